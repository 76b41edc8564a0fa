"""Multi-head self-attention, in two layers of ops.

`attention_forward` is the core a kernel replaces: softmax(q k^T / sqrt(D), padding mask) with dropout, times v, for
every batch and head at once. `mha_forward` wraps it with the Q, K, V and output projections and the head split.

Scale: q . k sums D products of roughly unit-variance terms, so its spread grows like sqrt(D); dividing by sqrt(D)
keeps the scores O(1) whatever the head size, so the softmax does not saturate into a one-hot whose gradient vanishes.
Mask: a padded key must get no weight from any query; padded queries still compute (their rows are ignored later).
Dropout on the weights uses the counter-based mask of `minielectra.ops.dropout.hashed_keep_mask`: one seed drawn from
the Generator decides every keep(b, h, i, j). The reference stores that mask as a (B, H, T, T) scale like any dropout,
but the kernels recompute it from the seed where they need it and store no (T, T) array, and still drop the very
weights the reference drops.
"""

import math
from typing import NamedTuple

from minielectra.backend import dispatch, get_xp
from minielectra.ops import checks
from minielectra.ops.dropout import DropoutCache, draw_seed, drop_threshold, dropout_backward, hashed_keep_mask
from minielectra.ops.softmax import softmax_backward, softmax_forward


def key_mask(mask, B, T):
    """The (B, T) padding mask (nonzero = real token) as a boolean (B, 1, 1, T) that broadcasts over heads and queries."""
    if mask is None:
        return None
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"attention mask must have shape (B, T) = {(B, T)}, got {tuple(mask.shape)}")
    return (mask != 0)[:, None, None, :]


class AttentionCache(NamedTuple):
    q: object  # (B, H, T, D)
    k: object  # (B, H, T, D)
    v: object  # (B, H, T, D)
    probs: object  # (B, H, T, T) attention weights before dropout: what to plot
    softmax: object  # SoftmaxCache
    dropout: object  # DropoutCache on the weights
    scale: float  # 1 / sqrt(D)
    seed: int = 0  # the dropout mask's hash seed (draw_seed)
    threshold: int = 0  # drop_threshold(p_drop); 0: no dropout

    @property
    def keep(self):
        """(B, H, T, T) bool dropout keep mask, recomputed from the seed; None when dropout was off."""
        if not self.threshold:
            return None
        return hashed_keep_mask(get_xp(self.q), self.seed, self.probs.shape, self.threshold)


def check_attention_args(q, k, v, mask=None, p_drop=0.0):
    """attention_forward's argument checks, shared with the kernels that replace it -> (B, H, T, D)."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        checks.float_array(name, a)
        checks.ndim(name, a, 4, "(B, H, T, D)")
    checks.shape("k", k, q.shape, "(B, H, T, D) like q")
    checks.shape("v", v, q.shape, "(B, H, T, D) like q")
    B, H, T, D = q.shape
    if mask is not None:
        checks.shape("attention mask", mask, (B, T), "(B, T)")
    checks.probability("p_drop", p_drop)
    return B, H, T, D


def attention_forward(q, k, v, mask=None, p_drop=0.0, rng=None):
    """q, k, v (B, H, T, D), mask (B, T) nonzero at real tokens -> (B, H, T, D). Dropout on the weights when p_drop > 0."""
    B, H, T, D = check_attention_args(q, k, v, mask, p_drop)
    scale = 1.0 / math.sqrt(D)
    scores = (q @ k.swapaxes(-1, -2)) * q.dtype.type(scale)  # (B, H, T, T)
    probs, sm_cache = softmax_forward(scores, key_mask(mask, B, T))  # (B, H, T, T)
    threshold = drop_threshold(p_drop)
    if threshold:
        seed = draw_seed(rng)
        keep = hashed_keep_mask(get_xp(probs), seed, probs.shape, threshold)  # (B, H, T, T)
        drop_cache = DropoutCache(keep.astype(probs.dtype) * probs.dtype.type(1.0 / (1.0 - p_drop)))
        dropped = probs * drop_cache.scale
    else:
        seed, drop_cache, dropped = 0, DropoutCache(None), probs
    out = dropped @ v  # (B, H, T, D)
    return out, AttentionCache(q, k, v, probs, sm_cache, drop_cache, scale, seed, threshold)


def attention_backward(dout, cache):
    """Inverts `out = dropout(softmax(q k^T * scale)) @ v` -> (dq, dk, dv)."""
    q, k, v, probs, sm_cache, drop_cache, scale, _, _ = cache  # the seed and threshold live on in drop_cache.scale
    dropped = probs if drop_cache.scale is None else probs * drop_cache.scale
    dv = dropped.swapaxes(-1, -2) @ dout  # (B, H, T, D)   from out = dropped @ v
    ddropped = dout @ v.swapaxes(-1, -2)  # (B, H, T, T)
    dprobs = dropout_backward(ddropped, drop_cache)
    dscores = softmax_backward(dprobs, sm_cache) * q.dtype.type(scale)  # (B, H, T, T)
    dq = dscores @ k  # (B, H, T, D)   from scores = q @ k^T * scale
    dk = dscores.swapaxes(-1, -2) @ q  # (B, H, T, D)
    return dq, dk, dv


def _split_heads(x, H):
    B, T, C = x.shape
    return x.reshape(B, T, H, C // H).transpose(0, 2, 1, 3)  # (B, H, T, D)


def _merge_heads(x):
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)  # (B, T, C)


class MHACache(NamedTuple):
    q: object  # LinearCache of each projection
    k: object
    v: object
    attn: AttentionCache  # attn.probs (B, H, T, T) are the attention weights
    o: object
    n_heads: int

    @property
    def probs(self):
        return self.attn.probs


def mha_forward(x, Wq, bq, Wk, bk, Wv, bv, Wo, bo, mask=None, n_heads=1, p_drop=0.0, rng=None):
    """x (B, T, C) -> (B, T, C): project to Q, K, V, attend per head (D = C / H), merge heads, project out."""
    checks.float_array("x", x)
    checks.ndim("x", x, 3, "(B, T, C)")
    B, T, C = x.shape
    if n_heads < 1 or C % n_heads:
        raise ValueError(f"n_heads {n_heads} must divide the model width C = {C}")
    for name, p in (("Wq", Wq), ("Wk", Wk), ("Wv", Wv), ("Wo", Wo)):  # named here: linear would only say "W"
        checks.param(name, p, (C, C), "(C, C)")
    for name, p in (("bq", bq), ("bk", bk), ("bv", bv), ("bo", bo)):
        checks.param(name, p, (C,), "(C,)")
    project = dispatch("project", x)
    q, q_cache = project(x, Wq, bq)  # (B, T, C)
    k, k_cache = project(x, Wk, bk)
    v, v_cache = project(x, Wv, bv)
    attention = dispatch("attention_forward", x)
    a, a_cache = attention(_split_heads(q, n_heads), _split_heads(k, n_heads), _split_heads(v, n_heads),
                           mask, p_drop, rng)  # (B, H, T, D)
    out, o_cache = project(_merge_heads(a), Wo, bo)  # (B, T, C)
    return out, MHACache(q_cache, k_cache, v_cache, a_cache, o_cache, n_heads)


def mha_backward(dout, cache):
    """Inverts mha_forward -> (dx, dWq, dbq, dWk, dbk, dWv, dbv, dWo, dbo); x fed Q, K and V, so dx sums three paths."""
    linear_backward = dispatch("linear_backward", dout)
    da, dWo, dbo = linear_backward(dout, cache.o)  # (B, T, C)
    H = cache.n_heads
    dq, dk, dv = dispatch("attention_backward", dout)(_split_heads(da, H), cache.attn)  # (B, H, T, D) each
    dxq, dWq, dbq = linear_backward(_merge_heads(dq), cache.q)
    dxk, dWk, dbk = linear_backward(_merge_heads(dk), cache.k)
    dxv, dWv, dbv = linear_backward(_merge_heads(dv), cache.v)
    return dxq + dxk + dxv, dWq, dbq, dWk, dbk, dWv, dbv, dWo, dbo
