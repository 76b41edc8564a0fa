"""GELU, the Transformer's activation: gelu(x) = x * Phi(x), with Phi the standard normal CDF.

ELECTRA (like BERT) uses the exact form Phi(x) = (1 + erf(x / sqrt 2)) / 2. The tanh approximation
0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) is offered behind `approximate=True` for comparison with GPT-2-style
code; it differs by up to ~1e-3 and is not what a pre-trained ELECTRA expects.

`bias_gelu_*` adds the bias of the preceding dense layer first, so a kernel can fuse the two into one pass over memory.
"""

import math
from typing import NamedTuple

from minielectra.backend import get_xp, special
from minielectra.ops import checks

_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)


def _erf(xp):
    return special(xp).erf


class GeluCache(NamedTuple):
    x: object  # (...) the pre-activation
    s: object  # (...) Phi(x) for the exact form, tanh(...) for the approximation: the costly part, kept for backward
    approximate: bool


def gelu_forward(x, approximate=False):
    """gelu(x), elementwise, same shape and dtype as x."""
    checks.float_array("x", x)
    xp = get_xp(x)
    if approximate:
        s = xp.tanh(_TANH_C * (x + 0.044715 * x**3))
        out = 0.5 * x * (1.0 + s)
    else:
        s = (0.5 * (1.0 + _erf(xp)(x / _SQRT_2))).astype(x.dtype, copy=False)  # Phi(x)
        out = x * s
    return out.astype(x.dtype, copy=False), GeluCache(x, s, approximate)


def gelu_backward(dout, cache):
    """Inverts `out = x * Phi(x)`: d/dx = Phi(x) + x * phi(x), phi the normal density (or the tanh form's derivative)."""
    x, s, approximate = cache
    xp = get_xp(x)
    if approximate:
        dinner = _TANH_C * (1.0 + 3 * 0.044715 * x**2)
        grad = 0.5 * (1.0 + s) + 0.5 * x * (1.0 - s * s) * dinner
    else:
        # exp(-x^2/2) underflows to 0 for |x| > ~38, where the derivative is exactly 0 or 1 anyway.
        grad = s + x * _INV_SQRT_2PI * xp.exp(-0.5 * x * x)
    return (dout * grad).astype(x.dtype, copy=False)


class BiasGeluCache(NamedTuple):
    gelu: GeluCache  # of h = x + b


def bias_gelu_forward(x, b, approximate=False):
    """gelu(x + b): x (..., F) the output of a matmul, b (F,) its bias."""
    checks.float_array("x", x)
    checks.param("b", b, (x.shape[-1],), "(F,)")
    out, cache = gelu_forward(x + b, approximate)  # (..., F)
    return out, BiasGeluCache(cache)


def bias_gelu_backward(dout, cache):
    """Inverts `out = gelu(x + b)`: dx = gelu'(x + b) * dout, db sums dx over every leading position."""
    dx = gelu_backward(dout, cache.gelu)  # (..., F)
    db = dx.reshape(-1, dx.shape[-1]).sum(axis=0)  # (F,)
    return dx, db
