"""Numba CPU kernels for `minielectra.ops.activations` (bias_gelu_forward, bias_gelu_backward).

gelu(x + b) in one pass over memory, where the reference makes about six (add, divide, erf, add, two multiplies). The
kernel's cache keeps x, b and s = Phi(x + b) (tanh(...) for the approximation), as the reference keeps Phi, so the
backward recomputes h = x + b (the same bits as the reference's h) but no erf. The backward also accepts the
reference's `BiasGeluCache`. db is reduced race-free: each prange iteration owns a chunk of rows and one row of a partial-sum array.
Arithmetic follows the reference's expression order in the input dtype (float32 stays float32).
"""

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from kernels.numba_cpu._common import as_2d, exp, exp_for_float32, float_dtype, n_chunks
from minielectra.ops import checks
from minielectra.ops.activations import BiasGeluCache

_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


def normal_cdf(h):
    """Phi(h) = (1 + erf(h / sqrt 2)) / 2 for a float32 or float64 scalar inside a kernel; see the overload below."""
    return 0.5 * (1.0 + math.erf(h / _SQRT_2))


# For float32, Phi in float64 plain arithmetic, rounded once: LLVM turns it into SIMD code, where math.erf is a C call
# per element (on one core a GELU pass over 16 x 128 x 512 floats takes 8.4 ms with math.erf, 0.1 ms with no erf, and
# 2.1 ms with this). With a = |h| / sqrt 2 and the tail Phi(-|h|) = erfc(a) / 2:
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


@overload(normal_cdf, inline="always", jit_options={"cache": True})
def _normal_cdf_overload(h):
    if h == types.float64:
        return lambda h: 0.5 * (1.0 + math.erf(h / _SQRT_2))  # the reference's operations
    if h != types.float32:
        return None

    def normal_cdf32(h):
        z = np.float64(h) * _INV_SQRT_2
        a = abs(z)
        erfc_near = 1.0 - a * _horner(_ERF_P, a * a)
        t = 1.0 / (1.0 + 0.5 * min(a, 11.0))
        erfc_far = exp_for_float32(-a * a) * _horner(_ERFCX_R, 3.9 * t - 1.6)
        tail = 0.5 * (erfc_near if a < 1.0 else erfc_far)  # Phi(-|h|)
        return np.float32(tail if z < 0.0 else 1.0 - tail)

    return normal_cdf32


class BiasGeluKernelCache(NamedTuple):
    x: object  # (..., F) the matmul output, before the bias
    b: object  # (F,) the bias; backward recomputes h = x + b
    s: object  # (..., F) Phi(h), or tanh(sqrt(2/pi) (h + 0.044715 h^3)) when approximate
    approximate: bool


@njit(cache=True, parallel=True, nogil=True)
def _forward(x, b, approximate, c, out, s):
    # c: _consts(x.dtype)
    N, F = x.shape
    half, one, tanh_c, cubic = c[0], c[1], c[2], c[3]
    for i in prange(N):
        if approximate:
            for j in range(F):
                h = x[i, j] + b[j]
                t = math.tanh(tanh_c * (h + cubic * (h * h * h)))
                s[i, j] = t
                out[i, j] = half * h * (one + t)
        else:
            for j in range(F):
                h = x[i, j] + b[j]
                phi = normal_cdf(h)
                s[i, j] = phi
                out[i, j] = h * phi  # x * Phi(x)


@njit(cache=True, parallel=True, nogil=True)
def _backward(dout, x, b, s, approximate, c, dx, pdb):
    # c: _consts(x.dtype)
    N, F = x.shape
    half, one, tanh_c, inv_sqrt_2pi, neg_half, cubic3 = c[0], c[1], c[2], c[4], c[5], c[6]
    chunks = pdb.shape[0]
    for ch in prange(chunks):
        for i in range(ch * N // chunks, (ch + 1) * N // chunks):
            for j in range(F):
                h = x[i, j] + b[j]
                if approximate:
                    t = s[i, j]
                    dinner = tanh_c * (one + cubic3 * (h * h))
                    grad = half * (one + t) + half * h * (one - t * t) * dinner
                else:
                    # exp(-h^2/2) underflows to 0 for |h| > ~38, where the derivative is exactly 0 or 1 anyway.
                    grad = s[i, j] + h * inv_sqrt_2pi * exp(neg_half * h * h)
                g = dout[i, j] * grad
                dx[i, j] = g
                pdb[ch, j] += g


def _consts(dt):
    """The kernels' constants in the input dtype, so float32 arithmetic stays float32."""
    return np.array([0.5, 1.0, _TANH_C, _CUBIC, _INV_SQRT_2PI, -0.5, 3 * _CUBIC], dtype=dt)


def bias_gelu_forward(x, b, approximate=False):
    """gelu(x + b): x (..., F) the output of a matmul, b (F,) its bias."""
    checks.float_array("x", x)
    checks.param("b", b, (x.shape[-1],), "(F,)")
    dt = float_dtype(x, b)
    x2 = as_2d(x, dt)  # (N, F)
    b1 = np.ascontiguousarray(b, dtype=dt)
    out = np.empty(x2.shape, dt)
    s = np.empty(x2.shape, dt)
    _forward(x2, b1, bool(approximate), _consts(dt), out, s)
    return out.reshape(x.shape), BiasGeluKernelCache(x2.reshape(x.shape), b1, s, bool(approximate))


def bias_gelu_backward(dout, cache):
    """Inverts `out = gelu(x + b)`: dx = gelu'(x + b) * dout, db sums dx over every leading position."""
    if isinstance(cache, BiasGeluCache):  # from the reference forward: h = x + b is stored, so b = 0
        x, s, approximate = cache.gelu
        b = np.zeros(x.shape[-1], x.dtype)
    else:
        x, b, s, approximate = cache
    checks.float_array("dout", dout)
    checks.shape("dout", dout, x.shape, "(..., F) like the forward's x")
    dt = float_dtype(x, b)
    x2 = as_2d(x, dt)  # (N, F)
    d2 = as_2d(dout, dt)
    N, F = x2.shape
    dx = np.empty((N, F), dt)
    chunks = n_chunks(N)
    pdb = np.zeros((chunks, F), dt)
    _backward(d2, x2, np.ascontiguousarray(b, dtype=dt), as_2d(s, dt), bool(approximate), _consts(dt), dx, pdb)
    return dx.reshape(x.shape), pdb.sum(axis=0)
