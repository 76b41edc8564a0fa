# %% [markdown]
# # 05 · Multi-head attention
#
# One attention head computes one weighting of the sequence: each token can look mostly at one kind of thing. A
# Transformer runs H heads side by side, each on its own slice of D = C / H features, so one head can track the
# previous word while another tracks the subject of the sentence, and then mixes their outputs.
#
# **You will learn**
# - the full layer: project to Q, K, V; split into heads; attend per head with a padding mask; merge; project out;
# - that splitting heads is only a reshape and a transpose, and so is its backward;
# - the backward pass through all of it, checked for every one of the nine inputs;
# - the library's `ops.attention.mha_forward`, and a heat map of its attention weights on a padded sequence.
#
# Run it: `python lessons/05_multihead_attention.py` (a few seconds).

# %%
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from minielectra import gradcheck
from minielectra.gradcheck import format_table

FIG_DIR = Path("lessons/figures/05_multihead_attention")
FIG_DIR.mkdir(parents=True, exist_ok=True)
np.set_printoptions(precision=3, suppress=True)
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The forward pass, shape by shape
#
# ```
# x                          (B, T, C)
# q = x Wq + bq              (B, T, C)      and the same for k, v: three dense layers
# split: reshape, transpose  (B, T, C) -> (B, T, H, D) -> (B, H, T, D)
# scores = q kᵀ / sqrt(D)    (B, H, T, T)   every head at once: @ batches over (B, H)
# probs = softmax(scores + mask over keys)  (B, H, T, T)
# a = probs v                (B, H, T, D)
# merge: transpose, reshape  (B, H, T, D) -> (B, T, H, D) -> (B, T, C)
# out = a Wo + bo            (B, T, C)
# ```
#
# The padding mask `(B, T)` (1 = real token, 0 = pad) becomes `(B, 1, 1, T)`: it broadcasts over heads and over
# queries, and masks **keys**. Padded queries still compute a row of weights; nothing reads those rows later.

# %%
def split_heads(x, H):
    B, T, C = x.shape
    return x.reshape(B, T, H, C // H).transpose(0, 2, 1, 3)  # (B, H, T, D)


def merge_heads(x):
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)  # (B, T, C)


def mha_forward(x, Wq, bq, Wk, bk, Wv, bv, Wo, bo, mask, H):
    B, T, C = x.shape
    D = C // H
    q, k, v = split_heads(x @ Wq + bq, H), split_heads(x @ Wk + bk, H), split_heads(x @ Wv + bv, H)  # (B, H, T, D)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D)  # (B, H, T, T)
    keep = (mask != 0)[:, None, None, :]  # (B, 1, 1, T)
    s = np.where(keep, scores, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))  # every row keeps at least one real key here
    probs = e / e.sum(axis=-1, keepdims=True)  # (B, H, T, T)
    a = merge_heads(probs @ v)  # (B, T, C)
    out = a @ Wo + bo  # (B, T, C)
    return out, (x, q, k, v, probs, a, Wq, Wk, Wv, Wo, H)


B, T, C, H = 2, 5, 8, 2
mask = np.ones((B, T))
mask[1, 3:] = 0  # the second sequence has 3 real tokens and 2 pads
params = {f"{w}{n}": 0.5 * rng.standard_normal((C, C) if w == "W" else C) for n in "qkvo" for w in "Wb"}
x = rng.standard_normal((B, T, C))
out, cache = mha_forward(x, **params, mask=mask, H=H)
print("x", x.shape, "-> q split", cache[1].shape, "-> probs", cache[4].shape, "-> out", out.shape)
print("head 0 weights of the padded sequence (columns 3, 4 are pads):\n", cache[4][1, 0])

# %% [markdown]
# ## 2. The backward pass
#
# Each forward line, inverted in reverse order:
#
# - `out = a Wo + bo`: `da = dout Woᵀ`, `dWo = aᵀ dout` over all rows, `dbo = sum dout` (lesson 03).
# - merge is a transpose + reshape, which only moves numbers around; its backward moves them back: **split** `da`.
# - `a = probs v` per head: `dv = probsᵀ da`, `dprobs = da vᵀ`.
# - softmax: `dscores = probs * (dprobs - sum(dprobs * probs))` (lesson 02); masked keys have probs 0, so 0 gradient.
# - `scores = q kᵀ / sqrt(D)`: `dq = dscores k / sqrt(D)`, `dk = dscoresᵀ q / sqrt(D)`.
# - split's backward is a **merge**; then three dense layers. `x` fed all three, so `dx` is the sum of three paths.

# %%
def mha_backward(dout, cache):
    x, q, k, v, probs, a, Wq, Wk, Wv, Wo, H = cache
    C = x.shape[-1]
    D = C // H
    da = dout @ Wo.T  # (B, T, C)
    dWo = a.reshape(-1, C).T @ dout.reshape(-1, C)  # (C, C)
    dbo = dout.reshape(-1, C).sum(axis=0)  # (C,)
    da = split_heads(da, H)  # (B, H, T, D)
    dv = probs.transpose(0, 1, 3, 2) @ da  # (B, H, T, D)
    dprobs = da @ v.transpose(0, 1, 3, 2)  # (B, H, T, T)
    dscores = probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True)) / math.sqrt(D)  # (B, H, T, T)
    dq = dscores @ k  # (B, H, T, D)
    dk = dscores.transpose(0, 1, 3, 2) @ q  # (B, H, T, D)
    grads = []
    dx = np.zeros_like(x)
    xs = x.reshape(-1, C)  # (B*T, C)
    for dproj, W in ((dq, Wq), (dk, Wk), (dv, Wv)):
        dproj = merge_heads(dproj)  # (B, T, C)
        dx += dproj @ W.T  # x fed Q, K and V: three paths add
        grads += [xs.T @ dproj.reshape(-1, C), dproj.reshape(-1, C).sum(axis=0)]
    return (dx, *grads, dWo, dbo)


names = ["x", "Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo", "bo"]
rows = gradcheck.check_op(lambda **a: mha_forward(**a, mask=mask, H=H), mha_backward, dict(x=x, **params), names)
print(format_table(rows, title="multi-head attention, our backward vs centred differences"))
assert all(r.ok for r in rows)

# %% [markdown]
# Look at `bk`: relative error 1, yet `ok`. Its gradient is **zero in theory**: adding the same vector `bk` to every
# key adds `q · bk` to a whole row of scores, and softmax ignores a shift shared by a row. Both sides are round-off
# (about 1e-17 analytically, 1e-10 numerically), so they are unrelated noise with relative error 1; the checker
# accepts a gradient as zero when both sides are below `gradcheck.ABS_TOLERANCE` (1e-8).
#
# ## 3. The library version
#
# `ops.attention.mha_forward` takes the same nine arrays, the `(B, T)` mask, `n_heads`, and attention dropout.
# With dropout off it must agree with ours exactly.

# %%
from minielectra.ops import attention as lib

out_lib, cache_lib = lib.mha_forward(x, **params, mask=mask, n_heads=H)
np.testing.assert_allclose(out_lib, out, rtol=1e-12, atol=1e-13)
np.testing.assert_allclose(cache_lib.probs, cache[4], rtol=1e-12, atol=1e-15)
dout = rng.standard_normal(out.shape)
for name, g_lib, g_ours in zip(names, lib.mha_backward(dout, cache_lib), mha_backward(dout, cache)):
    np.testing.assert_allclose(g_lib, g_ours, rtol=1e-10, atol=1e-12, err_msg=name)
rows = gradcheck.check_op(lambda **a: lib.mha_forward(**a, mask=mask, n_heads=H, p_drop=0.1,
                                                      rng=np.random.default_rng(1)),
                          lib.mha_backward, dict(x=x, **params), names)
print(format_table(rows, title="library mha_forward, attention dropout 0.1 (same dropout mask every call)"))
assert all(r.ok for r in rows)
print("library mha_forward / mha_backward agree with ours")

# %% [markdown]
# ## 4. What the weights look like
#
# A heat map of `cache.probs` for the padded sequence: one panel per head, queries down, keys across. Every row sums
# to 1 over the three real keys; the two pad columns are exactly zero, for every query including the pads' own rows.

# %%
assert np.all(cache_lib.probs[1][..., 3:] == 0.0)
fig, axes = plt.subplots(1, H, figsize=(4.2 * H, 3.8))
labels = ["tok 0", "tok 1", "tok 2", "pad", "pad"]
for h, ax in enumerate(axes):
    im = ax.imshow(cache_lib.probs[1, h], vmin=0, vmax=1, cmap="magma")
    ax.set_title(f"head {h}: sequence 1 (2 pads)")
    ax.set_xticks(range(T), labels, rotation=45)
    ax.set_yticks(range(T), labels)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
fig.colorbar(im, ax=axes, fraction=0.03)
path = FIG_DIR / "attention_heads.png"
fig.savefig(path, dpi=110, bbox_inches="tight")
plt.close(fig)
print("saved", path)
