"""Inverted dropout: zero each entry with probability p and scale the survivors by 1 / (1 - p).

Scaling at training time keeps the expected activation unchanged, so evaluation is the identity with no rescale.
The mask comes from an explicit numpy Generator, so a run (and a gradient check) can be replayed exactly.

Two ways to draw the mask. `dropout_forward` (the fine-tuning heads) draws one seed from the Generator, then one
uniform per entry from a Generator of x's array module seeded with it, and keeps the mask it returns.
Attention's weights, the encoder layers' sublayer outputs (`layernorm.dropout_add_layernorm_forward`) and the
embeddings' output (`layernorm.layernorm_dropout_forward`) use a counter-based mask instead: one 64-bit seed drawn from the Generator, and keep(index) a hash of (seed, flat index),
`hashed_keep_mask`. Any entry of it can be recomputed from the seed alone, in any order, so a fused kernel decides
dropout inside its loops and again in its backward without storing a mask; that is what lets the Numba and CUDA
attention kernels keep memory linear in T. The reference uses the same definition, so all three backends drop the same
entries for the same Generator state. The generator's Gumbel sampling draws its uniforms from the same hash
(`hashed_uniform`, used by `softmax.gumbel_sample`).
"""

import math
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
    # One seed from the Generator, the mask drawn where x lives: copying a host mask up to a GPU would move as many
    # bytes as x itself on every call. A CuPy run therefore drops other entries than a NumPy run of the same seed
    # (equally distributed), and replays its own exactly.
    xp = get_xp(x)
    keep = xp.random.default_rng(int(rng.integers(2**63))).random(x.shape, dtype=np.float32) >= p
    scale = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return x * scale, DropoutCache(scale)


def dropout_backward(dout, cache):
    """Inverts `out = x * scale`: the same mask and scale pass the gradient."""
    return dout if cache.scale is None else dout * cache.scale


# splitmix64's constants (Steele, Lea and Flood 2014): the hash of every counter-based mask and uniform.
# kernels/numba_cpu/_common.hash_bits, attention.cu's attn_keep and softmax.cu's gs_hash_bits compute the same
# function; change them together.
HASH_GOLDEN, HASH_MIX1, HASH_MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
HASH_KEEP_BITS = 24  # keep(index) compares the hash's top 24 bits with drop_threshold(p); hashed_uniform scales them


def drop_threshold(p):
    """An entry is kept when the top 24 bits of its hash are >= this: ceil(p * 2^24), so the keep probability is
    1 - p to within 2^-24; 0 (keep everything) exactly when p == 0."""
    checks.probability("p", p)
    return int(math.ceil(p * 2**HASH_KEEP_BITS))


def draw_seed(rng):
    """The one draw a hashed mask (or hashed_uniform) takes from the Generator: a uint64 seed, as a Python int."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError("dropout and sampling need an explicit numpy.random.Generator as rng "
                        "(np.random.default_rng(seed))")
    return int(rng.integers(0, 2**64, dtype=np.uint64))


# Entries hashed per chunk on the host: each of the hash's ~10 NumPy passes then runs over 256 KB that stay in the CPU's
# cache instead of over the whole array in memory (the Gumbel noise of the tiny preset's step, 304 x 8192: 11.9 ms in
# one piece, 4.5 ms in chunks; one core). A GPU takes the whole array in one launch per pass.
HOST_CHUNK = 1 << 15


def _hash_bits(xp, seed, shape):
    """(shape) uint64 array (xp = numpy or cupy): the top 24 bits of splitmix64(seed + (index + 1) * golden) for each
    C-order flat index. The uint64 products wrap around, as the hash intends."""
    u64 = xp.uint64
    size = math.prod(shape)
    chunk = HOST_CHUNK if xp is np else max(size, 1)
    out = xp.empty(size, dtype=u64)
    for lo in range(0, size, chunk):
        z = xp.arange(lo + 1, min(size, lo + chunk) + 1, dtype=u64)  # index + 1: the kernels' counter
        z *= u64(HASH_GOLDEN)
        z += u64(seed)
        z ^= z >> u64(30)
        z *= u64(HASH_MIX1)
        z ^= z >> u64(27)
        z *= u64(HASH_MIX2)
        z ^= z >> u64(31)
        out[lo:lo + z.size] = z >> u64(64 - HASH_KEEP_BITS)
    return out.reshape(shape)


def hashed_keep_mask(xp, seed, shape, threshold):
    """Boolean keep mask of `shape`: keep[index] = the top 24 bits of the hash of (seed, index) >= threshold."""
    return _hash_bits(xp, seed, shape) >= xp.uint64(threshold)


def hashed_uniform(xp, seed, shape):
    """float32 uniforms in [0, 1) of `shape`, multiples of 2^-24 (as Generator.random(dtype=float32) draws them): the
    top 24 bits of the hash of (seed, index), times 2^-24. The Gumbel sampler's noise (softmax.gumbel_sample)."""
    return _hash_bits(xp, seed, shape).astype(np.float32) * np.float32(2.0**-HASH_KEEP_BITS)


def hashed_dropout(x, seed, threshold, drop_scale):
    """x * keep * drop_scale with keep = hashed_keep_mask of x's shape; a fresh copy of x when threshold is 0."""
    if not threshold:
        return x.copy()
    keep = hashed_keep_mask(get_xp(x), seed, x.shape, threshold)
    return x * (keep * x.dtype.type(drop_scale))
