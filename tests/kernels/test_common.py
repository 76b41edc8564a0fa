"""The float32 special functions the Numba kernels compute in plain arithmetic (SIMD) instead of calling the C library:
_common.exp (exp_float32), exp_float32_sum, log_float32 and activations.normal_cdf_and_slope32 (GELU's Phi and
slope), each against float64 truth over a dense grid, in ulps of the float32 result, compiled with the flags of the
kernel that uses it."""

import math

import numpy as np
import pytest

pytest.importorskip("numba")

from numba import njit  # noqa: E402
from scipy.special import ndtr  # noqa: E402

from minielectra.kernels.numba_cpu._common import CONTRACT, exp, exp_float32_sum, log_float32  # noqa: E402
from minielectra.kernels.numba_cpu.activations import normal_cdf_and_slope32  # noqa: E402

pytestmark = pytest.mark.numba


@njit
def _exp_each(x, out):
    for i in range(x.size):
        out[i] = exp(x[i])


@njit
def _exp_sum_each(hi, lo, out):
    for i in range(hi.size):
        out[i] = exp_float32_sum(hi[i], lo[i])


@njit
def _log32_each(x, out):
    for i in range(x.size):
        out[i] = log_float32(x[i])


@njit(fastmath=CONTRACT)  # as activations._forward_exact32 compiles it
def _normal_cdf_and_slope_each(x, phi, slope):
    for i in range(x.size):
        phi[i], slope[i] = normal_cdf_and_slope32(x[i])


def _apply(fn, x):
    out = np.empty_like(x)
    fn(x, out)
    return out


def ulps_off(got, exact):
    """|got - exact| in units of the float32 spacing at exact (the smallest subnormal's below float32's normal range)."""
    exact32 = np.abs(exact).astype(np.float32)
    spacing = np.where(np.abs(exact) < np.finfo(np.float32).tiny, 2.0**-149,
                       np.spacing(exact32).astype(np.float64))
    return np.abs(got.astype(np.float64) - exact) / spacing


def test_exp_float32_is_within_an_ulp_and_over_and_underflows_like_float32():
    # The grid runs from float32's smallest subnormal result to its largest finite one; the measured worst is 0.99 ulp.
    x = np.linspace(-103.9, 88.7, 2_000_001, dtype=np.float32)
    assert ulps_off(_apply(_exp_each, x), np.exp(x.astype(np.float64))).max() < 1.0
    edges = np.array([-np.inf, -1000.0, -110.0, -104.0, 88.8, 89.5, 1000.0, np.inf, 0.0], np.float32)
    assert _apply(_exp_each, edges).tolist() == [0.0, 0.0, 0.0, 0.0, np.inf, np.inf, np.inf, np.inf, 1.0]
    assert np.isnan(_apply(_exp_each, np.array([np.nan], np.float32))[0])


def test_exp_float32_sum_keeps_the_low_part_of_its_argument():
    # GELU's e^(-h^2 / 2): h^2 / 2 split into hi, exact in float32 (h's top 12 bits squared), and a small lo. Measured
    # worst 1.16 ulps (exp_float32's 0.99, and lo rounds the reduced argument once more), where exp of the rounded
    # float32(-h^2 / 2) is off by up to 64.
    h = np.linspace(-14.5, 14.5, 2_000_001, dtype=np.float32)
    hh = (h.view(np.int32) & np.int32(-4096)).view(np.float32)
    hi, lo = np.float32(-0.5) * (hh * hh), np.float32(-0.5) * ((h - hh) * (h + hh))
    out = np.empty_like(h)
    _exp_sum_each(hi, lo, out)
    exact = np.exp(-0.5 * h.astype(np.float64) ** 2)
    assert ulps_off(out, exact).max() < 1.2
    assert ulps_off(_apply(_exp_each, -0.5 * h * h), exact).max() > 50  # why the split
    zero = np.zeros(3, np.float32)
    edges = np.array([0.0, -104.0, -1000.0], np.float32)
    _exp_sum_each(edges, zero, out[:3])
    assert out[:3].tolist() == [1.0, 0.0, 0.0]


def test_log_float32_is_within_an_ulp_over_the_gumbel_sampler_s_inputs():
    # The sampler takes logs of u + 1e-9 in [1e-9, 1] and of -log(u + 1e-9) + 1e-9 in (6e-8, 20.8]; the grid covers
    # both, and [0.5, 2) (where ln x is near 0 and its relative accuracy matters most) in steps of 2^-20.
    x = np.concatenate([np.geomspace(1e-9, 30.0, 2_000_001, dtype=np.float32),
                        np.arange(2**19, 2**21, dtype=np.float32) / np.float32(2**20)])
    # Measured worst: 0.81 ulps (NumPy's own float32 log is within 3.6 here).
    off = ulps_off(_apply(_log32_each, x), np.log(x.astype(np.float64)))
    assert off.max() < 1.0
    assert _apply(_log32_each, np.array([1.0, 2.0, 0.5], np.float32)).tolist() == [0.0, np.float32(math.log(2)),
                                                                                  np.float32(-math.log(2))]


def test_exp_float64_is_the_c_library_exp():
    x = np.array([-745.0, -1.5, 0.0, 1e-300, 2.5, 709.0])
    assert _apply(_exp_each, x).tolist() == [math.exp(v) for v in x]


def test_normal_cdf_float32_is_within_a_few_ulps_where_float32_erf_cancels():
    # Down to h = -14, where Phi leaves float32's subnormals; 1 + erf(h / sqrt 2) in float32 is off by up to 2^24 ulps
    # of Phi below h = -3 (the reference's float32 Phi), which is why the kernel computes the tail. Measured worst:
    # 5.22 ulps over the whole grid, 1.98 above h = -0.7 (activations.py says where the error comes from).
    h = np.linspace(-14.5, 9.0, 3_000_001, dtype=np.float32)
    phi, _ = _cdf_and_slope(h)
    off = ulps_off(phi, ndtr(h.astype(np.float64)))
    assert off.max() <= 5.3
    assert off[h > -0.7].max() <= 2.0
    edges = np.array([-np.inf, -1000.0, -15.0, 0.0, 6.0, 1000.0, np.inf], np.float32)
    assert _cdf_and_slope(edges)[0].tolist() == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]
    assert np.isnan(_cdf_and_slope(np.array([np.nan], np.float32))[0][0])


def test_gelu_slope_float32_is_within_a_few_ulps_of_its_terms():
    # slope = Phi + h phi crosses 0 near h = -0.75, where the two terms cancel: there the bound is in ulps of the terms'
    # size, Phi + |h| phi, as well as of the result. Measured worst: 3.97 of their sum.
    h = np.linspace(-14.5, 9.0, 3_000_001, dtype=np.float32)
    h64 = h.astype(np.float64)
    density = np.exp(-0.5 * h64 * h64) / math.sqrt(2.0 * math.pi)
    exact = ndtr(h64) + h64 * density
    _, slope = _cdf_and_slope(h)
    err = np.abs(slope.astype(np.float64) - exact)
    spacing = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert np.all(err <= 4.0 * (spacing + 2.0**-24 * (ndtr(h64) + np.abs(h64) * density)))
    edges = np.array([-1000.0, -40.0, 0.0, 40.0, 1000.0], np.float32)  # at +-inf it is NaN, as in the reference
    assert _cdf_and_slope(edges)[1].tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def _cdf_and_slope(h):
    phi, slope = np.empty_like(h), np.empty_like(h)
    _normal_cdf_and_slope_each(h, phi, slope)
    return phi, slope
