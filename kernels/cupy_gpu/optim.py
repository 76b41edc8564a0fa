"""CUDA kernels for `minielectra.optim` (adamw_step, clip_scale): one multi-tensor launch per dtype (optim.cu).

clip_scale: one launch sums the squares of every gradient of a dtype in double, a partial sum per block, where the
reference makes four CuPy launches per tensor (a float64 copy, its square, its sum, the running total): some 1,600
for the small preset's 402 tensors, each costing microseconds of launch overhead however small its tensor.

adamw_step: the launcher builds, per dtype, device tables of the tensors' pointers (param, grad, m, v), sizes and
weight decays, and a block table of CHUNK-sized slices; one launch then does the whole update, each element read once
and written once. Same contract and arithmetic as the reference: params, state.m and state.v updated in place (so
they must be C-contiguous), state.step += 1, 1 - beta formed in float64 and rounded once (as
kernels/numba_cpu/optim.py does).
"""

import numpy as np

from minielectra.kernels.cupy_gpu import _common
from minielectra.optim import _check_matching, no_decay, norm_and_scale

CHUNK = 8192  # elements per block
THREADS = 256  # threads per block; optim.cu's ME_SQ_THREADS, the size of sum_squares' tree


def _blocks(sizes):
    """The block table of tensors of `sizes` (none empty): (tensor index, first element) of each CHUNK-sized slice,
    as device arrays."""
    xp = _common.runtime().xp
    chunks = -(-sizes // CHUNK)
    block_tensor = np.repeat(np.arange(len(sizes), dtype=np.int32), chunks)
    block_start = np.concatenate([np.arange(c, dtype=np.int64) * CHUNK for c in chunks])
    return xp.asarray(block_tensor), xp.asarray(block_start)


def clip_scale(grads, max_norm):
    """Same contract as minielectra.optim.clip_scale: (global_norm, scale), here 0-d device arrays computed on the
    device, as the reference's are for device gradients."""
    keys = sorted(grads)  # the reference's order of tensors
    _common.require_device_arrays("clip_scale", "minielectra.optim.clip_scale",
                                  **{"grads[" + k + "]": grads[k] for k in keys})
    rt = _common.runtime()
    xp = rt.xp
    groups = {}
    for k in keys:
        if grads[k].dtype not in (np.float32, np.float64):
            raise TypeError(f"clip_scale kernel: grads[{k!r}] is {grads[k].dtype}; gradients must be float32 or "
                            "float64")
        if grads[k].size:
            groups.setdefault(np.dtype(grads[k].dtype), []).append(k)
    total = xp.zeros((), np.float64)
    for dt, ks in groups.items():
        gs = [xp.ascontiguousarray(grads[k]) for k in ks]  # kept alive until the launch is queued
        sizes = np.array([g.size for g in gs], np.int64)
        block_tensor, block_start = _blocks(sizes)
        partial = xp.empty(len(block_tensor), np.float64)
        _common.launch("optim", f"sum_squares_{_common.suffix(dt)}", (len(block_tensor),), (THREADS,),
                       (xp.asarray(np.array([rt.ptr(g) for g in gs], np.uint64)), xp.asarray(sizes), block_tensor,
                        block_start, np.int64(CHUNK), partial))
        total = total + partial.sum()
    return norm_and_scale(total, max_norm)


def check_step(params, grads, state):
    """The reference's key and shape checks, then the kernel's: float32/float64, m and v of the param's dtype, and
    params, m, v C-contiguous (updated in place). -> {dtype: [keys]}."""
    _check_matching(params, grads, state)
    groups = {}
    for key, p in params.items():
        if p.dtype not in (np.float32, np.float64):
            raise TypeError(f"adamw_step kernel: {key} is {p.dtype}; parameters must be float32 or float64")
        for what, a in (("state.m", state.m[key]), ("state.v", state.v[key])):
            if a.dtype != p.dtype:
                raise TypeError(f"adamw_step kernel: {what}[{key!r}] is {a.dtype} but the param is {p.dtype}; "
                                "build the state with adamw_init(params)")
        for what, a in (("param", p), ("state.m", state.m[key]), ("state.v", state.v[key])):
            if not a.flags.c_contiguous:
                raise ValueError(f"adamw_step kernel updates in place and needs C-contiguous arrays; {what} of "
                                 f"{key} is not")
        groups.setdefault(np.dtype(p.dtype), []).append(key)
    return groups


def adamw_step(params, grads, state, lr, config, grad_scale=1.0):
    """Same contract as minielectra.optim.adamw_step: params, state.m, state.v updated in place, state.step += 1."""
    groups = check_step(params, grads, state)
    for key in params:
        _common.require_device_arrays("adamw_step", "minielectra.optim.adamw_step", **{
            "params[" + key + "]": params[key], "grads[" + key + "]": grads[key],
            "state.m[" + key + "]": state.m[key], "state.v[" + key + "]": state.v[key]})
    rt = _common.runtime()
    xp = rt.xp
    b1, b2 = config.adam_beta1, config.adam_beta2
    for dt, keys in groups.items():
        keys = [k for k in keys if params[k].size]
        if not keys:
            continue
        t = dt.type
        gs = [xp.ascontiguousarray(grads[k], dtype=dt) for k in keys]  # kept alive until the launch is queued
        sizes = np.array([params[k].size for k in keys], np.int64)
        tables = {
            name: xp.asarray(np.array([rt.ptr(a) for a in arrays], np.uint64))
            for name, arrays in (("p", [params[k] for k in keys]), ("g", gs), ("m", [state.m[k] for k in keys]),
                                 ("v", [state.v[k] for k in keys]))}
        wds = np.array([0.0 if no_decay(k) else config.weight_decay for k in keys], dt)
        block_tensor, block_start = _blocks(sizes)
        # grad_scale may be clip_scale's 0-d device array: the kernel reads it through a pointer, so it never crosses
        # to the host (a host float is copied up, which does not wait for the device).
        scale = xp.asarray(grad_scale, dtype=dt).reshape(1)
        _common.launch("optim", f"adamw_step_{_common.suffix(dt)}", (len(block_tensor),), (THREADS,),
                       (tables["p"], tables["g"], tables["m"], tables["v"], xp.asarray(sizes), xp.asarray(wds),
                        block_tensor, block_start, np.int64(CHUNK), t(lr), scale,
                        t(b1), t(1 - b1), t(b2), t(1 - b2), t(config.adam_epsilon)))
    state.step += 1
