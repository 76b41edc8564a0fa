"""The two ELECTRA losses, each returning (loss, dlogits) so the backward starts right here.

softmax_cross_entropy: the generator's masked-LM loss over the selected positions (and the classifier's loss).
sigmoid_cross_entropy: the discriminator's replaced-token-detection loss over the non-pad tokens.
Both are weighted means, sum(w * loss_i) / sum(w), as the official code computes them; with all weights 0 the loss
is 0 and so is its gradient. The loss is a Python float for NumPy inputs and a 0-d float64 array for device inputs. Both are exact at logits of +-1000: no exp of a large positive number is ever taken.
"""

from minielectra.backend import get_xp, on_device
from minielectra.ops import checks
from minielectra.ops.softmax import log_softmax_forward


def as_weights(weights, shape, xp, dtype):
    """The loss weights as `dtype`, all ones when None (shape already checked)."""
    return xp.ones(shape, dtype=dtype) if weights is None else weights.astype(dtype, copy=False)


def weight_total(w):
    """sum(w) in float64 as a 0-d array, 1 when it is 0 (every weight 0: loss and gradient 0, not NaN)."""
    xp = get_xp(w)
    total = xp.asarray(w.sum(), dtype=xp.float64)
    return xp.where(total > 0, total, 1.0)


def mean_loss(weighted_sum, denom):
    """weighted_sum / denom in float64: a Python float for host arrays, a 0-d array on a device, where float() would
    stall the step to copy one number to the host (the trainer copies a logging interval's losses at once)."""
    xp = get_xp(weighted_sum)
    loss = xp.asarray(weighted_sum, dtype=xp.float64) / denom
    return loss if on_device(loss) else float(loss)


def check_softmax_ce_args(logits, targets, weights=None):
    """softmax_cross_entropy's argument checks, shared with the kernels that replace it -> (N, V)."""
    checks.float_array("logits", logits)
    checks.ndim("logits", logits, 2, "(N, V)")
    checks.int_array("targets", targets)
    N, V = logits.shape
    checks.shape("targets", targets, (N,), "(N,)")
    if N and checks.readable(targets) and (int(targets.min()) < 0 or int(targets.max()) >= V):
        raise ValueError(f"targets must lie in [0, {V}), got values in [{int(targets.min())}, {int(targets.max())}]")
    if weights is not None:
        checks.shape("weights", weights, (N,), "(N,) like the targets")
    return N, V


def check_sigmoid_ce_args(logits, labels, weights=None):
    """sigmoid_cross_entropy's argument checks, shared with the kernels that replace it."""
    checks.float_array("logits", logits)
    checks.shape("labels", labels, logits.shape, "like logits")
    if labels.size and checks.readable(labels) and (float(labels.min()) < 0 or float(labels.max()) > 1):
        raise ValueError(f"labels must lie in [0, 1] (1 = replaced), got values in [{labels.min()}, {labels.max()}]")
    if weights is not None:
        checks.shape("weights", weights, logits.shape, "like logits")


def softmax_cross_entropy(logits, targets, weights=None):
    """logits (N, V), targets (N,) ints in [0, V), weights (N,) -> (loss, dlogits (N, V)).

    loss_i = -log softmax(logits_i)[targets_i]; dloss_i/dlogits_i = softmax(logits_i) - onehot(targets_i).
    """
    N, V = check_softmax_ce_args(logits, targets, weights)
    xp = get_xp(logits)
    w = as_weights(weights, (N,), xp, logits.dtype)
    logp, cache = log_softmax_forward(logits)  # (N, V)
    rows = xp.arange(N)
    denom = weight_total(w)
    loss = -(w * logp[rows, targets]).sum()
    dlogits = cache.probs.copy()  # (N, V)
    dlogits[rows, targets] -= 1.0
    dlogits *= (w / denom.astype(logits.dtype))[:, None]
    return mean_loss(loss, denom), dlogits


def sigmoid_cross_entropy(logits, labels, weights=None):
    """logits (...), labels (...) in {0, 1}, weights (...) -> (loss, dlogits (...)).

    loss_i = -[y log s(z) + (1 - y) log(1 - s(z))], written as max(z, 0) - z y + log(1 + exp(-|z|)) so it never
    overflows; dloss_i/dz = s(z) - y.
    """
    check_sigmoid_ce_args(logits, labels, weights)
    xp = get_xp(logits)
    z = logits
    y = labels.astype(z.dtype, copy=False)
    w = as_weights(weights, z.shape, xp, z.dtype)
    e = xp.exp(-xp.abs(z))  # in (0, 1]: the only exp taken
    per = xp.maximum(z, 0) - z * y + xp.log1p(e)
    sig = xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))  # sigmoid(z), stable on both sides
    denom = weight_total(w)
    dlogits = ((sig - y) * w / denom.astype(z.dtype)).astype(z.dtype, copy=False)
    return mean_loss((w * per).sum(), denom), dlogits
