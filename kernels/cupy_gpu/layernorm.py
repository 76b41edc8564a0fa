"""CUDA kernels for `minielectra.ops.layernorm` (layernorm_forward, layernorm_backward,
dropout_add_layernorm_forward, dropout_add_layernorm_backward, layernorm_dropout_forward, layernorm_dropout_backward):
launcher of layernorm.cu.

One warp per row with warp-shuffle sums for the forward and dx; dgamma and dbeta as fixed per-block partial sums
that are then summed (deterministic). The cache is the reference's LayerNormCache (xhat, rstd, gamma), so either
backward accepts either forward's cache. float32 and float64.

The sublayer end LN(residual + dropout(x)) runs the reference's hashed dropout and sum as CuPy elementwise code on the
device, then the layer norm kernel: fused on the CPU (where a pass over memory is what costs), composed here. So is
the embeddings' end dropout(LN(x)).
"""

import numpy as np

from minielectra.kernels.cupy_gpu import _common
from minielectra.ops import checks
from minielectra.ops import dropout as _dropout
from minielectra.ops.layernorm import (LAYER_NORM_EPS, DropoutAddNormCache, LayerNormCache, NormDropoutCache,
                                      dropout_add_setup, layernorm_dropout_setup)

WARPS_PER_BLOCK = 4  # rows per block of the row kernels
PARTIAL_THREADS = 256


def check_forward(x, gamma, beta):
    """The reference's argument checks -> (dtype, C). gamma and beta must be finite, as the reference requires."""
    checks.float_array("x", x)
    if x.ndim < 1:
        raise ValueError("x must have shape (..., C), got a 0-d array")
    C = x.shape[-1]
    checks.param("gamma", gamma, (C,), "(C,)")
    checks.param("beta", beta, (C,), "(C,)")
    return _common.float_dtype(x, gamma, beta), C


def layernorm_forward(x, gamma, beta, eps=LAYER_NORM_EPS):
    """x (..., C), gamma (C,), beta (C,) -> (..., C)."""
    dt, C = check_forward(x, gamma, beta)
    if C == 0:  # nothing to normalise; the reference defines what happens
        from minielectra.ops.layernorm import layernorm_forward as reference

        return reference(x, gamma, beta, eps)
    _common.require_device_arrays("layernorm_forward", "minielectra.ops.layernorm.layernorm_forward",
                                  x=x, gamma=gamma, beta=beta)
    xp = _common.runtime().xp
    x2 = xp.ascontiguousarray(x, dtype=dt).reshape(-1, C)
    gamma, beta = (xp.ascontiguousarray(a, dtype=dt) for a in (gamma, beta))
    N = x2.shape[0]
    y, xhat = xp.empty_like(x2), xp.empty_like(x2)
    rstd = xp.empty((N,), dt)
    if N:
        _common.launch("layernorm", f"layernorm_forward_{_common.suffix(dt)}", (-(-N // WARPS_PER_BLOCK),),
                       (32 * WARPS_PER_BLOCK,), (x2, gamma, beta, y, xhat, rstd, np.int64(N), np.int32(C), dt.type(eps)))
    shape = tuple(x.shape)
    return y.reshape(shape), LayerNormCache(xhat.reshape(shape), rstd.reshape(shape[:-1] + (1,)), gamma)


def check_backward(dout, cache):
    xhat, rstd, gamma = cache
    checks.float_array("dout", dout)
    checks.shape("dout", dout, xhat.shape, "like the forward's x")
    return _common.float_dtype(dout, xhat, rstd, gamma), xhat.shape[-1]


def layernorm_backward(dout, cache):
    """Inverts `out = xhat * gamma + beta`: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * gamma."""
    dt, C = check_backward(dout, cache)
    xhat, rstd, gamma = cache
    if C == 0:
        from minielectra.ops.layernorm import layernorm_backward as reference

        return reference(dout, cache)
    _common.require_device_arrays("layernorm_backward", "minielectra.ops.layernorm.layernorm_backward",
                                  dout=dout, xhat=xhat, rstd=rstd, gamma=gamma)
    xp = _common.runtime().xp
    g2 = xp.ascontiguousarray(dout, dtype=dt).reshape(-1, C)
    h2 = xp.ascontiguousarray(xhat, dtype=dt).reshape(-1, C)
    r = xp.ascontiguousarray(rstd, dtype=dt).reshape(-1)
    gamma = xp.ascontiguousarray(gamma, dtype=dt)
    N = g2.shape[0]
    dx = xp.empty_like(g2)
    if not N:
        return dx.reshape(dout.shape), xp.zeros((C,), dt), xp.zeros((C,), dt)
    sfx = _common.suffix(dt)
    _common.launch("layernorm", f"layernorm_backward_dx_{sfx}", (-(-N // WARPS_PER_BLOCK),), (32 * WARPS_PER_BLOCK,),
                   (g2, h2, r, gamma, dx, np.int64(N), np.int32(C)))
    P = _common.n_partials(N)
    pg, pb = xp.empty((P, C), dt), xp.empty((P, C), dt)
    _common.launch("layernorm", f"layernorm_backward_partials_{sfx}", (P, -(-C // PARTIAL_THREADS)),
                   (PARTIAL_THREADS,), (g2, h2, pg, pb, np.int64(N), np.int32(C)))
    return dx.reshape(dout.shape), pg.sum(axis=0), pb.sum(axis=0)


def dropout_add_layernorm_forward(x, residual, gamma, beta, p, rng, train=True, eps=LAYER_NORM_EPS):
    """x, residual (..., C), gamma, beta (C,) -> LN(residual + dropout(x)) (..., C)."""
    _common.require_device_arrays("dropout_add_layernorm_forward",
                                  "minielectra.ops.layernorm.dropout_add_layernorm_forward", x=x, residual=residual)
    seed, threshold, drop_scale = dropout_add_setup(x, residual, p, rng, train)  # the reference's draw: its mask
    y, ln = layernorm_forward(residual + _dropout.hashed_dropout(x, seed, threshold, drop_scale), gamma, beta, eps)
    return y, DropoutAddNormCache(ln, seed, threshold, drop_scale)


def dropout_add_layernorm_backward(dout, cache):
    """Inverts `y = LN(s)`, `s = residual + x * keep * drop_scale` -> dx, dresidual, dgamma, dbeta."""
    ds, dgamma, dbeta = layernorm_backward(dout, cache.ln)
    return _dropout.hashed_dropout(ds, cache.seed, cache.threshold, cache.drop_scale), ds, dgamma, dbeta


def layernorm_dropout_forward(x, gamma, beta, p, rng, train=True, eps=LAYER_NORM_EPS):
    """x (..., C), gamma, beta (C,) -> dropout(LN(x)) (..., C)."""
    _common.require_device_arrays("layernorm_dropout_forward", "minielectra.ops.layernorm.layernorm_dropout_forward",
                                  x=x)
    seed, threshold, drop_scale = layernorm_dropout_setup(x, p, rng, train)  # the reference's draw: its mask
    y, ln = layernorm_forward(x, gamma, beta, eps)
    out = _dropout.hashed_dropout(y, seed, threshold, drop_scale) if threshold else y
    return out, NormDropoutCache(ln, seed, threshold, drop_scale)


def layernorm_dropout_backward(dout, cache):
    """Inverts `out = LN(x) * keep * drop_scale` -> dx, dgamma, dbeta."""
    if cache.threshold:
        dout = _dropout.hashed_dropout(dout, cache.seed, cache.threshold, cache.drop_scale)
    return layernorm_backward(dout, cache.ln)
