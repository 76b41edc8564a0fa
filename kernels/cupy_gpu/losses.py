"""CUDA kernels for `minielectra.ops.losses` (softmax_cross_entropy, sigmoid_cross_entropy): launcher of losses.cu.

Same contract as the reference: weighted means sum(w * loss_i) / sum(w), (loss, dlogits), 0 when every weight is 0,
exact at logits of +-1000; the loss is a 0-d float64 device array, as the reference's on a device. Softmax cross-entropy runs one block per row (max, sum of exp and the
gradient in three passes over the row, nothing (N, V)-sized besides dlogits); sigmoid cross-entropy is elementwise.
sum(w) is formed on the device and read by the kernels through a pointer, and the per-row losses are summed there:
nothing crosses to the host.
float32 and float64.
"""

import numpy as np

from minielectra.kernels.cupy_gpu import _common
from minielectra.ops import checks
from minielectra.ops.losses import check_sigmoid_ce_args, check_softmax_ce_args, mean_loss, weight_total

SOFTMAX_THREADS = 256  # LS_THREADS in losses.cu
THREADS = 256


def _weights(xp, name, weights, shape, dtype):
    if weights is None:
        return xp.ones(shape, dtype=dtype)
    checks.shape(name, weights, shape, "like the targets")
    return xp.ascontiguousarray(weights, dtype=dtype)


def check_softmax(logits, targets, weights=None):
    """The reference's checks (the range of the targets only for host arrays, as the reference)."""
    N, V = check_softmax_ce_args(logits, targets, weights)
    return logits.dtype, N, V


def softmax_cross_entropy(logits, targets, weights=None):
    """logits (N, V), targets (N,) ints in [0, V), weights (N,) -> (loss, dlogits (N, V))."""
    dt, N, V = check_softmax(logits, targets, weights)
    _common.require_device_arrays("softmax_cross_entropy", "minielectra.ops.losses.softmax_cross_entropy",
                                  logits=logits, targets=targets, weights=weights)
    xp = _common.runtime().xp
    x = xp.ascontiguousarray(logits)
    t = xp.ascontiguousarray(targets, dtype=np.int64)
    w = _weights(xp, "weights", weights, (N,), dt)
    denom = weight_total(w)
    dlogits = xp.empty((N, V), dt)
    rowloss = xp.zeros((N,), dt)
    if N:
        _common.launch("losses", f"softmax_cross_entropy_{_common.suffix(dt)}", (N,), (SOFTMAX_THREADS,),
                       (x, t, w, denom.astype(dt).reshape(1), dlogits, rowloss, np.int32(V)))
    return mean_loss(-rowloss.sum(), denom), dlogits


def check_sigmoid(logits, labels, weights=None):
    check_sigmoid_ce_args(logits, labels, weights)
    return logits.dtype


def sigmoid_cross_entropy(logits, labels, weights=None):
    """logits (...), labels (...) in {0, 1}, weights (...) -> (loss, dlogits (...))."""
    dt = check_sigmoid(logits, labels, weights)
    _common.require_device_arrays("sigmoid_cross_entropy", "minielectra.ops.losses.sigmoid_cross_entropy",
                                  logits=logits, labels=labels, weights=weights)
    xp = _common.runtime().xp
    z = xp.ascontiguousarray(logits)
    y = xp.ascontiguousarray(labels, dtype=dt)
    w = _weights(xp, "weights", weights, z.shape, dt)
    denom = weight_total(w)
    dlogits, wloss = xp.empty_like(z), xp.zeros_like(z)
    n = z.size
    if n:
        _common.launch("losses", f"sigmoid_cross_entropy_{_common.suffix(dt)}", (_common.blocks_for(n, THREADS),),
                       (THREADS,), (z, y, w, denom.astype(dt).reshape(1), dlogits, wloss, np.int64(n)))
    return mean_loss(wloss.sum(), denom), dlogits
