# %% [markdown]
# # 04 · Layer normalisation, and a compact backward pass
#
# Layer norm rescales every token's feature vector to mean 0 and variance 1, then applies a learned gain and shift:
#
# `y = (x - mean(x)) / sqrt(var(x) + eps) * γ + β`, over the last axis (the C features of one token).
#
# It keeps activations at a steady scale through a deep stack (lesson 06). Its backward pass is the first one where
# every output depends on every input of the row, through the mean and the variance.
#
# **You will learn**
# - the forward pass, step by step with shapes;
# - the backward pass two ways: the chain rule through each intermediate (the "staged" version), and a compact
#   formula `dx = rstd * (g - mean(g) - x̂ * mean(g * x̂))` derived by hand;
# - that both agree with each other, with finite differences, and with the library's `ops.layernorm`.
#
# Run it: `python lessons/04_layernorm.py` (a few seconds).

# %%
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from minielectra import gradcheck
from minielectra.gradcheck import format_table

FIG_DIR = Path("lessons/figures/04_layernorm")
FIG_DIR.mkdir(parents=True, exist_ok=True)
np.set_printoptions(precision=4, suppress=True)
rng = np.random.default_rng(0)
EPS = 1e-12  # ELECTRA's (and BERT's) layer-norm epsilon: it only matters for a constant row

# %% [markdown]
# ## 1. Forward, staged
#
# For `x` of shape `(B, T, C)`, every statistic is per token, over the C features, kept with a trailing axis of 1 so
# it broadcasts back:
#
# ```
# mu   = mean(x)                 (B, T, 1)
# xc   = x - mu                  (B, T, C)
# var  = mean(xc²)               (B, T, 1)   the biased variance (divide by C), as every framework uses
# rstd = 1 / sqrt(var + eps)     (B, T, 1)
# xhat = xc * rstd               (B, T, C)   mean 0, variance 1 per token
# y    = xhat * γ + β            (B, T, C)   γ, β of shape (C,)
# ```

# %%
def layernorm_forward(x, gamma, beta, eps=EPS):
    mu = x.mean(axis=-1, keepdims=True)  # (B, T, 1)
    xc = x - mu  # (B, T, C)
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (B, T, 1)
    rstd = 1.0 / np.sqrt(var + eps)  # (B, T, 1)
    xhat = xc * rstd  # (B, T, C)
    return xhat * gamma + beta, (x, xc, var, rstd, xhat, gamma, eps)


x = 3.0 + 2.0 * rng.standard_normal((2, 3, 8))  # (B, T, C), far from mean 0 / variance 1
gamma, beta = 1 + 0.1 * rng.standard_normal(8), 0.1 * rng.standard_normal(8)  # (C,)
y, cache = layernorm_forward(x, gamma, beta)
xhat = cache[4]
print("per-token mean of x   :", x.mean(-1).ravel())
print("per-token mean of xhat:", xhat.mean(-1).ravel())
print("per-token var  of xhat:", xhat.var(-1).ravel())

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
for t in range(3):
    axes[0].plot(x[0, t], "o-", label=f"token {t}")
    axes[1].plot(xhat[0, t], "o-", label=f"token {t}")
axes[0].set_title("x: each token at its own offset and scale")
axes[1].set_title("x̂ = (x - mean) / std: every token mean 0, variance 1")
for ax in axes:
    ax.set_xlabel("feature c")
    ax.legend()
fig.tight_layout()
path = FIG_DIR / "normalised_tokens.png"
fig.savefig(path, dpi=110)
plt.close(fig)
print("saved", path)

# %% [markdown]
# ## 2. Backward, staged: invert each line in reverse
#
# Given `dy`, walk back up the forward. Two of the lines fan out, so their gradients add: `xc` is used by both `var`
# and `xhat`, and `x` by both `mu` and `xc`. Writing `C` for the row length:
#
# ```
# y = xhat * γ + β       dγ = sum over rows of dy * xhat;  dβ = sum over rows of dy;  dxhat = dy * γ
# xhat = xc * rstd       dxc = dxhat * rstd;  drstd = sum_c(dxhat * xc)
# rstd = (var + eps)^-½  dvar = drstd * (-½) (var + eps)^-3/2 = -½ drstd rstd³
# var = mean(xc²)        dxc += dvar * 2 xc / C
# xc = x - mu            dx = dxc;  dmu = -sum_c(dxc)
# mu = mean(x)           dx += dmu / C
# ```

# %%
def layernorm_backward_staged(dout, cache):
    x, xc, var, rstd, xhat, gamma, eps = cache
    C = x.shape[-1]
    dgamma = (dout * xhat).reshape(-1, C).sum(axis=0)  # (C,)
    dbeta = dout.reshape(-1, C).sum(axis=0)  # (C,)
    dxhat = dout * gamma  # (B, T, C)
    dxc = dxhat * rstd  # (B, T, C)
    drstd = (dxhat * xc).sum(axis=-1, keepdims=True)  # (B, T, 1)
    dvar = -0.5 * drstd * rstd**3  # (B, T, 1)
    dxc = dxc + dvar * 2.0 * xc / C  # (B, T, C)
    dmu = -dxc.sum(axis=-1, keepdims=True)  # (B, T, 1)
    dx = dxc + dmu / C  # (B, T, C)
    return dx, dgamma, dbeta


# %% [markdown]
# ## 3. Backward, compact: do the algebra once
#
# Let `g = dy * γ` (the gradient at `x̂`) and write `r = rstd`. We need `dx_i = sum_j g_j ∂x̂_j/∂x_i`.
#
# 1. `x̂_j = (x_j - μ) r`. Product rule: `∂x̂_j/∂x_i = r (δ_ij - 1/C) + (x_j - μ) ∂r/∂x_i`
#    (the `-1/C` is `∂μ/∂x_i`).
# 2. `r = (σ² + eps)^-½`, so `∂r/∂x_i = -½ r³ ∂σ²/∂x_i`, and `∂σ²/∂x_i = (2/C)(x_i - μ)` (the term through μ
#    vanishes because the deviations sum to zero). Hence `∂r/∂x_i = -r³ (x_i - μ) / C = -r² x̂_i / C`.
# 3. Substitute: `∂x̂_j/∂x_i = r (δ_ij - 1/C - x̂_j x̂_i / C)`.
# 4. Sum against `g_j`: `dx_i = r (g_i - (1/C) sum_j g_j - x̂_i (1/C) sum_j g_j x̂_j)`, that is
#
# `dx = rstd * (g - mean(g) - x̂ * mean(g * x̂))`.
#
# Read it as: pass the gradient through, minus its component along the all-ones direction (the mean cannot change the
# output), minus its component along `x̂` (neither can the scale), then undo the division by the std. One line, and
# the cache needs only `x̂`, `rstd` and `γ`.

# %%
def layernorm_backward_compact(dout, cache):
    x, xc, var, rstd, xhat, gamma, eps = cache
    C = x.shape[-1]
    g = dout * gamma  # (B, T, C)
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))  # (B, T, C)
    return dx, (dout * xhat).reshape(-1, C).sum(axis=0), dout.reshape(-1, C).sum(axis=0)


dout = rng.standard_normal(y.shape)
for name, a, b in zip(("dx", "dgamma", "dbeta"), layernorm_backward_staged(dout, cache),
                      layernorm_backward_compact(dout, cache)):
    print(f"staged vs compact {name:6}: max abs diff {np.abs(a - b).max():.1e}")
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)

inputs = dict(x=x, gamma=gamma, beta=beta)
rows = []
for label, backward in (("staged", layernorm_backward_staged), ("compact", layernorm_backward_compact)):
    rows += [r._replace(name=f"{label}: {r.name}")
             for r in gradcheck.check_op(layernorm_forward, backward, inputs, ["x", "gamma", "beta"])]
print(format_table(rows, title="layer norm backward vs centred differences"))
assert all(r.ok for r in rows)

# %% [markdown]
# A sanity check on the geometry: since the output cannot depend on a shift of the whole row, `dx` must sum to zero
# over each row, and since it cannot depend on a rescaling, `sum(dx * x̂)` must be zero too.

# %%
dx = layernorm_backward_compact(dout, cache)[0]
print(f"max |sum_c dx|     : {np.abs(dx.sum(-1)).max():.1e}")
print(f"max |sum_c dx * x̂| : {np.abs((dx * xhat).sum(-1)).max():.1e}   (not exactly 0: eps makes var(x̂) = 1 - eps/var)")

# %% [markdown]
# ## 4. The library version
#
# `ops.layernorm.layernorm_forward(x, gamma, beta, eps)` caches exactly `(xhat, rstd, gamma)` and its backward is the
# compact formula.

# %%
from minielectra.ops import layernorm as lib

y_lib, cache_lib = lib.layernorm_forward(x, gamma, beta)
np.testing.assert_allclose(y_lib, y, rtol=1e-12)
for a, b in zip(lib.layernorm_backward(dout, cache_lib), layernorm_backward_staged(dout, cache)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
rows = gradcheck.check_op(lib.layernorm_forward, lib.layernorm_backward,
                          dict(x=rng.standard_normal((2, 3, 8)), gamma=gamma.copy(), beta=beta.copy()),
                          ["x", "gamma", "beta"])
print(format_table(rows, title="library layernorm"))
assert all(r.ok for r in rows)
print("library layernorm agrees with the staged and the compact backward")
