"""A params dict whose arrays are views of one flat buffer, and grads and optimizer moments laid out alike.

Why: after the backward passes a training step treats every tensor the same way (add the shards' gradients, sum
their squares for the clipping, AdamW). Over separate arrays each of those is one call per tensor, 145 of them in
the tiny preset, and the calls' Python cost outweighs the arithmetic of most tensors; over one buffer each is one
call. Measured on 2 cores, tiny preset, batch 32 x 128, numba backend, alternating in one process: see
kernels/numba_cpu/optim.py.

Everything else sees an ordinary dict of arrays: ops and blocks read params[k] and add into grads[k] in place (a
view), checkpoints save them by name. The flat fast paths run only while the dicts are `intact`: replacing an entry
(params[k] = new_array) leaves the buffer behind, and then the callers fall back to their per-tensor loops.

The layout: keys in two parts, each in sorted key order, so the order (which a float sum depends on) is the same on
every run. The optimizer puts the keys that take weight decay first (optim.flatten), so its decay mask is one
boundary.
"""

import operator
from typing import NamedTuple

import numpy as np

from minielectra.backend import get_xp


class Layout(NamedTuple):
    keys: tuple  # the keys in buffer order
    shapes: tuple  # each key's shape
    offsets: tuple  # where each key's entries start in the buffer
    sizes: tuple  # each key's number of entries
    size: int  # the buffer's length
    split: int  # the buffer's first `split` entries hold the first part's keys


class FlatDict(dict):
    """{key: array} whose arrays are views of `buffer` (1-d, contiguous) placed by `layout`."""

    def __init__(self, buffer, layout):
        views = {k: buffer[o:o + n].reshape(s) for k, s, o, n in zip(*layout[:4])}
        super().__init__(views)
        self.buffer = buffer
        self.layout = layout
        self._views = views

    def intact(self):
        """True while every key holds the view it was made with (and no key was added or removed)."""
        return len(self) == len(self._views) and all(map(operator.is_, self.values(), self._views.values()))


def layout_of(params, last):
    """The Layout for {key: array}: the keys k with last(k) false first, then the others."""
    first = sorted(k for k in params if not last(k))
    keys = tuple(first) + tuple(sorted(k for k in params if last(k)))
    shapes = tuple(tuple(params[k].shape) for k in keys)
    sizes = [int(np.prod(s)) for s in shapes]
    offsets = tuple(int(o) for o in np.cumsum([0] + sizes[:-1]))
    return Layout(keys, shapes, offsets, tuple(sizes), sum(sizes), sum(sizes[:len(first)]))


def flatten(params, layout):
    """A FlatDict holding a copy of params' values, placed by `layout` (params' keys and shapes). Params of mixed
    dtypes or array modules, or an empty dict, are returned as they are: the per-tensor paths handle them."""
    arrays = list(params.values())
    if not arrays or len({a.dtype for a in arrays}) != 1 or len({get_xp(a) for a in arrays}) != 1:
        return params
    flat = FlatDict(get_xp(arrays[0]).empty(layout.size, arrays[0].dtype), layout)
    for k in layout.keys:
        flat[k][...] = params[k]
    return flat


def zeros_like(flat):
    """A FlatDict of zeros laid out as `flat`: one allocation and one pass, where a dict of zeros takes one per key."""
    return FlatDict(get_xp(flat.buffer).zeros_like(flat.buffer), flat.layout)


def buffers(*dicts):
    """The dicts' buffers when every one is an intact FlatDict with the same layout; else None."""
    if not all(isinstance(d, FlatDict) for d in dicts):
        return None
    layout = dicts[0].layout
    if not all(d.layout is layout and d.intact() for d in dicts):
        return None
    return [d.buffer for d in dicts]
