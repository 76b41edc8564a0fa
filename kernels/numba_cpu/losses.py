"""Numba CPU kernels for `minielectra.ops.losses` (softmax_cross_entropy, sigmoid_cross_entropy).

softmax_cross_entropy makes three passes per row: the max; exp(x - max), summed and parked in dlogits; then dlogits
scaled in place to (softmax - onehot) * w / sum(w). One exp per entry, and nothing of size (N, V) is allocated but
dlogits itself, where the reference materialises the shifted scores, their exp, log-probabilities and probabilities.
Rows run in a prange. The per-row weighted log-probabilities come back as an
(N,) array that is summed on the host exactly as the reference sums them, so the loss matches it.
sigmoid_cross_entropy is one fused elementwise pass. Both keep the reference's stable forms and expression order.
"""

import math

import numpy as np
from numba import njit, prange

from minielectra.kernels.numba_cpu._common import exp, row_max, row_sum
from minielectra.ops.losses import as_weights, check_sigmoid_ce_args, check_softmax_ce_args


@njit(cache=True, parallel=True, nogil=True)
def _softmax_ce(logits, targets, w, denom, one, wlogp, dlogits):
    N, V = logits.shape
    for i in prange(N):
        m = row_max(logits[i], logits[i, 0])
        for j in range(V):  # exp(x - max) parked in dlogits: the row stays in cache for the next passes
            dlogits[i, j] = exp(logits[i, j] - m)
        # A loop of its own, in SIMD partial sums (_common.row_sum, whose reordering stays off this kernel's other
        # arithmetic), in float64: a vocabulary is thousands of terms, which one float32 chain would add with up to
        # V / 2 ulps of error.
        s = dlogits.dtype.type(row_sum(dlogits[i], 0.0))
        t = targets[i]
        wlogp[i] = w[i] * (logits[i, t] - m - math.log(s))
        c = w[i] / denom  # the reference's w / denom, in the logits' dtype
        pt = dlogits[i, t] / s
        for j in range(V):
            dlogits[i, j] = dlogits[i, j] / s * c
        dlogits[i, t] = (pt - one) * c


@njit(cache=True, parallel=True, nogil=True)
def _sigmoid_ce(z, y, w, denom, one, wper, dz):
    n = z.shape[0]
    zero = one - one
    for i in prange(n):
        zi = z[i]
        e = math.exp(-abs(zi))  # in (0, 1]: the only exp taken
        wper[i] = w[i] * (max(zi, zero) - zi * y[i] + math.log1p(e))
        sig = one / (one + e) if zi >= zero else e / (one + e)  # sigmoid(z), stable on both sides
        dz[i] = (sig - y[i]) * w[i] / denom


def softmax_cross_entropy(logits, targets, weights=None):
    """logits (N, V), targets (N,) ints in [0, V), weights (N,) -> (loss, dlogits (N, V)).

    loss_i = -log softmax(logits_i)[targets_i]; dloss_i/dlogits_i = softmax(logits_i) - onehot(targets_i).
    """
    N, V = check_softmax_ce_args(logits, targets, weights)
    dt = logits.dtype
    x = np.ascontiguousarray(logits)
    w = np.ascontiguousarray(as_weights(weights, (N,), np, dt))
    total = float(w.sum())
    denom = total if total > 0 else 1.0
    wlogp = np.empty(N, dt)
    dlogits = np.empty((N, V), dt)
    if N:
        _softmax_ce(x, np.ascontiguousarray(targets, dtype=np.int64), w, dt.type(denom), dt.type(1), wlogp, dlogits)
    return float(-wlogp.sum()) / denom, dlogits


def sigmoid_cross_entropy(logits, labels, weights=None):
    """logits (...), labels (...) in {0, 1}, weights (...) -> (loss, dlogits (...)).

    loss_i = -[y log s(z) + (1 - y) log(1 - s(z))], written as max(z, 0) - z y + log(1 + exp(-|z|)) so it never
    overflows; dloss_i/dz = s(z) - y.
    """
    check_sigmoid_ce_args(logits, labels, weights)
    dt = logits.dtype
    z = np.ascontiguousarray(logits).reshape(-1)
    y = np.ascontiguousarray(labels, dtype=dt).reshape(-1)
    w = np.ascontiguousarray(as_weights(weights, logits.shape, np, dt)).reshape(-1)
    total = float(w.sum())
    denom = total if total > 0 else 1.0
    wper = np.empty(z.shape, dt)
    dz = np.empty(z.shape, dt)
    _sigmoid_ce(z, y, w, dt.type(denom), dt.type(1), wper, dz)
    return float(wper.sum()) / denom, dz.reshape(logits.shape)
