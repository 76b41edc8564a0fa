"""Softmax and log-softmax over the last axis, with an optional mask.

The mask is either boolean (True = keep) or additive (0 = keep, -inf = drop), and broadcasts to x's shape.
Stability: subtract the row maximum before exp, so exp never overflows at +-1000. A fully masked row (every entry
dropped, e.g. a query in a padding-only sequence) has no defined softmax; we define it as all zeros in the output and
in the gradient, without producing NaN or a warning. A finite additive mask (Hugging Face's -1e4 or float32 min) is
just a shift: it makes dropped entries negligible in a mixed row, but a row shifted everywhere by the same amount is
the softmax of its unshifted scores, not zeros. Use a boolean or -inf mask when rows can be fully masked.

`gumbel_sample` draws from a softmax without computing it (ELECTRA's generator samples its replacements with it).
"""

from typing import NamedTuple

import numpy as np

from minielectra.backend import get_xp
from minielectra.ops import checks
from minielectra.ops.dropout import draw_seed, hashed_uniform


def _masked_scores(x, mask):
    """x with dropped entries set to -inf; the mask is checked to broadcast against x."""
    if mask is None:
        return x
    xp = get_xp(x)
    try:
        fits = xp.broadcast_shapes(tuple(mask.shape), tuple(x.shape)) == tuple(x.shape)
    except ValueError:
        fits = False
    if not fits:  # a mask may broadcast over x, never enlarge it
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x's shape {tuple(x.shape)}")
    if mask.dtype == bool:
        return xp.where(mask, x, -xp.inf)
    checks.float_array("mask", mask)
    return x + mask


def _exp_shifted(s):
    """exp(s - rowmax) and its row sum; a row that is all -inf gets shift 0, so it stays exp(-inf) = 0, not NaN."""
    xp = get_xp(s)
    m = s.max(axis=-1, keepdims=True)  # (..., 1)
    m = xp.where(xp.isfinite(m), m, 0.0).astype(s.dtype, copy=False)
    e = xp.exp(s - m)  # (..., N) in (0, 1]
    return e, m, e.sum(axis=-1, keepdims=True)


class SoftmaxCache(NamedTuple):
    probs: object  # (..., N) the output; the backward needs nothing else


def softmax_forward(x, mask=None):
    """x (..., N) -> probabilities (..., N), rows summing to 1 over kept entries (0 for a fully masked row)."""
    checks.float_array("x", x)
    xp = get_xp(x)
    e, _, denom = _exp_shifted(_masked_scores(x, mask))
    probs = e / xp.where(denom == 0, 1.0, denom)  # (..., N)
    return probs, SoftmaxCache(probs)


def softmax_backward(dout, cache):
    """Inverts `p = e / sum(e)`: dx = p * (dout - sum(dout * p)); masked entries have p = 0 and so get 0."""
    p = cache.probs
    return p * (dout - (dout * p).sum(axis=-1, keepdims=True))


class LogSoftmaxCache(NamedTuple):
    probs: object  # (..., N) softmax of the same row, 0 at masked entries
    keep: object  # (..., N) bool, entries that were not masked; None when there was no mask


def log_softmax_forward(x, mask=None):
    """x (..., N) -> log-probabilities (..., N). Masked entries (whose log-probability is -inf) hold 0, so sums stay finite."""
    checks.float_array("x", x)
    xp = get_xp(x)
    s = _masked_scores(x, mask)
    e, m, denom = _exp_shifted(s)
    safe = xp.where(denom == 0, 1.0, denom)
    keep = None if mask is None else xp.isfinite(s)
    out = s - m - xp.log(safe)  # (..., N)
    if keep is not None:
        out = xp.where(keep, out, 0.0).astype(x.dtype, copy=False)
    return out, LogSoftmaxCache(e / safe, keep)


def log_softmax_backward(dout, cache):
    """Inverts `out = s - log(sum(exp(s)))`: dx = dout - p * sum(dout) over kept entries; masked entries get 0."""
    p, keep = cache
    if keep is not None:
        dout = dout * keep
    return dout - p * dout.sum(axis=-1, keepdims=True)


GUMBEL_GUARD = 1e-9  # the official code's guard in -log(-log(u + 1e-9) + 1e-9): keeps log(0) out for u = 0


def check_gumbel_args(logits, temperature):
    """gumbel_sample's argument checks, shared with its kernels."""
    checks.float_array("logits", logits)
    checks.ndim("logits", logits, 2, "(N, V)")
    if logits.shape[1] == 0:
        raise ValueError("logits has shape (N, 0): there is no token to sample from")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def gumbel_sample(logits, temperature, rng):
    """logits (N, V) -> (N,) int64: one index per row, drawn from softmax(logits / temperature) by the Gumbel-max
    trick: argmax(logits / t + g) with g = -log(-log(u)) is distributed exactly as that softmax, with no
    normalisation. The first index wins a tie, as in argmax.

    The uniforms u are counter-based (dropout.hashed_uniform): one seed drawn from rng, u of entry (i, j) a hash of
    (seed, i * V + j). A kernel computes each where it uses it, so no (N, V) noise array is ever stored (300 MB a
    step for ELECTRA-Small's batch on a GPU), and every backend draws the same samples for the same seed. The noise
    is float32, as the official code's, whatever the logits' dtype.
    """
    check_gumbel_args(logits, temperature)
    xp = get_xp(logits)
    u = hashed_uniform(xp, draw_seed(rng), logits.shape)  # (N, V) float32
    guard = np.float32(GUMBEL_GUARD)
    g = -xp.log(-xp.log(u + guard) + guard)  # (N, V) float32
    return xp.argmax(logits / logits.dtype.type(temperature) + g, axis=-1)  # (N,)
