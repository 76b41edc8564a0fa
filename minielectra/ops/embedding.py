"""Embedding lookup: out[b, t] = table[ids[b, t]].

The backward is a scatter-add: every position that looked up id i adds its gradient to row i. With `dtable[ids] +=`
a repeated id would be written once instead of summed, so the reference uses `add.at`, which accumulates.
"""

from typing import NamedTuple

from minielectra.backend import get_xp
from minielectra.ops import checks


class EmbeddingCache(NamedTuple):
    ids: object  # (...) the looked-up rows
    table_shape: tuple  # (V, E)


def embedding_forward(ids, table):
    """ids (...) ints in [0, V), table (V, E) -> (..., E)."""
    checks.int_array("ids", ids)
    checks.float_array("table", table)
    checks.ndim("table", table, 2, "(V, E)")
    V = table.shape[0]
    if ids.size and checks.readable(ids) and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"ids must lie in [0, {V}) for a table of {V} rows, got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]: is the vocab size in the config right?")
    checks.finite("table", table)
    return table[ids], EmbeddingCache(ids, tuple(table.shape))  # (..., E)


def embedding_backward(dout, cache):
    """Inverts `out = table[ids]`: dtable[i] = sum of dout over every position whose id is i."""
    ids, (V, E) = cache
    xp = get_xp(dout)
    dtable = xp.zeros((V, E), dtype=dout.dtype)
    xp.add.at(dtable, ids.reshape(-1), dout.reshape(-1, E))
    return dtable
