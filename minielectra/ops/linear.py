"""Linear layer: y = x @ W + b over the last axis, any number of leading dimensions.

W is stored (in, out) so the forward is a plain `x @ W` (Hugging Face / PyTorch store (out, in); import transposes).
"""

from typing import NamedTuple

from minielectra.ops import checks


class LinearCache(NamedTuple):
    x: object  # (..., C) the input, needed for dW
    W: object  # (C, OC) needed for dx


def linear_forward(x, W, b):
    """x (..., C) @ W (C, OC) + b (OC,) -> (..., OC)."""
    checks.float_array("x", x)
    checks.ndim("W", W, 2, "(C, OC)")
    C, OC = W.shape
    if x.ndim < 1 or x.shape[-1] != C:
        raise ValueError(f"x must have shape (..., C) with C = {C} to match W {tuple(W.shape)}, got {tuple(x.shape)}")
    checks.param("W", W, (C, OC), "(C, OC)")
    checks.param("b", b, (OC,), "(OC,)")
    out = x @ W + b  # (..., OC)
    return out, LinearCache(x, W)


def linear_backward(dout, cache):
    """Inverts `out = x @ W + b`: dx = dout @ W.T, dW = x.T @ dout over all leading rows, db = sum of dout."""
    x, W = cache
    C, OC = W.shape
    dx = dout @ W.T  # (..., C)
    x2 = x.reshape(-1, C)  # every leading position is one row that used the same W
    d2 = dout.reshape(-1, OC)
    dW = x2.T @ d2  # (C, OC)
    db = d2.sum(axis=0)  # (OC,)
    return dx, dW, db
