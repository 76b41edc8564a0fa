# %% [markdown]
# # 00 · Gradient checking: how we know a backward pass is right
#
# Every layer in minielectra has a forward pass and a hand-written backward pass. Nothing computes gradients for us,
# so we need a way to *prove* each backward right. The proof is old and simple: nudge an input a little, watch the
# output move, and compare that slope with what the backward claims.
#
# **You will learn**
# - forward vs centred finite differences, and why their errors shrink like `h` and `h²`;
# - why making `h` smaller stops helping (rounding error grows like `eps / h`): the V on a log-log plot;
# - why gradient checks must run in float64 (and what float32 does to them);
# - the relative error we compare against, and the thresholds that mean "right" and "wrong";
# - directional checks: testing a 10 000-entry gradient with 8 forward passes;
# - the project's `minielectra.gradcheck`, which every later lesson uses.
#
# Run it: `python lessons/00_gradient_checking.py` (a few seconds).

# %%
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from minielectra import gradcheck
from minielectra.gradcheck import Row, format_table

FIG_DIR = Path("lessons/figures/00_gradient_checking")
FIG_DIR.mkdir(parents=True, exist_ok=True)
np.set_printoptions(precision=4, suppress=True)
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Two ways to estimate a derivative
#
# Taylor's theorem says `f(x + h) = f(x) + h f'(x) + h²/2 f''(x) + h³/6 f'''(x) + ...`. Rearranged:
#
# - **forward difference**: `(f(x + h) - f(x)) / h = f'(x) + h/2 f''(x) + ...` — the error is **O(h)**.
# - **centred difference**: `(f(x + h) - f(x - h)) / 2h = f'(x) + h²/6 f'''(x) + ...` — the `h²/2 f''` terms of
#   the two sides cancel, so the error is **O(h²)**. Same two function calls, far more accurate.
#
# That is the *truncation* error. There is a second error: the computer stores `f(x + h)` with a relative rounding
# error of about `eps` (2.2e-16 in float64, 1.2e-7 in float32). Dividing a difference of two rounded numbers by `h`
# amplifies it to about `eps |f| / h`. So the total error is roughly
#
# - forward: `h |f''| / 2 + eps |f| / h`, smallest near `h ≈ sqrt(eps) ≈ 1e-8`;
# - centred: `h² |f'''| / 6 + eps |f| / h`, smallest near `h ≈ eps^(1/3) ≈ 1e-5` (the project's default `h`).
#
# Let us see it on `f(x) = sin(x)` at `x = 1`, whose derivative we know exactly: `cos(1)`.

# %%
def forward_diff(f, x, h):
    return (f(x + h) - f(x)) / h


def centred_diff(f, x, h):
    return (f(x + h) - f(x - h)) / (2 * h)


x0, exact = 1.0, np.cos(1.0)
hs = np.logspace(-15, 0, 61)
err_fwd = np.array([abs(forward_diff(np.sin, x0, h) - exact) for h in hs])
err_ctr = np.array([abs(centred_diff(np.sin, x0, h) - exact) for h in hs])
for h in (1e-1, 1e-3, 1e-5, 1e-8, 1e-12):
    print(f"h = {h:7.0e}   forward error {abs(forward_diff(np.sin, x0, h) - exact):.1e}   "
          f"centred error {abs(centred_diff(np.sin, x0, h) - exact):.1e}")

# %%
fig, ax = plt.subplots(figsize=(6.5, 4.5))
ax.loglog(hs, err_fwd, "o-", ms=3, label="forward  (f(x+h) - f(x)) / h")
ax.loglog(hs, err_ctr, "s-", ms=3, label="centred  (f(x+h) - f(x-h)) / 2h")
ax.loglog(hs, 0.5 * hs * abs(np.sin(x0)), "k--", lw=0.8, label="h |f''| / 2   (slope 1)")
ax.loglog(hs, hs**2 * abs(np.cos(x0)) / 6, "k:", lw=0.8, label="h² |f'''| / 6  (slope 2)")
ax.loglog(hs, 2.2e-16 * abs(np.sin(x0)) / hs, "r-.", lw=0.8, label="eps |f| / h  (rounding, slope -1)")
ax.set_ylim(1e-17, 1)
ax.set_xlabel("step h")
ax.set_ylabel("|numerical - exact|")
ax.set_title("d/dx sin(x) at x = 1: truncation (right) vs rounding (left)")
ax.legend(fontsize=8)
fig.tight_layout()
path = FIG_DIR / "error_vs_h.png"
fig.savefig(path, dpi=110)
plt.close(fig)
print("saved", path)

# %% [markdown]
# The V shape: right of the minimum, truncation dominates and the lines have slope 1 (forward) and 2 (centred); left
# of it, rounding dominates and the error *grows* as `h` shrinks. The centred difference bottoms out near `1e-11` at
# `h ≈ 1e-5`, the forward difference only near `1e-8`. That is why the project uses centred differences with
# `h = 1e-5`.
#
# ## 2. Why float64
#
# In float32, `eps ≈ 1.2e-7`, so the rounding term at `h = 1e-5` is about `1e-7 / 1e-5 = 1e-2`: the numerical
# gradient is only good to two digits, and a check at that level cannot tell a correct backward from a slightly
# wrong one. Here is a function with a known gradient, `f(x) = sum(tanh(x)²)`, `df/dx = 2 tanh(x) (1 - tanh²(x))`,
# checked entry by entry in both precisions.

# %%
def f_tanh(x):
    return np.sum(np.tanh(x) ** 2)


def grad_tanh(x):
    t = np.tanh(x)
    return 2 * t * (1 - t * t)


def numerical_grad_any_dtype(f, x, h):
    """Centred differences in whatever dtype x has (gradcheck itself refuses anything but float64)."""
    g = np.zeros_like(x)
    for i in range(x.size):
        old = x.flat[i]
        x.flat[i] = old + h
        fp = f(x)
        x.flat[i] = old - h
        fm = f(x)
        x.flat[i] = old
        g.flat[i] = (fp - fm) / (2 * h)
    return g


def my_rel_error(a, b):
    return np.linalg.norm(a - b) / (np.linalg.norm(a) + np.linalg.norm(b))


x64 = rng.standard_normal(20)  # (20,)
for dtype in (np.float64, np.float32):
    x = x64.astype(dtype)
    num = numerical_grad_any_dtype(f_tanh, x, dtype(1e-5))
    print(f"{np.dtype(dtype).name}: relative error {my_rel_error(num.astype(np.float64), grad_tanh(x64)):.1e}")

x32 = x64.astype(np.float32)
try:
    gradcheck.numerical_grad(lambda: f_tanh(x32), x32)
except TypeError as e:
    print("gradcheck refuses float32:", e)

# %% [markdown]
# float64 agrees to about 1e-10; float32 to about 1e-3 or worse: nothing a real bug could not hide under. So every
# gradient check in this project runs in float64, and `minielectra.gradcheck` refuses anything else. (Training runs
# in float32; every op also runs in float64 for exactly this reason.)
#
# ## 3. Relative error: what "agrees" means
#
# Gradients come in every size, so an absolute difference means nothing on its own. We compare with
#
# `rel_error(a, b) = ||a - b|| / (||a|| + ||b||)`
#
# which is 0 for equal arrays, 1 for unrelated ones (e.g. one of them zero), and does not care about overall scale.
# With float64 and centred differences, a correct backward lands around **1e-8 to 1e-11**; a wrong one (a missing
# factor, a transposed matrix, a forgotten term) lands around **1e-1**. The project's threshold is `1e-6`.
#
# Let us check the linear map `y = x @ W` with loss `L = sum(y * dout)` for a fixed random `dout`. Then
# `dL/dW = x.T @ dout`. We write a correct gradient and two classic mistakes.

# %%
x = rng.standard_normal((5, 3))  # (N, C)
W = rng.standard_normal((3, 4))  # (C, OC)
dout = rng.standard_normal((5, 4))  # (N, OC): the upstream gradient


def loss():
    return float(np.sum((x @ W) * dout))


num = gradcheck.numerical_grad(loss, W)  # (C, OC), centred, h = 1e-5
candidates = {
    "dW = x.T @ dout (right)": x.T @ dout,  # (3, 5) @ (5, 4) -> (3, 4)
    "dW = 2 x.T @ dout (extra factor)": 2 * x.T @ dout,
    "dW with one row paired to dout reversed": np.vstack([x.T[:2] @ dout, x.T[2:] @ dout[::-1]]),
}
rows = []
for name, ana in candidates.items():
    err = gradcheck.rel_error(num, ana)
    assert np.isclose(err, my_rel_error(num, ana))  # the library's rel_error is the formula above
    rows.append(Row(name, float(np.max(np.abs(num - ana))), err, err <= gradcheck.TOLERANCE))
print(format_table(rows, title="dL/dW of L = sum((x @ W) * dout)"))

# %% [markdown]
# `check_backward` does exactly this comparison and returns the `Row`:

# %%
print(format_table([gradcheck.check_backward(loss, W, x.T @ dout, "W"),
                    gradcheck.check_backward(loss, x, dout @ W.T, "x")]))

# %% [markdown]
# ## 4. Directional checks for big tensors
#
# Checking a `(100, 100)` weight entry by entry costs 20 000 forward passes. Instead, pick a random unit direction
# `u` with the same shape and compare one number: the directional derivative
#
# `(f(W + h u) - f(W - h u)) / 2h  ≈  sum(dL/dW * u)`.
#
# Two forward passes per direction, and every entry of the gradient takes part: a wrong entry changes the right-hand
# side by `u_i * error_i`, which a random `u` almost surely does not cancel. `check_backward` switches to this above
# `ELEMENTWISE_MAX` entries, using `N_DIRECTIONS` directions.

# %%
x = rng.standard_normal((8, 100))  # (N, C)
W = rng.standard_normal((100, 100))  # (C, OC): 10 000 entries
dout = rng.standard_normal((8, 100))  # (N, OC)
right = x.T @ dout  # (C, OC)
wrong = right.copy()
wrong[17, 42] += 1.0  # a single bad entry out of 10 000

calls = 0


def loss():
    global calls
    calls += 1
    return float(np.sum((x @ W) * dout))


u = rng.standard_normal(W.shape)
u /= np.linalg.norm(u)
print(f"one direction by hand: numerical {gradcheck.directional_grad(loss, W, u):+.8f}   "
      f"analytic {np.sum(right * u):+.8f}")

calls = 0
rows = [gradcheck.check_backward(loss, W, right, "W (right)"), gradcheck.check_backward(loss, W, wrong, "W (one entry off)")]
print(format_table(rows, title=f"directional checks, {gradcheck.N_DIRECTIONS} directions each"))
print(f"forward passes used: {calls} (entry by entry would need {2 * W.size * 2:,})")

# %% [markdown]
# ## 5. The library version
#
# `minielectra.gradcheck.numerical_grad` is the centred difference of section 2; `check_op` wraps the whole recipe for
# an op pair `out, cache = forward(...)`, `grads = backward(dout, cache)`: draw a random `dout`, define
# `L = sum(out * dout)` (whose gradient with respect to `out` is exactly `dout`), and check every input. Every later
# lesson ends with one of these tables.

# %%
x = rng.standard_normal(20)
np.testing.assert_allclose(gradcheck.numerical_grad(lambda: f_tanh(x), x), numerical_grad_any_dtype(f_tanh, x, 1e-5),
                           rtol=1e-12)
np.testing.assert_allclose(gradcheck.numerical_grad(lambda: f_tanh(x), x), grad_tanh(x), rtol=1e-7, atol=1e-9)

from minielectra.ops.linear import linear_backward, linear_forward

rows = gradcheck.check_op(linear_forward, linear_backward,
                          dict(x=rng.standard_normal((2, 3, 4)), W=rng.standard_normal((4, 5)), b=rng.standard_normal(5)),
                          ["x", "W", "b"])
print(format_table(rows, title="check_op(linear_forward, linear_backward)"))
assert all(r.ok for r in rows)
print("all checks pass")
