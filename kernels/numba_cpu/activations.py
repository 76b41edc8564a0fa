"""Numba CPU kernels for `minielectra.ops.activations` (bias_gelu_forward, bias_gelu_backward).

gelu(x + b) in one pass over memory, where the reference makes about six (add, divide, erf, add, two multiplies). The
same pass computes the slope gelu'(x + b) = Phi + (x + b) phi, since it has phi's exp(-h^2 / 2) at hand, and the cache
keeps only that slope: the backward is then one multiply per entry (dx = dout * slope) and the sum for db, where the
reference's backward recomputes an exp per entry. The backward also accepts the reference's `BiasGeluCache` (it
runs the reference backward on it). db is reduced race-free: each prange iteration owns a chunk of rows and one row of
a partial-sum array. Arithmetic follows the reference's expression order in the input dtype (float32 stays float32),
except float32's Phi and slope, computed in float64 and rounded once (below).
"""

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from kernels.numba_cpu._common import CONTRACT, as_2d, exp_for_float32, float_dtype, n_chunks
from minielectra.ops import checks
from minielectra.ops.activations import BiasGeluCache, bias_gelu_backward as _reference_backward

_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


# For float32, Phi in float64 plain arithmetic, rounded once: LLVM turns it into SIMD code, where math.erf is a C call
# per element (on one core a GELU pass over 16 x 128 x 512 floats takes 8.4 ms with math.erf, 0.1 ms with no erf, and
# 2.1 ms with this; 1.1 ms with multiply-adds fused, below). With a = |h| / sqrt 2 and the tail
# Phi(-|h|) = erfc(a) / 2:
# - a < 1: erfc(a) = 1 - a P(a^2);
# - a >= 1: erfc(a) = e^(-a^2) R(u), u = 3.9 t - 1.6 in [-1, 1] for t = 1 / (1 + a / 2) (Numerical Recipes' variable)
#   and a in [1, 11]; beyond 11 erfc(a) / 2 < 1e-53, which is 0 in float32.
# P (degree 8) and R (degree 12) are least-squares fits on 4,000 Chebyshev nodes to SciPy's erf(a) / a and
# erfcx(a) = e^(a^2) erfc(a), weighted for relative error; over 400,000 points their relative errors are below
# 9.3e-13 and 2.6e-12, and exp_for_float32's 2e-10, so the float32 result is Phi correctly rounded but where Phi lies
# within 2e-10 of a rounding boundary (tests/kernels/test_common.py measures it). Computing the tail and taking 1 - tail
# for h > 0 keeps Phi's small values for h < 0 exact to float32 precision, where 1 + erf in float32 would cancel.
# float64 inputs keep math.erf: these fits are not accurate to float64's last bit.
_ERF_P = (1.1283791670946948, -0.3761263888986915, 0.11283791313495543, -0.026866133625174055, 0.005223785005783531,
          -0.0008542670538449808, 0.00011956946460152778, -1.3911698794169989e-05, 1.0595269661272887e-06)
_ERFCX_R = (0.18605493468488257, 0.1784350323263686, 0.052660216982509306, 0.010003804175295736,
            0.0006509408368003206, -0.00019359763518182218, -3.553635515180705e-05, 6.613608079558863e-06,
            1.5933340838974174e-06, -3.8504736636824217e-07, -6.627439183156704e-08, 2.3272248685242174e-08,
            2.248670321803919e-09)
_INV_SQRT_2 = 1.0 / _SQRT_2


@njit(cache=True, inline="always")
def _horner(coefs, x):
    acc = coefs[-1]
    for c in coefs[-2::-1]:
        acc = acc * x + c
    return acc


@njit(cache=True, inline="always")
def _tail_and_gauss(z):
    """(Phi(-|h|), e^(-h^2 / 2)) in float64 for z = h / sqrt 2, by the fits above. e^(-a^2) is the far branch's factor
    and phi's, so the slope costs one more multiply-add; it is 0 past a = 11, where phi h is below float32's
    smallest subnormal anyway (exp_for_float32 stops at e^-110)."""
    a = abs(z)
    erfc_near = 1.0 - a * _horner(_ERF_P, a * a)
    t = 1.0 / (1.0 + 0.5 * min(a, 11.0))
    gauss = exp_for_float32(-a * a) if a < 11.0 else 0.0
    erfc_far = gauss * _horner(_ERFCX_R, 3.9 * t - 1.6)
    return 0.5 * (erfc_near if a < 1.0 else erfc_far), gauss


@njit(cache=True, inline="always")
def normal_cdf_and_slope32(h):
    """(Phi(h), Phi(h) + h phi(h)) of a float32 h as float32: the normal CDF and GELU's slope, each computed in float64
    and rounded once. GELU itself is then h * Phi in float32, the reference's product of float32 factors."""
    h64 = np.float64(h)
    z = h64 * _INV_SQRT_2
    tail, gauss = _tail_and_gauss(z)
    phi = tail if z < 0.0 else 1.0 - tail  # Phi(h)
    return np.float32(phi), np.float32(phi + h64 * _INV_SQRT_2PI * gauss)


class BiasGeluKernelCache(NamedTuple):
    slope: object  # (N, F) gelu'(x + b), of the exact form or of the tanh approximation
    shape: tuple  # the forward's x.shape, (..., F)


# The float32 exact form's kernel is compiled with CONTRACT (_common.py), which halves the cost of the float64
# polynomials above (on one core 1 M entries take 2.1 ms without, 1.2 ms with). Only float64 intermediate values are
# contracted: the float32 operations, h = x + b and out = h * Phi, have no product to fuse, so they stay the
# reference's. test_common.py measures the accuracy above on code compiled this way.


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
