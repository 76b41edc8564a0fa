"""CUDA kernel for `minielectra.ops.softmax` (gumbel_sample): launcher of softmax.cu.

One block per row computes the reference's hashed Gumbel noise where it uses it and reduces the row to the first index
of its maximum score: the reference's (N, V) noise array (300 MB a step for ELECTRA-Small's batch) and its dozen
passes are never made. float32 and float64 logits (the noise is float32 in both, as the reference's). CUDA's logf is
within an ulp, NumPy's float32 log within a few: the samples agree with the reference's but where two tokens' scores
are that close.
"""

import numpy as np

from minielectra.kernels.cupy_gpu import _common
from minielectra.ops.dropout import draw_seed
from minielectra.ops.softmax import check_gumbel_args

THREADS = 256  # GS_THREADS in softmax.cu


def gumbel_sample(logits, temperature, rng):
    """logits (N, V) -> (N,) int64: one index per row drawn from softmax(logits / temperature)."""
    check_gumbel_args(logits, temperature)
    _common.require_device_arrays("gumbel_sample", "minielectra.ops.softmax.gumbel_sample", logits=logits)
    seed = draw_seed(rng)  # the reference's one draw: the same noise
    xp = _common.runtime().xp
    x = xp.ascontiguousarray(logits)
    N, V = x.shape
    out = xp.zeros((N,), np.int64)
    if N:
        _common.launch("softmax", f"gumbel_sample_{_common.suffix(x.dtype)}", (N,), (THREADS,),
                       (x, x.dtype.type(temperature), np.uint64(seed), out, np.int32(V)))
    return out
