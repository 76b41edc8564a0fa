"""Numba CPU kernel for `minielectra.ops.softmax` (gumbel_sample).

The reference builds the (N, V) noise in about a dozen NumPy passes (the hash's seven, the conversion, two logs and
their adds), then divides, adds and takes the argmax. Here each row goes by in blocks of W entries, in scratch rows of
the thread's own: a loop of hashed uniforms (the integer hash vectorises in a loop of its own, as in attention's
keep_row), a loop of the two logs (_common.log_float32, which vectorises where the C library's logf is a call per
entry) and the noisy scores, then the block's max and the first index that reaches it, kept while it beats every
earlier block's. No (N, V) array is made. 304 x 8192 float32 (the tiny preset's picks for 16 sequences), one core:
the reference 13.6-13.8 ms, the kernel's loop 2.2 ms (3.8 when its logs were float64 arithmetic rounded to float32).

The compile flag error_model="numpy" lets a division by a value that could be zero vectorise (numba's default checks
each one, to raise ZeroDivisionError); NumPy's semantics are the reference's anyway.

The logs are within an ulp (0.81 measured), NumPy's float32 log within 3.6 ulps on this project's machines: the noise
can differ from the reference's in its last bits, and the sample with it only where two tokens' scores are that close.
The tests allow exactly that.
"""

import numpy as np
from numba import njit, prange

from minielectra.kernels.numba_cpu._common import ONE_U64, hash_bits, log_float32, row_max
from minielectra.ops.dropout import HASH_KEEP_BITS, draw_seed
from minielectra.ops.softmax import GUMBEL_GUARD, check_gumbel_args

W = 1024  # entries per block: a 4 KB float32 scratch row, in L1 while its max and argmax are taken

_TO_UNIT = np.float32(2.0**-HASH_KEEP_BITS)
_GUARD = np.float32(GUMBEL_GUARD)


@njit(cache=True, parallel=True, nogil=True, error_model="numpy")
def _gumbel_argmax(logits, t, seed, out):
    # logits (N, V); t the temperature in logits' dtype; seed uint64. Writes out (N,) int64.
    N, V = logits.shape
    neg_inf = -np.inf
    for i in prange(N):
        score = np.empty(min(W, V), logits.dtype)
        u = np.empty(min(W, V), np.float32)
        best = neg_inf
        best_j = 0
        for j0 in range(0, V, W):
            n = min(W, V - j0)
            counter = np.uint64(i * V + j0)
            for jj in range(n):
                counter += ONE_U64  # the hash counts from flat index + 1
                u[jj] = np.float32(hash_bits(seed, counter)) * _TO_UNIT
            row = logits[i, j0:j0 + n]
            for jj in range(n):
                a = log_float32(u[jj] + _GUARD)  # the reference's float32 steps
                b = log_float32(-a + _GUARD)
                score[jj] = row[jj] / t - b
            m = row_max(score[:n], neg_inf)
            if m > best:  # strictly: on a tie the earlier block's index stays, as argmax's first index
                best = m
                for jj in range(n):
                    if score[jj] == m:
                        best_j = j0 + jj
                        break
        out[i] = best_j


def gumbel_sample(logits, temperature, rng):
    """logits (N, V) -> (N,) int64: one index per row drawn from softmax(logits / temperature)."""
    check_gumbel_args(logits, temperature)
    seed = draw_seed(rng)  # the reference's one draw: the same noise
    logits = np.ascontiguousarray(logits)
    out = np.zeros(logits.shape[0], np.int64)
    if logits.shape[0]:
        _gumbel_argmax(logits, logits.dtype.type(temperature), np.uint64(seed), out)
    return out
