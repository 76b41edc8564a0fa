"""Layer norm over the last axis: normalised statistics, closed form, grads, +-1000, constant rows, eps; the fused
sublayer end LN(residual + dropout(x)); and the embeddings' end dropout(LN(x))."""

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from minielectra.gradcheck import check_op, format_table
from minielectra.ops.dropout import draw_seed, drop_threshold, hashed_keep_mask
from minielectra.ops.layernorm import (LAYER_NORM_EPS, dropout_add_layernorm_backward, dropout_add_layernorm_forward,
                                       layernorm_backward, layernorm_dropout_backward, layernorm_dropout_forward,
                                       layernorm_forward)


def assert_rows_ok(rows):
    """Every row ok with rel error <= 1e-6; a gradient that is zero in theory (e.g. gelu' at x = -30 is 1e-114, the
    finite difference exactly 0: rel error 1) may pass on an absolute difference below 1e-9 instead."""
    for r in rows:
        assert r.ok and (r.rel_error <= 1e-6 or r.max_abs_diff <= 1e-9), format_table(rows)


SEEDS = st.integers(0, 2**32 - 1)
LEAD = st.lists(st.integers(1, 3), min_size=0, max_size=2)
# Not below 0.1: the third derivative grows like 1 / std^3, so at std 0.01 the centred difference with h = 1e-5 is
# itself wrong by ~(h / std)^2 = 1e-6 (the test's limit, not the op's).
SCALES = st.sampled_from([0.1, 1.0, 30.0, 1000.0])


def _inputs(seed, lead, C, scale):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((*lead, C))
    z -= z.mean(-1, keepdims=True)
    z /= z.std(-1, keepdims=True)  # every row spread exactly `scale`: a near-constant row is ill-conditioned (eps)
    x = z * scale + rng.standard_normal((*lead, 1)) * scale  # rows with a nonzero mean too
    gamma = 1.0 + 0.5 * rng.standard_normal(C)
    beta = 0.5 * rng.standard_normal(C)
    return x, gamma, beta


def test_eps_is_bert_s():
    assert LAYER_NORM_EPS == 1e-12


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, lead=LEAD, C=st.integers(2, 9), scale=SCALES)
def test_mean_zero_var_one_before_affine(seed, lead, C, scale):
    x, _, _ = _inputs(seed, lead, C, scale)
    y, cache = layernorm_forward(x, np.ones(C), np.zeros(C))
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-6)
    np.testing.assert_allclose(y.var(-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(cache.xhat, y)


def test_closed_form():
    x = np.array([[1.0, 2.0, 3.0, 4.0]])
    gamma = np.array([1.0, 2.0, -1.0, 0.5])
    beta = np.array([0.0, 1.0, 0.0, -1.0])
    y, cache = layernorm_forward(x, gamma, beta)
    xhat = np.array([-1.5, -0.5, 0.5, 1.5]) / np.sqrt(1.25 + 1e-12)  # mean 2.5, biased variance 1.25
    np.testing.assert_allclose(cache.xhat, [xhat], rtol=1e-15)
    np.testing.assert_allclose(y, [xhat * gamma + beta], rtol=1e-15)
    np.testing.assert_allclose(cache.rstd, [[1 / np.sqrt(1.25)]], rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_plus_minus_1000(dtype):
    x = np.array([[1000.0, -1000.0, 1000.0, -1000.0], [1000.0, 1000.0, 1000.0, -1000.0]], dtype=dtype)
    C = 4
    y, cache = layernorm_forward(x, np.ones(C, dtype), np.zeros(C, dtype))
    # row 2: mean 500, deviations (500, 500, 500, -1500), std 866.0254..: xhat = (1, 1, 1, -3) / sqrt(3)
    expected = np.array([[1.0, -1.0, 1.0, -1.0], np.array([1.0, 1.0, 1.0, -3.0]) / np.sqrt(3.0)])
    np.testing.assert_allclose(y, expected, rtol=1e-6 if dtype == np.float32 else 1e-14)
    dx, dgamma, dbeta = layernorm_backward(np.ones_like(x) * np.arange(4, dtype=dtype), cache)
    for g in (dx, dgamma, dbeta):
        assert np.isfinite(g).all() and g.dtype == dtype


@pytest.mark.parametrize("value", [0.0, 3.0, 1000.0, -1000.0])
def test_constant_row_gives_beta_and_finite_grads(value):
    x = np.full((2, 4), value)
    x[1] = np.array([1.0, 2.0, 3.0, 5.0])
    beta = np.array([0.1, -0.2, 0.3, 0.0])
    y, cache = layernorm_forward(x, np.array([2.0, 1.0, -1.0, 3.0]), beta)
    np.testing.assert_array_equal(y[0], beta)  # xhat = 0 exactly: these values average exactly
    dx, dgamma, dbeta = layernorm_backward(np.random.default_rng(0).standard_normal((2, 4)), cache)
    assert all(np.isfinite(g).all() for g in (dx, dgamma, dbeta))


def test_constant_row_with_an_inexact_mean_is_still_about_zero():
    x = np.full((1, 3), 0.1)  # (0.1 + 0.1 + 0.1) / 3 != 0.1 in binary: x - mean ~ 1e-17, times rstd 1e6
    y, cache = layernorm_forward(x, np.ones(3), np.zeros(3))
    np.testing.assert_allclose(y, 0.0, atol=1e-9)
    assert all(np.isfinite(g).all() for g in layernorm_backward(np.ones((1, 3)), cache))


def test_eps_is_configurable_and_matters_for_small_variance():
    x = np.array([[0.0, 1e-4]])  # variance 2.5e-9
    C = 2
    y12, _ = layernorm_forward(x, np.ones(C), np.zeros(C))
    y3, _ = layernorm_forward(x, np.ones(C), np.zeros(C), eps=1e-3)
    np.testing.assert_allclose(y12, [[-1.0, 1.0]], rtol=1e-3)
    np.testing.assert_allclose(y3, [[-5e-5, 5e-5]] / np.sqrt(2.5e-9 + 1e-3), rtol=1e-12)
    assert abs(y3[0, 1]) < 2e-3
    big = np.array([[0.0, 10.0]])  # variance 25: eps makes no visible difference
    np.testing.assert_allclose(layernorm_forward(big, np.ones(C), np.zeros(C), eps=1e-3)[0], [[-1.0, 1.0]], rtol=1e-4)


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, lead=LEAD, C=st.integers(3, 8), scale=st.sampled_from([0.1, 1.0, 30.0]),
       offset=st.sampled_from([0.0, 1000.0, -1000.0]))
def test_grads_of_x_gamma_beta(seed, lead, C, scale, offset):
    # dx ~ gamma / spread: at a spread of 1000 it nears the finite difference's noise floor, so +-1000 enters as the
    # rows' mean here (and as the spread in the forward and finiteness tests).
    x, gamma, beta = _inputs(seed, lead, C, scale)
    x += offset
    rows = check_op(layernorm_forward, layernorm_backward, {"x": x, "gamma": gamma, "beta": beta},
                    ["x", "gamma", "beta"])
    assert_rows_ok(rows)


def test_two_channels_normalise_to_plus_minus_one_whose_x_gradient_vanishes():
    x = np.array([[3.0, 7.0], [-1000.0, 1000.0]])
    y, cache = layernorm_forward(x, np.ones(2), np.zeros(2))
    np.testing.assert_allclose(y, [[-1.0, 1.0], [-1.0, 1.0]], rtol=1e-12)
    dx, _, _ = layernorm_backward(np.array([[1.0, 5.0], [-2.0, 0.5]]), cache)
    np.testing.assert_allclose(dx, 0.0, atol=1e-12)


def test_grads_directional_and_with_a_large_eps_on_a_constant_row():
    x, gamma, beta = _inputs(1, (3, 4), 12, 1.0)  # 144 entries: directional
    assert_rows_ok(check_op(layernorm_forward, layernorm_backward, {"x": x, "gamma": gamma, "beta": beta},
                            ["x", "gamma", "beta"]))
    # eps large enough to dominate: the constant row is a smooth point, so its gradient can be checked
    x, gamma, beta = _inputs(2, (3,), 4, 1.0)
    x[0] = 0.25
    assert_rows_ok(check_op(layernorm_forward, layernorm_backward,
                            {"x": x, "gamma": gamma, "beta": beta, "eps": 1e-2}, ["x", "gamma", "beta"]))


def test_float32_in_float32_out():
    x, gamma, beta = (a.astype(np.float32) for a in _inputs(3, (2, 3), 5, 1.0))
    y, cache = layernorm_forward(x, gamma, beta)
    assert y.dtype == np.float32
    assert all(g.dtype == np.float32 for g in layernorm_backward(np.ones_like(y), cache))
    y64, _ = layernorm_forward(x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64))
    np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-5)


X, ONES, ZEROS = np.zeros((2, 3)), np.ones(3), np.zeros(3)


@pytest.mark.parametrize("args, exc, name", [
    ((X.astype(np.int64), ONES, ZEROS), TypeError, "x"),
    ((X, ONES.astype(np.int64), ZEROS), TypeError, "gamma"),
    ((X, ONES, ZEROS.astype(np.int64)), TypeError, "beta"),
    ((X, np.ones(4), ZEROS), ValueError, "gamma"),
    ((X, ONES, np.zeros((1, 3))), ValueError, "beta"),
    ((X, np.array([1.0, np.nan, 1.0]), ZEROS), ValueError, "gamma"),
    ((X, ONES, np.array([0.0, 0.0, -np.inf])), ValueError, "beta"),
])
def test_bad_input_names_the_argument(args, exc, name):
    with pytest.raises(exc, match=rf"^{name}\b"):
        layernorm_forward(*args)


# ---- dropout_add_layernorm: LN(residual + dropout(x)), the end of each post-LN sublayer ------------------------------


def _expected_mask(cache, seed, shape, p, train):
    """(keep, scale) a fused op with dropout p must have used, its cache checked: the hashed mask of its one draw from
    default_rng(seed), or everything kept (scale 1) when p is 0 or it is not training."""
    threshold = drop_threshold(p) if train else 0
    assert cache.threshold == threshold
    if not threshold:
        return np.ones(shape, bool), 1.0
    assert cache.seed == draw_seed(np.random.default_rng(seed))  # the op's only draw
    return hashed_keep_mask(np, cache.seed, shape, threshold), 1 / (1 - p)


def _sublayer_inputs(seed, lead, C, scale, offset):
    x, gamma, beta = _inputs(seed, lead, C, scale)
    residual, _, _ = _inputs(seed + 1, lead, C, scale)
    return x, residual + offset, gamma, beta


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, lead=LEAD, C=st.integers(2, 9), p=st.sampled_from([0.0, 0.1, 0.5]), train=st.booleans(),
       offset=st.sampled_from([0.0, 1000.0, -1000.0]))
def test_dropout_add_layernorm_is_the_three_ops_with_the_hashed_mask(seed, lead, C, p, train, offset):
    x, residual, gamma, beta = _sublayer_inputs(seed, lead, C, 1.0, offset)
    y, cache = dropout_add_layernorm_forward(x, residual, gamma, beta, p, np.random.default_rng(seed), train)
    keep, scale = _expected_mask(cache, seed, x.shape, p, train)
    want, ln = layernorm_forward(residual + x * keep * scale, gamma, beta)
    np.testing.assert_array_equal(y, want)
    dout = np.random.default_rng(seed + 2).standard_normal(x.shape)
    dx, dresidual, dgamma, dbeta = dropout_add_layernorm_backward(dout, cache)
    ds, dgamma_want, dbeta_want = layernorm_backward(dout, ln)
    np.testing.assert_array_equal(dresidual, ds)
    np.testing.assert_array_equal(dx, ds * keep * scale)
    np.testing.assert_array_equal(dgamma, dgamma_want)
    np.testing.assert_array_equal(dbeta, dbeta_want)
    assert dx is not dresidual  # fresh arrays even when nothing is dropped: a composer may add into either


def test_dropout_add_layernorm_drops_p_of_x_and_keeps_all_of_the_residual():
    x, residual = np.ones((400, 50)), np.zeros((400, 50))
    y, cache = dropout_add_layernorm_forward(x, residual, np.ones(50), np.zeros(50), 0.3, np.random.default_rng(0))
    dx, dresidual, _, _ = dropout_add_layernorm_backward(np.ones_like(x) * np.arange(50), cache)
    kept = dx != 0
    assert abs(kept.mean() - 0.7) < 0.01  # 20,000 entries: 4 standard deviations is 0.013
    np.testing.assert_allclose(dx[kept], dresidual[kept] / 0.7, rtol=1e-15)
    assert np.all(dresidual[:, 1:] != 0)


def test_dropout_add_layernorm_without_dropout_draws_nothing():
    x, residual, gamma, beta = _sublayer_inputs(0, (2, 3), 6, 1.0, 0.0)
    for p, train in ((0.0, True), (0.1, False)):
        rng = np.random.default_rng(4)
        y, _ = dropout_add_layernorm_forward(x, residual, gamma, beta, p, rng, train)
        assert rng.bit_generator.state == np.random.default_rng(4).bit_generator.state
        np.testing.assert_array_equal(y, layernorm_forward(residual + x, gamma, beta)[0])


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, lead=LEAD, C=st.integers(3, 8), scale=st.sampled_from([0.1, 1.0, 30.0]),
       offset=st.sampled_from([0.0, 1000.0, -1000.0]), p=st.sampled_from([0.0, 0.1, 0.5]))
@example(seed=229939, lead=[], C=3, scale=0.1, offset=0.0, p=0.0)  # a near-cancelling sum: skipped, not failed
def test_dropout_add_layernorm_grads(seed, lead, C, scale, offset, p):
    # +-1000 enters as the residual's offset, as in test_grads_of_x_gamma_beta; the same rng seed each call replays
    # the same mask, so the finite differences see the function the backward differentiates.
    x, residual, gamma, beta = _sublayer_inputs(seed, lead, C, scale, offset)

    def forward(x, residual, gamma, beta):
        return dropout_add_layernorm_forward(x, residual, gamma, beta, p, np.random.default_rng(seed))

    # The layer norm sees the sum, whose rows x and the residual can nearly cancel (seen: spread 0.00065 from two rows
    # of spread 0.1, C = 3): there the finite difference itself is off (_inputs' comment), so such draws are skipped.
    assume(np.all(1 / forward(x, residual, gamma, beta)[1].ln.rstd >= 0.5 * scale))

    def backward(dout, cache):
        return dropout_add_layernorm_backward(dout, cache)

    rows = check_op(forward, backward, {"x": x, "residual": residual, "gamma": gamma, "beta": beta},
                    ["x", "residual", "gamma", "beta"])
    assert_rows_ok(rows)


def test_dropout_add_layernorm_float32_in_float32_out():
    x, residual, gamma, beta = (a.astype(np.float32) for a in _sublayer_inputs(3, (2, 3), 5, 1.0, 0.0))
    y, cache = dropout_add_layernorm_forward(x, residual, gamma, beta, 0.1, np.random.default_rng(0))
    assert y.dtype == np.float32
    assert all(g.dtype == np.float32 for g in dropout_add_layernorm_backward(np.ones_like(y), cache))


@pytest.mark.parametrize("args, exc, name", [
    ((X.astype(np.int64), X, ONES, ZEROS, 0.1), TypeError, "x"),
    ((X, X.astype(np.int64), ONES, ZEROS, 0.1), TypeError, "residual"),
    ((X, np.zeros((3, 3)), ONES, ZEROS, 0.1), ValueError, "residual"),
    ((X, X, np.array([1.0, np.nan, 1.0]), ZEROS, 0.1), ValueError, "gamma"),
    ((X, X, ONES, ZEROS, 1.0), ValueError, "p"),
])
def test_dropout_add_layernorm_bad_input_names_the_argument(args, exc, name):
    with pytest.raises(exc, match=rf"^{name}\b"):
        dropout_add_layernorm_forward(*args, np.random.default_rng(0))


# ---- layernorm_dropout: dropout(LN(x)), the end of the embeddings -------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, lead=LEAD, C=st.integers(2, 9), p=st.sampled_from([0.0, 0.1, 0.5]), train=st.booleans(),
       offset=st.sampled_from([0.0, 1000.0, -1000.0]))
def test_layernorm_dropout_is_the_layer_norm_then_the_hashed_mask(seed, lead, C, p, train, offset):
    x, gamma, beta = _inputs(seed, lead, C, 1.0)
    x = x + offset
    y, cache = layernorm_dropout_forward(x, gamma, beta, p, np.random.default_rng(seed), train)
    keep, scale = _expected_mask(cache, seed, x.shape, p, train)
    ln_y, ln = layernorm_forward(x, gamma, beta)
    np.testing.assert_array_equal(y, ln_y * keep * scale)
    dout = np.random.default_rng(seed + 2).standard_normal(x.shape)
    for got, want in zip(layernorm_dropout_backward(dout, cache), layernorm_backward(dout * keep * scale, ln)):
        np.testing.assert_array_equal(got, want)


def test_layernorm_dropout_drops_p_of_the_entries_and_passes_no_gradient_through_them():
    x = np.random.default_rng(0).standard_normal((400, 50))
    y, cache = layernorm_dropout_forward(x, np.ones(50), np.zeros(50), 0.3, np.random.default_rng(0))
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.01  # 20,000 entries: 4 standard deviations is 0.013
    np.testing.assert_allclose(y[kept], layernorm_forward(x, np.ones(50), np.zeros(50))[0][kept] / 0.7, rtol=1e-15)
    # dout only where an entry was dropped: nothing reaches the layer norm
    dx, dgamma, dbeta = layernorm_dropout_backward(np.where(kept, 0.0, 1.0), cache)
    assert not dx.any() and not dgamma.any() and not dbeta.any()


def test_layernorm_dropout_without_dropout_draws_nothing():
    x, gamma, beta = _inputs(0, (2, 3), 6, 1.0)
    for p, train in ((0.0, True), (0.1, False)):
        rng = np.random.default_rng(4)
        y, _ = layernorm_dropout_forward(x, gamma, beta, p, rng, train)
        assert rng.bit_generator.state == np.random.default_rng(4).bit_generator.state
        np.testing.assert_array_equal(y, layernorm_forward(x, gamma, beta)[0])


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, lead=LEAD, C=st.integers(3, 8), scale=st.sampled_from([0.1, 1.0, 30.0]),
       offset=st.sampled_from([0.0, 1000.0, -1000.0]), p=st.sampled_from([0.0, 0.1, 0.5]))
def test_layernorm_dropout_grads(seed, lead, C, scale, offset, p):
    # As test_grads_of_x_gamma_beta: +-1000 enters as the rows' mean. The same rng seed each call replays the same
    # mask, so the finite differences see the function the backward differentiates.
    x, gamma, beta = _inputs(seed, lead, C, scale)
    x += offset

    def forward(x, gamma, beta):
        return layernorm_dropout_forward(x, gamma, beta, p, np.random.default_rng(seed))

    assert_rows_ok(check_op(forward, layernorm_dropout_backward, {"x": x, "gamma": gamma, "beta": beta},
                            ["x", "gamma", "beta"]))


def test_layernorm_dropout_float32_in_float32_out():
    x, gamma, beta = (a.astype(np.float32) for a in _inputs(3, (2, 3), 5, 1.0))
    y, cache = layernorm_dropout_forward(x, gamma, beta, 0.1, np.random.default_rng(0))
    assert y.dtype == np.float32
    assert all(g.dtype == np.float32 for g in layernorm_dropout_backward(np.ones_like(y), cache))


@pytest.mark.parametrize("args, exc, name", [
    ((X.astype(np.int64), ONES, ZEROS, 0.1), TypeError, "x"),
    ((X, np.array([1.0, np.nan, 1.0]), ZEROS, 0.1), ValueError, "gamma"),
    ((X, ONES, ZEROS[:2], 0.1), ValueError, "beta"),
    ((X, ONES, ZEROS, 1.0), ValueError, "p"),
])
def test_layernorm_dropout_bad_input_names_the_argument(args, exc, name):
    with pytest.raises(exc, match=rf"^{name}\b"):
        layernorm_dropout_forward(*args, np.random.default_rng(0))
