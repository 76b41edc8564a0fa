"""Numba CPU kernels for `minielectra.ops.linear` (matmul_forward, matmul_backward, linear_forward, project,
linear_backward).

The products stay BLAS's: `_blas.gemm` calls the sgemm/dgemm that NumPy's matmul calls. What the kernels fuse is what
sits around them: the forward adds the bias in the same call, right after BLAS has written the product; the backward
computes dx = dout @ W.T, dW = x.T @ dout and db, the sum of dout's rows (a loop that adds row after row in float64,
SIMD across the row), in one call. A transposed W (the tied LM head's table.T) is read where it lies, with BLAS's
transposition flag, not copied.

Why: one Numba call per op, where the reference makes two to four NumPy calls and the reshapes around them. In the
sharded step each call is a moment where a thread gives up Python's lock and must win it back (parallel.py), and the
tiny preset makes 105 linear ops a shard-step. Tiny preset, 2-core step (batch 32 x 128), alternating the reference
and these kernels in one process, two runs: 2.1 and 1.6 ms faster a step (of 108-116). Adding the bias inside
BLAS instead (the output set to b, then beta = 1) was slower: BLAS then reads the output back, 0.395 ms against 0.29
for a (2048, 128) x (128, 128) product on one core.

The results are the reference's up to rounding: db is summed in float64 where the reference's GEMV sums in the input
dtype.
"""

import math

import numpy as np
from numba import njit

from minielectra.kernels.numba_cpu._blas import gemm
from minielectra.kernels.numba_cpu._common import float_dtype
from minielectra.ops.linear import LinearCache, _check_matmul
from minielectra.ops import checks


@njit(cache=True, nogil=True)
def _forward(x, w, ldw, trans_w, b, out):
    # out (N, OC) = x (N, C) @ op(w) + b, op(w) = w or w.T (C, OC) with rows ldw apart; b (OC,), or (0,) for none.
    N, C = x.shape
    OC = out.shape[1]
    gemm(x, C, False, w, ldw, trans_w, out, OC, N, OC, C, False)
    if b.shape[0]:
        for i in range(N):
            for j in range(OC):
                out[i, j] += b[j]


@njit(cache=True, nogil=True)
def _backward(dout, x, w, ldw, trans_w, dx, dw, db):
    # dx (N, C) = dout (N, OC) @ op(w).T, dw (C, OC) = x.T @ dout, db (OC,) = dout's row sum (db of size 0: none).
    N, OC = dout.shape
    C = x.shape[1]
    gemm(dout, OC, False, w, ldw, not trans_w, dx, C, N, C, OC, False)
    gemm(x, C, True, dout, OC, False, dw, OC, C, OC, N, False)
    if db.shape[0]:
        acc = np.zeros(OC)  # float64: the row sum's rounding stays far below the reference's own
        for i in range(N):
            for j in range(OC):
                acc[j] += dout[i, j]
        for j in range(OC):
            db[j] = acc[j]


def _blas_operand(W, dt):
    """(w, ld, trans) with op(w) = W for BLAS: W itself when its rows are contiguous, the C-contiguous W.T with the
    transposition flag when W is a transposed view (the LM head's table.T), else a contiguous copy."""
    if W.dtype == dt and W.flags.c_contiguous:
        return W, W.shape[1], False
    if W.dtype == dt and W.T.flags.c_contiguous:
        return W.T, W.shape[0], True
    W = np.ascontiguousarray(W, dtype=dt)
    return W, W.shape[1], False


def _linear(x, W, b):
    """x (..., C) @ W (C, OC) (+ b (OC,) unless None) -> ((..., OC), LinearCache), on arguments already checked."""
    C, OC = W.shape
    dt = float_dtype(x, W) if b is None else float_dtype(x, W, b)
    x2 = np.ascontiguousarray(x, dtype=dt).reshape(math.prod(x.shape[:-1]), C)  # (N, C)
    out = np.empty((x2.shape[0], OC), dt)
    if x2.shape[0] and OC:
        if C:
            w, ld, trans = _blas_operand(W, dt)
            _forward(x2, w, ld, trans, np.empty(0, dt) if b is None else np.ascontiguousarray(b, dtype=dt), out)
        else:  # BLAS rejects an empty inner dimension: the product is zeros
            out[:] = 0 if b is None else b
    return out.reshape(*x.shape[:-1], OC), LinearCache(x, W)


def matmul_forward(x, W):
    """x (..., C) @ W (C, OC) -> (..., OC): a linear layer whose bias is added by the next op (e.g. bias_gelu)."""
    _check_matmul(x, W)
    return _linear(x, W, None)


def linear_forward(x, W, b):
    """x (..., C) @ W (C, OC) + b (OC,) -> (..., OC)."""
    _check_matmul(x, W)
    checks.param("b", b, (W.shape[1],), "(OC,)")
    return _linear(x, W, b)


def project(x, W, b):
    """linear_forward without its argument checks, for a caller that has made them (see the reference)."""
    return _linear(x, W, b)


def _backward_all(dout, cache, with_bias):
    x, W = cache
    C, OC = W.shape
    checks.float_array("dout", dout)
    checks.shape("dout", dout, tuple(x.shape[:-1]) + (OC,), "(..., OC) like the forward's output")
    dt = float_dtype(dout, x, W)
    N = math.prod(x.shape[:-1])
    d2 = np.ascontiguousarray(dout, dtype=dt).reshape(N, OC)
    x2 = np.ascontiguousarray(x, dtype=dt).reshape(N, C)
    if N and C and OC:
        dx, dW, db = np.empty((N, C), dt), np.empty((C, OC), dt), np.empty(OC if with_bias else 0, dt)
        w, ld, trans = _blas_operand(W, dt)
        _backward(d2, x2, w, ld, trans, dx, dW, db)
    else:  # BLAS rejects empty matrices: an empty product's dx and dW are zeros, its db is not
        dx, dW, db = np.zeros((N, C), dt), np.zeros((C, OC), dt), d2.sum(axis=0) if with_bias else None
    dx = dx.reshape(*dout.shape[:-1], C)
    return (dx, dW, db) if with_bias else (dx, dW)


def matmul_backward(dout, cache):
    """Inverts `out = x @ W`: dx = dout @ W.T, dW = x.T @ dout summed over all leading rows."""
    return _backward_all(dout, cache, with_bias=False)


def linear_backward(dout, cache):
    """Inverts `out = x @ W + b`: the matmul's (dx, dW), and db = dout summed over every leading position."""
    return _backward_all(dout, cache, with_bias=True)
