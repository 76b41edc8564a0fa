"""Numba kernels for `minielectra.optim` (clip_scale, adamw_step).

adamw_step: the whole AdamW update of one tensor in a single pass. The reference makes ~8 passes over memory per
parameter (scale g, update m, update v, sqrt, divide, decay, step) with a temporary for each; here every element is
read once and m, v and the parameter are written once, with the clipping scale and the decay mask folded in. Same
arithmetic, in float32 for float32 params, as the reference.

clip_scale: the sum of the squared gradients in float64 in one pass per tensor, where the reference casts each
tensor to a float64 copy, squares it into a second and sums that. It runs between the shards' backward passes and the
update, on the whole step's critical path.

Params, grads and moments that are views of one buffer each (optim.flatten, as training and bench lay them out) take
one call each: the sum of squares over the grads' buffer, and AdamW over the decayed part of the buffers and then
over the rest, on all of Numba's threads. Tiny preset (145 tensors, 2.0 M entries), on a 2-core step's grads:
clip_scale + adamw_step 2.17 ms tensor by tensor, 0.85-0.9 ms on the buffers; the whole 2-core step
(batch 32 x 128, alternating in one process, three runs) 1.0-1.7 ms faster.

Tensor by tensor, both run on the calling thread alone: waking Numba's thread pool costs about 50 us a parallel
region (its threads sleep when idle, kernels/numba_cpu/__init__.py), more than a 65,536-entry tensor's whole update
on one core (9.5 us), and a model's tensors are mostly far smaller. In the tiny preset's 2-core step what runs
between the shards' passes took 4.6-4.7 ms with the tensors from 65,536 entries on the pool and 3.7-3.8 ms without;
the small preset's step (14.2 M entries) was the same either way within the machine's noise (487.6-508.3 ms
against 494.6-510.1). AdamW's loop is still a prange, run with one thread (numba.set_num_threads is a setting of the
calling thread): Numba compiles a parallel loop's body with its arrays marked as not overlapping, and LLVM vectorises
it, where the same loop in a plain @njit function stays scalar (120 us for those 65,536 entries), since LLVM cannot
rule out that p, g, m and v overlap. The sum of squares is vectorised by hand (_sum_chunk) and needs no such help.
"""

import contextlib

import numba
import numpy as np
from numba import njit, prange

from minielectra.kernels.numba_cpu._common import n_chunks
from minielectra import flat
from minielectra.optim import _check_matching, no_decay, norm_and_scale

_LANES = 8  # independent running sums per chunk: one would wait for each add in turn


@njit(cache=True, inline="always")
def _sum_chunk(g, acc, lo, hi):
    # Entry lo + 8 k + l goes to lane l (the last hi - lo mod 8 entries to lane 0), so the order of the additions is
    # fixed by the code, on any CPU. Eight local sums stay in registers; summed into acc[i % 8] in memory, each add
    # waited for the store before it (the small preset's clip_scale, on the thread pool then: 7.9-8.0 -> 6.8-7.0 ms).
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    blocks = (hi - lo) // _LANES
    for b in range(blocks):  # counting blocks, not stepping i by 8, which LLVM would not unroll (lesson 11, section 8)
        i = lo + _LANES * b
        x0, x1, x2, x3 = np.float64(g[i]), np.float64(g[i + 1]), np.float64(g[i + 2]), np.float64(g[i + 3])
        x4, x5, x6, x7 = np.float64(g[i + 4]), np.float64(g[i + 5]), np.float64(g[i + 6]), np.float64(g[i + 7])
        s0 += x0 * x0
        s1 += x1 * x1
        s2 += x2 * x2
        s3 += x3 * x3
        s4 += x4 * x4
        s5 += x5 * x5
        s6 += x6 * x6
        s7 += x7 * x7
    for i in range(lo + _LANES * blocks, hi):
        x0 = np.float64(g[i])
        s0 += x0 * x0
    acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7] = s0, s1, s2, s3, s4, s5, s6, s7


@njit(cache=True, nogil=True)
def _sum_squares(g, partial):
    # g (n,) flat; partial (chunks, _LANES) float64 scratch: chunk c owns row c and the entries
    # [c n / chunks, (c+1) n / chunks), summed in that order. Returns the sum of the rows, in row and lane order.
    n = g.size
    chunks = partial.shape[0]
    total = 0.0
    for c in range(chunks):
        _sum_chunk(g, partial[c], c * n // chunks, (c + 1) * n // chunks)
        for lane in range(_LANES):
            total += partial[c, lane]
    return total


@njit(cache=True, parallel=True, nogil=True)
def _sum_squares_parallel(g, partial):
    # As _sum_squares, with the chunks on Numba's threads: each writes its own row of partial, and the rows are
    # summed afterwards in row order, so the result does not depend on the thread count.
    n = g.size
    chunks = partial.shape[0]
    for c in prange(chunks):
        _sum_chunk(g, partial[c], c * n // chunks, (c + 1) * n // chunks)
    total = 0.0
    for c in range(chunks):
        for lane in range(_LANES):
            total += partial[c, lane]
    return total


def clip_scale(grads, max_norm):
    """Same contract as minielectra.optim.clip_scale: (global_norm, scale). Tensors are added in sorted key order, as
    in the reference, so a resumed run adds them in the same order as a fresh one; grads that are views of one buffer
    (flat.py) are summed as that buffer, in its fixed order, on all of Numba's threads."""
    partial = np.empty((n_chunks(2**62), _LANES))  # scratch for every tensor's chunk sums: one allocation a step
    bufs = flat.buffers(grads)
    if bufs is not None:
        return norm_and_scale(_sum_squares_parallel(bufs[0], partial), max_norm)
    total = 0.0
    for k in sorted(grads):
        g = np.ascontiguousarray(grads[k]).reshape(-1)
        total += _sum_squares(g, partial[:n_chunks(g.size)])
    return norm_and_scale(total, max_norm)


@njit(cache=True, inline="always")
def _adamw_element(p, g, m, v, i, lr, grad_scale, b1, c1, b2, c2, eps, wd):
    gi = g[i] * grad_scale
    mi = b1 * m[i] + c1 * gi
    vi = b2 * v[i] + c2 * (gi * gi)
    m[i] = mi
    v[i] = vi
    update = mi / (np.sqrt(vi) + eps) + wd * p[i]
    p[i] = p[i] - lr * update


@njit(cache=True, parallel=True, nogil=True)
def _adamw_flat(p, g, m, v, c):
    # c: lr, grad_scale, b1, 1 - b1, b2, 1 - b2, eps, weight decay, in p's dtype: one array, not eight scalars, since
    # each argument costs its type check on every call (144 calls a step in the tiny preset).
    # Run inside _one_thread (see the module docstring): prange for the vectorised loop, not for the threads.
    lr, grad_scale, b1, c1, b2, c2, eps, wd = c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
    for i in prange(p.size):  # each iteration owns element i
        _adamw_element(p, g, m, v, i, lr, grad_scale, b1, c1, b2, c2, eps, wd)


@contextlib.contextmanager
def _one_thread():
    """Numba's parallel loops called inside run on the calling thread alone; its previous setting is restored."""
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def adamw_step(params, grads, state, lr, config, grad_scale=1.0):
    """Same contract as minielectra.optim.adamw_step: params, state.m, state.v updated in place, state.step += 1."""
    b1, b2 = config.adam_beta1, config.adam_beta2
    # 1 - beta is formed in float64 and rounded once, as the reference's Python scalars are: 1 - float32(0.999) would
    # be off by 1e-5 relative.
    row = [lr, grad_scale, b1, 1 - b1, b2, 1 - b2, config.adam_epsilon]
    bufs = flat.buffers(params, grads, state.m, state.v)
    if bufs is not None:  # one buffer each, laid out alike: the decayed entries first (optim.flatten)
        split, dt = params.layout.split, bufs[0].dtype
        for part, wd in ((slice(0, split), config.weight_decay), (slice(split, None), 0.0)):
            _adamw_flat(*(b[part] for b in bufs), np.array(row + [wd], dtype=dt))
        state.step += 1
        return
    _check_matching(params, grads, state)
    consts = {}  # (dtype, decayed) -> _adamw_flat's c
    with _one_thread():
        for k, p in params.items():
            if not (p.flags.c_contiguous and state.m[k].flags.c_contiguous and state.v[k].flags.c_contiguous):
                raise ValueError(f"adamw_step kernel updates in place and needs C-contiguous arrays; {k} is not")
            g = np.ascontiguousarray(grads[k], dtype=p.dtype)
            key = (p.dtype, not no_decay(k))
            if key not in consts:
                consts[key] = np.array(row + [config.weight_decay if key[1] else 0.0], dtype=p.dtype)
            _adamw_flat(p.reshape(-1), g.reshape(-1), state.m[k].reshape(-1), state.v[k].reshape(-1), consts[key])
    state.step += 1
