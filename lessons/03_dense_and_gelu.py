# %% [markdown]
# # 03 · The dense layer and GELU
#
# The feed-forward half of every Transformer layer is `dense -> GELU -> dense`. Together with attention's four
# projections, dense layers hold nearly all of a Transformer's weights and do nearly all of its arithmetic.
#
# **You will learn**
# - the linear layer `y = x W + b` on a batch of sequences, and its three gradients; in particular why
#   `dW = xᵀ dout` sums over **every** row of every sequence;
# - GELU, `x Φ(x)`: the exact erf form ELECTRA and BERT use, the tanh approximation GPT-2 uses, how far apart they
#   are, and their derivatives;
# - gradient checks of both, and the library's `ops.linear` and `ops.activations`.
#
# Run it: `python lessons/03_dense_and_gelu.py` (a few seconds).

# %%
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy.special import erf

from minielectra import gradcheck
from minielectra.gradcheck import format_table

FIG_DIR = Path("lessons/figures/03_dense_and_gelu")
FIG_DIR.mkdir(parents=True, exist_ok=True)
np.set_printoptions(precision=4, suppress=True)
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The linear layer
#
# Input `x` has shape `(B, T, C)`: B sequences of T tokens, C features each. The same weights act on every token:
# `y[b, t] = x[b, t] @ W + b`, with `W` of shape `(C, OC)` (stored input-major so the code is a plain `x @ W`) and
# bias `b` of shape `(OC,)`. NumPy's `@` broadcasts over the leading `(B, T)`.
#
# **Backward.** Write one output entry: `y[r, o] = sum_c x[r, c] W[c, o] + b[o]`, where `r` runs over all `B*T` rows.
#
# - `dx[r, c] = sum_o dout[r, o] W[c, o]`, i.e. `dx = dout @ Wᵀ`: `(B, T, OC) @ (OC, C) -> (B, T, C)`.
# - `dW[c, o] = sum_r x[r, c] dout[r, o]`: **every row used the same W**, so every row contributes. Flatten the
#   rows first: `dW = x.reshape(-1, C).T @ dout.reshape(-1, OC)`, `(C, B*T) @ (B*T, OC) -> (C, OC)`.
# - `db[o] = sum_r dout[r, o]`: the bias was added to every row.

# %%
def linear_forward(x, W, b):
    return x @ W + b, (x, W)  # (B, T, C) @ (C, OC) + (OC,) -> (B, T, OC)


def linear_backward(dout, cache):
    x, W = cache
    C, OC = W.shape
    dx = dout @ W.T  # (B, T, C)
    dW = x.reshape(-1, C).T @ dout.reshape(-1, OC)  # (C, OC): summed over all B*T rows
    db = dout.reshape(-1, OC).sum(axis=0)  # (OC,)
    return dx, dW, db


def linear_backward_buggy(dout, cache):
    """A classic mistake: `x[0].T @ dout[0]` (or a loop that overwrites instead of adding) keeps one sequence only."""
    x, W = cache
    dx, _, db = linear_backward(dout, cache)
    return dx, x[0].T @ dout[0], db  # (C, OC) from the first sequence alone


B, T, C, OC = 2, 3, 4, 5
inputs = dict(x=rng.standard_normal((B, T, C)), W=rng.standard_normal((C, OC)), b=rng.standard_normal(OC))
y, _ = linear_forward(**inputs)
print("x", inputs["x"].shape, "@ W", inputs["W"].shape, "+ b", inputs["b"].shape, "->", y.shape)
rows = gradcheck.check_op(linear_forward, linear_backward, inputs, ["x", "W", "b"])
rows += [r._replace(name=f"{r.name} (dW from sequence 0 only)")
         for r in gradcheck.check_op(linear_forward, linear_backward_buggy, inputs, ["x", "W", "b"])]
print(format_table(rows, title="linear layer"))
assert all(r.ok for r in rows[:3]) and not rows[4].ok

# %% [markdown]
# The buggy `dW` fails by a wide margin (with B = 2 it is off by about half), while `dx` and `db` in the same call
# still pass: a gradient check names exactly the parameter that is wrong.
#
# ## 2. GELU
#
# ReLU zeroes negative inputs, `x * 1[x > 0]`. GELU softens that gate: it multiplies `x` by the *probability* that a
# standard normal variable is below `x`,
#
# `gelu(x) = x Φ(x)`, with `Φ(x) = (1 + erf(x / sqrt 2)) / 2` the normal CDF.
#
# Large positive x pass almost unchanged (`Φ ≈ 1`), large negative x go to 0 (`Φ ≈ 0`), and near 0 the curve is
# smooth, dipping slightly below zero (minimum about -0.17 at x ≈ -0.75).
#
# Before `erf` was fast everywhere, GPT-2's code used a tanh approximation:
#
# `gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`.
#
# **Derivatives.** Product rule on `x Φ(x)`: `gelu'(x) = Φ(x) + x φ(x)`, with `φ(x) = exp(-x²/2) / sqrt(2π)` the
# normal density (the derivative of Φ). For the tanh form, with `u = sqrt(2/π)(x + 0.044715 x³)` and `t = tanh(u)`:
# `gelu_tanh'(x) = 0.5 (1 + t) + 0.5 x (1 - t²) sqrt(2/π) (1 + 3 · 0.044715 x²)`.

# %%
SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def gelu_exact(x):
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def gelu_exact_grad(x):
    return 0.5 * (1 + erf(x / math.sqrt(2))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x**3)))


def gelu_tanh_grad(x):
    t = np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x**2)


xs = np.linspace(-5, 5, 2001)  # (2001,)
diff = gelu_tanh(xs) - gelu_exact(xs)
print(f"max |gelu_tanh - gelu_exact| = {np.abs(diff).max():.2e} at x = {xs[np.abs(diff).argmax()]:+.2f}")
print(f"max |derivative difference|  = {np.abs(gelu_tanh_grad(xs) - gelu_exact_grad(xs)).max():.2e}")
print(f"minimum of gelu: {gelu_exact(xs).min():.4f} at x = {xs[gelu_exact(xs).argmin()]:+.3f}")

fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
axes[0].plot(xs, gelu_exact(xs), label="exact  x Φ(x)")
axes[0].plot(xs, gelu_tanh(xs), "--", label="tanh approximation")
axes[0].plot(xs, np.maximum(xs, 0), ":", color="gray", label="ReLU")
axes[0].set_title("GELU")
axes[0].legend()
axes[1].plot(xs, diff)
axes[1].set_title("tanh approximation - exact")
axes[2].plot(xs, gelu_exact_grad(xs), label="exact: Φ(x) + x φ(x)")
axes[2].plot(xs, gelu_tanh_grad(xs), "--", label="tanh form")
axes[2].set_title("derivative")
axes[2].legend()
for ax in axes:
    ax.set_xlabel("x")
    ax.grid(alpha=0.3)
fig.tight_layout()
path = FIG_DIR / "gelu.png"
fig.savefig(path, dpi=110)
plt.close(fig)
print("saved", path)

# %% [markdown]
# The two forms differ by a few parts in 10⁴: small, but a pre-trained ELECTRA was trained with the exact form, and
# swapping it shifts every activation in every layer. minielectra uses the exact form by default and offers the tanh
# form behind `approximate=True` for comparison.
#
# Gradient check of both, as an op: `out = gelu(x)`, `dx = dout * gelu'(x)`.

# %%
rows = []
for name, f, fprime in (("gelu exact", gelu_exact, gelu_exact_grad), ("gelu tanh", gelu_tanh, gelu_tanh_grad)):
    rows += [r._replace(name=name) for r in gradcheck.check_op(
        lambda x, f=f: (f(x), x), lambda dout, x, fprime=fprime: dout * fprime(x),
        dict(x=3 * rng.standard_normal((2, 3, 4))), ["x"])]
print(format_table(rows, title="GELU derivatives vs centred differences"))
assert all(r.ok for r in rows)

# %% [markdown]
# ## 3. The library version
#
# `ops.linear.linear_forward/backward` and `ops.activations.gelu_forward/backward` (plus `bias_gelu_*`, which adds
# the preceding layer's bias first so a kernel can fuse both into one pass over memory).

# %%
from minielectra.ops import activations, linear

out_lib, cache_lib = linear.linear_forward(**inputs)
out_ours, cache_ours = linear_forward(**inputs)
np.testing.assert_allclose(out_lib, out_ours, rtol=1e-13)
dout = rng.standard_normal(out_ours.shape)
for g_lib, g_ours in zip(linear.linear_backward(dout, cache_lib), linear_backward(dout, cache_ours)):
    np.testing.assert_allclose(g_lib, g_ours, rtol=1e-12)

x = 4 * rng.standard_normal((3, 7))
for approximate, f, fprime in ((False, gelu_exact, gelu_exact_grad), (True, gelu_tanh, gelu_tanh_grad)):
    out, cache = activations.gelu_forward(x, approximate=approximate)
    np.testing.assert_allclose(out, f(x), rtol=1e-12, atol=1e-15)
    dout = rng.standard_normal(x.shape)
    np.testing.assert_allclose(activations.gelu_backward(dout, cache), dout * fprime(x), rtol=1e-12, atol=1e-15)

bias = rng.standard_normal(7)
out, _ = activations.bias_gelu_forward(x, bias)
np.testing.assert_allclose(out, gelu_exact(x + bias), rtol=1e-12, atol=1e-15)
rows = gradcheck.check_op(activations.bias_gelu_forward, activations.bias_gelu_backward,
                          dict(x=rng.standard_normal((2, 3, 4)), b=rng.standard_normal(4)), ["x", "b"])
print(format_table(rows, title="library bias_gelu"))
assert all(r.ok for r in rows)
print("library linear and GELU agree with ours")
