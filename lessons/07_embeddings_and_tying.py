# %% [markdown]
# # 07 · Embeddings, the scatter-add backward, and a table used three times
#
# A Transformer's first layer is a lookup: token id `i` becomes row `i` of a table. ELECTRA uses its word table
# three times: the generator looks words up in it, the generator's output layer reads words *out* with it (a "tied"
# LM head), and the discriminator looks words up in it too. Its gradient is the sum of all three.
#
# **You will learn**
# - the lookup `table[ids]` and its backward, a **scatter-add**, and why `dtable[ids] += g` silently drops gradient
#   when an id repeats;
# - the tied LM head `logits = h @ Eᵀ + b` and its two gradients;
# - how ELECTRA's shared word table collects gradient from the generator's lookup, the generator's LM head and the
#   discriminator's lookup, each checked separately with finite differences on sampled coordinates.
#
# Run it: `python lessons/07_embeddings_and_tying.py` (about 10 seconds).

# %%
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from minielectra import gradcheck
from minielectra.gradcheck import Row, format_table

FIG_DIR = Path("lessons/figures/07_embeddings_and_tying")
FIG_DIR.mkdir(parents=True, exist_ok=True)
np.set_printoptions(precision=3, suppress=True)
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Lookup and scatter-add
#
# `out[b, t] = table[ids[b, t]]`: ids `(B, T)` integers in `[0, V)`, table `(V, E)`, out `(B, T, E)`. It is the same
# as multiplying a one-hot matrix by the table, `onehot(ids) @ table`, without building the one-hot.
#
# **Backward.** Row `i` of the table was copied to every position whose id is `i`, so its gradient is the **sum** of
# the output gradients at those positions: `dtable[i] = sum over (b, t) with ids[b, t] = i of dout[b, t]`. Rows never
# looked up get zero. (In one-hot terms: `dtable = onehot(ids)ᵀ @ dout`.)
#
# The tempting one-liner `dtable[ids] += dout` is wrong. NumPy's fancy-index assignment evaluates `dtable[ids] + dout`
# into a temporary and then writes it back position by position; when an id repeats, the later writes *overwrite* the
# earlier ones instead of adding to them. `np.add.at(dtable, ids, dout)` accumulates every one.

# %%
V, E = 5, 3
table = rng.standard_normal((V, E))  # (V, E)
ids = np.array([[1, 3, 1], [1, 0, 4]])  # (B, T) = (2, 3); id 1 appears three times
out = table[ids]  # (2, 3, 3)
dout = np.ones_like(out) * np.arange(1, 7).reshape(2, 3, 1)  # position k sends gradient k (easy to add up by eye)

wrong = np.zeros_like(table)
wrong[ids] += dout  # the tempting one-liner
right = np.zeros_like(table)
np.add.at(right, ids.reshape(-1), dout.reshape(-1, E))
onehot = np.eye(V)[ids.reshape(-1)]  # (B*T, V)
print("ids:\n", ids, "\ngradient sent by each position: 1..6")
print("dtable[ids] += dout  ->  row 1 =", wrong[1], " (only the last write, position 4, survived)")
print("np.add.at            ->  row 1 =", right[1], " (1 + 3 + 4 = 8)")
np.testing.assert_allclose(right, onehot.T @ dout.reshape(-1, E))
assert not np.allclose(wrong, right)


# %%
def embedding_forward(ids, table):
    return table[ids], (ids, table.shape)


def embedding_backward(dout, cache):
    ids, (V, E) = cache
    dtable = np.zeros((V, E))
    np.add.at(dtable, ids.reshape(-1), dout.reshape(-1, E))  # (V, E)
    return dtable


def embedding_backward_wrong(dout, cache):
    ids, (V, E) = cache
    dtable = np.zeros((V, E))
    dtable[ids] += dout
    return dtable


rows = gradcheck.check_op(embedding_forward, embedding_backward, dict(ids=ids, table=table), ["table"])
rows += [r._replace(name="table, with dtable[ids] += dout") for r in
         gradcheck.check_op(embedding_forward, embedding_backward_wrong, dict(ids=ids, table=table), ["table"])]
print(format_table(rows, title="embedding backward"))
assert rows[0].ok and not rows[1].ok

# %% [markdown]
# ## 2. The tied LM head
#
# A masked language model ends by scoring every vocabulary word for a hidden vector `h` `(N, E)`. Instead of a
# separate `(E, V)` output matrix, BERT and ELECTRA reuse the input table: `logits = h @ tableᵀ + b`, `(N, E) @ (E, V)
# -> (N, V)`. A word's score is the dot product of `h` with that word's own embedding, so reading a word in and
# writing it out use the same vector. It saves `V x E` parameters, and it means the table gets gradient from the
# output side too:
#
# - `dh = dlogits @ table` `(N, V) @ (V, E)`;
# - `dtable += dlogitsᵀ @ h` `(V, N) @ (N, E)`: the transpose of the usual `dW = xᵀ dout`, since `W = tableᵀ`;
# - `db = sum over rows of dlogits`.
#
# A toy model that uses the table twice, `logits = table[ids] @ tableᵀ`, shows the two contributions adding up.

# %%
def tied_forward(table):
    h = table[ids].reshape(-1, E)  # (N, E), N = B*T
    return h @ table.T, h  # (N, V)


def tied_backward(dlogits, h):
    dtable_out = dlogits.T @ h  # (V, E): the LM-head use
    dh = dlogits @ table  # (N, E)
    dtable_in = embedding_backward(dh.reshape(*ids.shape, E), (ids, table.shape))  # (V, E): the lookup use
    return dtable_out + dtable_in


print(format_table(gradcheck.check_op(tied_forward, tied_backward, dict(table=table), ["table"]),
                   title="a table used for lookup and as the output layer"))

# %% [markdown]
# ## 3. ELECTRA's word table: three contributions
#
# In `minielectra.electra` the word table `electra.WORDS` (`discriminator.electra.embeddings.word_embeddings.weight`)
# is used by:
#
# 1. the **generator's lookup** of the masked sequence;
# 2. the **generator's LM head**, `logits = h @ tableᵀ + b`, at the masked positions;
# 3. the **discriminator's lookup** of the corrupted sequence.
#
# `electra.backward` adds all three into `grads[WORDS]`. We take a tiny float64 model (dropout off, so every forward
# is deterministic), run one step, and replay its backward one branch at a time into separate grads dicts.

# %%
from minielectra import electra
from minielectra.config import ElectraConfig
from minielectra.nn import zeros_like
from minielectra.nn.encoder import electra_encoder_backward, electra_encoder_forward
from minielectra.nn.heads import (discriminator_head_backward, generator_head_backward, generator_head_forward)
from minielectra.ops.losses import softmax_cross_entropy

config = ElectraConfig(vocab_size=23, embedding_size=6, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=12, generator_hidden_size=4, generator_num_attention_heads=1,
                       generator_intermediate_size=8, max_position_embeddings=16, mask_prob=0.3,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
params = electra.init_model(config, np.random.default_rng(0), np.float64)
for k in params:  # larger weights than the 0.02 init, so every gradient is well above round-off
    params[k] += 0.3 * rng.standard_normal(params[k].shape)
input_ids = rng.integers(5, 23, (3, 9))  # (B, T), ids 0-4 are the special tokens
input_ids[:, 0], input_ids[:, -1] = config.cls_token_id, config.sep_token_id
attention_mask = np.ones_like(input_ids)
input_ids[2, 6:], attention_mask[2, 6:] = config.pad_token_id, 0  # the third sequence ends in three pads
batch = (input_ids, attention_mask)

out = electra.forward(params, batch, config, np.random.default_rng(7))
grads = electra.backward(out, params, config)
print("losses:", {k: round(v, 4) for k, v in out.losses.items()})

# The backward of electra.backward, branch by branch (c is the step's cache):
c = out.cache
g_disc = zeros_like(params)
ddh = discriminator_head_backward(c.drtd * config.rtd_weight, c.disc_head, g_disc, electra.DISC)
electra_encoder_backward(ddh, c.disc, g_disc, f"{electra.DISC}.electra", electra.EMB)  # 3. discriminator lookup
g_head = zeros_like(params)
dg = generator_head_backward(c.dmlm, c.gen_head, g_head, electra.GEN, electra.WORDS)  # 2. LM head, (N, Cg)
g_look = zeros_like(params)
B, T, Cg = c.shape
dgh = np.zeros((B * T, Cg))
dgh[c.gen_rows] = dg
electra_encoder_backward(dgh.reshape(B, T, Cg), c.gen, g_look, f"{electra.GEN}.electra", electra.EMB)  # 1. lookup

W = electra.WORDS
parts = {"generator lookup": g_look[W], "generator LM head": g_head[W], "discriminator lookup": g_disc[W]}
np.testing.assert_allclose(sum(parts.values()), grads[W], rtol=1e-12, atol=1e-15)
for name, g in parts.items():
    print(f"{name:22} |grad| = {np.linalg.norm(g):.4f}")
print(f"{'sum = grads[WORDS]':22} |grad| = {np.linalg.norm(grads[W]):.4f}")

# %% [markdown]
# Now prove each part with finite differences, on 12 sampled coordinates of the table (`numerical_grad(...,
# indices=...)` perturbs only those entries). The samples the generator drew are passed back in (`samples=`), so the
# discriminator's input does not change while we nudge the table.
#
# - **the whole gradient**: differentiate the full loss.
# - **discriminator lookup**: with the samples fixed, the discriminator's loss `50 * rtd` depends on the table only
#   through the discriminator's lookup.
# - **generator lookup vs LM head**: the MLM loss uses the table twice. Untie it: give the LM head its own copy of the
#   table under a new key, with the same values. Nudging the original moves only the lookup; nudging the copy moves
#   only the head. The generator's input and positions come from the step's cache.

# %%
idx = rng.choice(params[W].size, 12, replace=False)


def run(**kw):
    return electra.forward(params, batch, config, np.random.default_rng(7), samples=out.samples, **kw).losses


num_full = gradcheck.numerical_grad(lambda: run()["loss"], params[W], indices=idx)
num_disc = gradcheck.numerical_grad(lambda: config.rtd_weight * run()["rtd_loss"], params[W], indices=idx)

untied = dict(params)
untied["lm_table"] = params[W].copy()  # same values, separate array
masked_ids, rows_ = c.gen.emb.words.ids, c.gen_rows  # the generator's input and the picked positions
targets = input_ids.reshape(-1)[rows_]


def mlm_untied():
    gd = electra.encoder_dims(config, electra.GEN)
    gh, _ = electra_encoder_forward(untied, f"{electra.GEN}.electra", electra.EMB, masked_ids, np.zeros_like(input_ids),
                                    attention_mask, gd)  # (B, T, Cg)
    logits, _ = generator_head_forward(untied, electra.GEN, "lm_table", gh.reshape(B * T, -1)[rows_],
                                       config.layer_norm_eps)  # (N, V)
    return softmax_cross_entropy(logits, targets)[0]


assert np.isclose(mlm_untied(), out.losses["mlm_loss"], rtol=1e-12)  # same loss as the real step
num_look = gradcheck.numerical_grad(mlm_untied, untied[W], indices=idx)  # untied[W] is params[W]: the lookup use
num_head = gradcheck.numerical_grad(mlm_untied, untied["lm_table"], indices=idx)


def row(name, num, ana):
    err = gradcheck.rel_error(num, ana)
    return Row(name, float(np.max(np.abs(num - ana))), err, err <= gradcheck.TOLERANCE)


rows = [row("generator lookup", num_look, parts["generator lookup"].reshape(-1)[idx]),
        row("generator LM head", num_head, parts["generator LM head"].reshape(-1)[idx]),
        row("discriminator lookup", num_disc, parts["discriminator lookup"].reshape(-1)[idx]),
        row("all three = grads[WORDS]", num_full, grads[W].reshape(-1)[idx])]
print(format_table(rows, title="word table, 12 sampled coordinates: each contribution vs centred differences"))
assert all(r.ok for r in rows)

# %% [markdown]
# One more honest cross-check: with `rtd_weight = 0` the loss is the MLM loss alone, so the whole model's table
# gradient must be exactly the generator's two parts.

# %%
import dataclasses

mlm_only = dataclasses.replace(config, rtd_weight=0.0)
g0 = electra.backward(electra.forward(params, batch, mlm_only, np.random.default_rng(7), samples=out.samples), params,
                      mlm_only)
np.testing.assert_allclose(g0[W], parts["generator lookup"] + parts["generator LM head"], rtol=1e-12, atol=1e-15)
print("rtd_weight = 0: grads[WORDS] = generator lookup + generator LM head")

# %%
fig, axes = plt.subplots(1, 4, figsize=(14, 4), sharey=True)
vmax = np.abs(grads[W]).max()
for ax, (name, g) in zip(axes, [*parts.items(), ("sum (grads[WORDS])", grads[W])]):
    im = ax.imshow(g, cmap="coolwarm", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("embedding feature")
axes[0].set_ylabel("token id (row of the table)")
fig.colorbar(im, ax=axes, fraction=0.02)
path = FIG_DIR / "word_table_gradients.png"
fig.savefig(path, dpi=110, bbox_inches="tight")
plt.close(fig)
print("saved", path)

# %% [markdown]
# In the picture, the lookups only touch the rows of ids that occur in the batch, while the LM head touches **every**
# row: the softmax over the vocabulary pushes down every word it did not want, and pulls up the right one. The
# generator's lookup is the faintest: its gradient comes only from the few masked positions' losses, through the
# whole (narrow) generator, while the discriminator's comes from every token with weight 50.
#
# ## 4. The library's embedding op
#
# `ops.embedding.embedding_forward/backward` is the lookup and scatter-add above.

# %%
from minielectra.ops import embedding as lib

small_ids = np.array([[1, 3, 1], [1, 0, 4]])
out_lib, cache_lib = lib.embedding_forward(small_ids, table)
np.testing.assert_array_equal(out_lib, table[small_ids])
dout = rng.standard_normal(out_lib.shape)
np.testing.assert_allclose(lib.embedding_backward(dout, cache_lib),
                           embedding_backward(dout, (small_ids, table.shape)), rtol=1e-14)
print("library embedding agrees with ours")
