"""Numba CPU kernels for `minielectra.ops.layernorm` (layernorm_forward, layernorm_backward,
dropout_add_layernorm_forward, dropout_add_layernorm_backward, layernorm_dropout_forward, layernorm_dropout_backward).

Same names, signatures, caches (the reference's `LayerNormCache(xhat, rstd, gamma)` and `DropoutAddNormCache`) and
results as the reference, so a forward from either implementation can be inverted by the backward of the other. Rows
run in a prange; each row is one pass for the mean, one for the variance and one writing xhat and the output. dgamma
and dbeta are reduced race-free: each prange iteration owns a chunk of rows and a row of a (chunks, C) partial-sum
array.

The fused sublayer end LN(residual + dropout(x)) writes the sum straight into the row's xhat (which the normalisation
then overwrites in place), deciding each dropout entry by the reference's hash (`_common.keep`); its backward writes
dresidual as the layer norm's dx and, in the same row loop, dx through the recomputed mask. The reference makes
separate passes for the mask, the scale, the product, the sum and the layer norm, and again for the mask in the
backward. The embeddings' end dropout(LN(x)) is the same in the other order: each row is normalised, then dropped
where it is written; its backward rebuilds the row's dy through the mask in a scratch row, then runs the layer norm's.
"""

import numpy as np
from numba import njit, prange

from minielectra.kernels.numba_cpu._common import ONE_U64, REDUCE, as_2d, float_dtype, keep, n_chunks, row_sum
from minielectra.ops import checks
from minielectra.ops.layernorm import (LAYER_NORM_EPS, DropoutAddNormCache, LayerNormCache, NormDropoutCache,
                                      dropout_add_setup, layernorm_dropout_setup)


@njit(cache=True, fastmath=REDUCE)
def _row_sq_dev(x, c, zero):
    """sum((x - c)^2) in SIMD partial sums, as _common.row_sum."""
    s = zero
    for j in range(x.shape[0]):
        d = x[j] - c
        s += d * d
    return s


@njit(cache=True, inline="always")
def _normalise_row(s, gamma, beta, eps, one, fC, y, xhat):
    """y, xhat of one row s (which may be xhat itself: each entry is read before it is written); returns rstd."""
    zero = one - one
    mean = row_sum(s, zero) / fC
    r = one / np.sqrt(_row_sq_dev(s, mean, zero) / fC + eps)  # biased variance, as the reference
    for j in range(s.shape[0]):
        xh = (s[j] - mean) * r
        xhat[j] = xh
        y[j] = xh * gamma[j] + beta[j]
    return r


@njit(cache=True, parallel=True, nogil=True)
def _forward(x, gamma, beta, eps, one, fC, y, xhat, rstd):
    for i in prange(x.shape[0]):
        rstd[i] = _normalise_row(x[i], gamma, beta, eps, one, fC, y[i], xhat[i])


@njit(cache=True, parallel=True, nogil=True)
def _dropout_add_forward(x, residual, gamma, beta, eps, one, fC, seed, threshold, drop_scale, y, xhat, rstd):
    # threshold 0 keeps every entry (the reference then adds x unscaled; drop_scale is 1 then)
    N, C = x.shape
    zero = one - one
    for i in prange(N):
        s = xhat[i]
        counter = np.uint64(i * C)
        for j in range(C):
            counter += ONE_U64  # the hash counts from flat index + 1
            s[j] = residual[i, j] + (x[i, j] * drop_scale if keep(seed, counter, threshold) else zero)
        rstd[i] = _normalise_row(s, gamma, beta, eps, one, fC, y[i], xhat[i])


@njit(cache=True, parallel=True, nogil=True)
def _forward_dropout(x, gamma, beta, eps, one, fC, seed, threshold, drop_scale, y, xhat, rstd):
    # threshold 0: no dropout, y = LN(x)
    N, C = x.shape
    zero = one - one
    for i in prange(N):
        rstd[i] = _normalise_row(x[i], gamma, beta, eps, one, fC, y[i], xhat[i])
        if threshold:
            counter = np.uint64(i * C)
            for j in range(C):
                counter += ONE_U64  # the hash counts from flat index + 1
                y[i, j] = y[i, j] * drop_scale if keep(seed, counter, threshold) else zero


@njit(cache=True, fastmath=REDUCE)
def _g_sums(d, gamma, xh, zero):
    """(sum(g), sum(g * xh)) with g = d * gamma, in SIMD partial sums, as _common.row_sum."""
    sg = sgx = zero
    for j in range(d.shape[0]):
        g = d[j] * gamma[j]
        sg += g
        sgx += g * xh[j]
    return sg, sgx


@njit(cache=True, inline="always")
def _backward_row(d, xh, r, gamma, fC, dx, pgamma, pbeta):
    """dx of one row, r * (g - mean(g) - xh * mean(g * xh)) with g = d * gamma, and its dgamma, dbeta shares added
    into the chunk's partial rows."""
    sg, sgx = _g_sums(d, gamma, xh, fC - fC)
    mg = sg / fC
    mgx = sgx / fC
    for j in range(d.shape[0]):
        dx[j] = r * (d[j] * gamma[j] - mg - xh[j] * mgx)
        pgamma[j] += d[j] * xh[j]
        pbeta[j] += d[j]


@njit(cache=True, parallel=True, nogil=True)
def _backward(dout, xhat, rstd, gamma, fC, dx, pgamma, pbeta):
    N = dout.shape[0]
    chunks = pgamma.shape[0]
    for c in prange(chunks):
        for i in range(c * N // chunks, (c + 1) * N // chunks):
            _backward_row(dout[i], xhat[i], rstd[i], gamma, fC, dx[i], pgamma[c], pbeta[c])


@njit(cache=True, parallel=True, nogil=True)
def _dropout_add_backward(dout, xhat, rstd, gamma, fC, seed, threshold, drop_scale, dx, dresidual, pgamma, pbeta):
    N, C = dout.shape
    chunks = pgamma.shape[0]
    zero = fC - fC
    for c in prange(chunks):
        for i in range(c * N // chunks, (c + 1) * N // chunks):
            ds = dresidual[i]
            _backward_row(dout[i], xhat[i], rstd[i], gamma, fC, ds, pgamma[c], pbeta[c])
            counter = np.uint64(i * C)
            for j in range(C):
                counter += ONE_U64
                dx[i, j] = ds[j] * drop_scale if keep(seed, counter, threshold) else zero


@njit(cache=True, parallel=True, nogil=True)
def _backward_dropout(dout, xhat, rstd, gamma, fC, seed, threshold, drop_scale, dx, pgamma, pbeta):
    N, C = dout.shape
    chunks = pgamma.shape[0]
    zero = fC - fC
    for c in prange(chunks):
        dy = np.empty(C, dout.dtype)  # the row's gradient at LN's output, through the dropout mask
        for i in range(c * N // chunks, (c + 1) * N // chunks):
            counter = np.uint64(i * C)
            for j in range(C):
                counter += ONE_U64
                dy[j] = dout[i, j] * drop_scale if keep(seed, counter, threshold) else zero
            _backward_row(dy, xhat[i], rstd[i], gamma, fC, dx[i], pgamma[c], pbeta[c])


def _check_params(gamma, beta, C):
    checks.param("gamma", gamma, (C,), "(C,)")
    checks.param("beta", beta, (C,), "(C,)")


def _normalise(kernel, x, gamma, beta, eps, *extra):
    """kernel(x2, gamma, beta, eps, 1, C, *extra, y, xhat, rstd) on x as (N, C) in the inputs' dtype -> (y (..., C),
    LayerNormCache): what the two forward kernels share."""
    C = x.shape[-1]
    _check_params(gamma, beta, C)
    dt = float_dtype(x, gamma, beta)
    x2 = as_2d(x, dt)  # (N, C)
    N = x2.shape[0]
    y, xhat, rstd = np.empty((N, C), dt), np.empty((N, C), dt), np.empty(N, dt)
    kernel(x2, np.ascontiguousarray(gamma, dtype=dt), np.ascontiguousarray(beta, dtype=dt), dt.type(eps), dt.type(1),
           dt.type(C), *(dt.type(a) if isinstance(a, float) else a for a in extra), y, xhat, rstd)
    shape = x.shape
    return y.reshape(shape), LayerNormCache(xhat.reshape(shape), rstd.reshape(shape[:-1] + (1,)), gamma)


def layernorm_forward(x, gamma, beta, eps=LAYER_NORM_EPS):
    """x (..., C), gamma (C,), beta (C,) -> (..., C)."""
    checks.float_array("x", x)
    return _normalise(_forward, x, gamma, beta, eps)


def _backward_args(dout, ln):
    """dout and the LayerNormCache as the 2-D, one-dtype arrays the backward kernels take -> (dt, N, C, args)."""
    xhat, rstd, gamma = ln
    checks.float_array("dout", dout)
    checks.shape("dout", dout, xhat.shape, "(..., C) like the forward's x")
    C = xhat.shape[-1]
    dt = float_dtype(dout, xhat, gamma)
    d2 = as_2d(dout, dt)  # (N, C)
    N = d2.shape[0]
    args = (d2, as_2d(xhat, dt), np.ascontiguousarray(rstd, dtype=dt).reshape(N), np.ascontiguousarray(gamma, dtype=dt),
            dt.type(C))
    return dt, N, C, args


def layernorm_backward(dout, cache):
    """Inverts `out = xhat * gamma + beta`: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * gamma."""
    dt, N, C, args = _backward_args(dout, cache)
    dx = np.empty((N, C), dt)
    pgamma, pbeta = np.zeros((n_chunks(N), C), dt), np.zeros((n_chunks(N), C), dt)
    _backward(*args, dx, pgamma, pbeta)
    return dx.reshape(dout.shape), pgamma.sum(axis=0), pbeta.sum(axis=0)


def dropout_add_layernorm_forward(x, residual, gamma, beta, p, rng, train=True, eps=LAYER_NORM_EPS):
    """x, residual (..., C), gamma, beta (C,) -> LN(residual + dropout(x)) (..., C)."""
    seed, threshold, drop_scale = dropout_add_setup(x, residual, p, rng, train)  # the reference's draw: its mask
    C = x.shape[-1]
    _check_params(gamma, beta, C)
    dt = float_dtype(x, residual, gamma, beta)
    x2 = as_2d(x, dt)  # (N, C)
    N = x2.shape[0]
    y, xhat, rstd = np.empty((N, C), dt), np.empty((N, C), dt), np.empty(N, dt)
    _dropout_add_forward(x2, as_2d(residual, dt), np.ascontiguousarray(gamma, dtype=dt),
                         np.ascontiguousarray(beta, dtype=dt), dt.type(eps), dt.type(1), dt.type(C), np.uint64(seed),
                         np.uint64(threshold), dt.type(drop_scale if threshold else 1.0), y, xhat, rstd)
    shape = x.shape
    ln = LayerNormCache(xhat.reshape(shape), rstd.reshape(shape[:-1] + (1,)), gamma)
    return y.reshape(shape), DropoutAddNormCache(ln, seed, threshold, drop_scale)


def dropout_add_layernorm_backward(dout, cache):
    """Inverts `y = LN(s)`, `s = residual + x * keep * drop_scale` -> dx, dresidual, dgamma, dbeta."""
    dt, N, C, args = _backward_args(dout, cache.ln)
    dx, dresidual = np.empty((N, C), dt), np.empty((N, C), dt)
    pgamma, pbeta = np.zeros((n_chunks(N), C), dt), np.zeros((n_chunks(N), C), dt)
    _dropout_add_backward(*args, np.uint64(cache.seed), np.uint64(cache.threshold),
                          dt.type(cache.drop_scale if cache.threshold else 1.0), dx, dresidual, pgamma, pbeta)
    return dx.reshape(dout.shape), dresidual.reshape(dout.shape), pgamma.sum(axis=0), pbeta.sum(axis=0)


def layernorm_dropout_forward(x, gamma, beta, p, rng, train=True, eps=LAYER_NORM_EPS):
    """x (..., C), gamma, beta (C,) -> dropout(LN(x)) (..., C)."""
    seed, threshold, drop_scale = layernorm_dropout_setup(x, p, rng, train)  # the reference's draw: its mask
    y, ln = _normalise(_forward_dropout, x, gamma, beta, eps, np.uint64(seed), np.uint64(threshold), drop_scale)
    return y, NormDropoutCache(ln, seed, threshold, drop_scale)


def layernorm_dropout_backward(dout, cache):
    """Inverts `out = LN(x) * keep * drop_scale` -> dx, dgamma, dbeta."""
    if not cache.threshold:
        return layernorm_backward(dout, cache.ln)
    dt, N, C, args = _backward_args(dout, cache.ln)
    dx = np.empty((N, C), dt)
    pgamma, pbeta = np.zeros((n_chunks(N), C), dt), np.zeros((n_chunks(N), C), dt)
    _backward_dropout(*args, np.uint64(cache.seed), np.uint64(cache.threshold), dt.type(cache.drop_scale), dx, pgamma,
                      pbeta)
    return dx.reshape(dout.shape), pgamma.sum(axis=0), pbeta.sum(axis=0)
