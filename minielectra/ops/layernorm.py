"""Layer normalisation over the last axis: y = (x - mean) / sqrt(var + eps) * gamma + beta.

ELECTRA (like BERT) uses eps = 1e-12: tiny enough that it only matters for a constant row.

`dropout_add_layernorm_forward` is the end of every post-LN sublayer, LN(residual + dropout(x)), as one op, and
`layernorm_dropout_forward` the end of the embeddings, dropout(LN(x)).
"""

from typing import NamedTuple

from minielectra.backend import get_xp
from minielectra.ops import checks
from minielectra.ops.dropout import draw_seed, drop_threshold, hashed_dropout

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


class DropoutAddNormCache(NamedTuple):
    ln: LayerNormCache  # of the sum residual + dropout(x)
    seed: int  # the dropout mask's hash seed (dropout.hashed_keep_mask)
    threshold: int  # dropout.drop_threshold(p); 0: no dropout (p == 0 or not training)
    drop_scale: float  # 1 / (1 - p)


def dropout_add_setup(x, residual, p, rng, train):
    """The fused op's argument checks and its one draw from rng, shared with its kernels -> (seed, threshold,
    drop_scale); gamma and beta are checked by the layer norm."""
    checks.float_array("x", x)
    checks.float_array("residual", residual)
    checks.shape("residual", residual, x.shape, "(..., C) like x")
    checks.probability("p", p)
    threshold = drop_threshold(p) if train else 0
    seed = draw_seed(rng) if threshold else 0
    return seed, threshold, 1.0 / (1.0 - p)


def dropout_add_layernorm_forward(x, residual, gamma, beta, p, rng, train=True, eps=LAYER_NORM_EPS):
    """x, residual (..., C), gamma, beta (C,) -> LN(residual + dropout(x)) (..., C): how each post-LN sublayer ends
    (BERT's `LayerNorm(dropout(dense(h)) + input)`), as one op so a kernel can do it in one pass over each row.

    Dropout here uses the counter-based mask attention uses (dropout.hashed_keep_mask): one seed drawn from rng, the
    keep bit of each entry a hash of (seed, flat index). The backward recomputes it from the seed, so the cache holds
    no mask, and a kernel decides each entry inside its row loop.
    """
    seed, threshold, drop_scale = dropout_add_setup(x, residual, p, rng, train)
    s = residual + hashed_dropout(x, seed, threshold, drop_scale)  # (..., C)
    y, ln = layernorm_forward(s, gamma, beta, eps)
    return y, DropoutAddNormCache(ln, seed, threshold, drop_scale)


def dropout_add_layernorm_backward(dout, cache):
    """Inverts `y = LN(s)`, `s = residual + x * keep * drop_scale`: ds reaches the residual unchanged and x through
    the same mask and scale. -> dx, dresidual, dgamma, dbeta."""
    ds, dgamma, dbeta = layernorm_backward(dout, cache.ln)
    return hashed_dropout(ds, cache.seed, cache.threshold, cache.drop_scale), ds, dgamma, dbeta


class NormDropoutCache(NamedTuple):
    ln: LayerNormCache  # of x
    seed: int  # the dropout mask's hash seed (dropout.hashed_keep_mask)
    threshold: int  # dropout.drop_threshold(p); 0: no dropout (p == 0 or not training)
    drop_scale: float  # 1 / (1 - p)


def layernorm_dropout_setup(x, p, rng, train):
    """layernorm_dropout_forward's checks of x and p and its one draw from rng, shared with its kernels -> (seed,
    threshold, drop_scale); gamma and beta are checked by the layer norm."""
    checks.float_array("x", x)
    checks.probability("p", p)
    threshold = drop_threshold(p) if train else 0
    return (draw_seed(rng) if threshold else 0), threshold, 1.0 / (1.0 - p)


def layernorm_dropout_forward(x, gamma, beta, p, rng, train=True, eps=LAYER_NORM_EPS):
    """x (..., C), gamma, beta (C,) -> dropout(LN(x)) (..., C): how the embeddings end (BERT's
    `dropout(LayerNorm(words + positions + types))`), as one op so a kernel can do it in one pass over each row.

    Dropout uses the hashed mask of dropout_add_layernorm_forward (one seed drawn from rng when it drops anything), so
    the backward recomputes it and the cache holds no mask.
    """
    seed, threshold, drop_scale = layernorm_dropout_setup(x, p, rng, train)
    y, ln = layernorm_forward(x, gamma, beta, eps)
    out = hashed_dropout(y, seed, threshold, drop_scale) if threshold else y
    return out, NormDropoutCache(ln, seed, threshold, drop_scale)


def layernorm_dropout_backward(dout, cache):
    """Inverts `out = LN(x) * keep * drop_scale`: dout goes back through the same mask and scale, then the layer norm.
    -> dx, dgamma, dbeta."""
    dy = hashed_dropout(dout, cache.seed, cache.threshold, cache.drop_scale) if cache.threshold else dout
    return layernorm_backward(dy, cache.ln)
