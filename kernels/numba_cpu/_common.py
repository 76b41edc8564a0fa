"""Helpers shared by the Numba CPU kernels: dtype resolution and the fixed chunking of race-free reductions."""

import numpy as np

# Reductions over rows (dgamma, dbeta, db, loss sums) are split into at most this many chunks, each written by one
# prange iteration into its own row of a (chunks, C) partial array and summed afterwards. A fixed count (not the thread
# count) keeps the summation order, and so the result, the same on every machine.
N_CHUNKS = 32


def float_dtype(*arrays):
    """The dtype the reference would compute in: NumPy's promotion of the float inputs (float32 or float64)."""
    return np.result_type(*arrays)


def as_2d(x, dtype):
    """x (..., C) as a C-contiguous (N, C) array of `dtype` (a view when it already is one)."""
    x = np.ascontiguousarray(x, dtype=dtype)
    C = x.shape[-1] if x.ndim else 1
    return x.reshape(-1, C)


def n_chunks(n):
    return max(1, min(n, N_CHUNKS))
