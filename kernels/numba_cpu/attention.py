"""Numba CPU kernels for `minielectra.ops.attention` (attention_forward, attention_backward).

Memory grows linearly in T. The reference keeps the weights (B, H, T, T) and a dropout scale of the same size for its
backward; this kernel keeps, besides q, k and v, two numbers per query row: the max and the sum of exp(s - max) of its
masked, scaled scores (B, H, T each). The backward recomputes every weight from them as exp(s - max) / sum, the very
operations of the forward on the very scores (the same BLAS call on the same block), so it differentiates exactly the
weights the forward used, down to the subnormal ones, which exp(s - lse) would round differently. It recomputes the
dropout mask from its seed.

One prange iteration per (batch, head) walks the queries in blocks of BR rows against all T keys, in a (BR, T) scratch
block of its own: scores = q_blk k^T (BLAS), scale, key padding mask, a stable softmax row by row (a fully masked row
gives zeros), dropout, then out_blk = weights @ v (BLAS). Each block holds whole rows, so the softmax needs no online
rescaling and the backward gets the softmax's row term sum_j dprobs_ij p_ij exactly as the reference computes it. Each
iteration writes only its own (b, h) slices.

Dropout is the reference's counter-based mask (`minielectra.ops.dropout.hashed_keep_mask`): one uint64 seed drawn from
the Generator, keep(b, h, i, j) a splitmix64 hash of (seed, flat index + 1) computed inside the loops, in the forward
and again in the backward. The same seed drops the same weights as the reference and as the CUDA kernel.

The GEMMs stay on BLAS (numba's np.dot on contiguous 2-D slices): seven per head, one more than the reference, since
the backward recomputes the scores. What sits between them is fused: the reference makes separate (B, H, T, T) passes
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

from kernels.numba_cpu._common import exp, float_dtype, keep_row, row_dot, row_max, row_sum
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


class AttentionKernelCache(NamedTuple):
    q: object  # (B, H, T, D) contiguous
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

    @property
    def probs(self):
        """(B, H, T, T) attention weights before dropout, recomputed on demand (for plots and tests): the reference
        softmax of the recomputed scores."""
        s = (self.q @ self.k.swapaxes(-1, -2)) * self.q.dtype.type(self.scale)  # (B, H, T, T)
        return softmax_forward(s, self.keys[:, None, None, :])[0]

    @property
    def keep(self):
        """(B, H, T, T) bool dropout keep mask, recomputed from the seed; None when dropout was off."""
        if not self.threshold:
            return None
        B, H, T, _ = self.q.shape
        return _dropout.hashed_keep_mask(np, self.seed, (B, H, T, T), self.threshold)


@njit(cache=True, parallel=True, nogil=True)
def _forward(q, k, v, keys, seed, threshold, use_drop, c, br, out, rowmax, rowsum):
    # q, k, v (B*H, T, D); keys (B, T) bool, True at real tokens; seed, threshold uint64, read only when use_drop;
    # c: scale, dropout scale, +inf in the input dtype; br: query rows per block. Writes out (B*H, T, D), rowmax and
    # rowsum (B*H, T).
    BH, T, D = q.shape
    H = BH // keys.shape[0]
    scale, drop_scale, inf = c[0], c[1], c[2]
    zero = scale - scale
    for bh in prange(BH):
        kb = keys[bh // H]  # (T,)
        all_real = kb.all()
        scratch = np.empty((min(br, T), T), q.dtype)
        kept = np.empty(T, np.bool_)
        for r0 in range(0, T, br):
            n = min(br, T - r0)
            P = scratch[:n]  # (n, T): scores, then weights, then dropped weights
            np.dot(q[bh, r0:r0 + n], k[bh].T, P)
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
                if m == -inf:  # every key masked: no defined softmax, the reference's zeros
                    p[:] = zero
                    rowsum[bh, i] = zero
                    continue
                for j in range(T):
                    p[j] = exp(p[j] * scale - m) if kb[j] else zero
                tot = row_sum(p, zero)
                rowsum[bh, i] = tot
                if use_drop:
                    keep_row(kept, seed, np.uint64((bh * T + i) * T), threshold)
                    for j in range(T):
                        p[j] = p[j] / tot * drop_scale if kept[j] else zero
                else:
                    for j in range(T):
                        p[j] = p[j] / tot
            np.dot(P, v[bh], out[bh, r0:r0 + n])


@njit(cache=True, inline="always")
def _add_into(acc, part):
    """acc += part, element by element: no temporary copy of part (numba's array += may make one)."""
    for t in range(acc.shape[0]):
        for d in range(acc.shape[1]):
            acc[t, d] += part[t, d]


@njit(cache=True, parallel=True, nogil=True)
def _backward(dout, q, k, v, keys, rowmax, rowsum, seed, threshold, use_drop, c, br, dq, dk, dv):
    # As _forward, plus dout (B*H, T, D) and the forward's rowmax, rowsum; writes dq, dk, dv (B*H, T, D).
    BH, T, D = q.shape
    H = BH // keys.shape[0]
    scale, drop_scale, inf = c[0], c[1], c[2]
    zero = scale - scale
    for bh in prange(BH):
        kb = keys[bh // H]  # (T,)
        rows = min(br, T)
        Pbuf = np.empty((rows, T), q.dtype)  # weights, then dropped weights
        Gbuf = np.empty((rows, T), q.dtype)  # d(dropped), then dprobs, then dscores
        kept = np.empty(T, np.bool_)
        part = np.empty((T, D), q.dtype)  # one block's share of dk or dv
        for r0 in range(0, T, br):
            n = min(br, T - r0)
            P, G = Pbuf[:n], Gbuf[:n]
            qb, gb = q[bh, r0:r0 + n], dout[bh, r0:r0 + n]
            np.dot(qb, k[bh].T, P)  # the forward's scores, recomputed
            np.dot(gb, v[bh].T, G)  # from out = dropped @ v
            for ii in range(n):
                i = r0 + ii
                p, g = P[ii], G[ii]  # (T,)
                m, tot = rowmax[bh, i], rowsum[bh, i]
                if m == -inf:  # fully masked row: zero weights, so no gradient flows through it
                    p[:] = zero
                    g[:] = zero
                    continue
                for j in range(T):  # the forward's weights, by the forward's operations
                    p[j] = exp(p[j] * scale - m) / tot if kb[j] else zero
                if use_drop:
                    keep_row(kept, seed, np.uint64((bh * T + i) * T), threshold)
                    for j in range(T):  # from dropped = p * keep / (1 - p_drop)
                        g[j] = g[j] * drop_scale if kept[j] else zero
                dot = row_dot(g, p, zero)
                for j in range(T):  # softmax backward: p * (dp - sum(dp * p)), masked keys have p = 0
                    g[j] = p[j] * (g[j] - dot) * scale
                if use_drop:
                    for j in range(T):
                        p[j] = p[j] * drop_scale if kept[j] else zero
            # dv and dk sum over the blocks: the first block's share is written in place, the others added to it
            if r0 == 0:
                np.dot(P.T, gb, dv[bh])  # from out = dropped @ v
            else:
                np.dot(P.T, gb, part)
                _add_into(dv[bh], part)
            np.dot(G, k[bh], dq[bh, r0:r0 + n])  # from scores = q @ k^T * scale
            if r0 == 0:
                np.dot(G.T, qb, dk[bh])
            else:
                np.dot(G.T, qb, part)
                _add_into(dk[bh], part)


def attention_forward(q, k, v, mask=None, p_drop=0.0, rng=None):
    """q, k, v (B, H, T, D), mask (B, T) nonzero at real tokens -> (B, H, T, D). Dropout on the weights when p_drop > 0."""
    B, H, T, D = check_attention_args(q, k, v, mask, p_drop)
    dt = float_dtype(q, k, v)
    scale = 1.0 / math.sqrt(D)
    km = key_mask(mask, B, T)
    keys = np.ones((B, T), bool) if km is None else np.ascontiguousarray(km.reshape(B, T))
    threshold = _dropout.drop_threshold(p_drop)
    seed = _dropout.draw_seed(rng) if threshold else 0  # the reference's one draw: the same mask
    q, k, v = (np.ascontiguousarray(a, dtype=dt) for a in (q, k, v))
    out = np.empty((B, H, T, D), dt)
    rowmax, rowsum = np.empty((B, H, T), dt), np.empty((B, H, T), dt)
    drop_scale = dt.type(1.0 / (1.0 - p_drop))
    consts = np.array([scale, drop_scale, np.inf], dtype=dt)
    if B * H * T:
        with limit_blas(1):
            _forward(q.reshape(B * H, T, D), k.reshape(B * H, T, D), v.reshape(B * H, T, D), keys, np.uint64(seed),
                     np.uint64(threshold), threshold > 0, consts, BR, out.reshape(B * H, T, D),
                     rowmax.reshape(B * H, T), rowsum.reshape(B * H, T))
    return out, AttentionKernelCache(q, k, v, rowmax, rowsum, keys, seed, threshold, drop_scale, float(scale), BR)


def attention_backward(dout, cache):
    """Inverts `out = dropout(softmax(q k^T * scale)) @ v` -> (dq, dk, dv)."""
    if isinstance(cache, AttentionCache):  # from the reference forward
        return _reference_backward(dout, cache)
    q, k, v, rowmax, rowsum, keys, seed, threshold, drop_scale, scale, block_rows = cache
    checks.float_array("dout", dout)
    checks.shape("dout", dout, q.shape, "(B, H, T, D) like q")
    B, H, T, D = q.shape
    dt = q.dtype
    dout = np.ascontiguousarray(dout, dtype=dt)
    dq, dk, dv = (np.empty((B, H, T, D), dt) for _ in range(3))
    consts = np.array([scale, drop_scale, np.inf], dtype=dt)
    if B * H * T:
        r = lambda a: a.reshape(B * H, T, D)  # noqa: E731
        with limit_blas(1):
            _backward(r(dout), r(q), r(k), r(v), keys, rowmax.reshape(B * H, T), rowsum.reshape(B * H, T),
                      np.uint64(seed), np.uint64(threshold), threshold > 0, consts, block_rows, r(dq), r(dk), r(dv))
    return dq, dk, dv
