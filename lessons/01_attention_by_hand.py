# %% [markdown]
# # 01 · Attention by hand
#
# Attention is how a Transformer lets each token gather information from the others. Each token asks a question
# (its **query**), advertises what it holds (its **key**) and offers content (its **value**). A token's output is a
# weighted average of all values, weighted by how well its query matches each key.
#
# **You will learn**
# - the four lines of scaled dot-product attention, `softmax(Q Kᵀ / sqrt(D)) V`, on three tokens small enough to
#   follow with pencil and paper;
# - three ways to get it wrong (no normalisation, no exp, no scale) and what each breaks;
# - why dividing by `sqrt(D)` matters: without it the softmax saturates into a one-hot as the head size grows;
# - the backward pass, checked with finite differences, and the library's `attention_forward`.
#
# Run it: `python lessons/01_attention_by_hand.py` (a few seconds).

# %%
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from minielectra import gradcheck
from minielectra.gradcheck import format_table

FIG_DIR = Path("lessons/figures/01_attention_by_hand")
FIG_DIR.mkdir(parents=True, exist_ok=True)
np.set_printoptions(precision=3, suppress=True)

# %% [markdown]
# ## 1. Three tokens
#
# Take the sentence "cats chase mice": T = 3 tokens, each a vector of C = 4 numbers (made up, small integers so you
# can follow along). Three weight matrices project every token to a query, a key and a value of head size D = 2:
#
# `Q = X Wq`, `K = X Wk`, `V = X Wv`, each `(T, C) @ (C, D) -> (T, D)`.

# %%
tokens = ["cats", "chase", "mice"]
X = np.array([[1.0, 0.0, 1.0, 0.0],
              [0.0, 2.0, 0.0, 1.0],
              [1.0, 1.0, 0.0, 0.0]])  # (T, C) = (3, 4)
Wq = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])  # (C, D) = (4, 2)
Wk = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # (4, 2)
Wv = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [2.0, 0.0]])  # (4, 2)
Q, K, V = X @ Wq, X @ Wk, X @ Wv  # (3, 2) each
T, D = Q.shape
print("Q =\n", Q, "\nK =\n", K, "\nV =\n", V)

# %% [markdown]
# ## 2. Scores, weights, outputs
#
# **Scores.** How much does token i want token j? The dot product of i's query with j's key:
# `S[i, j] = Q[i] · K[j]`, all at once `S = Q Kᵀ`, `(3, 2) @ (2, 3) -> (3, 3)`. Row i is token i's view.
# By hand, `S[0, 1] = Q[0] · K[1] = (2, 0) · (3, 0) = 6`.
#
# **Scale.** Divide by `sqrt(D)` (section 4 says why): `S / sqrt(2)`.
#
# **Weights.** Turn each row into a probability distribution with softmax:
# `P[i, j] = exp(S[i, j]) / sum_k exp(S[i, k])`. Every weight is positive and each row sums to 1.
#
# **Outputs.** Token i's output is the weighted average of the values: `O[i] = sum_j P[i, j] V[j]`, i.e.
# `O = P V`, `(3, 3) @ (3, 2) -> (3, 2)`.

# %%
S = Q @ K.T  # (T, T) = (3, 3)
print("raw scores S = Q Kᵀ:\n", S)
assert S[0, 1] == 6.0
S_scaled = S / math.sqrt(D)  # (3, 3)
print("scaled scores S / sqrt(D):\n", S_scaled)

E = np.exp(S_scaled - S_scaled.max(axis=1, keepdims=True))  # (3, 3); subtracting the row max changes nothing (lesson 02)
P = E / E.sum(axis=1, keepdims=True)  # (3, 3)
print("attention weights P (rows sum to 1):\n", P)
print("row sums:", P.sum(axis=1))
O = P @ V  # (3, 2)
print("outputs O = P V:\n", O)
for i, tok in enumerate(tokens):
    best = int(P[i].argmax())
    print(f"  {tok!r:8} attends most to {tokens[best]!r} (weight {P[i, best]:.2f})")

# %% [markdown]
# ## 3. The same thing, done wrong three ways
#
# **Wrong 1 — exp but no normalisation.** `exp(S)` is positive, but rows do not sum to 1, so the output is not an
# average: its size depends on how large the scores happen to be, and it grows exponentially with them.
#
# **Wrong 2 — normalise without exp.** `S / sum(S)` sums to 1, but a negative score gives a negative "weight", and a
# row whose scores sum to nearly zero blows up. Softmax's exp is what makes every weight positive.
#
# **Wrong 3 — forget the scale.** Softmax of the raw scores is a valid distribution, but sharper than it should be;
# section 4 shows how bad that gets as D grows.

# %%
E_wrong = np.exp(S_scaled)  # (3, 3)
print("Wrong 1, exp(S) unnormalised; row sums:", E_wrong.sum(axis=1), "-> outputs\n", E_wrong @ V)

S_neg = np.array([[2.0, -1.0, 0.5], [1.0, -1.1, 0.2]])  # two rows of scores
W_wrong = S_neg / S_neg.sum(axis=1, keepdims=True)
print("Wrong 2, S / sum(S):\n", W_wrong, "\nrow sums", W_wrong.sum(axis=1), "but weights are negative and huge")

P_unscaled = np.exp(S - S.max(axis=1, keepdims=True))
P_unscaled /= P_unscaled.sum(axis=1, keepdims=True)
print("Wrong 3, softmax(S) without 1/sqrt(D):\n", P_unscaled, "\nvs the right\n", P)

# %% [markdown]
# ## 4. Why divide by sqrt(D)
#
# If the entries of q and k are independent with mean 0 and variance 1, then `q · k` is a sum of D products, each of
# variance 1, so `Var(q · k) = D`: the scores spread out like `sqrt(D)`. Wide scores push softmax to a one-hot
# (nearly all weight on the largest score), and a one-hot softmax has a nearly zero gradient: `dP/dS` is
# `P (1 - P)` on the diagonal, which is 0 when P is 0 or 1. Dividing by `sqrt(D)` brings the variance back to 1
# for every head size.
#
# We draw random q, k for 16 keys and measure the largest softmax weight, averaged over many queries.

# %%
rng = np.random.default_rng(0)
dims = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
n_keys, trials = 16, 400
max_w = {"unscaled": [], "scaled by 1/sqrt(D)": []}
for d in dims:
    q = rng.standard_normal((trials, 1, d))  # (trials, 1, D)
    k = rng.standard_normal((trials, n_keys, d))  # (trials, 16, D)
    s = (q @ k.transpose(0, 2, 1))[:, 0, :]  # (trials, 16)
    for name, scale in (("unscaled", 1.0), ("scaled by 1/sqrt(D)", 1 / math.sqrt(d))):
        z = s * scale
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        max_w[name].append(p.max(axis=1).mean())
for d, a, b in zip(dims, max_w["unscaled"], max_w["scaled by 1/sqrt(D)"]):
    print(f"D = {d:5d}   score std {math.sqrt(d):5.1f}   max weight unscaled {a:.3f}   scaled {b:.3f}")

fig, ax = plt.subplots(figsize=(6, 4))
for name, values in max_w.items():
    ax.semilogx(dims, values, "o-", label=name, base=2)
ax.axhline(1 / n_keys, color="gray", ls=":", label="uniform (1/16)")
ax.set_xlabel("head size D")
ax.set_ylabel("mean of the largest softmax weight")
ax.set_title("Without the scale, attention saturates to one-hot")
ax.legend()
fig.tight_layout()
path = FIG_DIR / "saturation_vs_d.png"
fig.savefig(path, dpi=110)
plt.close(fig)
print("saved", path)

# %% [markdown]
# ## 5. The backward pass
#
# Going backwards through `S = Q Kᵀ * s` (with `s = 1/sqrt(D)`), `P = softmax(S)`, `O = P V`, given `dO = dL/dO`:
#
# - `O = P V` is a matrix product, so `dV = Pᵀ dO` `(T, T) @ (T, D)` and `dP = dO Vᵀ` `(T, D) @ (D, T)`.
# - softmax, row by row (derived in lesson 02): `dS = P * (dP - sum_j dP * P)`.
# - `S = Q Kᵀ s`: `dQ = dS K s` and `dK = dSᵀ Q s`: each key j received gradient from every query that looked at it.

# %%
def attention_forward_1head(q, k, v):
    """q, k, v (T, D) -> out (T, D), cache."""
    s = 1.0 / math.sqrt(q.shape[-1])
    scores = q @ k.T * s  # (T, T)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)  # (T, T)
    return p @ v, (q, k, v, p, s)  # (T, D)


def attention_backward_1head(dout, cache):
    q, k, v, p, s = cache
    dv = p.T @ dout  # (T, D)
    dp = dout @ v.T  # (T, T)
    dscores = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # (T, T)
    dq = dscores @ k * s  # (T, D)
    dk = dscores.T @ q * s  # (T, D)
    return dq, dk, dv


out, _ = attention_forward_1head(Q, K, V)
np.testing.assert_allclose(out, O)  # the same as the step-by-step computation above
q, k, v = (rng.standard_normal((5, 4)) for _ in range(3))  # (T, D) = (5, 4), float64
rows = gradcheck.check_op(attention_forward_1head, attention_backward_1head, dict(q=q, k=k, v=v), ["q", "k", "v"])
print(format_table(rows, title="one-head attention, our backward vs centred differences"))
assert all(r.ok for r in rows)

# %% [markdown]
# ## 6. The library version
#
# `minielectra.ops.attention.attention_forward` does the same for a batch of sequences and many heads at once, with
# shapes `(B, H, T, D)`, plus a padding mask and dropout (lessons 02 and 05). With B = H = 1, no mask and no dropout
# it must agree with ours, forward and backward.

# %%
from minielectra.ops.attention import attention_backward, attention_forward

lib_out, lib_cache = attention_forward(q[None, None], k[None, None], v[None, None])  # (1, 1, T, D)
ours, our_cache = attention_forward_1head(q, k, v)
np.testing.assert_allclose(lib_out[0, 0], ours, rtol=1e-12, atol=1e-14)
dout = rng.standard_normal(ours.shape)
for g_lib, g_ours in zip(attention_backward(dout[None, None], lib_cache), attention_backward_1head(dout, our_cache)):
    np.testing.assert_allclose(g_lib[0, 0], g_ours, rtol=1e-10, atol=1e-12)
np.testing.assert_allclose(lib_cache.probs[0, 0], our_cache[3], rtol=1e-12)
print("library attention_forward / attention_backward agree with ours")
