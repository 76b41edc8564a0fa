"""Layer normalisation over the last axis: y = (x - mean) / sqrt(var + eps) * gamma + beta.

ELECTRA (like BERT) uses eps = 1e-12: tiny enough that it only matters for a constant row.
"""

from typing import NamedTuple

from minielectra.backend import get_xp
from minielectra.ops import checks

LAYER_NORM_EPS = 1e-12


class LayerNormCache(NamedTuple):
    xhat: object  # (..., C) the normalised input
    rstd: object  # (..., 1) 1 / sqrt(var + eps)
    gamma: object  # (C,)


def layernorm_forward(x, gamma, beta, eps=LAYER_NORM_EPS):
    """x (..., C), gamma (C,), beta (C,) -> (..., C)."""
    checks.float_array("x", x)
    C = x.shape[-1]
    checks.param("gamma", gamma, (C,), "(C,)")
    checks.param("beta", beta, (C,), "(C,)")
    xp = get_xp(x)
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., 1) biased, as every framework's LayerNorm
    rstd = (1.0 / xp.sqrt(var + eps)).astype(x.dtype, copy=False)
    xhat = xc * rstd  # (..., C)
    return xhat * gamma + beta, LayerNormCache(xhat, rstd, gamma)


def layernorm_backward(dout, cache):
    """Inverts `out = xhat * gamma + beta` with xhat = (x - mean) * rstd.

    With g = dout * gamma, the mean and variance couple every entry of a row, and the chain rule through them collapses
    to the compact form dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
    """
    xhat, rstd, gamma = cache
    C = xhat.shape[-1]
    g = dout * gamma  # (..., C)
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    dgamma = (dout * xhat).reshape(-1, C).sum(axis=0)  # (C,)
    dbeta = dout.reshape(-1, C).sum(axis=0)  # (C,)
    return dx, dgamma, dbeta
