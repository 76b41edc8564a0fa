"""Inverted dropout: zero each entry with probability p and scale the survivors by 1 / (1 - p).

Scaling at training time keeps the expected activation unchanged, so evaluation is the identity with no rescale.
The mask comes from an explicit numpy Generator, so a run (and a gradient check) can be replayed exactly.
"""

from typing import NamedTuple

import numpy as np

from minielectra.backend import get_xp
from minielectra.ops import checks


class DropoutCache(NamedTuple):
    scale: object  # (...) mask / (1 - p): 0 where dropped; None when dropout was the identity


def dropout_forward(x, p, rng, train=True):
    """x (...) -> same shape. Identity (cache.scale None) when p == 0 or train is False."""
    checks.float_array("x", x)
    checks.probability("p", p)
    if p == 0.0 or not train:
        return x, DropoutCache(None)
    if not isinstance(rng, np.random.Generator):
        raise TypeError("dropout needs an explicit numpy.random.Generator as rng (np.random.default_rng(seed))")
    keep = rng.random(x.shape, dtype=np.float32) >= p  # drawn on the host so NumPy and CuPy runs see the same mask
    xp = get_xp(x)
    scale = xp.asarray(keep, dtype=x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return x * scale, DropoutCache(scale)


def dropout_backward(dout, cache):
    """Inverts `out = x * scale`: the same mask and scale pass the gradient."""
    return dout if cache.scale is None else dout * cache.scale
