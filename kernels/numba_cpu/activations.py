"""Numba CPU kernels for `minielectra.ops.activations` (bias_gelu_forward, bias_gelu_backward).

gelu(x + b) in one pass over memory, where the reference makes about six (add, divide, erf, add, two multiplies). The
same pass computes the slope gelu'(x + b) = Phi + (x + b) phi, since it has phi's exp(-h^2 / 2) at hand, and the cache
keeps only that slope: the backward is then one multiply per entry (dx = dout * slope) and the sum for db, where the
reference's backward recomputes an exp per entry. The backward also accepts the reference's `BiasGeluCache` (it
runs the reference backward on it). db is reduced race-free: each prange iteration owns a chunk of rows and one row of
a partial-sum array. Arithmetic follows the reference's expression order in the input dtype (float32 stays float32),
except float32's Phi and slope, computed by fits of their own (below).
"""

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from minielectra.kernels.numba_cpu._common import (CONTRACT, _HALF32, _ONE32, _reinterpret, as_2d, exp_float32_sum,
                                                   float_dtype, horner, n_chunks)
from minielectra.ops import checks
from minielectra.ops.activations import BiasGeluCache, bias_gelu_backward as _reference_backward

_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


# For float32, Phi and the slope in float32 plain arithmetic: LLVM turns it into SIMD code, sixteen lanes wide, where
# math.erf is a C call per element (on one core a GELU pass over 16 x 128 x 512 floats takes 8.4 ms with math.erf and
# 0.1 ms with no erf at all). With a = |h| / sqrt 2 and the tail Phi(-|h|) = erfc(a) / 2:
# - a < 1/2: erfc(a) = 1 - a P(a^2), which cancels by at most a factor 1.1 there;
# - a >= 1/2: erfc(a) = e^(-a^2) R(t) for t = 1 / (1 + a / 2) (Numerical Recipes' variable), a in [1/2, 11]; beyond 11
#   erfc(a) / 2 < 1e-53, which is 0 in float32.
# P (degree 5) and R (degree 9) are least-squares fits on 4,000 Chebyshev nodes to SciPy's erf(a) / a and
# erfcx(a) = e^(a^2) erfc(a), weighted for relative error, their coefficients rounded to float32 one at a time with the
# rest refitted; evaluated in float32 they are within 1.1e-7 and 1.8e-7 relative. e^(-a^2) = e^(-h^2 / 2) is taken
# from h itself, h^2 / 2 split into an exact part and a small one (exp_float32_sum), since a rounded a^2 would err by
# 2^-24 a^2 in the exponent. Computing the tail and taking 1 - tail for h > 0 keeps Phi's small values for h < 0 to
# float32 precision, where 1 + erf in float32 (the reference) cancels. Measured over 3 M points down to h = -14.5
# (tests/kernels/test_common.py): Phi within 5.3 ulps (in the tail, where the reference is off by up to 2^24 ulps; 2
# for h > -0.7, where its own error is an ulp or two), the slope within 4 ulps of its terms' size. One core, 1 M
# entries: 0.48 ms, where the same fits in float64, correctly rounded to float32, took 1.06.
# float64 inputs keep math.erf: these fits are not accurate to float64's last bit.
_ERF_P = tuple(np.float32(c) for c in (1.1283792, -0.37613103, 0.112940945, -0.027801313, 0.008936295, -0.006183975))
_ERFCX_R = tuple(np.float32(c) for c in (3.4023378e-06, 0.2819875, 0.28356764, 0.23525836, 0.23386626, -0.10458153,
                                         0.4012634, -0.6064293, 0.34899303, -0.073936775))
_F32 = np.float32
_NEAR_END, _FAR_END = _F32(0.5), _F32(11.0)
_INV_SQRT_2_32, _INV_SQRT_2PI_32 = _F32(1.0 / _SQRT_2), _F32(_INV_SQRT_2PI)
_HIGH_12_BITS = np.int32(-4096)  # clears a float32's low 12 mantissa bits: the rest squares exactly in float32


@njit(cache=True, inline="always")
def normal_cdf_and_slope32(h):
    """(Phi(h), Phi(h) + h phi(h)) of a float32 h, in float32: the normal CDF and GELU's slope, by the fits above.
    GELU itself is then h * Phi, the reference's product. phi's e^(-h^2 / 2) is the far branch's factor, so the slope
    costs one more multiply-add; it is 0 past a = 11, where phi h is below float32's smallest subnormal anyway."""
    a = abs(h) * _INV_SQRT_2_32
    erfc_near = _ONE32 - a * horner(_ERF_P, a * a)
    t = _ONE32 / (_ONE32 + _HALF32 * a)
    hh = _reinterpret(np.int32(_reinterpret(h) & _HIGH_12_BITS))  # h = hh + (h - hh), hh * hh exact
    gauss = exp_float32_sum(-_HALF32 * (hh * hh), -_HALF32 * ((h - hh) * (h + hh))) if a < _FAR_END else _F32(0.0)
    tail = _HALF32 * (erfc_near if a < _NEAR_END else gauss * horner(_ERFCX_R, t))  # Phi(-|h|)
    phi = tail if h < _F32(0.0) else _ONE32 - tail
    return phi, phi + h * _INV_SQRT_2PI_32 * gauss


class BiasGeluKernelCache(NamedTuple):
    slope: object  # (N, F) gelu'(x + b), of the exact form or of the tanh approximation
    shape: tuple  # the forward's x.shape, (..., F)


# The float32 exact form's kernel is compiled with CONTRACT (_common.py): the polynomials' multiply-adds fuse into one
# instruction each. The operations that mirror the reference, h = x + b and out = h * Phi, have no product to fuse, so
# they stay the reference's. test_common.py measures the accuracy above on code compiled this way.


@njit(cache=True, parallel=True, nogil=True, fastmath=CONTRACT)
def _forward_exact32(x, b, out, slope):
    # float32 x, b: writes out = gelu(x + b) and slope = gelu'(x + b), both (N, F).
    N, F = x.shape
    for i in prange(N):
        for j in range(F):
            h = x[i, j] + b[j]
            phi, slope[i, j] = normal_cdf_and_slope32(h)
            out[i, j] = h * phi


@njit(cache=True, parallel=True, nogil=True)
def _forward(x, b, approximate, c, out, slope):
    # The tanh approximation in either dtype, and the exact form in float64, each by the reference's operations in the
    # input dtype (c: _consts(x.dtype)). Writes out = gelu(x + b) and slope = gelu'(x + b), both (N, F).
    N, F = x.shape
    half, one, tanh_c, cubic, cubic3, sqrt_2, inv_sqrt_2pi, neg_half = c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
    for i in prange(N):
        if approximate:
            for j in range(F):
                h = x[i, j] + b[j]
                t = math.tanh(tanh_c * (h + cubic * (h * h * h)))
                out[i, j] = half * h * (one + t)
                dinner = tanh_c * (one + cubic3 * (h * h))  # the reference's backward, term for term
                slope[i, j] = half * (one + t) + half * h * (one - t * t) * dinner
        else:
            for j in range(F):
                h = x[i, j] + b[j]
                phi = half * (one + math.erf(h / sqrt_2))
                out[i, j] = h * phi
                # exp(-h^2/2) underflows to 0 for |h| > ~38, where the slope is exactly 0 or 1 anyway.
                slope[i, j] = phi + h * inv_sqrt_2pi * math.exp(neg_half * h * h)


@njit(cache=True, parallel=True, nogil=True)
def _backward(dout, slope, dx, pdb):
    N, F = dout.shape
    chunks = pdb.shape[0]
    for ch in prange(chunks):
        for i in range(ch * N // chunks, (ch + 1) * N // chunks):
            for j in range(F):
                g = dout[i, j] * slope[i, j]
                dx[i, j] = g
                pdb[ch, j] += g


def _consts(dt):
    """The kernels' constants in the input dtype, so float32 arithmetic stays float32."""
    return np.array([0.5, 1.0, _TANH_C, _CUBIC, 3 * _CUBIC, _SQRT_2, _INV_SQRT_2PI, -0.5], dtype=dt)


def bias_gelu_forward(x, b, approximate=False):
    """gelu(x + b): x (..., F) the output of a matmul, b (F,) its bias."""
    checks.float_array("x", x)
    checks.param("b", b, (x.shape[-1],), "(F,)")
    dt = float_dtype(x, b)
    x2 = as_2d(x, dt)  # (N, F)
    out = np.empty(x2.shape, dt)
    slope = np.empty(x2.shape, dt)
    b1 = np.ascontiguousarray(b, dtype=dt)
    if dt == np.float32 and not approximate:
        _forward_exact32(x2, b1, out, slope)
    else:
        _forward(x2, b1, bool(approximate), _consts(dt), out, slope)
    return out.reshape(x.shape), BiasGeluKernelCache(slope, x.shape)


def bias_gelu_backward(dout, cache):
    """Inverts `out = gelu(x + b)`: dx = gelu'(x + b) * dout, db sums dx over every leading position."""
    if isinstance(cache, BiasGeluCache):  # from the reference forward, which kept Phi, not the slope
        return _reference_backward(dout, cache)
    slope, shape = cache
    checks.float_array("dout", dout)
    checks.shape("dout", dout, shape, "(..., F) like the forward's x")
    d2 = as_2d(dout, slope.dtype)
    N, F = slope.shape
    dx = np.empty((N, F), slope.dtype)
    pdb = np.zeros((n_chunks(N), F), slope.dtype)
    _backward(d2, slope, dx, pdb)
    return dx.reshape(shape), pdb.sum(axis=0)
