"""Numba CPU kernel for `minielectra.ops.embedding` (embedding_backward); the forward lookup stays the reference.

The backward is a scatter-add, dtable[ids[n]] += dout[n], where repeated ids must accumulate. The kernel is race-free
by splitting the table's columns E into blocks, one per prange iteration: every iteration walks all positions in order
and adds into its own columns only. Each dtable[i, e] therefore sums its terms in position order, exactly like the
reference's `add.at`, so the results are bitwise equal. It takes the reference's `EmbeddingCache(ids, table_shape)`.
"""

import numpy as np
from numba import njit, prange

from minielectra.ops import checks

_BLOCK = 16  # columns per prange iteration: 64 bytes of float32, one cache line per row touched


@njit(cache=True, parallel=True, nogil=True)
def _scatter_add(ids, dout, dtable):
    n, E = dout.shape
    blocks = (E + _BLOCK - 1) // _BLOCK
    for blk in prange(blocks):
        e0 = blk * _BLOCK
        e1 = min(E, e0 + _BLOCK)
        for p in range(n):
            row = ids[p]
            for e in range(e0, e1):
                dtable[row, e] += dout[p, e]


def embedding_backward(dout, cache):
    """Inverts `out = table[ids]`: dtable[i] = sum of dout over every position whose id is i."""
    ids, (V, E) = cache
    checks.float_array("dout", dout)
    checks.shape("dout", dout, tuple(ids.shape) + (E,), "(..., E) like the looked-up ids")
    flat = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= V):  # the kernel does not bounds-check its writes
        raise ValueError(f"ids must lie in [0, {V}), got values in [{int(flat.min())}, {int(flat.max())}]")
    dtable = np.zeros((V, E), dtype=dout.dtype)
    _scatter_add(flat, np.ascontiguousarray(dout).reshape(-1, E), dtable)
    return dtable
