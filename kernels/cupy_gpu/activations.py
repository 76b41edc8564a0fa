"""CUDA kernels for `minielectra.ops.activations` (bias_gelu_forward, bias_gelu_backward): launcher of activations.cu.

The forward fuses the bias add and GELU (exact erf form, or tanh with approximate=True) in one pass and returns the
reference's BiasGeluCache(GeluCache(h, s, approximate)), so either backward accepts either forward's cache. The
backward writes dx and per-block partial sums of it in one pass; db is their sum (deterministic). float32 and float64.
"""

import numpy as np

from minielectra.kernels.cupy_gpu import _common
from minielectra.ops import checks
from minielectra.ops.activations import BiasGeluCache, GeluCache

THREADS = 256


def check_forward(x, b):
    checks.float_array("x", x)
    if x.ndim < 1:
        raise ValueError("x must have shape (..., F), got a 0-d array")
    checks.param("b", b, (x.shape[-1],), "(F,)")
    return _common.float_dtype(x, b), x.shape[-1]


def bias_gelu_forward(x, b, approximate=False):
    """gelu(x + b): x (..., F) the output of a matmul, b (F,) its bias."""
    dt, F = check_forward(x, b)
    _common.require_device_arrays("bias_gelu_forward", "minielectra.ops.activations.bias_gelu_forward", x=x, b=b)
    xp = _common.runtime().xp
    x2 = xp.ascontiguousarray(x, dtype=dt)
    b = xp.ascontiguousarray(b, dtype=dt)
    out, h, s = xp.empty_like(x2), xp.empty_like(x2), xp.empty_like(x2)
    n = x2.size
    if n:
        _common.launch("activations", f"bias_gelu_forward_{_common.suffix(dt)}", (_common.blocks_for(n, THREADS),),
                       (THREADS,), (x2, b, out, h, s, np.int64(n), np.int32(F), np.int32(bool(approximate))))
    return out, BiasGeluCache(GeluCache(h, s, bool(approximate)))


def check_backward(dout, cache):
    h, s, _ = cache.gelu
    checks.float_array("dout", dout)
    checks.shape("dout", dout, h.shape, "like the forward's x")
    return _common.float_dtype(h, s), h.shape[-1]


def bias_gelu_backward(dout, cache):
    """Inverts `out = gelu(x + b)`: dx = gelu'(x + b) * dout, db sums dx over every leading position."""
    dt, F = check_backward(dout, cache)
    h, s, approximate = cache.gelu
    _common.require_device_arrays("bias_gelu_backward", "minielectra.ops.activations.bias_gelu_backward",
                                  dout=dout, h=h, s=s)
    xp = _common.runtime().xp
    g2, h2, s2 = (xp.ascontiguousarray(a, dtype=dt) for a in (dout, h, s))
    dx = xp.empty_like(h2)
    N = h2.size // F if F else 0
    if not N:
        return dx, xp.zeros((F,), dt)
    P = _common.n_partials(N)
    partial = xp.empty((P, F), dt)
    _common.launch("activations", f"bias_gelu_backward_{_common.suffix(dt)}", (P, -(-F // THREADS)), (THREADS,),
                   (g2, h2, s2, dx, partial, np.int64(N), np.int32(F), np.int32(bool(approximate))))
    return dx, partial.sum(axis=0)
