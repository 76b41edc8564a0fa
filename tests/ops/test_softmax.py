"""softmax / log_softmax over the last axis, with boolean or additive masks and fully masked rows; Gumbel-max sampling."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minielectra.gradcheck import check_op, format_table
from minielectra.ops.dropout import draw_seed, hashed_uniform
from minielectra.ops.softmax import (gumbel_sample, log_softmax_backward, log_softmax_forward, softmax_backward,
                                     softmax_forward)


def assert_rows_ok(rows):
    """Every row ok with rel error <= 1e-6; a gradient that is zero in theory (e.g. gelu' at x = -30 is 1e-114, the
    finite difference exactly 0: rel error 1) may pass on an absolute difference below 1e-9 instead."""
    for r in rows:
        assert r.ok and (r.rel_error <= 1e-6 or r.max_abs_diff <= 1e-9), format_table(rows)


def softmax_ref(x, keep=None):
    """By hand, row by row, in float64: exp(x - max over kept) / sum; zeros for a row with nothing kept."""
    x = np.asarray(x, dtype=np.float64)
    keep = np.ones(x.shape, bool) if keep is None else np.broadcast_to(keep, x.shape)
    out = np.zeros(x.shape)
    for idx in np.ndindex(x.shape[:-1]):
        row, k = x[idx], keep[idx]
        if not k.any():
            continue
        m = row[k].max()
        e = np.where(k, np.exp(np.where(k, row - m, 0.0)), 0.0)
        out[idx] = e / e.sum()
    return out


def _draw(seed, shape, scale, full_row=True):
    """x and a boolean keep-mask with at least one kept entry per row, and optionally one fully masked row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * scale
    keep = rng.random(shape) < 0.6
    keep[..., rng.integers(shape[-1])] = True
    if full_row and len(shape) > 1:
        keep.reshape(-1, shape[-1])[0] = False
    return x, keep


SHAPES = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(lambda s: (*s, s[-1] + 1))
SCALES = st.sampled_from([1e-3, 1.0, 10.0, 1000.0])
SEEDS = st.integers(0, 2**32 - 1)


# forward ----------------------------------------------------------------------------------------------------------------

def test_known_values():
    p, _ = softmax_forward(np.array([0.0, np.log(2.0), np.log(3.0)]))
    np.testing.assert_allclose(p, [1 / 6, 2 / 6, 3 / 6], rtol=1e-15)
    lp, _ = log_softmax_forward(np.array([0.0, np.log(2.0), np.log(3.0)]))
    np.testing.assert_allclose(lp, np.log([1 / 6, 2 / 6, 3 / 6]), rtol=1e-15)
    p, _ = softmax_forward(np.zeros((2, 4)))
    np.testing.assert_array_equal(p, np.full((2, 4), 0.25))


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, shape=SHAPES, scale=SCALES)
def test_rows_sum_to_one_and_match_the_reference(seed, shape, scale):
    x = np.random.default_rng(seed).standard_normal(shape) * scale
    p, cache = softmax_forward(x)
    assert p.shape == x.shape
    assert (p >= 0).all() and (p <= 1).all()
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-14)
    np.testing.assert_allclose(p, softmax_ref(x), rtol=1e-13, atol=1e-300)
    assert cache.probs is p or np.array_equal(cache.probs, p)


@settings(max_examples=20, deadline=None)
@given(seed=SEEDS, shape=SHAPES, scale=st.sampled_from([1.0, 10.0]))
def test_shift_invariance(seed, shape, scale):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * scale
    c = rng.uniform(-500, 500, shape[:-1] + (1,))  # one shift per row
    np.testing.assert_allclose(softmax_forward(x + c)[0], softmax_forward(x)[0], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(log_softmax_forward(x + c)[0], log_softmax_forward(x)[0], rtol=1e-9, atol=1e-10)


def test_plus_minus_1000_stable_and_exact():
    x = np.array([[1000.0, -1000.0, 999.0], [-1000.0, -1000.0, -1000.0], [1000.0, 1000.0, -1000.0]])
    p, _ = softmax_forward(x)
    e = np.exp(-1.0)
    expected = np.array([[1 / (1 + e), 0.0, e / (1 + e)], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]])
    np.testing.assert_allclose(p, expected, rtol=1e-15, atol=0)
    np.testing.assert_allclose(p, softmax_ref(x), rtol=1e-15, atol=0)
    lp, _ = log_softmax_forward(x)
    expected_log = np.array([[-np.log1p(e), -2000.0 - np.log1p(e), -1.0 - np.log1p(e)],
                             [-np.log(3.0)] * 3, [-np.log(2.0), -np.log(2.0), -2000.0 - np.log(2.0)]])
    np.testing.assert_allclose(lp, expected_log, rtol=1e-15)
    assert np.isfinite(lp).all()
    assert lp[0, 1] == -2000.0 - np.log1p(e)  # no exp(-2000) underflow turned into log(0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plus_minus_1000_backward_finite(dtype):
    x = np.array([[1000.0, -1000.0, 1000.0]], dtype=dtype)
    p, cache = softmax_forward(x)
    np.testing.assert_array_equal(p, np.array([[0.5, 0.0, 0.5]], dtype=dtype))
    dx = softmax_backward(np.array([[1.0, 2.0, 3.0]], dtype=dtype), cache)
    np.testing.assert_allclose(dx, [[-0.5, 0.0, 0.5]], rtol=1e-6)  # p * (dout - 2)
    lp, cache = log_softmax_forward(x)
    np.testing.assert_allclose(lp, [[-np.log(2), -2000 - np.log(2), -np.log(2)]], rtol=1e-6)
    dx = log_softmax_backward(np.array([[1.0, 2.0, 3.0]], dtype=dtype), cache)
    np.testing.assert_allclose(dx, [[1 - 3.0, 2.0, 3 - 3.0]], rtol=1e-6)  # dout - p * 6


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, shape=SHAPES, scale=SCALES)
def test_boolean_and_additive_masks_agree_and_masked_entries_get_zero(seed, shape, scale):
    x, keep = _draw(seed, shape, scale)
    additive = np.where(keep, 0.0, -np.inf)
    dout = np.random.default_rng(seed + 1).standard_normal(shape)
    pb, cb = softmax_forward(x, keep)
    pa, ca = softmax_forward(x, additive)
    np.testing.assert_array_equal(pb, pa)
    assert (pb[~keep] == 0).all()
    np.testing.assert_allclose(pb, softmax_ref(x, keep), rtol=1e-13, atol=1e-300)
    np.testing.assert_array_equal(softmax_backward(dout, cb), softmax_backward(dout, ca))
    assert (softmax_backward(dout, cb)[~keep] == 0).all()
    lb, lcb = log_softmax_forward(x, keep)
    la, lca = log_softmax_forward(x, additive)
    np.testing.assert_array_equal(lb, la)
    assert (lb[~keep] == 0).all() and np.isfinite(lb).all()
    np.testing.assert_array_equal(log_softmax_backward(dout, lcb), log_softmax_backward(dout, lca))
    assert (log_softmax_backward(dout, lcb)[~keep] == 0).all()


def test_fully_masked_row_is_zero_forward_and_backward_without_nan_or_warning():
    x = np.array([[1.0, 2.0, 3.0], [1000.0, -1000.0, 5.0]])
    keep = np.array([[False, False, False], [True, False, True]])
    dout = np.array([[1.0, -2.0, 3.0], [0.5, 0.25, -1.0]])
    for mask in (keep, np.where(keep, 0.0, -np.inf)):
        p, cache = softmax_forward(x, mask)
        np.testing.assert_array_equal(p[0], 0.0)
        np.testing.assert_allclose(p[1], [1.0, 0.0, np.exp(-995.0)], rtol=1e-15, atol=0)
        dx = softmax_backward(dout, cache)
        np.testing.assert_array_equal(dx[0], 0.0)
        assert np.isfinite(dx).all()
        lp, lcache = log_softmax_forward(x, mask)
        np.testing.assert_array_equal(lp[0], 0.0)
        np.testing.assert_allclose(lp[1], [0.0, 0.0, -995.0], rtol=1e-15, atol=1e-300)
        dx = log_softmax_backward(dout, lcache)
        np.testing.assert_array_equal(dx[0], 0.0)
        np.testing.assert_array_equal(dx[1, 1], 0.0)
        assert np.isfinite(dx).all()


def test_mask_broadcasts_like_an_attention_padding_mask():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 4))  # (B, H, T, T)
    keep = np.array([[1, 1, 0, 1], [0, 0, 0, 0]], bool)[:, None, None, :]  # (B, 1, 1, T); sequence 1 all padding
    p, _ = softmax_forward(x, keep)
    assert p.shape == x.shape
    np.testing.assert_array_equal(p, softmax_forward(x, np.broadcast_to(keep, x.shape).copy())[0])
    np.testing.assert_array_equal(p[..., 2], 0.0)
    np.testing.assert_array_equal(p[1], 0.0)
    np.testing.assert_allclose(p[0].sum(-1), 1.0, rtol=1e-14)


@settings(max_examples=20, deadline=None)
@given(seed=SEEDS, shape=SHAPES, scale=st.sampled_from([1e-3, 1.0, 10.0]))
def test_log_softmax_equals_log_of_softmax_at_kept_entries(seed, shape, scale):
    x, keep = _draw(seed, shape, scale)
    for mask in (None, keep):
        p, _ = softmax_forward(x, mask)
        lp, _ = log_softmax_forward(x, mask)
        k = np.ones(shape, bool) if mask is None else keep
        np.testing.assert_allclose(lp[k], np.log(p[k]), rtol=1e-12, atol=1e-14)


# backward ---------------------------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, shape=SHAPES, scale=st.sampled_from([1e-3, 0.3, 1.0, 2.0]),
       offset=st.sampled_from([0.0, 1000.0, -1000.0]), kind=st.sampled_from(["none", "bool", "additive"]))
def test_grads(seed, shape, scale, offset, kind):
    # Moderate spreads (a saturated row has a gradient ~exp(-spread), below the finite difference's noise floor),
    # but rows offset to +-1000, where the max-subtraction must keep everything finite and exact.
    x, keep = _draw(seed, shape, scale)
    x += offset
    mask = {"none": None, "bool": keep, "additive": np.where(keep, 0.0, -np.inf)}[kind]
    assert_rows_ok(check_op(softmax_forward, softmax_backward, {"x": x, "mask": mask}, ["x"]))
    assert_rows_ok(check_op(log_softmax_forward, log_softmax_backward, {"x": x, "mask": mask}, ["x"]))


def test_grads_with_a_finite_additive_mask_and_a_fully_masked_row():
    x, keep = _draw(3, (3, 5), 2.0)
    additive = np.where(keep, 0.0, -30.0)  # finite: these entries stay in the softmax with a tiny weight
    assert_rows_ok(check_op(softmax_forward, softmax_backward, {"x": x, "mask": additive}, ["x"]))
    assert_rows_ok(check_op(log_softmax_forward, log_softmax_backward, {"x": x, "mask": additive}, ["x"]))
    x, keep = _draw(4, (4, 6, 7), 3.0)  # 168 entries: directional
    assert_rows_ok(check_op(softmax_forward, softmax_backward, {"x": x, "mask": keep}, ["x"]))
    assert_rows_ok(check_op(log_softmax_forward, log_softmax_backward, {"x": x, "mask": keep}, ["x"]))


# dtype ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_float32_in_float32_out(mask_kind):
    x, keep = _draw(0, (3, 5), 10.0)
    x = x.astype(np.float32)
    mask = {"none": None, "bool": keep, "additive": np.where(keep, 0.0, -np.inf).astype(np.float32)}[mask_kind]
    p, cache = softmax_forward(x, mask)
    assert p.dtype == np.float32
    assert softmax_backward(np.ones_like(p), cache).dtype == np.float32
    np.testing.assert_allclose(p, softmax_ref(x, None if mask is None else keep), rtol=1e-5, atol=1e-7)
    lp, cache = log_softmax_forward(x, mask)
    assert lp.dtype == np.float32
    assert log_softmax_backward(np.ones_like(lp), cache).dtype == np.float32


# bad input --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("forward", [softmax_forward, log_softmax_forward])
def test_bad_input_names_the_argument(forward):
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match="mask"):
        forward(x, np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="mask"):
        forward(x, np.ones(2, bool))
    with pytest.raises(TypeError, match=r"^mask\b"):
        forward(x, np.ones((2, 3), np.int64))
    with pytest.raises(TypeError, match=r"^x\b"):
        forward(np.zeros((2, 3), np.int64))


@pytest.mark.parametrize("forward", [softmax_forward, log_softmax_forward])
def test_mask_that_broadcasts_x_to_a_bigger_shape_is_rejected(forward):
    with pytest.raises(ValueError, match="mask"):
        forward(np.zeros((2, 4)), np.ones((3, 2, 4), bool))


# ---- gumbel_sample: a draw from softmax(logits / t) per row ---------------------------------------------------------


def test_gumbel_max_samples_from_the_softmax():
    logits = np.log(np.array([[0.5, 0.3, 0.2]] * 20000, dtype=np.float32))
    s = gumbel_sample(logits, 1.0, np.random.default_rng(0))
    assert s.shape == (20000,) and s.dtype == np.int64
    freq = np.bincount(s, minlength=3) / len(s)
    assert np.allclose(freq, [0.5, 0.3, 0.2], atol=0.015)  # 4 standard deviations of a frequency is 0.014
    sharp = gumbel_sample(logits, 0.05, np.random.default_rng(0))  # low temperature: almost always the argmax
    assert (sharp == 0).mean() > 0.99
    flat = gumbel_sample(np.log(np.array([[0.9, 0.1]] * 20000)), 1e3, np.random.default_rng(1))  # float64, t high
    assert abs(np.mean(flat) - 0.5) < 0.015


def test_gumbel_sample_is_the_argmax_of_the_hashed_noise():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((7, 11)).astype(np.float32) * 1000
    seed = draw_seed(np.random.default_rng(3))
    u = hashed_uniform(np, seed, logits.shape)
    g = -np.log(-np.log(u + np.float32(1e-9)) + np.float32(1e-9))
    np.testing.assert_array_equal(gumbel_sample(logits, 2.0, np.random.default_rng(3)),
                                  np.argmax(logits / np.float32(2.0) + g, axis=-1))
    used, one_draw = np.random.default_rng(3), np.random.default_rng(3)
    gumbel_sample(logits, 2.0, used)
    draw_seed(one_draw)
    assert used.random() == one_draw.random()  # the sampler took exactly the seed from rng


def test_gumbel_sample_rows_and_seeds_differ():
    logits = np.zeros((1000, 50), np.float32)  # uniform over 50 tokens
    a = gumbel_sample(logits, 1.0, np.random.default_rng(0))
    b = gumbel_sample(logits, 1.0, np.random.default_rng(1))
    assert len(set(a.tolist())) == 50 and (a != b).mean() > 0.9
    np.testing.assert_array_equal(a, gumbel_sample(logits, 1.0, np.random.default_rng(0)))


@pytest.mark.parametrize("logits, t, exc, match", [
    (np.zeros((2, 3), np.int64), 1.0, TypeError, "^logits"),
    (np.zeros(3, np.float32), 1.0, ValueError, "^logits"),
    (np.zeros((3, 0), np.float32), 1.0, ValueError, "^logits"),
    (np.zeros((2, 3), np.float32), 0.0, ValueError, "^temperature"),
    (np.zeros((2, 3), np.float32), -1.0, ValueError, "^temperature"),
])
def test_gumbel_sample_bad_input(logits, t, exc, match):
    with pytest.raises(exc, match=match):
        gumbel_sample(logits, t, np.random.default_rng(0))
