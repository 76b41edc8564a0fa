# %% [markdown]
# # 06 · The Transformer block: residuals and where the layer norm goes
#
# A Transformer encoder is one block repeated: attention lets tokens exchange information, a feed-forward network
# transforms each token on its own, and around each of the two sits a **residual** connection and a **layer norm**.
# Where the layer norm sits is a real design choice.
#
# **You will learn**
# - the post-LN block BERT and ELECTRA use, `a = LN(x + MHA(x))`, `y = LN(a + FFN(a))`, and the pre-LN block many
#   later models use, `a = x + MHA(LN(x))`, `y = a + FFN(LN(a))`;
# - how a residual splits the gradient into two paths that add;
# - the library's `nn.encoder.layer_forward` / `layer_backward` over a params dict with Hugging Face names, and a
#   gradient check of every one of its 16 parameters;
# - why activations grow with depth in a pre-LN stack but stay normalised in a post-LN one (with a plot).
#
# Run it: `python lessons/06_transformer_block.py` (a few seconds).

# %%
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from minielectra import gradcheck
from minielectra.gradcheck import format_table
from minielectra.nn import init_params, zeros_like
from minielectra.nn import encoder
from minielectra.nn.encoder import EncoderDims

FIG_DIR = Path("lessons/figures/06_transformer_block")
FIG_DIR.mkdir(parents=True, exist_ok=True)
np.set_printoptions(precision=3, suppress=True)
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. One post-LN layer, as ELECTRA has it
#
# ```
# att = dropout(MHA(x))                 (B, T, C)     lesson 05
# a   = LN(x + att)                     (B, T, C)     residual, then layer norm (lesson 04)
# f   = dropout(W2 gelu(W1 a + b1) + b2)              (B, T, C) -> (B, T, F) -> (B, T, C)   lesson 03
# y   = LN(a + f)                       (B, T, C)
# ```
#
# The parameters live in a dict keyed by Hugging Face's ELECTRA names, so a pre-trained checkpoint loads by name.
# `encoder.layer_shapes(prefix, dims)` lists them; `nn.init_params` fills them (LayerNorm gains 1, biases 0, weights
# truncated normal).

# %%
dims = EncoderDims(vocab_size=10, embedding_size=8, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                   max_positions=16, hidden_dropout=0.1, attention_dropout=0.1)
prefix = "discriminator.electra.encoder.layer.0"
shapes = encoder.layer_shapes(prefix, dims)
for name, shape in shapes.items():
    print(f"{name[len(prefix) + 1:]:40} {shape}")
params = init_params(shapes, rng, std=0.3, dtype=np.float64)  # a larger std than training's 0.02: bigger signals

# %% [markdown]
# ## 2. Residuals in the backward pass
#
# `y = x + g(x)` has `dy/dx = 1 + g'(x)`: the gradient reaches `x` twice, once straight through the skip and once
# through `g`, and the two **add**. That straight path is what lets gradients reach the bottom of a deep stack
# undiminished. In `layer_backward` you will find exactly two such sums: `da = da + dsum` (the FFN's residual) and
# `dx + dsum` (attention's).
#
# Now the check. `layer_backward(dout, cache, grads, prefix)` adds every parameter's gradient into `grads` and returns
# `dx`. With dropout on, each forward must draw the same masks, so every call gets a freshly seeded Generator.

# %%
B, T = 2, 5
x = rng.standard_normal((B, T, dims.hidden_size))  # (B, T, C)
mask = np.ones((B, T))
mask[1, 4:] = 0  # one pad in the second sequence
dout = rng.standard_normal(x.shape)


def forward():
    return encoder.layer_forward(params, prefix, x, mask, dims, train=True, rng=np.random.default_rng(42))


def loss():
    return float(np.sum(forward()[0] * dout))


y, cache = forward()
grads = zeros_like(params)
dx = encoder.layer_backward(dout, cache, grads, prefix)
rows = [gradcheck.check_backward(loss, x, dx, "x (the layer's input)")]
rows += [gradcheck.check_backward(loss, params[k], grads[k], k[len(prefix) + 1:]) for k in shapes]
print(format_table(rows, title="post-LN layer (dropout 0.1), every parameter"))
assert all(r.ok for r in rows)

# %% [markdown]
# Tensors with more than 64 entries (the FFN weights) are checked along random directions (lesson 00); the rest entry
# by entry. `attention.self.key.bias` is again a gradient that is zero in theory (lesson 05).
#
# ## 3. Post-LN vs pre-LN
#
# **Pre-LN** moves the norm inside the residual branch: `a = x + MHA(LN(x))`, `y = a + FFN(LN(a))`. The residual
# stream `x -> a -> y` is never normalised: each layer *adds* its output to it. The branch sees a normalised input, so
# it adds something of roughly fixed size every layer. If those additions were independent of the stream, its
# variance would grow by a fixed amount per layer and its std like `sqrt(depth)`. They are computed *from* the
# stream, so they are not independent of it, and the curve below is closer to a straight line than to a square root.
# Either way the stream grows steadily with depth and nothing brings it back (pre-LN models therefore put one extra
# LayerNorm after the last layer). In **post-LN**, every layer ends with a
# LayerNorm, so every layer's output has mean 0 and std 1 per token (times γ = 1, plus β = 0, at initialisation).
#
# Pre-LN's unnormalised skip path makes very deep models easier to train without a long warm-up; post-LN (BERT,
# ELECTRA) keeps each layer's output at a fixed scale but relies on warm-up. We implement pre-LN with the same ops and
# the same params dict, and push a random batch through 24 random layers of each kind. The weights use a
# variance-preserving std of `1/sqrt(fan_in)`, so each branch outputs activations of order 1, as in a trained network.

# %%
from minielectra.ops.activations import gelu_forward
from minielectra.ops.attention import mha_forward
from minielectra.ops.layernorm import layernorm_forward


def pre_ln_layer_forward(params, prefix, x, mask, d):
    """a = x + MHA(LN1(x)); y = a + FFN(LN2(a)), no dropout. Reuses the post-LN names: LN1 is attention.output.LayerNorm."""
    P = lambda name: params[f"{prefix}.{name}"]  # noqa: E731
    h, _ = layernorm_forward(x, P("attention.output.LayerNorm.weight"), P("attention.output.LayerNorm.bias"))
    att, _ = mha_forward(h, P("attention.self.query.weight"), P("attention.self.query.bias"),
                         P("attention.self.key.weight"), P("attention.self.key.bias"),
                         P("attention.self.value.weight"), P("attention.self.value.bias"),
                         P("attention.output.dense.weight"), P("attention.output.dense.bias"), mask, d.num_heads)
    a = x + att  # (B, T, C): the residual stream, never normalised
    h, _ = layernorm_forward(a, P("output.LayerNorm.weight"), P("output.LayerNorm.bias"))
    h, _ = gelu_forward(h @ P("intermediate.dense.weight") + P("intermediate.dense.bias"))  # (B, T, F)
    return a + h @ P("output.dense.weight") + P("output.dense.bias")  # (B, T, C)


depth_dims = EncoderDims(vocab_size=10, embedding_size=64, hidden_size=64, num_layers=24, num_heads=4,
                         intermediate_size=256, max_positions=64)
stack = {}
for i in range(depth_dims.num_layers):
    layer = init_params(encoder.layer_shapes(f"layer.{i}", depth_dims), rng, std=1.0, dtype=np.float64)
    for k, v in layer.items():
        if k.endswith(".weight") and v.ndim == 2:
            v /= math.sqrt(v.shape[0])  # std 1/sqrt(fan_in): truncated normal(1) scaled per layer
    stack.update(layer)

x0 = rng.standard_normal((4, 32, depth_dims.hidden_size))  # (B, T, C)
mask0 = np.ones((4, 32))
post, pre = x0, x0
post_std, pre_std = [x0.std()], [x0.std()]
for i in range(depth_dims.num_layers):
    post, _ = encoder.layer_forward(stack, f"layer.{i}", post, mask0, depth_dims)
    pre = pre_ln_layer_forward(stack, f"layer.{i}", pre, mask0, depth_dims)
    post_std.append(post.std())
    pre_std.append(pre.std())
for i in (0, 1, 2, 4, 8, 16, 24):
    print(f"after layer {i:2d}: post-LN std {post_std[i]:.3f}   pre-LN std {pre_std[i]:.3f}")

fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(post_std, "o-", label="post-LN (BERT, ELECTRA):  LN(x + f(x))")
ax.plot(pre_std, "s-", label="pre-LN:  x + f(LN(x))")
ax.plot(np.sqrt(1 + np.arange(len(pre_std))), "k:", label="sqrt(1 + layers): independent unit-size additions")
ax.set_xlabel("layer")
ax.set_ylabel("std of the activations")
ax.set_title("The residual stream through 24 random layers")
ax.legend()
fig.tight_layout()
path = FIG_DIR / "activation_std_vs_depth.png"
fig.savefig(path, dpi=110)
plt.close(fig)
print("saved", path)

# %% [markdown]
# ## 4. The library's stack
#
# `encoder.electra_encoder_forward` is embeddings (lesson 07), an optional E -> C projection, then `num_layers` calls
# of `layer_forward`; its backward calls `layer_backward` in reverse, so the check of section 2 covers every layer of
# it. One last look at the post-LN claim: every token of every layer's output has mean 0 and std 1.

# %%
h = x0
for i in range(depth_dims.num_layers):
    h, _ = encoder.layer_forward(stack, f"layer.{i}", h, mask0, depth_dims)
    np.testing.assert_allclose(h.mean(-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(h.std(-1), 1.0, rtol=1e-9)
print("post-LN outputs: per-token mean 0 and std 1 after each of the 24 layers")
