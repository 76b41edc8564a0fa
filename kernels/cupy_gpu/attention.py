"""CUDA kernels for `minielectra.ops.attention` (attention_forward, attention_backward): launcher of attention.cu.

FlashAttention-style (see attention.cu): the forward keeps, besides its output, only the log-sum-exp of every score
row (B, H, T); the backward recomputes the probabilities from it, so memory grows linearly in T. float32 with head
size D <= 128 runs the kernels; float64 inputs (gradient checks) and larger heads fall back to the NumPy/CuPy reference
(and its cache, which attention_backward here accepts too).

Dropout uses the reference's counter-based mask (`minielectra.ops.dropout.hashed_keep_mask`): one 64-bit seed drawn
with rng.integers, and each keep(b, h, i, j) a hash of (seed, flat index) that attention.cu's attn_keep computes inside
the kernels, so no (T, T) mask is stored. The same seed gives the same mask in the forward and the backward (so
gradients are exact for the mask used), and the same mask as the reference and the Numba kernel.
"""

import math
from typing import NamedTuple

import numpy as np

from minielectra.kernels.cupy_gpu import _common
from minielectra.backend import get_xp
from minielectra.ops import attention as _reference
from minielectra.ops import checks
from minielectra.ops.dropout import draw_seed, drop_threshold, hashed_keep_mask

BR, BC = 64, 32  # rows per block and per shared-memory tile: must match attention.cu
MAX_DS = (32, 64, 128)  # the head sizes the kernels are instantiated for (D is rounded up to one of them)


class FlashAttentionCache(NamedTuple):
    q: object  # (B, H, T, D) float32, contiguous
    k: object  # (B, H, T, D)
    v: object  # (B, H, T, D)
    out: object  # (B, H, T, D) the forward's output: delta = rowsum(dout * out) in the backward
    lse: object  # (B, H, T) log-sum-exp of each masked, scaled score row; +inf for a fully masked row
    keys: object  # (B, T) uint8, 1 at real tokens
    scale: float  # 1 / sqrt(D)
    threshold: int  # dropout threshold (drop_threshold(p)); 0: no dropout
    drop_scale: float  # 1 / (1 - p)
    seed: int  # the dropout hash's seed

    @property
    def probs(self):
        """(B, H, T, T) attention weights before dropout, recomputed on demand from q, k, the mask and lse."""
        xp = get_xp(self.q)
        s = (self.q @ self.k.swapaxes(-1, -2)) * np.float32(self.scale)  # (B, H, T, T)
        s = xp.where(self.keys.astype(bool)[:, None, None, :], s, -xp.inf) - self.lse[..., None]
        return xp.exp(s).astype(self.q.dtype, copy=False)

    @property
    def keep(self):
        """(B, H, T, T) bool dropout keep mask the kernels used; None when dropout was off."""
        if not self.threshold:
            return None
        B, H, T, _ = self.q.shape
        return hashed_keep_mask(get_xp(self.q), self.seed, (B, H, T, T), self.threshold)


def check_forward(q, k, v, mask=None, p_drop=0.0, rng=None):
    """The reference's argument checks (no GPU needed) -> (B, H, T, D, use_kernel)."""
    B, H, T, D = _reference.check_attention_args(q, k, v, mask, p_drop)
    if p_drop > 0 and not isinstance(rng, np.random.Generator):
        raise TypeError("dropout needs an explicit numpy.random.Generator as rng (np.random.default_rng(seed))")
    use_kernel = _common.float_dtype(q, k, v) == np.float32 and 1 <= D <= MAX_DS[-1]
    return B, H, T, D, use_kernel


def attention_forward(q, k, v, mask=None, p_drop=0.0, rng=None):
    """q, k, v (B, H, T, D), mask (B, T) nonzero at real tokens -> (B, H, T, D). Dropout on the weights when p_drop > 0."""
    B, H, T, D, use_kernel = check_forward(q, k, v, mask, p_drop, rng)
    if not use_kernel:  # float64 (gradient checks) or a head larger than the kernels' registers: the reference
        return _reference.attention_forward(q, k, v, mask, p_drop, rng)
    _common.require_device_arrays("attention_forward", "minielectra.ops.attention.attention_forward",
                                  q=q, k=k, v=v, mask=mask)
    xp = _common.runtime().xp
    q, k, v = (xp.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v))
    keys = xp.ones((B, T), np.uint8) if mask is None else xp.ascontiguousarray(mask != 0, dtype=np.uint8)
    threshold = drop_threshold(p_drop)
    seed = draw_seed(rng) if threshold else 0  # the reference's one draw: the same mask
    drop_scale = float(np.float32(1.0 / (1.0 - p_drop)))
    scale = 1.0 / math.sqrt(D)
    out = xp.zeros((B, H, T, D), np.float32)
    lse = xp.empty((B, H, T), np.float32)
    if B * H * T:
        maxd = next(m for m in MAX_DS if D <= m)
        _common.launch("attention", f"attention_forward_d{maxd}", (B * H, -(-T // BR)), (BR,),
                       (q, k, v, keys, out, lse, np.int32(H), np.int32(T), np.int32(D), np.float32(scale),
                        np.uint32(threshold), np.float32(drop_scale), np.uint64(seed)),
                       shared_mem=2 * BC * D * 4)
    return out, FlashAttentionCache(q, k, v, out, lse, keys, scale, threshold, drop_scale, seed)


def attention_backward(dout, cache):
    """Inverts `out = dropout(softmax(q k^T * scale)) @ v` -> (dq, dk, dv)."""
    if isinstance(cache, _reference.AttentionCache):  # the forward fell back to the reference
        return _reference.attention_backward(dout, cache)
    q, k, v, out, lse, keys, scale, threshold, drop_scale, seed = cache
    checks.float_array("dout", dout)
    checks.shape("dout", dout, q.shape, "(B, H, T, D) like q")
    _common.require_device_arrays("attention_backward", "minielectra.ops.attention.attention_backward", dout=dout)
    xp = _common.runtime().xp
    B, H, T, D = q.shape
    dout = xp.ascontiguousarray(dout, dtype=np.float32)
    dq, dk, dv = (xp.zeros((B, H, T, D), np.float32) for _ in range(3))
    if B * H * T:
        delta = xp.ascontiguousarray((dout * out).sum(axis=-1, dtype=np.float32))  # (B, H, T) = sum_j P dP
        maxd = next(m for m in MAX_DS if D <= m)
        common = (np.int32(H), np.int32(T), np.int32(D), np.float32(scale), np.uint32(threshold),
                  np.float32(drop_scale), np.uint64(seed))
        grid = (B * H, -(-T // BR))
        _common.launch("attention", f"attention_backward_dq_d{maxd}", grid, (BR,),
                       (q, k, v, keys, dout, lse, delta, dq) + common, shared_mem=2 * BC * D * 4)
        _common.launch("attention", f"attention_backward_dkdv_d{maxd}", grid, (BR,),
                       (q, k, v, keys, dout, lse, delta, dk, dv) + common, shared_mem=(2 * BC * D + 2 * BC) * 4)
    return dq, dk, dv
