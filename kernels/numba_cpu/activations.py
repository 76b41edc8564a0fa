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
from numba import njit, prange

from kernels.numba_cpu._common import as_2d, exp, float_dtype, n_chunks
from minielectra.ops import checks
from minielectra.ops.activations import BiasGeluCache

_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


class BiasGeluKernelCache(NamedTuple):
    x: object  # (..., F) the matmul output, before the bias
    b: object  # (F,) the bias; backward recomputes h = x + b
    s: object  # (..., F) Phi(h), or tanh(sqrt(2/pi) (h + 0.044715 h^3)) when approximate
    approximate: bool


@njit(cache=True, parallel=True, nogil=True)
def _forward(x, b, approximate, c, out, s):
    # c: 0.5, 1, sqrt 2, sqrt(2/pi), 0.044715 in the input dtype
    N, F = x.shape
    half, one, sqrt2, tanh_c, cubic = c[0], c[1], c[2], c[3], c[4]
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
                phi = half * (one + math.erf(h / sqrt2))
                s[i, j] = phi
                out[i, j] = h * phi  # x * Phi(x)


@njit(cache=True, parallel=True, nogil=True)
def _backward(dout, x, b, s, approximate, c, dx, pdb):
    # c: 0.5, 1, sqrt 2, sqrt(2/pi), 0.044715, 1/sqrt(2 pi), -0.5, 3 * 0.044715 in the input dtype
    N, F = x.shape
    half, one, tanh_c, inv_sqrt_2pi, neg_half, cubic3 = c[0], c[1], c[3], c[5], c[6], c[7]
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
    return np.array([0.5, 1.0, _SQRT_2, _TANH_C, _CUBIC, _INV_SQRT_2PI, -0.5, 3 * _CUBIC], dtype=dt)


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
