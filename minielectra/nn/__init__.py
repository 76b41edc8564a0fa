"""Blocks that compose ops over a `params` dict whose keys are Hugging Face ELECTRA state_dict names.

A block's forward reads `params[prefix + ...]` and returns (out, cache); its backward takes (dout, cache, grads),
adds each parameter's gradient into `grads` (a parameter used twice, like the shared word embeddings, collects both
contributions) and returns the gradient of its input.
"""

import numpy as np

from minielectra import flat
from minielectra.backend import get_xp


def truncated_normal(rng, shape, std, dtype=np.float32):
    """Normal(0, std) redrawn outside +-2 std, as TensorFlow's truncated_normal that ELECTRA's code initialises with."""
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2.0
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2.0
    return (out * std).astype(dtype)


def init_params(shapes, rng, std=0.02, dtype=np.float32):
    """Fresh parameters for {name: shape}: LayerNorm gains 1, biases 0, every other weight truncated normal(std).

    Names are drawn in sorted order so the same seed gives the same model whatever order `shapes` was built in.
    """
    params = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if "LayerNorm" in name and name.endswith(".weight"):
            params[name] = np.ones(shape, dtype)
        elif name.endswith(".bias"):
            params[name] = np.zeros(shape, dtype)
        else:
            params[name] = truncated_normal(rng, shape, std, dtype)
    return params


def zeros_like(params):
    """A grads dict: zeros with the keys, shapes and dtypes (and array library) of params. zeros_like writes the zeros
    without reading the params, where params * 0 read them too (3.4 ms of a one-core step of the small preset). For
    params that are views of one buffer (flat.py) the grads are too, laid out alike."""
    if isinstance(params, flat.FlatDict) and params.intact():
        return flat.zeros_like(params)
    return {k: get_xp(v).zeros_like(v) for k, v in params.items()}
