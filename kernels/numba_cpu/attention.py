"""Numba CPU kernels for `minielectra.ops.attention` (attention_forward, attention_backward).

One prange iteration per (batch, head) does the whole attention of that head: scores = q k^T (BLAS, written straight
into the cached probs), scale, key padding mask, a stable softmax (a fully masked row gives zeros), dropout and
probs @ v. The backward does dv, dprobs, the softmax backward and dq, dk for its head. Each iteration writes only its
own (b, h) slices, and uses at most one (T, T) scratch block (only when dropout is on, or in the backward).

The GEMMs stay on BLAS (numba's np.dot on contiguous 2-D slices); the kernel wins by fusing what sits between them:
the reference makes separate (B, H, T, T) passes for the scale, mask, max, exp, sum, divide, dropout scale and the
softmax backward. The dropout keep mask is drawn with the reference's own Generator call before the kernel runs, so
the same seed drops the same weights.
"""

import contextlib
import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from kernels.numba_cpu._common import float_dtype
from minielectra.ops import checks
from minielectra.ops.attention import AttentionCache, attention_backward as _reference_backward, check_attention_args, key_mask


_blas_controller = []


def _one_blas_thread():
    """Run BLAS single-threaded inside the kernels: the prange already spreads the heads over the cores, and a
    multithreaded BLAS call from each of those threads oversubscribes them (2-3x slower, measured). Uses threadpoolctl
    where installed; without it BLAS keeps its own setting (OPENBLAS_NUM_THREADS=1 does the same)."""
    if not _blas_controller:
        try:
            import scipy.linalg.cython_blas  # noqa: F401  the BLAS numba's np.dot calls, loaded so it is seen
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _blas_controller.append(None)
        else:
            _blas_controller.append(ThreadpoolController())
    controller = _blas_controller[0]
    return contextlib.nullcontext() if controller is None else controller.limit(limits=1, user_api="blas")


class AttentionKernelCache(NamedTuple):
    q: object  # (B, H, T, D) contiguous
    k: object  # (B, H, T, D)
    v: object  # (B, H, T, D)
    probs: object  # (B, H, T, T) attention weights before dropout: what to plot
    keep: object  # (B, H, T, T) bool dropout keep mask; None when dropout was the identity
    drop_scale: object  # 1 / (1 - p) in the input dtype
    scale: float  # 1 / sqrt(D)


@njit(cache=True, parallel=True)
def _forward(q, k, v, keys, keep, use_drop, c, probs, out):
    # q, k, v (B*H, T, D); keys (B, T) bool, True at real tokens; keep (B*H, T, T) bool, read only when use_drop;
    # c: scale, dropout scale, -inf in the input dtype
    BH, T, D = q.shape
    H = BH // keys.shape[0]
    scale, drop_scale, neg_inf = c[0], c[1], c[2]
    zero = scale - scale
    for bh in prange(BH):
        b = bh // H
        P = probs[bh]  # (T, T)
        np.dot(q[bh], k[bh].T, P)  # scores
        for i in range(T):
            m = neg_inf
            for j in range(T):
                if keys[b, j]:
                    s = P[i, j] * scale
                    P[i, j] = s
                    if s > m:
                        m = s
            if m == neg_inf:  # every key masked: no defined softmax, the reference's zeros
                for j in range(T):
                    P[i, j] = zero
                continue
            tot = zero
            for j in range(T):
                if keys[b, j]:
                    e = np.exp(P[i, j] - m)
                    P[i, j] = e
                    tot += e
                else:
                    P[i, j] = zero
            for j in range(T):
                P[i, j] = P[i, j] / tot
        if use_drop:
            S = np.empty((T, T), q.dtype)  # the dropped weights
            for i in range(T):
                for j in range(T):
                    S[i, j] = P[i, j] * drop_scale if keep[bh, i, j] else zero
            np.dot(S, v[bh], out[bh])
        else:
            np.dot(P, v[bh], out[bh])


@njit(cache=True, parallel=True)
def _backward(dout, q, k, v, probs, keep, use_drop, c, dq, dk, dv):
    BH, T, D = q.shape
    scale, drop_scale = c[0], c[1]
    zero = scale - scale
    for bh in prange(BH):
        P = probs[bh]  # (T, T)
        S = np.empty((T, T), q.dtype)
        if use_drop:
            for i in range(T):
                for j in range(T):
                    S[i, j] = P[i, j] * drop_scale if keep[bh, i, j] else zero
            np.dot(S.T, dout[bh], dv[bh])  # from out = dropped @ v
        else:
            np.dot(P.T, dout[bh], dv[bh])
        np.dot(dout[bh], v[bh].T, S)  # d(dropped)
        for i in range(T):
            if use_drop:
                for j in range(T):
                    S[i, j] = S[i, j] * drop_scale if keep[bh, i, j] else zero
            dot = zero
            for j in range(T):
                dot += S[i, j] * P[i, j]
            for j in range(T):  # softmax backward: p * (dp - sum(dp * p)), masked keys have p = 0
                S[i, j] = P[i, j] * (S[i, j] - dot) * scale
        np.dot(S, k[bh], dq[bh])  # from scores = q @ k^T * scale
        np.dot(S.T, q[bh], dk[bh])


def attention_forward(q, k, v, mask=None, p_drop=0.0, rng=None):
    """q, k, v (B, H, T, D), mask (B, T) nonzero at real tokens -> (B, H, T, D). Dropout on the weights when p_drop > 0."""
    B, H, T, D = check_attention_args(q, k, v, mask, p_drop)
    dt = float_dtype(q, k, v)
    scale = 1.0 / math.sqrt(D)
    km = key_mask(mask, B, T)
    keys = np.ones((B, T), bool) if km is None else np.ascontiguousarray(km.reshape(B, T))
    use_drop = p_drop > 0
    if use_drop:
        if not isinstance(rng, np.random.Generator):
            raise TypeError("dropout needs an explicit numpy.random.Generator as rng (np.random.default_rng(seed))")
        keep = rng.random((B, H, T, T), dtype=np.float32) >= p_drop  # the reference's draw: the same mask
    else:
        keep = np.ones((1, 1, 1, 1), bool)  # never read
    q, k, v = (np.ascontiguousarray(a, dtype=dt) for a in (q, k, v))
    probs = np.empty((B, H, T, T), dt)
    out = np.empty((B, H, T, D), dt)
    drop_scale = dt.type(1.0 / (1.0 - p_drop))
    consts = np.array([scale, drop_scale, -np.inf], dtype=dt)
    if B * H:
        with _one_blas_thread():
            _forward(q.reshape(B * H, T, D), k.reshape(B * H, T, D), v.reshape(B * H, T, D), keys,
                     keep.reshape(-1, keep.shape[2], keep.shape[3]), use_drop, consts,
                     probs.reshape(B * H, T, T), out.reshape(B * H, T, D))
    return out, AttentionKernelCache(q, k, v, probs, keep if use_drop else None, drop_scale, float(scale))


def attention_backward(dout, cache):
    """Inverts `out = dropout(softmax(q k^T * scale)) @ v` -> (dq, dk, dv)."""
    if isinstance(cache, AttentionCache):  # from the reference forward
        return _reference_backward(dout, cache)
    q, k, v, probs, keep, drop_scale, scale = cache
    checks.float_array("dout", dout)
    checks.shape("dout", dout, q.shape, "(B, H, T, D) like q")
    B, H, T, D = q.shape
    dt = q.dtype
    dout = np.ascontiguousarray(dout, dtype=dt)
    use_drop = keep is not None
    if not use_drop:
        keep = np.ones((1, 1, 1, 1), bool)
    dq, dk, dv = (np.empty((B, H, T, D), dt) for _ in range(3))
    consts = np.array([scale, drop_scale, -np.inf], dtype=dt)
    if B * H:
        r = lambda a: a.reshape(B * H, T, a.shape[-1])  # noqa: E731
        with _one_blas_thread():
            _backward(r(dout), r(q), r(k), r(v), r(probs), keep.reshape(-1, keep.shape[2], keep.shape[3]), use_drop,
                      consts, r(dq), r(dk), r(dv))
    return dq, dk, dv
