"""GELU (exact erf form and tanh approximation) and the fused bias + GELU."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minielectra.gradcheck import check_op, format_table
from minielectra.ops.activations import bias_gelu_backward, bias_gelu_forward, gelu_backward, gelu_forward


def assert_rows_ok(rows):
    """Every row ok with rel error <= 1e-6; a gradient that is zero in theory (e.g. gelu' at x = -30 is 1e-114, the
    finite difference exactly 0: rel error 1) may pass on an absolute difference below 1e-9 instead."""
    for r in rows:
        assert r.ok and (r.rel_error <= 1e-6 or r.max_abs_diff <= 1e-9), format_table(rows)


def gelu_exact_ref(x):
    """x * Phi(x) with math.erf, element by element: no scipy, no numpy ufunc."""
    return np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in np.ravel(x)]).reshape(np.shape(x))


def gelu_tanh_ref(x):
    c = math.sqrt(2.0 / math.pi)
    return np.array([0.5 * v * (1.0 + math.tanh(c * (v + 0.044715 * v**3))) for v in np.ravel(x)]).reshape(np.shape(x))


def gelu_exact_deriv_ref(x):
    return np.array([0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) + v * math.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)
                     for v in np.ravel(x)]).reshape(np.shape(x))


PHI_1 = 0.8413447460685429  # standard normal CDF at 1
PHI_2 = 0.9772498680518208
PDF_1 = 0.24197072451914337  # standard normal density at 1


def test_gelu_known_values():
    x = np.array([0.0, 1.0, -1.0, 2.0, -2.0])
    out, _ = gelu_forward(x)
    expected = [0.0, PHI_1, -(1.0 - PHI_1), 2 * PHI_2, -2 * (1.0 - PHI_2)]
    np.testing.assert_allclose(out, expected, rtol=1e-15, atol=1e-16)
    assert out[0] == 0.0


def test_gelu_known_derivatives():
    x = np.array([0.0, 1.0, -1.0])
    _, cache = gelu_forward(x)
    d = gelu_backward(np.ones(3), cache)
    np.testing.assert_allclose(d, [0.5, PHI_1 + PDF_1, (1.0 - PHI_1) - PDF_1], rtol=1e-15, atol=1e-16)


def test_gelu_exact_and_tanh_match_their_closed_forms_on_a_grid():
    grid = np.linspace(-8.0, 8.0, 641)
    np.testing.assert_allclose(gelu_forward(grid)[0], gelu_exact_ref(grid), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(gelu_forward(grid, approximate=True)[0], gelu_tanh_ref(grid), rtol=1e-14, atol=1e-15)
    _, cache = gelu_forward(grid)
    np.testing.assert_allclose(gelu_backward(np.ones_like(grid), cache), gelu_exact_deriv_ref(grid),
                               rtol=1e-14, atol=1e-15)


def test_tanh_flag_changes_the_result_but_stays_within_1e_3():
    grid = np.linspace(-6.0, 6.0, 2401)
    diff = np.abs(gelu_forward(grid)[0] - gelu_forward(grid, approximate=True)[0])
    assert diff.max() > 1e-4
    assert diff.max() < 1e-3


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       scale=st.sampled_from([1e-2, 1.0, 3.0, 50.0, 1000.0]), approximate=st.booleans())
def test_gelu_grads(seed, shape, scale, approximate):
    x = np.random.default_rng(seed).standard_normal(shape) * scale
    # One entry where gelu' is O(1): a tensor whose entries all sit in the left tail (x ~ -5, gelu' ~ 1e-5) has a
    # gradient below the finite difference's noise floor (1 + erf cancels there), and no relative test can pass.
    x.flat[0] = 0.7
    rows = check_op(gelu_forward, gelu_backward, {"x": x, "approximate": approximate}, ["x"])
    assert_rows_ok(rows)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       F=st.integers(1, 5), scale=st.sampled_from([1e-2, 1.0, 3.0, 100.0]), approximate=st.booleans())
def test_bias_gelu_grads_of_x_and_b(seed, lead, F, scale, approximate):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, F)) * scale
    b = rng.standard_normal(F) * scale
    x.flat[0] = 0.7 - b[0]  # x + b = 0.7 there: see test_gelu_grads
    rows = check_op(bias_gelu_forward, bias_gelu_backward, {"x": x, "b": b, "approximate": approximate}, ["x", "b"])
    assert_rows_ok(rows)


def test_gelu_grads_directional_on_a_bigger_tensor():
    x = np.random.default_rng(0).standard_normal((4, 5, 6)) * 2
    for approximate in (False, True):
        assert_rows_ok(check_op(gelu_forward, gelu_backward, {"x": x, "approximate": approximate}, ["x"]))


def test_bias_gelu_is_gelu_of_the_sum():
    rng = np.random.default_rng(3)
    x, b = rng.standard_normal((2, 3, 4)), rng.standard_normal(4)
    np.testing.assert_allclose(bias_gelu_forward(x, b)[0], gelu_exact_ref(x + b), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(bias_gelu_forward(x, b, approximate=True)[0], gelu_tanh_ref(x + b),
                               rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_at_plus_minus_1000(dtype, approximate):
    x = np.array([1000.0, -1000.0, 40.0, -40.0], dtype=dtype)
    out, cache = gelu_forward(x, approximate)
    np.testing.assert_array_equal(out, [1000.0, 0.0, 40.0, 0.0])
    d = gelu_backward(np.ones_like(x), cache)
    np.testing.assert_array_equal(d, [1.0, 0.0, 1.0, 0.0])
    b = np.zeros(4, dtype=dtype)
    out, cache = bias_gelu_forward(x, b, approximate)
    np.testing.assert_array_equal(out, [1000.0, 0.0, 40.0, 0.0])
    dx, db = bias_gelu_backward(np.ones_like(x), cache)
    np.testing.assert_array_equal(dx, [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(db, [1.0, 0.0, 1.0, 0.0])


@pytest.mark.parametrize("approximate", [False, True])
def test_float32_in_float32_out(approximate):
    x = np.linspace(-4, 4, 24, dtype=np.float32).reshape(2, 3, 4)
    out, cache = gelu_forward(x, approximate)
    assert out.dtype == np.float32
    assert gelu_backward(np.ones_like(out), cache).dtype == np.float32
    ref = gelu_tanh_ref(x) if approximate else gelu_exact_ref(x)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    out, cache = bias_gelu_forward(x, np.full(4, 0.5, np.float32), approximate)
    assert out.dtype == np.float32
    assert all(g.dtype == np.float32 for g in bias_gelu_backward(np.ones_like(out), cache))


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match=r"^x\b"):
        gelu_forward(np.arange(3))
    with pytest.raises(TypeError, match=r"^x\b"):
        bias_gelu_forward(np.arange(3), np.zeros(3))
    with pytest.raises(TypeError, match=r"^b\b"):
        bias_gelu_forward(np.zeros((2, 3)), np.arange(3))
    with pytest.raises(ValueError, match=r"^b must have shape"):
        bias_gelu_forward(np.zeros((2, 3)), np.zeros(4))
    with pytest.raises(ValueError, match=r"^b contains NaN"):
        bias_gelu_forward(np.zeros((2, 3)), np.array([0.0, np.nan, 0.0]))
