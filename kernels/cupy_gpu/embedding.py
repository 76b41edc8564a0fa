"""CUDA kernel for `minielectra.ops.embedding` (embedding_backward): launcher of embedding.cu.

The scatter-add uses atomicAdd, one thread per (position, channel): rows looked up more than once are summed in the
order the atomics land, which varies from run to run, so results are NON-DETERMINISTIC in their last bits (and differ
from the reference's add.at by rounding). The cache is the reference's EmbeddingCache(ids, table_shape). float32 and
float64.
"""

import numpy as np

from minielectra.kernels.cupy_gpu import _common
from minielectra.ops import checks

THREADS = 256


def check_backward(dout, cache):
    ids, table_shape = cache
    checks.int_array("ids", ids)
    checks.float_array("dout", dout)
    V, E = table_shape
    checks.shape("dout", dout, tuple(ids.shape) + (E,), "ids.shape + (E,)")
    return np.dtype(dout.dtype), int(V), int(E)


def embedding_backward(dout, cache):
    """Inverts `out = table[ids]`: dtable[i] = sum of dout over every position whose id is i."""
    dt, V, E = check_backward(dout, cache)
    _common.require_device_arrays("embedding_backward", "minielectra.ops.embedding.embedding_backward",
                                  dout=dout, ids=cache.ids)
    xp = _common.runtime().xp
    g = xp.ascontiguousarray(dout)
    ids = xp.ascontiguousarray(cache.ids, dtype=np.int64)
    dtable = xp.zeros((V, E), dt)
    n = ids.size
    if n * E:
        _common.launch("embedding", f"embedding_backward_{_common.suffix(dt)}",
                       (_common.blocks_for(n * E, THREADS),), (THREADS,),
                       (g, ids, dtable, np.int64(n), np.int32(E), np.int64(V)))
    return dtable
