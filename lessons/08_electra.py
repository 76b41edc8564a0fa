# %% [markdown]
# # 08 · ELECTRA: a generator, a discriminator, and one training step
#
# BERT learns by masked language modelling: hide 15 % of the words, predict them. Only those 15 % produce a
# learning signal. ELECTRA (Clark et al., 2020) gets a signal from **every** token: a small generator fills the
# masked positions with plausible words, and the main model, the discriminator, says for each token whether it is
# the original or a replacement (*replaced-token detection*).
#
# **You will learn**
# - the two networks and the loss `mlm + 50 * rtd`, and the starting loss `ln V + 50 ln 2`, checked against a real
#   untrained model;
# - why ELECTRA is **not** a teacher/student pair or a GAN: no gradient crosses from the discriminator to the
#   generator, and we show it;
# - one training step traced with real words: masking, the generator's samples, the labels, the losses;
# - a gradient check of the whole model, every parameter.
#
# Run it: `python lessons/08_electra.py` (about 15 seconds).

# %%
import dataclasses
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from minielectra import electra, gradcheck
from minielectra.config import ElectraConfig, preset
from minielectra.gradcheck import format_table
from minielectra.tokenizer import train_wordpiece
from minielectra.train import with_tokenizer

FIG_DIR = Path("lessons/figures/08_electra")
FIG_DIR.mkdir(parents=True, exist_ok=True)
np.set_printoptions(precision=3, suppress=True)
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Two encoders, one loss
#
# - The **generator** is a small BERT-style masked LM (a quarter of the discriminator's width). It reads the masked
#   sequence and predicts the original token at each masked position: loss `mlm`, a cross-entropy over V words.
# - At each masked position we **sample** a token from the generator's softmax and write it into the original
#   sequence. Where the generator guessed right, the token is unchanged.
# - The **discriminator** reads that corrupted sequence and outputs one logit per token: replaced (1) or original (0).
#   Loss `rtd`, a sigmoid cross-entropy averaged over **all** non-pad tokens.
# - Total: `loss = mlm + 50 * rtd` (the 50 balances a binary loss near 0.3 against a V-way loss near 2–9).
#
# The two share their embedding tables (lesson 07). After pre-training the generator is thrown away and the
# **discriminator** is the model you fine-tune.
#
# **The starting loss.** At initialisation (weights ~ N(0, 0.02²)) every logit is close to 0. The generator's
# softmax is then nearly uniform over V words: cross-entropy `ln V`. The discriminator's sigmoid is 0.5 for every
# token: cross-entropy `ln 2`. So the first loss should be about `ln V + 50 ln 2`.

# %%
model, _ = preset("tiny")
V = model.vocab_size
expected = math.log(V) + 50 * math.log(2)
print(f"tiny preset: V = {V}; ln V = {math.log(V):.3f}, 50 ln 2 = {50 * math.log(2):.3f}, sum = {expected:.3f}")
assert math.isclose(electra.starting_loss(V), expected)

params = electra.init_model(model, np.random.default_rng(0))  # float32, as in training
B, T = 4, 64
ids = rng.integers(5, V, (B, T))
ids[:, 0], ids[:, -1] = model.cls_token_id, model.sep_token_id
losses, metrics, grads = electra.loss_and_grads(params, (ids, np.ones_like(ids)), model, np.random.default_rng(1))
print(f"untrained model on a random batch: loss {losses['loss']:.3f} (mlm {losses['mlm_loss']:.3f}, "
      f"rtd {losses['rtd_loss']:.4f} vs ln 2 = {math.log(2):.4f})")
assert abs(losses["loss"] - expected) < 0.5

# %% [markdown]
# ## 2. Not a teacher and a student
#
# It looks adversarial: one network makes fakes, the other spots them. But the generator is **not** trained to fool
# the discriminator. Sampling (`argmax` of logits plus Gumbel noise, section 3) is not differentiable, and ELECTRA
# does not try to push a gradient through it: the generator learns from its own MLM loss alone, exactly like a small
# BERT. Nor does the discriminator imitate the generator's outputs, as a distilled student would; it solves a
# different task. The paper tried adversarial training and found it worse.
#
# We can see this in the gradients. Replay the same step (same masking, same samples) with the discriminator's loss
# switched off (`rtd_weight = 0`): every **generator** parameter's gradient is unchanged, bit for bit. Only the shared
# embeddings, which the discriminator also reads, see a difference.

# %%
tiny64 = ElectraConfig(vocab_size=40, embedding_size=8, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=16, generator_hidden_size=4, generator_num_attention_heads=1,
                       generator_intermediate_size=8, max_position_embeddings=32, mask_prob=0.3)
p64 = electra.init_model(tiny64, np.random.default_rng(0), np.float64)
ids64 = rng.integers(5, 40, (2, 12))
ids64[:, 0], ids64[:, -1] = tiny64.cls_token_id, tiny64.sep_token_id
batch64 = (ids64, np.ones_like(ids64))
out = electra.forward(p64, batch64, tiny64, np.random.default_rng(3))
g_full = electra.backward(out, p64, tiny64)
no_rtd = dataclasses.replace(tiny64, rtd_weight=0.0)
g_mlm = electra.backward(electra.forward(p64, batch64, no_rtd, np.random.default_rng(3), samples=out.samples), p64,
                         no_rtd)
gen_keys = [k for k in p64 if k.startswith("generator.")]
assert all(np.array_equal(g_full[k], g_mlm[k]) for k in gen_keys)
changed = sorted(k for k in p64 if not np.array_equal(g_full[k], g_mlm[k]))
print(f"{len(gen_keys)} generator parameters: gradients identical with and without the discriminator's loss")
print("parameters whose gradient the discriminator's loss changes:", len(changed), "- e.g.",
      ", ".join(k.split(".", 1)[1] for k in changed[:2]), "...")
print("shared embeddings among them:", [k[len(electra.EMB) + 1:] for k in changed if k.startswith(electra.EMB)])

# %% [markdown]
# ## 3. One step, traced with words
#
# We train a WordPiece tokenizer (`tokenizer.train_wordpiece`) on a few paragraphs, build a small model with its
# vocabulary (`train.with_tokenizer` sets the vocab size and special-token ids), and follow one step.
#
# **Masking** (`electra.mask_tokens`): pick `round(0.15 n)` of the n non-special tokens of each sequence (at least
# 1); 85 % of the picks become `[MASK]`, 15 % stay as they are (the generator must still predict them: it cannot
# tell which of the unmasked tokens were picked). We raise `mask_prob` to 0.3 here to see more of it.
#
# **Sampling** (`ops.softmax.gumbel_sample`): `argmax(logits + g)` with `g = -log(-log u)`, `u ~ Uniform(0, 1)`, is an
# exact sample from `softmax(logits)`: the Gumbel-max trick.

# %%
paragraphs = [
    "The cat sat on the warm mat and watched the birds in the garden. The birds sang in the morning.",
    "A dog ran across the park to chase the ball. The ball rolled under a bench near the old tree.",
    "In the morning the sun rose over the hills, and the farmers walked to the fields with their tools.",
    "The children read books in the library after school. They liked stories about dragons and ships.",
    "Rain fell on the city all night. In the morning the streets were wet and the air was cold and clean.",
    "The cat and the dog slept by the fire. Outside, the wind moved the trees and the birds were quiet.",
]
tok = train_wordpiece(paragraphs, vocab_size=300, min_frequency=1)
print(tok, "- the last tokens it learned:", tok.vocab[-10:])
config = with_tokenizer(dataclasses.replace(tiny64, mask_prob=0.3, max_position_embeddings=64), tok).validate()
sentences = ["The cat sat on the warm mat and watched the birds.", "A dog ran across the park to chase the ball."]
T = 20
input_ids = np.full((2, T), tok.pad_id)
attention_mask = np.zeros((2, T), dtype=np.int64)
for b, s in enumerate(sentences):
    row = [tok.cls_id] + tok.encode(s) + [tok.sep_id]
    input_ids[b, :len(row)], attention_mask[b, :len(row)] = row, 1
print("input ids (B, T) =", input_ids.shape, "\n", input_ids)

m = electra.mask_tokens(input_ids, attention_mask, config, np.random.default_rng(5))
for b in range(2):
    picks = m.positions[b][m.weights[b] > 0]
    print(f"\nsequence {b}: {tok.decode(input_ids[b])}")
    print(f"  picked positions {sorted(picks.tolist())}")
    print(f"  generator sees  : {tok.decode(m.masked_ids[b])}")

# %% [markdown]
# Now the full step through `electra.forward`, which does the masking above, the generator, the sampling and the
# discriminator (it derives its masking seed from the Generator we pass, so its picks differ from the cell above).
# The model is untrained, so its samples are nearly random words and most picks end up replaced.

# %%
step_params = electra.init_model(config, np.random.default_rng(0), np.float64)
out = electra.forward(step_params, (input_ids, attention_mask), config, np.random.default_rng(11), train=False)
c = out.cache
masked_ids = c.gen.emb.words.ids  # (B, T) what the generator read
corrupted = c.disc.emb.words.ids  # (B, T) what the discriminator read
labels = (corrupted != input_ids).astype(int)  # 1 = replaced
for b in range(2):
    print(f"\noriginal      : {tok.decode(input_ids[b])}")
    print(f"generator in  : {tok.decode(masked_ids[b])}")
    print(f"discriminator : {tok.decode(corrupted[b])}")
    n = int(attention_mask[b].sum())
    print("labels        :", " ".join(f"{tok.id_to_token(t)}/{y}" for t, y in zip(corrupted[b, :n], labels[b, :n])))
print(f"\nN = {len(out.samples)} picked positions; samples: {[tok.id_to_token(t) for t in out.samples]}")
print("losses:", {k: round(v, 4) for k, v in out.losses.items()},
      f"(ln V + 50 ln 2 = {electra.starting_loss(config.vocab_size):.3f})")
print("metrics:", {k: round(v, 3) for k, v in out.metrics.items()})

# %% [markdown]
# The discriminator's loss averages over all `sum(attention_mask)` real tokens, `[CLS]` and `[SEP]` included, not
# just over the picked ones: that is where ELECTRA's efficiency comes from. A sample equal to the original counts as
# original (label 0).
#
# Where do the replaced tokens sit, and what does the discriminator currently think? A picture of the step:

# %%
from minielectra.nn.encoder import electra_encoder_forward
from minielectra.nn.heads import discriminator_head_forward


def discriminator_probs(params, ids, attention_mask, config):
    """P(replaced) per token (B, T): the discriminator's encoder and head, dropout off."""
    h, _ = electra_encoder_forward(params, f"{electra.DISC}.electra", electra.EMB, ids, np.zeros_like(ids),
                                   attention_mask, electra.encoder_dims(config, electra.DISC))  # (B, T, C)
    logits, _ = discriminator_head_forward(params, electra.DISC, h)  # (B, T)
    return 1 / (1 + np.exp(-logits))


probs = discriminator_probs(step_params, corrupted, attention_mask, config)
fig, axes = plt.subplots(2, 1, figsize=(11, 4.5))
for b, ax in enumerate(axes):
    n = int(attention_mask[b].sum())
    ax.bar(range(n), labels[b, :n], color="tab:red", alpha=0.35, label="label: replaced")
    ax.plot(range(n), probs[b, :n], "ko-", label="discriminator P(replaced), untrained")
    ax.set_xticks(range(n), [tok.id_to_token(t) for t in corrupted[b, :n]], rotation=45, fontsize=8)
    ax.set_ylim(0, 1.05)
axes[0].legend(fontsize=8, loc="upper right")
fig.tight_layout()
path = FIG_DIR / "one_step.png"
fig.savefig(path, dpi=110)
plt.close(fig)
real = attention_mask > 0
print("saved", path)
print(f"untrained: P(replaced) lies in [{probs[real].min():.3f}, {probs[real].max():.3f}] for every token, "
      "a coin flip; lesson 09 trains it")

# %% [markdown]
# ## 4. The whole model, gradient-checked
#
# `electra.backward` runs both heads' and both encoders' backward passes and returns a grads dict with the same keys
# as the params. We check every parameter of a tiny float64 model with dropout on: each call replays the same
# Generator seed (same masking, same dropout masks) and the same samples, so the loss is a deterministic function of
# the weights. Weights are enlarged from the 0.02 init so that every gradient is well above round-off.

# %%
check_params = electra.init_model(tiny64, np.random.default_rng(0), np.float64)
for k in check_params:
    check_params[k] += 0.3 * rng.standard_normal(check_params[k].shape)
out = electra.forward(check_params, batch64, tiny64, np.random.default_rng(7))
grads = electra.backward(out, check_params, tiny64)


def loss():
    return electra.forward(check_params, batch64, tiny64, np.random.default_rng(7), samples=out.samples).losses["loss"]


rows = [gradcheck.check_backward(loss, check_params[k], grads[k], k) for k in sorted(check_params)]
print(format_table(rows, title=f"ELECTRA, every parameter ({len(rows)}), float64, dropout 0.1"))
assert all(r.ok for r in rows)
print(f"{len(rows)} of {len(rows)} gradients pass")
