"""Inverted dropout: identity in eval, p of the entries zeroed, survivors scaled by 1 / (1 - p), replayable from a seed."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minielectra.gradcheck import check_op, format_table
from minielectra.ops import dropout
from minielectra.ops.dropout import dropout_backward, dropout_forward, drop_threshold, hashed_keep_mask


def assert_rows_ok(rows):
    """Every row ok with rel error <= 1e-6; a gradient that is zero in theory (e.g. gelu' at x = -30 is 1e-114, the
    finite difference exactly 0: rel error 1) may pass on an absolute difference below 1e-9 instead."""
    for r in rows:
        assert r.ok and (r.rel_error <= 1e-6 or r.max_abs_diff <= 1e-9), format_table(rows)


@pytest.mark.parametrize("p, train, rng", [(0.0, True, np.random.default_rng(0)), (0.0, True, None),
                                           (0.5, False, None), (0.5, False, np.random.default_rng(0))])
def test_identity_when_p_is_zero_or_not_training(p, train, rng):
    x = np.random.default_rng(1).standard_normal((3, 4))
    before = x.copy()
    out, cache = dropout_forward(x, p, rng, train=train)
    assert out is x or np.array_equal(out, before)
    assert cache.scale is None
    dout = np.random.default_rng(2).standard_normal((3, 4))
    np.testing.assert_array_equal(dropout_backward(dout, cache), dout)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_zero_fraction_scale_and_expectation(p):
    x = np.ones((1000, 1000))
    out, cache = dropout_forward(x, p, np.random.default_rng(3))
    dropped = out == 0
    assert abs(dropped.mean() - p) < 5e-3  # std of the fraction is sqrt(p (1 - p) / 1e6) < 5e-4
    np.testing.assert_allclose(out[~dropped], 1.0 / (1.0 - p), rtol=1e-15)
    assert abs(out.mean() - 1.0) < 2e-2  # expectation preserved
    # the backward uses the same mask and scale
    dx = dropout_backward(np.ones_like(x), cache)
    np.testing.assert_array_equal(dx == 0, dropped)
    np.testing.assert_array_equal(dx, out)


def test_survivors_are_the_input_scaled():
    x = np.random.default_rng(4).standard_normal((50, 40)) * 1000
    out, _ = dropout_forward(x, 0.25, np.random.default_rng(5))
    kept = out != 0
    assert 0 < kept.sum() < x.size
    np.testing.assert_allclose(out[kept], x[kept] * 4.0 / 3.0, rtol=1e-15)
    assert np.isfinite(out).all()


def test_same_seed_same_mask_different_seed_different_mask():
    x = np.ones((20, 30))
    a, _ = dropout_forward(x, 0.3, np.random.default_rng(11))
    b, _ = dropout_forward(x, 0.3, np.random.default_rng(11))
    c, _ = dropout_forward(x, 0.3, np.random.default_rng(12))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_successive_calls_on_one_generator_draw_fresh_masks():
    rng = np.random.default_rng(13)
    a, _ = dropout_forward(np.ones((20, 30)), 0.3, rng)
    b, _ = dropout_forward(np.ones((20, 30)), 0.3, rng)
    assert not np.array_equal(a, b)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       p=st.sampled_from([0.0, 0.1, 0.5, 0.9]), scale=st.sampled_from([1e-3, 1.0, 1000.0]))
def test_grads_with_a_fixed_seed(seed, shape, p, scale):
    x = np.random.default_rng(seed).standard_normal(shape) * scale

    def forward(x):  # a fresh Generator per call: every probe of the finite difference sees the same mask
        return dropout_forward(x, p, np.random.default_rng(seed))

    assert_rows_ok(check_op(forward, dropout_backward, {"x": x}, ["x"]))


@pytest.mark.parametrize("train", [True, False])
def test_float32_in_float32_out(train):
    x = np.ones((4, 5), dtype=np.float32)
    out, cache = dropout_forward(x, 0.5, np.random.default_rng(0), train=train)
    assert out.dtype == np.float32
    assert dropout_backward(np.ones_like(out), cache).dtype == np.float32
    if train:
        assert set(np.unique(out)) <= {0.0, 2.0}


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan")])
def test_p_outside_0_1_raises(p):
    with pytest.raises(ValueError, match=r"^p must be in \[0, 1\)"):
        dropout_forward(np.ones(3), p, np.random.default_rng(0))


@pytest.mark.parametrize("rng", [None, 0, np.random.RandomState(0)])
def test_missing_generator_raises(rng):
    with pytest.raises(TypeError, match="Generator"):
        dropout_forward(np.ones(3), 0.5, rng)


def test_int_input_names_x():
    with pytest.raises(TypeError, match=r"^x\b"):
        dropout_forward(np.arange(3), 0.5, np.random.default_rng(0))


# ---- the counter-based keep mask (attention dropout) -------------------------------------------------------------

M64 = 2**64 - 1


def splitmix64(seed, counter):
    """The hash of hashed_keep_mask for one counter, in Python integers: the readable definition the array version
    must equal."""
    z = (seed + counter * dropout.HASH_GOLDEN) & M64
    z = ((z ^ (z >> 30)) * dropout.HASH_MIX1) & M64
    z = ((z ^ (z >> 27)) * dropout.HASH_MIX2) & M64
    return z ^ (z >> 31)


def test_hash_is_splitmix64():
    """Seeded with 0, splitmix64 (Steele, Lea and Flood 2014; Vigna's reference C) starts 0xE220A8397B1DCDAF,
    0x6E789E6AA1B965F4: counters 1 and 2 of our hash. Flat index 0 uses counter 1, so its keep decision flips exactly
    at the top 24 bits of the first value."""
    assert splitmix64(0, 1) == 0xE220A8397B1DCDAF and splitmix64(0, 2) == 0x6E789E6AA1B965F4
    assert hashed_keep_mask(np, 0, (2,), 0xE220A8).tolist() == [True, False]  # 0x6E789E < 0xE220A8
    assert hashed_keep_mask(np, 0, (2,), 0xE220A9).tolist() == [False, False]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, M64), shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       p=st.sampled_from([0.1, 0.5, 0.9]))
def test_hashed_keep_mask_is_the_scalar_hash_of_the_flat_index(seed, shape, p):
    keep = hashed_keep_mask(np, seed, tuple(shape), drop_threshold(p))
    assert keep.shape == tuple(shape) and keep.dtype == bool
    want = [(splitmix64(seed, i + 1) >> 40) >= drop_threshold(p) for i in range(keep.size)]
    assert keep.ravel().tolist() == want


def test_hashed_keep_mask_keeps_one_minus_p_and_depends_on_the_seed():
    shape = (2, 3, 50, 50)
    for p in (0.1, 0.5, 0.9):
        keep = hashed_keep_mask(np, 12345, shape, drop_threshold(p))
        assert abs(keep.mean() - (1 - p)) < 4 * np.sqrt(p * (1 - p) / keep.size)
        # no structure along rows, columns or heads
        assert np.abs(keep.mean(axis=(0, 1, 2)) - (1 - p)).max() < 0.1
        assert np.abs(keep.mean(axis=(0, 2, 3)) - (1 - p)).max() < 0.05
    a = hashed_keep_mask(np, 1, shape, drop_threshold(0.5))
    np.testing.assert_array_equal(a, hashed_keep_mask(np, 1, shape, drop_threshold(0.5)))
    assert (a != hashed_keep_mask(np, 2, shape, drop_threshold(0.5))).mean() > 0.4
    assert hashed_keep_mask(np, 2**64 - 1, (1, 1, 3, 3), 1).shape == (1, 1, 3, 3)  # seeds use all 64 bits


def test_drop_threshold():
    assert drop_threshold(0.0) == 0 and drop_threshold(2**-30) == 1 and drop_threshold(0.5) == 2**23
    assert drop_threshold(0.1) == 1677722  # ceil(0.1 * 2^24): keeps 1 - 1677722 / 2^24, within 2^-24 of 0.9
    with pytest.raises(ValueError, match=r"^p must be in \[0, 1\)"):
        drop_threshold(1.0)


def test_draw_seed_takes_one_uint64_draw():
    rng, twin = np.random.default_rng(7), np.random.default_rng(7)
    seed = dropout.draw_seed(rng)
    assert seed == int(twin.integers(0, 2**64, dtype=np.uint64)) and 0 <= seed <= M64
    assert rng.random() == twin.random()
    with pytest.raises(TypeError, match="Generator"):
        dropout.draw_seed(None)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, M64), shape=st.lists(st.integers(1, 6), min_size=1, max_size=3))
def test_hashed_uniform_is_the_hash_s_top_24_bits_over_2_to_the_24(seed, shape):
    u = dropout.hashed_uniform(np, seed, tuple(shape))
    assert u.shape == tuple(shape) and u.dtype == np.float32
    want = [(splitmix64(seed, i + 1) >> 40) / 2**24 for i in range(u.size)]
    assert u.ravel().tolist() == want  # exact: 24-bit integers times a power of two are float32 numbers


def test_hashed_uniform_is_uniform_on_0_1():
    u = dropout.hashed_uniform(np, 99, (400, 500)).astype(np.float64)
    assert u.min() >= 0 and u.max() < 1
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    expected = u.size / 20
    assert ((counts - expected) ** 2 / expected).sum() < 60  # chi-square, 19 degrees of freedom: p < 1e-5
    assert abs(np.corrcoef(u[:, :-1].ravel(), u[:, 1:].ravel())[0, 1]) < 0.01  # neighbours independent


def test_hash_is_the_same_in_host_chunks_and_across_their_boundaries(monkeypatch):
    whole = [splitmix64(5, i + 1) >> 40 for i in range(70)]
    monkeypatch.setattr(dropout, "HOST_CHUNK", 16)  # 70 entries: four full chunks and a partial one
    assert dropout._hash_bits(np, 5, (7, 10)).ravel().tolist() == whole
