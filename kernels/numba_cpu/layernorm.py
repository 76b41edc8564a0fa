"""Numba CPU kernels for `minielectra.ops.layernorm` (layernorm_forward, layernorm_backward).

Same names, signatures, caches (the reference's `LayerNormCache(xhat, rstd, gamma)`) and results as the reference, so
a forward from either implementation can be inverted by the backward of the other. Rows run in a prange; each row is
one pass for the mean, one for the variance and one writing xhat and the output. dgamma and dbeta are reduced
race-free: each prange iteration owns a chunk of rows and a row of a (chunks, C) partial-sum array.
"""

import numpy as np
from numba import njit, prange

from kernels.numba_cpu._common import as_2d, float_dtype, n_chunks
from minielectra.ops import checks
from minielectra.ops.layernorm import LAYER_NORM_EPS, LayerNormCache


@njit(cache=True, parallel=True, nogil=True)
def _forward(x, gamma, beta, eps, one, fC, y, xhat, rstd):
    N, C = x.shape
    zero = one - one
    for i in prange(N):
        s = zero
        for j in range(C):
            s += x[i, j]
        mean = s / fC
        s = zero
        for j in range(C):
            xc = x[i, j] - mean
            s += xc * xc
        r = one / np.sqrt(s / fC + eps)  # biased variance, as the reference
        rstd[i] = r
        for j in range(C):
            xh = (x[i, j] - mean) * r
            xhat[i, j] = xh
            y[i, j] = xh * gamma[j] + beta[j]


@njit(cache=True, parallel=True, nogil=True)
def _backward(dout, xhat, rstd, gamma, fC, dx, pgamma, pbeta):
    N, C = dout.shape
    chunks = pgamma.shape[0]
    zero = fC - fC
    for c in prange(chunks):
        for i in range(c * N // chunks, (c + 1) * N // chunks):
            sg = zero
            sgx = zero
            for j in range(C):
                g = dout[i, j] * gamma[j]
                sg += g
                sgx += g * xhat[i, j]
            mg = sg / fC
            mgx = sgx / fC
            r = rstd[i]
            for j in range(C):
                d = dout[i, j]
                xh = xhat[i, j]
                dx[i, j] = r * (d * gamma[j] - mg - xh * mgx)
                pgamma[c, j] += d * xh
                pbeta[c, j] += d


def layernorm_forward(x, gamma, beta, eps=LAYER_NORM_EPS):
    """x (..., C), gamma (C,), beta (C,) -> (..., C)."""
    checks.float_array("x", x)
    C = x.shape[-1]
    checks.param("gamma", gamma, (C,), "(C,)")
    checks.param("beta", beta, (C,), "(C,)")
    dt = float_dtype(x, gamma, beta)
    x2 = as_2d(x, dt)  # (N, C)
    N = x2.shape[0]
    g = np.ascontiguousarray(gamma, dtype=dt)
    y = np.empty((N, C), dt)
    xhat = np.empty((N, C), dt)
    rstd = np.empty(N, dt)
    _forward(x2, g, np.ascontiguousarray(beta, dtype=dt), dt.type(eps), dt.type(1), dt.type(C), y, xhat, rstd)
    shape = x.shape
    return y.reshape(shape), LayerNormCache(xhat.reshape(shape), rstd.reshape(shape[:-1] + (1,)), gamma)


def layernorm_backward(dout, cache):
    """Inverts `out = xhat * gamma + beta`: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * gamma."""
    xhat, rstd, gamma = cache
    checks.float_array("dout", dout)
    checks.shape("dout", dout, xhat.shape, "(..., C) like the forward's x")
    C = xhat.shape[-1]
    dt = float_dtype(dout, xhat, gamma)
    d2 = as_2d(dout, dt)  # (N, C)
    N = d2.shape[0]
    dx = np.empty((N, C), dt)
    chunks = n_chunks(N)
    pgamma = np.zeros((chunks, C), dt)
    pbeta = np.zeros((chunks, C), dt)
    _backward(d2, as_2d(xhat, dt), np.ascontiguousarray(rstd, dtype=dt).reshape(N),
              np.ascontiguousarray(gamma, dtype=dt), dt.type(C), dx, pgamma, pbeta)
    return dx.reshape(dout.shape), pgamma.sum(axis=0), pbeta.sum(axis=0)
