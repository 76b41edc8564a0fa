"""Scaled dot-product attention with a padding mask and dropout, and multi-head self-attention around it."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minielectra import backend
from minielectra.gradcheck import check_op, format_table
from minielectra.ops.attention import attention_backward, attention_forward, key_mask, mha_backward, mha_forward
from minielectra.ops.dropout import draw_seed, drop_threshold, hashed_keep_mask


def assert_rows_ok(rows):
    """Every row ok with rel error <= 1e-6; a gradient that is zero in theory (e.g. gelu' at x = -30 is 1e-114, the
    finite difference exactly 0: rel error 1) may pass on an absolute difference below 1e-9 instead."""
    for r in rows:
        assert r.ok and (r.rel_error <= 1e-6 or r.max_abs_diff <= 1e-9), format_table(rows)


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    """mha_forward dispatches attention: whatever $MINIELECTRA_BACKEND says, these tests check the NumPy reference."""
    monkeypatch.setattr(backend, "_active", "numpy")


def attention_ref(q, k, v, mask=None):
    """Per batch, per head, per query: softmax(q k^T / sqrt(D)) with -inf at padded keys, times v; 0 if all padded."""
    B, H, T, D = q.shape
    out = np.zeros((B, H, T, D))
    probs = np.zeros((B, H, T, T))
    for b in range(B):
        for h in range(H):
            for i in range(T):
                s = np.array([float(np.dot(q[b, h, i], k[b, h, j])) / math.sqrt(D) for j in range(T)])
                if mask is not None:
                    s[mask[b] == 0] = -np.inf
                if np.isneginf(s).all():
                    continue
                e = np.exp(s - s.max())
                probs[b, h, i] = e / e.sum()
                out[b, h, i] = probs[b, h, i] @ v[b, h]
    return out, probs


def mha_ref(x, Wq, bq, Wk, bk, Wv, bv, Wo, bo, mask, H):
    B, T, C = x.shape
    D = C // H
    q, k, v = x @ Wq + bq, x @ Wk + bk, x @ Wv + bv
    heads = []
    for h in range(H):
        cols = slice(h * D, (h + 1) * D)  # head h owns channels h*D .. (h+1)*D - 1
        o, _ = attention_ref(q[None, :, :, cols].transpose(1, 0, 2, 3), k[None, :, :, cols].transpose(1, 0, 2, 3),
                             v[None, :, :, cols].transpose(1, 0, 2, 3), mask)  # (B, 1, T, D)
        heads.append(o[:, 0])
    return np.concatenate(heads, axis=-1) @ Wo + bo


def _mask(rng, B, T, full_pad, min_real=1):
    mask = (rng.random((B, T)) < 0.7).astype(np.int64)
    mask[:, :min_real] = 1
    if full_pad:
        mask[-1] = 0
    return mask


def _qkv(seed, B, H, T, D, scale=1.0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((B, H, T, D)) * scale for _ in range(3)]


MHA_NAMES = ["x", "Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo", "bo"]


def _mha_inputs(seed, B, T, H, D, scale=1.0):
    rng = np.random.default_rng(seed)
    C = H * D
    inputs = {"x": rng.standard_normal((B, T, C)) * scale}
    for n in ("q", "k", "v", "o"):
        inputs[f"W{n}"] = rng.standard_normal((C, C)) / math.sqrt(C)
        inputs[f"b{n}"] = rng.standard_normal(C) * 0.5
    return inputs


# attention_forward ------------------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, 5),
       D=st.integers(1, 4), scale=st.sampled_from([0.1, 1.0, 5.0, 30.0]), masked=st.booleans(),
       full_pad=st.booleans())
def test_forward_equals_naive_loop(seed, B, H, T, D, scale, masked, full_pad):
    q, k, v = _qkv(seed, B, H, T, D, scale)
    mask = _mask(np.random.default_rng(seed), B, T, full_pad) if masked else None
    out, cache = attention_forward(q, k, v, mask)
    ref, ref_probs = attention_ref(q, k, v, mask)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10 * scale)
    np.testing.assert_allclose(cache.probs, ref_probs, rtol=1e-10, atol=1e-14)
    if mask is not None:
        assert (cache.probs[np.broadcast_to((mask == 0)[:, None, None, :], cache.probs.shape)] == 0).all()


def test_padded_keys_get_exactly_zero_weight_even_with_huge_scores():
    q, k, v = _qkv(0, 2, 2, 4, 3)
    k[:, :, 2] = 1000.0  # key 2 would dominate every query ...
    q[:] = np.abs(q)
    mask = np.array([[1, 1, 0, 1], [1, 0, 0, 1]])  # ... but it is padding
    out, cache = attention_forward(q, k, v, mask)
    np.testing.assert_array_equal(cache.probs[:, :, :, 2], 0.0)
    np.testing.assert_array_equal(cache.probs[1, :, :, 1], 0.0)
    np.testing.assert_allclose(cache.probs.sum(-1), 1.0, rtol=1e-14)
    np.testing.assert_allclose(out, attention_ref(q, k, v, mask)[0], rtol=1e-10, atol=1e-12)


def test_t1_h1_d1():
    q, k, v = (np.array([[[[x]]], [[[x + 1]]]]) for x in (2.0, -3.0, 5.0))  # (2, 1, 1, 1)
    out, cache = attention_forward(q, k, v)
    np.testing.assert_array_equal(out, v)  # one key: weight 1
    out, cache = attention_forward(q, k, v, np.array([[1], [0]]))
    np.testing.assert_array_equal(out, [[[[5.0]]], [[[0.0]]]])
    dq, dk, dv = attention_backward(np.ones_like(out), cache)
    np.testing.assert_array_equal(dv, [[[[1.0]]], [[[0.0]]]])
    np.testing.assert_array_equal(dq, 0.0)
    np.testing.assert_array_equal(dk, 0.0)


def test_known_two_token_case():
    # D = 1, scores q k / 1: query 0 scores (0, ln 3) -> weights (1/4, 3/4)
    q = np.array([0.0, 1.0]).reshape(1, 1, 2, 1)
    k = np.array([0.0, np.log(3.0)]).reshape(1, 1, 2, 1)
    v = np.array([4.0, 8.0]).reshape(1, 1, 2, 1)
    out, cache = attention_forward(q, k, v)
    np.testing.assert_allclose(cache.probs[0, 0], [[0.5, 0.5], [1 / 4, 3 / 4]], rtol=1e-15)
    np.testing.assert_allclose(out.ravel(), [6.0, 7.0], rtol=1e-15)


def test_fully_padded_sequence_gives_zero_output_and_finite_grads():
    q, k, v = _qkv(1, 2, 2, 3, 2, scale=1000.0)
    mask = np.array([[1, 1, 0], [0, 0, 0]])
    out, cache = attention_forward(q, k, v, mask)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_array_equal(cache.probs[1], 0.0)
    assert np.isfinite(out).all()
    grads = attention_backward(np.ones_like(out), cache)
    for g in grads:
        assert np.isfinite(g).all()
        np.testing.assert_array_equal(g[1], 0.0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 2), H=st.integers(1, 2), T=st.integers(1, 4),
       D=st.integers(1, 3), scale=st.sampled_from([1e-3, 1.0, 1000.0]), p_drop=st.sampled_from([0.0, 0.3]),
       masked=st.booleans(), full_pad=st.booleans())
def test_grads_of_q_k_v(seed, B, H, T, D, scale, p_drop, masked, full_pad):
    # q and k stay O(1): saturated weights have gradients ~exp(-score spread), below the finite-difference noise floor
    q, k, v = _qkv(seed, B, H, T, D)
    v *= scale
    mask = _mask(np.random.default_rng(seed), B, T, full_pad, min_real=2) if masked else None

    def forward(q, k, v):  # a fresh Generator per call: every probe sees the same dropout mask
        return attention_forward(q, k, v, mask, p_drop, np.random.default_rng(seed) if p_drop else None)

    assert_rows_ok(check_op(forward, attention_backward, {"q": q, "k": k, "v": v}, ["q", "k", "v"]))


@pytest.mark.parametrize("p_drop", [0.0, 0.3])
def test_grads_directional_with_padding(p_drop):
    q, k, v = _qkv(2, 2, 2, 5, 4)  # 80 entries each: directional
    mask = np.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])

    def forward(q, k, v):
        return attention_forward(q, k, v, mask, p_drop, np.random.default_rng(3))

    assert_rows_ok(check_op(forward, attention_backward, {"q": q, "k": k, "v": v}, ["q", "k", "v"]))


def test_dropout_acts_on_the_weights_and_cache_keeps_them_before_dropout():
    q, k, v = _qkv(4, 2, 2, 6, 3)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    out, cache = attention_forward(q, k, v, mask, 0.5, np.random.default_rng(5))
    _, ref_probs = attention_ref(q, k, v, mask)
    np.testing.assert_allclose(cache.probs, ref_probs, rtol=1e-12, atol=1e-15)
    scale = cache.dropout.scale
    assert set(np.unique(scale)) == {0.0, 2.0}
    np.testing.assert_allclose(out, (ref_probs * scale) @ v, rtol=1e-12, atol=1e-14)
    assert not np.allclose(out, attention_ref(q, k, v, mask)[0])
    with pytest.raises(TypeError, match="Generator"):
        attention_forward(q, k, v, mask, 0.5, None)


def test_dropout_mask_is_the_hash_of_one_seed_drawn_from_the_generator():
    """The weights' mask is hashed_keep_mask of one uint64 draw (what the Numba and CUDA kernels recompute); the cache
    records seed and threshold, cache.keep rebuilds the mask, and the Generator moves on by that one draw."""
    q, k, v = _qkv(8, 2, 3, 7, 4)
    rng, twin = np.random.default_rng(9), np.random.default_rng(9)
    _, cache = attention_forward(q, k, v, None, 0.25, rng)
    seed = draw_seed(twin)
    assert (cache.seed, cache.threshold) == (seed, drop_threshold(0.25))
    keep = hashed_keep_mask(np, seed, (2, 3, 7, 7), drop_threshold(0.25))
    np.testing.assert_array_equal(cache.keep, keep)
    np.testing.assert_array_equal(cache.dropout.scale, keep / 0.75)
    assert 0 < keep.mean() < 1 and rng.random() == twin.random()
    _, cache = attention_forward(q, k, v)
    assert cache.keep is None and cache.threshold == 0


def test_attention_float32_in_float32_out():
    q, k, v = (a.astype(np.float32) for a in _qkv(6, 2, 2, 3, 4))
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    out, cache = attention_forward(q, k, v, mask, 0.2, np.random.default_rng(0))
    assert out.dtype == np.float32 and cache.probs.dtype == np.float32
    assert all(g.dtype == np.float32 for g in attention_backward(np.ones_like(out), cache))
    out, _ = attention_forward(q, k, v, mask)
    np.testing.assert_allclose(out, attention_ref(q, k, v, mask)[0], rtol=1e-5, atol=1e-5)


def test_key_mask():
    assert key_mask(None, 2, 3) is None
    m = key_mask(np.array([[1, 0, 2], [0, 0, 1]]), 2, 3)
    assert m.shape == (2, 1, 1, 3) and m.dtype == bool
    np.testing.assert_array_equal(m[:, 0, 0], [[True, False, True], [False, False, True]])


def test_attention_bad_input_names_the_argument():
    q = np.zeros((1, 1, 2, 3))
    with pytest.raises(ValueError, match=r"^q must have shape"):
        attention_forward(q[0], q[0], q[0])
    with pytest.raises(ValueError, match=r"^k must have shape"):
        attention_forward(q, np.zeros((1, 1, 3, 3)), q)
    with pytest.raises(ValueError, match=r"^v must have shape"):
        attention_forward(q, q, np.zeros((1, 1, 2, 4)))
    with pytest.raises(TypeError, match=r"^v\b"):
        attention_forward(q, q, q.astype(np.int32))
    with pytest.raises(ValueError, match="mask"):
        attention_forward(q, q, q, np.ones((1, 3)))
    with pytest.raises(ValueError, match="mask"):
        attention_forward(q, q, q, np.ones((2,)))


# mha --------------------------------------------------------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 2), T=st.integers(2, 4), H=st.integers(1, 2),
       D=st.integers(2, 3), full_pad=st.booleans(), p_drop=st.sampled_from([0.0, 0.2]))
def test_mha_grads_of_x_and_all_8_params(seed, B, T, H, D, full_pad, p_drop):
    # At least two real keys and two channels: with one key (or a 1 x 1 Wk) the query/key gradients can be a single
    # near-cancelling number below the finite difference's noise floor (T = 1, D = 1 are covered by the forward tests).
    inputs = _mha_inputs(seed, B, T, H, D)
    inputs.update(mask=_mask(np.random.default_rng(seed), B, T, full_pad, min_real=2), n_heads=H, p_drop=p_drop)

    def forward(**kw):  # a fresh Generator per call
        return mha_forward(**kw, rng=np.random.default_rng(seed))

    assert_rows_ok(check_op(forward, mha_backward, inputs, MHA_NAMES))


def test_mha_grads_directional():
    inputs = _mha_inputs(7, 2, 5, 2, 3)  # x 60 -> elementwise; W 36 each; plus a bigger x below
    inputs["x"] = np.random.default_rng(8).standard_normal((3, 5, 6))  # 90 entries: directional
    inputs.update(mask=np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]), n_heads=2)
    assert_rows_ok(check_op(mha_forward, mha_backward, inputs, MHA_NAMES))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 3), T=st.integers(1, 5), H=st.integers(1, 3),
       D=st.integers(1, 3), full_pad=st.booleans())
def test_mha_forward_equals_per_head_reference_and_exposes_probs(seed, B, T, H, D, full_pad):
    inputs = _mha_inputs(seed, B, T, H, D)
    mask = _mask(np.random.default_rng(seed), B, T, full_pad)
    out, cache = mha_forward(**inputs, mask=mask, n_heads=H)
    assert out.shape == (B, T, H * D)
    ref = mha_ref(*(inputs[n] for n in MHA_NAMES), mask, H)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    assert cache.probs.shape == (B, H, T, T)
    assert cache.probs is cache.attn.probs
    for b in range(B):
        if mask[b].any():
            np.testing.assert_allclose(cache.probs[b].sum(-1), 1.0, rtol=1e-14)
            np.testing.assert_array_equal(cache.probs[b][..., mask[b] == 0], 0.0)
        else:
            np.testing.assert_array_equal(cache.probs[b], 0.0)
            np.testing.assert_allclose(out[b], np.broadcast_to(inputs["bo"], (T, H * D)), rtol=1e-15)


def test_mha_plus_minus_1000_inputs_stay_finite():
    inputs = _mha_inputs(9, 2, 3, 2, 2, scale=1000.0)
    mask = np.array([[1, 0, 1], [0, 0, 0]])
    out, cache = mha_forward(**inputs, mask=mask, n_heads=2)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, mha_ref(*(inputs[n] for n in MHA_NAMES), mask, 2), rtol=1e-9, atol=1e-9)
    assert all(np.isfinite(g).all() for g in mha_backward(np.ones_like(out), cache))


def test_mha_float32_in_float32_out():
    inputs = {n: a.astype(np.float32) for n, a in _mha_inputs(10, 2, 3, 2, 2).items()}
    out, cache = mha_forward(**inputs, mask=np.array([[1, 1, 0], [1, 0, 0]]), n_heads=2, p_drop=0.1,
                             rng=np.random.default_rng(0))
    assert out.dtype == np.float32
    grads = mha_backward(np.ones_like(out), cache)
    assert len(grads) == 9
    assert all(g.dtype == np.float32 for g in grads)


def test_mha_bad_input():
    inputs = _mha_inputs(11, 2, 3, 2, 2)  # C = 4
    with pytest.raises(ValueError, match="n_heads"):
        mha_forward(**inputs, n_heads=3)
    with pytest.raises(ValueError, match="n_heads"):
        mha_forward(**inputs, n_heads=0)
    with pytest.raises(ValueError, match="mask"):
        mha_forward(**inputs, mask=np.ones((2, 4)), n_heads=2)
    with pytest.raises(ValueError, match="mask"):
        mha_forward(**inputs, mask=np.ones((3, 2)), n_heads=2)
    with pytest.raises(ValueError, match=r"^x must have shape"):
        mha_forward(**{**inputs, "x": inputs["x"][0]}, n_heads=2)
    with pytest.raises(TypeError, match=r"^x\b"):
        mha_forward(**{**inputs, "x": inputs["x"].astype(np.int64)}, n_heads=2)
    with pytest.raises(ValueError, match="NaN"):
        mha_forward(**{**inputs, "Wq": np.full((4, 4), np.nan)}, n_heads=2)


@pytest.mark.parametrize("name, value", [("bq", np.zeros(5)), ("Wv", np.full((4, 4), np.nan))])
def test_mha_bad_parameter_message_names_it(name, value):
    inputs = _mha_inputs(12, 2, 3, 2, 2)
    inputs[name] = value
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        mha_forward(**inputs, n_heads=2)
