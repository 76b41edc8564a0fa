"""The gradient checker itself: if it cannot tell a wrong gradient from a right one, every other check proves nothing."""

import numpy as np
import pytest

from minielectra.gradcheck import (
    ABS_TOLERANCE,
    ELEMENTWISE_MAX,
    Row,
    check_backward,
    check_op,
    format_table,
    numerical_grad,
    rel_error,
)


def sum_sq(x):
    return lambda: float(np.sum(x * x))


# rel_error -------------------------------------------------------------------------------------------------------------

def test_rel_error_is_zero_for_equal_arrays_and_for_two_zero_arrays():
    a = np.array([1.0, -2.0, 3.0])
    assert rel_error(a, a.copy()) == 0.0
    assert rel_error(np.zeros(3), np.zeros(3)) == 0.0


def test_rel_error_is_one_for_opposite_arrays_and_against_zero():
    a = np.array([1.0, -2.0, 3.0])
    assert rel_error(a, -a) == pytest.approx(1.0, abs=1e-15)
    assert rel_error(a, np.zeros(3)) == pytest.approx(1.0, abs=1e-15)


def test_rel_error_known_value_and_symmetry():
    # ||(1, -1)|| / (1 + 1) = sqrt(2) / 2 for orthogonal unit vectors
    assert rel_error([1.0, 0.0], [0.0, 1.0]) == pytest.approx(np.sqrt(2) / 2, rel=1e-15)
    a, b = np.array([1.0, 2.0]), np.array([1.0, 2.5])
    assert rel_error(a, b) == rel_error(b, a)
    assert rel_error(a, b) == pytest.approx(0.5 / (np.sqrt(5) + np.sqrt(7.25)), rel=1e-15)


# numerical_grad --------------------------------------------------------------------------------------------------------

def test_numerical_grad_of_sum_of_squares_is_two_x():
    x = np.random.default_rng(0).standard_normal((3, 4))
    g = numerical_grad(sum_sq(x), x)
    assert g.shape == x.shape
    # a quadratic's centred difference is exact but for rounding: eps * |f| / h ~ 1e-10
    np.testing.assert_allclose(g, 2 * x, rtol=1e-8, atol=1e-8)


def test_numerical_grad_with_indices_returns_those_entries_in_order():
    x = np.random.default_rng(1).standard_normal((3, 4))
    idx = [11, 0, 5]
    g = numerical_grad(sum_sq(x), x, indices=idx)
    assert g.shape == (3,)
    np.testing.assert_allclose(g, 2 * x.reshape(-1)[idx], rtol=1e-9, atol=1e-9)


def test_numerical_grad_of_a_cubic_matches_closed_form():
    x = np.array([-2.0, 0.5, 3.0])
    g = numerical_grad(lambda: float(np.sum(x**3)), x)
    np.testing.assert_allclose(g, 3 * x**2, rtol=1e-8)  # centred difference error: h^2 * 1 = 1e-10 plus rounding


def test_numerical_grad_restores_x_exactly():
    x = np.random.default_rng(2).standard_normal((2, 5)) * 1e3
    before = x.copy()
    numerical_grad(sum_sq(x), x)
    assert np.array_equal(x, before)


def test_numerical_grad_of_a_non_contiguous_array():
    x = np.arange(1.0, 7.0).reshape(3, 2).T  # (2, 3) transposed view
    g = numerical_grad(sum_sq(x), x)
    np.testing.assert_allclose(g, 2 * x, rtol=1e-9)


def test_numerical_grad_rejects_float32():
    x = np.ones(3, dtype=np.float32)
    with pytest.raises(TypeError, match="float64"):
        numerical_grad(sum_sq(x), x)


# check_backward ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [5, ELEMENTWISE_MAX, ELEMENTWISE_MAX + 1, 300])
def test_check_backward_accepts_the_right_gradient(size):
    x = np.random.default_rng(3).standard_normal(size)
    row = check_backward(sum_sq(x), x, 2 * x, name="x")
    assert isinstance(row, Row)
    assert row.ok and row.rel_error <= 1e-8, row
    assert row.name == "x"


@pytest.mark.parametrize("size", [5, ELEMENTWISE_MAX, ELEMENTWISE_MAX + 1, 300])
def test_check_backward_rejects_a_scaled_gradient(size):
    x = np.random.default_rng(4).standard_normal(size)
    row = check_backward(sum_sq(x), x, 2.01 * x)  # 0.5 % too large everywhere
    assert not row.ok
    assert row.rel_error > 1e-3


@pytest.mark.parametrize("size", [ELEMENTWISE_MAX, 300])
def test_check_backward_rejects_a_gradient_wrong_in_one_element(size):
    """Element-wise for small x, directional (random u touches every entry) for big x: both see one bad entry."""
    x = np.random.default_rng(5).standard_normal(size)
    grad = 2 * x
    grad[size // 2] += 1.0
    row = check_backward(sum_sq(x), x, grad)
    assert not row.ok
    assert row.rel_error > 1e-4
    assert row.max_abs_diff > 1e-3


@pytest.mark.parametrize("size", [7, 300])
def test_check_backward_restores_x_exactly(size):
    x = np.random.default_rng(6).standard_normal((size,)) * 1e3
    before = x.copy()
    check_backward(sum_sq(x), x, 2 * x)
    assert np.array_equal(x, before)


def test_check_backward_rejects_float32_elementwise():
    x = np.ones(5, dtype=np.float32)
    with pytest.raises(TypeError, match="float64"):
        check_backward(lambda: float(np.sum(x.astype(np.float64) ** 2)), x, 2 * x)


def test_check_backward_rejects_float32_directional():
    x = np.ones(ELEMENTWISE_MAX + 36, dtype=np.float32)
    with pytest.raises(TypeError, match="float64"):
        check_backward(lambda: float(np.sum(x.astype(np.float64) ** 2)), x, 2 * x)


def test_check_backward_rejects_a_gradient_of_the_wrong_shape():
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match="gradient of W"):
        check_backward(sum_sq(x), x, np.ones((3, 2)), name="W")


def test_check_backward_passes_tiny_differences_of_a_zero_gradient():
    """A gradient zero in theory: the analytic side is ~1e-17, rel error ~1, but both are right (ABS_TOLERANCE)."""
    x = np.random.default_rng(7).standard_normal(4)
    row = check_backward(lambda: float(np.sum(x - x.mean())), x, np.full(4, 1e-17))
    assert row.ok
    assert row.max_abs_diff <= ABS_TOLERANCE
    # ... but a zero gradient claimed for a function that does depend on x is caught
    assert not check_backward(sum_sq(x), x, np.zeros(4)).ok


# check_op ---------------------------------------------------------------------------------------------------------------

def _square_forward(x, c):
    return c * x * x, (x, c)


def test_check_op_on_a_right_and_a_wrong_backward():
    x = np.random.default_rng(8).standard_normal((2, 3))
    rows = check_op(_square_forward, lambda dout, cache: 2 * cache[1] * cache[0] * dout, {"x": x, "c": 3.0}, ["x"])
    assert len(rows) == 1 and rows[0].name == "x"
    assert rows[0].ok and rows[0].rel_error <= 1e-8
    bad = check_op(_square_forward, lambda dout, cache: cache[0] * dout, {"x": x, "c": 3.0}, ["x"])
    assert not bad[0].ok


def test_check_op_rejects_a_wrong_number_of_gradients():
    x = np.ones(3)
    with pytest.raises(ValueError, match="2 gradients"):
        check_op(_square_forward, lambda dout, cache: (dout, dout), {"x": x, "c": 1.0}, ["x"])


# format_table -----------------------------------------------------------------------------------------------------------

def test_format_table_lists_every_row_and_flags_failures():
    rows = [Row("dWq", 1e-11, 2e-9, True), Row("a_much_longer_name", 0.5, 0.25, False)]
    text = format_table(rows, title="mha")
    lines = text.splitlines()
    assert lines[0] == "mha"
    assert "name" in lines[1] and "rel error" in lines[1]
    (ok_line,) = [ln for ln in lines if ln.startswith("dWq")]
    (bad_line,) = [ln for ln in lines if ln.startswith("a_much_longer_name")]
    assert ok_line.endswith("yes")
    assert bad_line.endswith("NO")
    assert "2.50e-01" in bad_line
    assert "NO" not in ok_line
