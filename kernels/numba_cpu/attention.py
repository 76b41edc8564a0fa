"""Numba CPU kernels for `minielectra.ops.attention` (attention_forward, attention_backward).

Memory grows linearly in T. The reference keeps the weights (B, H, T, T) and a dropout scale of the same size for its
backward; this kernel keeps, besides q, k and v, two numbers per query row: the max and the sum of exp(s - max) of its
masked, scaled scores (B, H, T each). The backward recomputes every weight from them as exp(s - max) / sum, the very
operations of the forward on the very scores (the same BLAS call on the same block), so it differentiates exactly the
weights the forward used, down to the subnormal ones, which exp(s - lse) would round differently. It recomputes the
dropout mask from its seed. Short sequences are the exception: up to T = KEEP_WEIGHTS_UP_TO (128) a head's (T, T)
weights are no larger than its q, k and v, and the forward keeps them and their keep bits for the backward, which then
skips one GEMM, an exp and a hash per weight.

One prange iteration per (batch, head) walks the queries in blocks of BR rows against all T keys, in a (BR, T) scratch
block of its own: scores = q_blk k^T (BLAS), scale, key padding mask, a stable softmax row by row (a fully masked row
gives zeros), dropout, then out_blk = weights @ v (BLAS). Each block holds whole rows, so the softmax needs no online
rescaling and the backward gets the softmax's row term sum_j dprobs_ij p_ij exactly as the reference computes it. Each
iteration writes only its own (b, h) slices.

Dropout is the reference's counter-based mask (`minielectra.ops.dropout.hashed_keep_mask`): one uint64 seed drawn from
the Generator, keep(b, h, i, j) a splitmix64 hash of (seed, flat index + 1) computed inside the loops, in the forward
and again in the backward. The same seed drops the same weights as the reference and as the CUDA kernel.

The GEMMs stay on BLAS: seven per head, one more than the reference, since the backward recomputes the scores. They
run on each head where it lies (`_blas.gemm`): q, k, v and dout are usually mha_forward's views of (B, T, C)
activations, a head's (T, D) rows C entries apart, and out, dq, dk, dv are written in that (B, T, H, D) layout and
returned as (B, H, T, D) views of it, so mha's merge of the heads back into (B, T, C) is a reshape, not a copy. What sits between them is fused: the reference makes separate (B, H, T, T) passes
for the scale, mask, max, exp, sum, divide, dropout and the softmax backward, each writing a new array. The GEMMs
set the floor: at T = 512 (B 8, H 2, D 64, dropout 0.1, OpenBLAS's AVX-512 kernels) on one core the seven of them take
19.7 ms and the kernel 24.3 (forward 7.4, backward 16.9); on 2 cores (`bench --ops`) the kernel takes 12.5-12.7 ms and
the reference 39-40. Of the 4.6 ms between the GEMMs on one core, the exps take about 1.8 and the dropout hash 1.
And it keeps no (T, T) array.
"""

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from minielectra.kernels.numba_cpu._blas import gemm
from minielectra.kernels.numba_cpu._common import exp, float_dtype, keep_row, row_dot, row_max, row_sum
from minielectra.ops import checks
from minielectra.ops import dropout as _dropout
from minielectra.ops.attention import AttentionCache, attention_backward as _reference_backward, check_attention_args, key_mask
from minielectra.ops.softmax import softmax_forward
from minielectra.parallel import limit_blas

# Inside the kernels BLAS runs single-threaded (limit_blas(1)): the prange already spreads the heads over the cores,
# and a multithreaded BLAS call from each of those threads oversubscribes them (2-3x slower, measured).

# Query rows per block: the scratch is (BR, T) per thread, and more rows make fewer, larger BLAS calls. At T = 512
# (B 8, H 2, D 64, 2 cores) forward + backward took 20.9 ms with 64 rows, 19.3 with 128 and 16.9 with 256; at T = 128
# the three are within 5 %. The kernels take it as an argument, so the tests can run small blocks on small inputs.
BR = 256

# Up to this T the forward keeps the weights and the dropout's keep bits, and the backward reuses them, where beyond
# it the backward recomputes them (one GEMM, an exp and a hash per weight). At T = 128 a head's (T, T) weights take no
# more memory than its q, k and v (3 T D entries, D = 64), and the tiny preset's 2-core step was 1.0-1.6 ms faster
# with the weights kept, 0.6 ms more (-0.1 to 1.1 in four runs) with the bits (alternating in one process); at
# T = 512 they would be 2.7 times q, k and v together, and memory would grow as T^2.
KEEP_WEIGHTS_UP_TO = 128


class AttentionKernelCache(NamedTuple):
    q: object  # (B, H, T, D), the forward's arrays (views, not copies) in the kernel's dtype
    k: object  # (B, H, T, D)
    v: object  # (B, H, T, D)
    rowmax: object  # (B, H, T) max of each masked, scaled score row; -inf for a fully masked row
    rowsum: object  # (B, H, T) sum of exp(s - rowmax) over the row's real keys
    keys: object  # (B, T) bool, True at real tokens
    seed: int  # the dropout hash's seed
    threshold: int  # drop_threshold(p_drop); 0: no dropout
    drop_scale: object  # 1 / (1 - p) in the input dtype
    scale: float  # 1 / sqrt(D)
    block_rows: int  # the forward's BR: the backward recomputes the scores in the same blocks, so with the same bits
    weights: object = None  # (B, H, T, T) the weights before dropout, kept when T <= KEEP_WEIGHTS_UP_TO; else None
    bits: object = None  # (B, H, T, T) bool, the dropout's keep bits, kept with the weights when dropout is on

    @property
    def probs(self):
        """(B, H, T, T) attention weights before dropout: the forward's, where it kept them; else recomputed on demand
        (for plots and tests), the reference softmax of the recomputed scores."""
        if self.weights is not None:
            return self.weights
        s = (self.q @ self.k.swapaxes(-1, -2)) * self.q.dtype.type(self.scale)  # (B, H, T, T)
        return softmax_forward(s, self.keys[:, None, None, :])[0]

    @property
    def keep(self):
        """(B, H, T, T) bool dropout keep mask: the forward's, where it kept them; else recomputed from the seed; None
        when dropout was off."""
        if not self.threshold:
            return None
        if self.bits is not None:
            return self.bits
        B, H, T, _ = self.q.shape
        return _dropout.hashed_keep_mask(np, self.seed, (B, H, T, T), self.threshold)


@njit(cache=True, inline="always")
def _offset(lay, b, h, i):
    """Where head (b, h) of the i-th array starts in its flat array (see `_heads`)."""
    return b * lay[i, 0] + h * lay[i, 1]


@njit(cache=True, parallel=True, nogil=True)
def _forward(q, k, v, out, lay, keys, seed, threshold, use_drop, c, br, rowmax, rowsum, weights, bits):
    # q, k, v, out: flat arrays, entry (b, h, t, d) of each at b lay[i, 0] + h lay[i, 1] + t lay[i, 2] + d (`_heads`);
    # keys (B, T) bool, True at real tokens; seed, threshold uint64, read only when use_drop; c: scale, dropout scale,
    # +inf in the input dtype; br: query rows per block. Writes out, rowmax and rowsum (B*H, T), and the weights and
    # keep bits (B*H, T, T) unless those arrays are empty (see KEEP_WEIGHTS_UP_TO).
    BH, T = rowmax.shape
    H = BH // keys.shape[0]
    D = lay[4, 0]
    scale, drop_scale, inf = c[0], c[1], c[2]
    zero = scale - scale
    keep_weights, keep_bits = weights.shape[0] > 0, bits.shape[0] > 0
    for bh in prange(BH):
        b, h = bh // H, bh % H
        qo, ko = _offset(lay, b, h, 0), _offset(lay, b, h, 1)
        vo, oo = _offset(lay, b, h, 2), _offset(lay, b, h, 3)
        kb = keys[b]  # (T,)
        all_real = kb.all()
        scratch = np.empty((min(br, T), T), q.dtype)
        kept = np.empty(T, np.bool_)
        for r0 in range(0, T, br):
            n = min(br, T - r0)
            P = scratch[:n]  # (n, T): scores, then weights, then dropped weights
            gemm(q[qo + r0 * lay[0, 2]:], lay[0, 2], False, k[ko:], lay[1, 2], True, P, T, n, T, D, False)
            for ii in range(n):
                i = r0 + ii
                p = P[ii]  # (T,)
                # The max of the scaled scores is the scaled max of the scores: rounding a product by scale > 0 keeps
                # the order, so one pass finds it without writing the scaled row.
                if all_real:
                    m = row_max(p, -inf) * scale
                else:
                    m = -inf
                    for j in range(T):
                        if kb[j]:
                            m = max(m, p[j])
                    m = m * scale
                rowmax[bh, i] = m
                kr = bits[bh, i] if keep_bits else kept  # (T,) where the keep bits go
                if use_drop:  # (kept bits are the whole mask, as cache.keep reports it, masked rows included)
                    keep_row(kr, seed, np.uint64((bh * T + i) * T), threshold)
                if m == -inf:  # every key masked: no defined softmax, the reference's zeros
                    p[:] = zero
                    if keep_weights:
                        weights[bh, i, :] = zero
                    rowsum[bh, i] = zero
                    continue
                for j in range(T):
                    p[j] = exp(p[j] * scale - m) if kb[j] else zero
                tot = row_sum(p, zero)
                rowsum[bh, i] = tot
                # Each loop below reads and writes p alone: LLVM vectorises such a loop, and not one that writes an
                # array which may overlap the one it reads (a T = 512 forward took 8.3 ms that way, 4.7 this way).
                if keep_weights:  # the weights, kept for the backward, then dropped in place
                    for j in range(T):
                        p[j] = p[j] / tot
                    weights[bh, i, :] = p
                    if use_drop:
                        for j in range(T):
                            p[j] = p[j] * drop_scale if kr[j] else zero
                elif use_drop:
                    for j in range(T):
                        p[j] = p[j] / tot * drop_scale if kr[j] else zero
                else:
                    for j in range(T):
                        p[j] = p[j] / tot
            gemm(P, T, False, v[vo:], lay[2, 2], False, out[oo + r0 * lay[3, 2]:], lay[3, 2], n, D, T, False)


@njit(cache=True, parallel=True, nogil=True)
def _backward(dout, q, k, v, dq, dk, dv, lay, keys, rowmax, rowsum, seed, threshold, use_drop, c, br, weights,
              bits):
    # As _forward, with dout, q, k, v, dq, dk, dv flat and placed by lay's rows 0-6, and the forward's rowmax, rowsum;
    # the forward's weights and keep bits, or empty arrays to recompute them; writes dq, dk, dv.
    BH, T = rowmax.shape
    H = BH // keys.shape[0]
    D = lay[7, 0]
    scale, drop_scale, inf = c[0], c[1], c[2]
    zero = scale - scale
    keep_weights, keep_bits = weights.shape[0] > 0, bits.shape[0] > 0
    for bh in prange(BH):
        b, h = bh // H, bh % H
        go, qo, ko, vo = _offset(lay, b, h, 0), _offset(lay, b, h, 1), _offset(lay, b, h, 2), _offset(lay, b, h, 3)
        dqo, dko, dvo = _offset(lay, b, h, 4), _offset(lay, b, h, 5), _offset(lay, b, h, 6)
        kb = keys[b]  # (T,)
        rows = min(br, T)
        Pbuf = np.empty((rows, T), q.dtype)  # weights, then dropped weights
        Gbuf = np.empty((rows, T), q.dtype)  # d(dropped), then dprobs, then dscores
        kept = np.empty(T, np.bool_)
        for r0 in range(0, T, br):
            n = min(br, T - r0)
            P, G = Pbuf[:n], Gbuf[:n]
            qb, gb = q[qo + r0 * lay[1, 2]:], dout[go + r0 * lay[0, 2]:]  # the block's first rows of q and dout
            if keep_weights:
                P[:, :] = weights[bh, r0:r0 + n]  # a copy: the backward may run again on the same cache
            else:
                gemm(qb, lay[1, 2], False, k[ko:], lay[2, 2], True, P, T, n, T, D, False)  # the forward's scores, again
            gemm(gb, lay[0, 2], False, v[vo:], lay[3, 2], True, G, T, n, T, D, False)  # from out = dropped @ v
            for ii in range(n):
                i = r0 + ii
                p, g = P[ii], G[ii]  # (T,)
                m, tot = rowmax[bh, i], rowsum[bh, i]
                if m == -inf:  # fully masked row: zero weights, so no gradient flows through it
                    p[:] = zero
                    g[:] = zero
                    continue
                if not keep_weights:
                    for j in range(T):  # the forward's weights, by the forward's operations
                        p[j] = exp(p[j] * scale - m) / tot if kb[j] else zero
                kr = bits[bh, i] if keep_bits else kept  # (T,) the forward's keep bits
                if use_drop and not keep_bits:
                    keep_row(kept, seed, np.uint64((bh * T + i) * T), threshold)
                if use_drop:
                    for j in range(T):  # from dropped = p * keep / (1 - p_drop)
                        g[j] = g[j] * drop_scale if kr[j] else zero
                dot = row_dot(g, p, zero)
                for j in range(T):  # softmax backward: p * (dp - sum(dp * p)), masked keys have p = 0
                    g[j] = p[j] * (g[j] - dot) * scale
                if use_drop:
                    for j in range(T):
                        p[j] = p[j] * drop_scale if kr[j] else zero
            # dv and dk sum over the blocks: the first block writes them, the others add to them (BLAS's beta = 1)
            gemm(P, T, True, gb, lay[0, 2], False, dv[dvo:], lay[6, 2], T, D, n, r0 > 0)  # from out = dropped @ v
            gemm(G, T, False, k[ko:], lay[2, 2], False, dq[dqo + r0 * lay[4, 2]:], lay[4, 2], n, D, T, False)
            gemm(G, T, True, qb, lay[1, 2], False, dk[dko:], lay[5, 2], T, D, n, r0 > 0)  # from scores = q k^T scale


def _heads(a):
    """(flat, (sb, sh, st)): a (B, H, T, D) as a flat array that holds entry (b, h, t, d) at b sb + h sh + t st + d,
    without a copy when a is contiguous in the (B, H, T, D) layout or in mha's (B, T, H, D) one; else a copy."""
    B, H, T, D = a.shape
    if not a.flags.c_contiguous:
        merged = a.transpose(0, 2, 1, 3)  # (B, T, H, D)
        if merged.flags.c_contiguous:
            return merged.reshape(-1), (T * H * D, D, H * D)
        a = np.ascontiguousarray(a)
    return a.reshape(-1), (H * T * D, T * D, D)


def _merged(B, H, T, D, dt):
    """A new (B, H, T, D) output as a view of (B, T, H, D) memory (mha merges its heads for free), with its `_heads`."""
    mem = np.empty((B, T, H, D), dt)
    return mem.transpose(0, 2, 1, 3), (mem.reshape(-1), (T * H * D, D, H * D))


def _layout(placed, D):
    """lay for the kernels: one row (sb, sh, st) per array in `placed` [(flat, strides), ...], then a row holding D."""
    return np.array([strides for _, strides in placed] + [(D, 0, 0)], dtype=np.int64)


def attention_forward(q, k, v, mask=None, p_drop=0.0, rng=None):
    """q, k, v (B, H, T, D), mask (B, T) nonzero at real tokens -> (B, H, T, D). Dropout on the weights when p_drop > 0."""
    B, H, T, D = check_attention_args(q, k, v, mask, p_drop)
    dt = float_dtype(q, k, v)
    scale = 1.0 / math.sqrt(D)
    km = key_mask(mask, B, T)
    keys = np.ones((B, T), bool) if km is None else np.ascontiguousarray(km.reshape(B, T))
    threshold = _dropout.drop_threshold(p_drop)
    seed = _dropout.draw_seed(rng) if threshold else 0  # the reference's one draw: the same mask
    q, k, v = (a if a.dtype == dt else a.astype(dt) for a in (q, k, v))
    out, out_placed = _merged(B, H, T, D, dt)
    rowmax, rowsum = np.empty((B, H, T), dt), np.empty((B, H, T), dt)
    drop_scale = dt.type(1.0 / (1.0 - p_drop))
    consts = np.array([scale, drop_scale, np.inf], dtype=dt)
    kept = T <= KEEP_WEIGHTS_UP_TO
    weights = np.empty((B, H, T, T) if kept else (0, 0, 0, 0), dt)
    bits = np.empty((B, H, T, T) if kept and threshold else (0, 0, 0, 0), np.bool_)
    if B * H * T:
        placed = [_heads(a) for a in (q, k, v)] + [out_placed]
        with limit_blas(1):
            _forward(*(flat for flat, _ in placed), _layout(placed, D), keys, np.uint64(seed), np.uint64(threshold),
                     threshold > 0, consts, BR, rowmax.reshape(B * H, T), rowsum.reshape(B * H, T),
                     *(a.reshape(-1, T, T) if a.size else a.reshape(0, 0, 0) for a in (weights, bits)))
    return out, AttentionKernelCache(q, k, v, rowmax, rowsum, keys, seed, threshold, drop_scale, float(scale), BR,
                                     *(a if a.size else None for a in (weights, bits)))


def attention_backward(dout, cache):
    """Inverts `out = dropout(softmax(q k^T * scale)) @ v` -> (dq, dk, dv), views of (B, T, H, D) memory as out."""
    if isinstance(cache, AttentionCache):  # from the reference forward
        return _reference_backward(dout, cache)
    q, k, v, rowmax, rowsum, keys, seed, threshold, drop_scale, scale, block_rows, weights, bits = cache
    checks.float_array("dout", dout)
    checks.shape("dout", dout, q.shape, "(B, H, T, D) like q")
    B, H, T, D = q.shape
    dt = q.dtype
    dout = dout if dout.dtype == dt else dout.astype(dt)
    (dq, dq_placed), (dk, dk_placed), (dv, dv_placed) = (_merged(B, H, T, D, dt) for _ in range(3))
    consts = np.array([scale, drop_scale, np.inf], dtype=dt)
    if B * H * T:
        placed = [_heads(a) for a in (dout, q, k, v)] + [dq_placed, dk_placed, dv_placed]
        with limit_blas(1):
            _backward(*(flat for flat, _ in placed), _layout(placed, D), keys, rowmax.reshape(B * H, T),
                      rowsum.reshape(B * H, T), np.uint64(seed), np.uint64(threshold), threshold > 0, consts,
                      block_rows, np.empty((0, 0, 0), dt) if weights is None else weights.reshape(-1, T, T),
                      np.empty((0, 0, 0), np.bool_) if bits is None else bits.reshape(-1, T, T))
    return dq, dk, dv
