"""The op-boundary checks of parameter values: finite, at any magnitude, in any layout."""

import numpy as np
import pytest

from minielectra.ops import checks


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finite_accepts_finite_values_up_to_the_largest(dtype):
    big = np.finfo(dtype).max / 2
    for x in (np.zeros(0, dtype), np.ones((3, 4), dtype), np.array([big, -big, 1.0], dtype)):
        checks.finite("w", x)
    checks.finite("w", np.arange(6).reshape(2, 3))  # integers are finite


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_finite_names_a_parameter_holding_nan_or_inf(dtype, bad):
    x = np.ones((5, 7), dtype)
    x[3, 2] = bad
    with pytest.raises(ValueError, match="^w contains NaN or inf"):
        checks.finite("w", x)
    with pytest.raises(ValueError, match="^w contains NaN or inf"):
        checks.finite("w", x.T)  # a non-contiguous view
