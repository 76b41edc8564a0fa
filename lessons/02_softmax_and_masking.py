# %% [markdown]
# # 02 · Softmax: stability, masking, and its backward pass
#
# Softmax turns a row of scores into a probability distribution: `p_i = exp(x_i) / sum_j exp(x_j)`. It sits inside
# every attention layer and every classification loss. Written naively it breaks on large inputs, and attention
# needs it to ignore padding.
#
# **You will learn**
# - why `exp(1000)` overflows, and the max trick that makes softmax exact at any magnitude;
# - padding masks, boolean (`True` = keep) and additive (`0` = keep, `-inf` = drop), and why they agree;
# - what to do with a row where *everything* is masked (define it as zeros, never NaN);
# - the backward pass `dx = p * (g - sum(g * p))`, derived from the Jacobian, and checked;
# - the library's `minielectra.ops.softmax`.
#
# Run it: `python lessons/02_softmax_and_masking.py` (a few seconds).

# %%
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from minielectra import gradcheck
from minielectra.gradcheck import format_table

FIG_DIR = Path("lessons/figures/02_softmax_and_masking")
FIG_DIR.mkdir(parents=True, exist_ok=True)
np.set_printoptions(precision=4, suppress=True)
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Naive softmax overflows
#
# float64 holds numbers up to about `1.8e308`, and `exp(710)` is already beyond that: it becomes `inf`, and
# `inf / inf` is `nan`. At the other end `exp(-1000)` underflows to `0`, and a row of zeros divided by its zero sum
# is `nan` again. (NumPy warns about both; we silence the warnings with `np.errstate` to look at the values.)

# %%
def softmax_naive(x):
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


x = np.array([[1.0, 2.0, 3.0], [1000.0, 1001.0, 1002.0], [-1000.0, -1001.0, -1002.0]])  # (3, 3)
with np.errstate(over="ignore", invalid="ignore"):
    print("naive softmax:\n", softmax_naive(x))

# %% [markdown]
# **The max trick.** Multiply the numerator and the denominator by the same `exp(-m)`:
#
# `exp(x_i) / sum_j exp(x_j) = exp(x_i - m) / sum_j exp(x_j - m)`.
#
# The result is unchanged for any constant `m`. Choose `m = max_j x_j`: now the largest exponent is `exp(0) = 1`,
# nothing overflows, and the sum is at least 1, so nothing divides by zero. The three rows above differ only by a
# shift, so they must have the same softmax.

# %%
def softmax_stable(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # (..., N), every entry in (0, 1]
    return e / e.sum(axis=-1, keepdims=True)


print("stable softmax:\n", softmax_stable(x))

# %% [markdown]
# ## 2. Padding masks
#
# Sentences in a batch have different lengths, so shorter ones are padded to a common T. A real token must give
# **zero** weight to a pad. We express "drop entry j" in one of two ways:
#
# - **boolean**: `keep[j]` is `True` for real tokens; set dropped scores to `-inf` before softmax:
#   `where(keep, x, -inf)`. Then `exp(-inf) = 0` exactly.
# - **additive**: add `0` to kept scores and `-inf` (or a large negative like `-1e9`) to dropped ones: `x + mask`.
#
# Both set the dropped exponents to 0, so the kept entries share all the probability.
#
# One edge case needs a decision: a row where **every** entry is masked (say, a query in a batch row that is pure
# padding). Its max is `-inf`, and `x - max` is `-inf - (-inf) = nan`. There is no sensible distribution, so we
# *define* its softmax as all zeros: use a shift of 0 for such rows (so `exp(-inf) = 0` stays 0) and divide by 1
# instead of by the zero sum.

# %%
def softmax_masked(x, keep):
    """x (..., N), keep (..., N) bool broadcasting against x -> probs (..., N); fully masked rows are 0."""
    s = np.where(keep, x, -np.inf)  # (..., N)
    m = s.max(axis=-1, keepdims=True)  # (..., 1), -inf for a fully masked row
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)  # (..., N), 0 at masked entries
    denom = e.sum(axis=-1, keepdims=True)  # (..., 1), 0 only for a fully masked row
    return e / np.where(denom == 0, 1.0, denom)


scores = rng.standard_normal((3, 5))  # (T queries, T keys) for one sequence... plus a broken row
keep = np.array([[True, True, True, False, False],  # a sequence of 3 real tokens + 2 pads
                 [True, True, True, False, False],
                 [False, False, False, False, False]])  # nothing to attend to
p_bool = softmax_masked(scores, keep)
additive = np.where(keep, 0.0, -np.inf)  # (3, 5): 0 = keep, -inf = drop
with np.errstate(invalid="ignore"):
    p_add_naive = softmax_stable(scores + additive)  # the third row becomes nan
print("boolean mask:\n", p_bool)
print("additive mask, plain stable softmax (fully masked row -> nan):\n", p_add_naive)
np.testing.assert_allclose(p_add_naive[:2], p_bool[:2])
p_big_negative = softmax_stable(scores + np.where(keep, 0.0, -1e9))
print("additive -1e9 instead of -inf, fully masked row:", p_big_negative[2])
print("              softmax of its raw scores, no mask:", softmax_stable(scores[2]))
np.testing.assert_allclose(p_big_negative[2], softmax_stable(scores[2]))

# %% [markdown]
# A large finite negative such as `-1e9` keeps the arithmetic finite, but look at what it does to a fully masked row:
# every entry is shifted by the same `-1e9`, the max trick removes the shift, and the row becomes the softmax of its
# raw scores, exactly as if there were no mask. That is harmless only if the row is ignored later. The library accepts
# both forms; with a boolean mask or `-inf`, a fully masked row is zeros.

# %%
fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
for ax, data, title in ((axes[0], scores, "scores (queries x keys)"), (axes[1], keep.astype(float), "keep mask"),
                        (axes[2], p_bool, "softmax with mask")):
    im = ax.imshow(data, cmap="viridis")
    ax.set_title(title)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    fig.colorbar(im, ax=ax, fraction=0.046)
fig.tight_layout()
path = FIG_DIR / "masked_softmax.png"
fig.savefig(path, dpi=110)
plt.close(fig)
print("saved", path)

# %% [markdown]
# ## 3. The backward pass
#
# Let `p = softmax(x)` for one row and `g = dL/dp` the gradient arriving from above. Differentiate
# `p_i = e_i / Z`, `Z = sum_k e_k`, with respect to `x_j`:
#
# - if `i = j`: `dp_i/dx_i = (e_i Z - e_i e_i) / Z² = p_i - p_i²`;
# - if `i ≠ j`: `dp_i/dx_j = -e_i e_j / Z² = -p_i p_j`.
#
# Together: `dp_i/dx_j = p_i (δ_ij - p_j)`. The chain rule sums over every output `i`:
#
# `dL/dx_j = sum_i g_i p_i (δ_ij - p_j) = p_j g_j - p_j sum_i g_i p_i = p_j (g_j - sum_i g_i p_i)`.
#
# So `dx = p * (g - sum(g * p))`: no `N x N` Jacobian needed, one multiply, one row sum, one subtract. Masked entries
# have `p = 0`, so they get gradient 0 automatically, and a fully masked row gets zeros everywhere.

# %%
def softmax_forward(x, keep):
    p = softmax_masked(x, keep)
    return p, p


def softmax_backward(dout, p):
    return p * (dout - (dout * p).sum(axis=-1, keepdims=True))  # (..., N)


x = rng.standard_normal((2, 4, 5))  # (B, T queries, T keys), float64
keep = np.ones((2, 1, 5), dtype=bool)  # (B, 1, T keys): broadcasts over queries
keep[1, 0, 3:] = False  # the second sequence ends in two pads
rows = gradcheck.check_op(lambda x: softmax_forward(x, keep), softmax_backward, dict(x=x), ["x"])
x_dead = rng.standard_normal((2, 5))  # (2, N)
keep_dead = np.array([[True, False, True, True, False], [False] * 5])
rows += [r._replace(name="x, with a fully masked row")
         for r in gradcheck.check_op(lambda x: softmax_forward(x, keep_dead), softmax_backward, dict(x=x_dead), ["x"])]
print(format_table(rows, title="softmax backward vs centred differences"))
assert all(r.ok for r in rows)

# %% [markdown]
# ## 4. Stability of the loss: log-softmax
#
# Losses need `log p`, and `log(softmax(x))` computed in two steps fails when a probability underflows to 0
# (`log 0 = -inf`). Expanding the formula avoids it: `log p_i = (x_i - m) - log(sum_j exp(x_j - m))`. The library's
# `log_softmax_forward` does this; we check one extreme row.

# %%
from minielectra.ops import softmax as lib

row = np.array([[0.0, -800.0, 5.0]])
with np.errstate(divide="ignore"):
    print("log(softmax(x)) in two steps:", np.log(softmax_stable(row)))
print("log_softmax in one step:       ", lib.log_softmax_forward(row)[0])

# %% [markdown]
# ## 5. The library version
#
# `minielectra.ops.softmax.softmax_forward(x, mask)` takes a boolean or an additive mask that broadcasts against x,
# and follows the same rules. It must agree with ours in every case above, forward and backward.

# %%
big = np.array([[1000.0, 1001.0, 1002.0], [-1000.0, -1001.0, -1002.0]])
np.testing.assert_allclose(lib.softmax_forward(big)[0], softmax_stable(big), rtol=1e-14)
for mask in (keep, np.where(keep, 0.0, -np.inf)):
    p_lib, cache = lib.softmax_forward(x, mask)
    np.testing.assert_allclose(p_lib, softmax_masked(x, keep), rtol=1e-14, atol=1e-300)
    dout = rng.standard_normal(x.shape)
    np.testing.assert_allclose(lib.softmax_backward(dout, cache), softmax_backward(dout, p_lib), rtol=1e-12,
                               atol=1e-15)
p_lib, _ = lib.softmax_forward(x_dead, keep_dead)
np.testing.assert_array_equal(p_lib[1], 0.0)  # a fully masked row is zeros, not nan
np.testing.assert_allclose(p_lib, softmax_masked(x_dead, keep_dead), rtol=1e-14)
rows = gradcheck.check_op(lambda x: lib.softmax_forward(x, keep_dead), lib.softmax_backward, dict(x=x_dead), ["x"])
print(format_table(rows, title="library softmax, fully masked row included"))
assert all(r.ok for r in rows)
print("library softmax agrees with ours (boolean and additive masks, fully masked rows)")
