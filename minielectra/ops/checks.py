"""Argument checks at the op boundary, so bad input fails with a message naming the argument, not deep in a matmul.

Type and shape checks run everywhere. Checks of values (finite parameters, ids and targets in range) read the data,
so they run on host (NumPy) arrays only: on a GPU each would be a device-to-host transfer that stalls the step. Device
runs are covered where the data is on the host anyway: batches are checked before they are copied to the device
(electra.forward masks on the host), and a non-finite parameter shows as a non-finite loss or gradient norm, which the
trainer checks when its metrics cross to the host, before any checkpoint is written.
"""

import numpy as np

from minielectra.backend import get_xp, on_device


def readable(*arrays):
    """True when the values of `arrays` can be checked for free: they all live on the host."""
    return not on_device(*arrays)


def float_array(name, x):
    """x must be a float32 or float64 array."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{name} must be a float32 or float64 array, got {type(x).__name__}")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}: convert with {name}.astype(np.float32)")


def int_array(name, x):
    """x must be an integer array (token ids, targets)."""
    if not hasattr(x, "dtype") or not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got {getattr(x, 'dtype', type(x).__name__)}")


def ndim(name, x, n, letters):
    """x must have n dimensions, described as `letters` (e.g. '(B, T, C)') in the message."""
    if x.ndim != n:
        raise ValueError(f"{name} must have shape {letters}, got {tuple(x.shape)}")


def shape(name, x, expected, letters):
    """x.shape must equal the tuple `expected`, described as `letters` in the message."""
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {letters} = {tuple(expected)}, got {tuple(x.shape)}")


def finite(name, x):
    """Parameters must hold no NaN or inf: one poisoned weight silently turns every later output into NaN.
    Host arrays only (see the module docstring)."""
    if readable(x) and not bool(get_xp(x).isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf: the parameters are corrupted (check the learning rate and "
                         "the last good checkpoint)")


def param(name, x, expected, letters):
    """A float parameter of the expected shape with finite values."""
    float_array(name, x)
    shape(name, x, expected, letters)
    finite(name, x)


def probability(name, p):
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
