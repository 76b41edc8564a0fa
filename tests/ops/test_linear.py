"""linear / matmul: forward against an explicit einsum, backward against its own forward in float64."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minielectra.gradcheck import check_op, format_table
from minielectra.ops.linear import linear_backward, linear_forward, matmul_backward, matmul_forward


def assert_rows_ok(rows):
    """Every row ok with rel error <= 1e-6; a gradient that is zero in theory (e.g. gelu' at x = -30 is 1e-114, the
    finite difference exactly 0: rel error 1) may pass on an absolute difference below 1e-9 instead."""
    for r in rows:
        assert r.ok and (r.rel_error <= 1e-6 or r.max_abs_diff <= 1e-9), format_table(rows)


# (scale of x, scale of W and b). Large and tiny magnitudes, but not both factors at 1000 at once: the centred
# difference's rounding error is eps * |L| / h, and |L| ~ 1e6 would drown db (~1) at the 1e-6 level.
# Nor tiny x under O(1) W, b: then L ~ 1 while dW ~ 1e-3 * (a random sum that may cancel) nears the same floor.
SCALES = st.sampled_from([(1.0, 1.0), (1000.0, 1.0), (1.0, 1000.0), (1e-3, 1e-3), (30.0, 30.0)])
LEADING = st.lists(st.integers(1, 3), min_size=1, max_size=3)  # x is 2-D, 3-D or 4-D


def _inputs(seed, lead, C, OC, scale):
    xs, ws = scale if isinstance(scale, tuple) else (scale, scale)
    rng = np.random.default_rng(seed)

    def signed(*shape):  # magnitudes in [0.5, 2): no near-zero draw makes a gradient vanish below the noise floor
        return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 2.0, shape)

    x = signed(*lead, C) * xs
    W = signed(C, OC) * ws
    b = signed(OC) * ws
    return x, W, b


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), lead=LEADING, C=st.integers(1, 5), OC=st.integers(1, 5), scale=SCALES)
def test_linear_grads_of_x_W_b(seed, lead, C, OC, scale):
    x, W, b = _inputs(seed, lead, C, OC, scale)
    assert_rows_ok(check_op(linear_forward, linear_backward, {"x": x, "W": W, "b": b}, ["x", "W", "b"]))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), lead=LEADING, C=st.integers(1, 5), OC=st.integers(1, 5), scale=SCALES)
def test_matmul_grads_of_x_W(seed, lead, C, OC, scale):
    x, W, _ = _inputs(seed, lead, C, OC, scale)
    assert_rows_ok(check_op(matmul_forward, matmul_backward, {"x": x, "W": W}, ["x", "W"]))


def test_linear_grads_directional_on_bigger_tensors():
    x, W, b = _inputs(0, (2, 3, 4), 9, 11, 1.0)  # 216 / 99 entries: checked along random directions
    assert_rows_ok(check_op(linear_forward, linear_backward, {"x": x, "W": W, "b": b}, ["x", "W", "b"]))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), lead=LEADING, C=st.integers(1, 6), OC=st.integers(1, 6),
       scale=st.sampled_from([1e-3, 1.0, 1000.0]))
def test_forward_equals_explicit_einsum(seed, lead, C, OC, scale):
    x, W, b = _inputs(seed, lead, C, OC, scale)
    out, _ = linear_forward(x, W, b)
    expected = np.einsum("...c,co->...o", x, W) + b
    assert out.shape == (*lead, OC)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12 * scale * scale)
    mm, _ = matmul_forward(x, W)
    np.testing.assert_allclose(mm, np.einsum("...c,co->...o", x, W), rtol=1e-12, atol=1e-12 * scale * scale)


def test_forward_by_hand():
    x = np.array([[1.0, 2.0]])
    W = np.array([[1.0, 0.0, -1.0], [2.0, 1.0, 0.5]])
    b = np.array([0.5, -1.0, 0.0])
    out, _ = linear_forward(x, W, b)
    np.testing.assert_array_equal(out, [[5.5, 1.0, 0.0]])


def test_backward_by_hand_sums_db_and_dW_over_leading_positions():
    x = np.arange(12.0).reshape(2, 3, 2)
    W = np.ones((2, 1))
    _, cache = linear_forward(x, W, np.zeros(1))
    dx, dW, db = linear_backward(np.ones((2, 3, 1)), cache)
    np.testing.assert_array_equal(db, [6.0])
    np.testing.assert_array_equal(dW, [[0 + 2 + 4 + 6 + 8 + 10], [1 + 3 + 5 + 7 + 9 + 11]])
    np.testing.assert_array_equal(dx, np.ones((2, 3, 2)))


def test_extreme_magnitudes_stay_finite():
    x = np.array([[1000.0, -1000.0]])
    W = np.array([[1000.0], [1000.0]])
    out, cache = linear_forward(x, W, np.array([-1000.0]))
    np.testing.assert_array_equal(out, [[-1000.0]])
    dx, dW, db = linear_backward(np.ones((1, 1)), cache)
    assert all(np.isfinite(g).all() for g in (dx, dW, db))


def test_float32_in_float32_out():
    x, W, b = (a.astype(np.float32) for a in _inputs(1, (2, 3), 4, 5, 1.0))
    out, cache = linear_forward(x, W, b)
    assert out.dtype == np.float32
    grads = linear_backward(np.ones_like(out), cache)
    assert all(g.dtype == np.float32 for g in grads)
    mm, cache = matmul_forward(x, W)
    assert mm.dtype == np.float32
    assert all(g.dtype == np.float32 for g in matmul_backward(np.ones_like(mm), cache))
    np.testing.assert_allclose(out, x.astype(np.float64) @ W + b, rtol=1e-5, atol=1e-5)


# bad input at the op boundary -------------------------------------------------------------------------------------------

X, W, B = np.ones((2, 3)), np.ones((3, 4)), np.ones(4)


@pytest.mark.parametrize("args, exc, name", [
    ((X.astype(np.int64), W, B), TypeError, "x"),
    ((X.tolist(), W, B), TypeError, "x"),
    ((X, W.astype(np.int32), B), TypeError, "W"),
    ((X, W, B.astype(np.int64)), TypeError, "b"),
    ((X, W[0], B), ValueError, "W"),
    ((X, W[None], B), ValueError, "W"),
    ((np.ones((2, 5)), W, B), ValueError, "x"),
    ((X, W, np.ones(3)), ValueError, "b"),
    ((X, W, np.ones((1, 4))), ValueError, "b"),
    ((X, np.where(np.eye(3, 4) > 0, np.nan, W), B), ValueError, "W"),
    ((X, W, np.array([0.0, np.inf, 0.0, 0.0])), ValueError, "b"),
])
def test_bad_input_names_the_argument(args, exc, name):
    with pytest.raises(exc, match=rf"^{name}\b"):
        linear_forward(*args)


def test_matmul_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"^W contains NaN"):
        matmul_forward(X, np.full((3, 4), np.nan))
    with pytest.raises(ValueError, match=r"^x must have shape"):
        matmul_forward(np.ones((2, 2)), W)
