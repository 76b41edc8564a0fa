# %% [markdown]
# # 09 · Pre-training ELECTRA on a laptop
#
# Everything so far was one step at a time. Here we run the real training loop, `minielectra.train.pretrain`, on the
# built-in corpus (the docstrings and comments of your Python's standard library: real English, nothing to
# download), then open the checkpoint and ask the model questions.
#
# **You will learn**
# - what a pre-training run produces (checkpoint, configs, vocab, metrics log) and how to read its loss curves;
# - how to load the trained weights and query the **generator** (fill in masked words) and the **discriminator**
#   (which word in a sentence was swapped?).
#
# The default run is 60 steps of batch 16 x 64 tokens, 1 to 3 minutes on two cores. That is a very short run: expect
# the generator to have learned the most frequent words and the discriminator to have started separating
# replacements from originals, not fluent English. Set `LESSON_STEPS=2000` (about an hour) or run
# `minielectra pretrain` for a model that has learned more; the code below works unchanged on any checkpoint.
#
# Run it: `python lessons/09_pretrain_on_a_laptop.py` (or `LESSON_STEPS=300 python lessons/09_pretrain_on_a_laptop.py`;
# `LESSON_OUT=path` puts the run folder elsewhere than `lessons/runs/09`).

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from minielectra import checkpoint, config, electra, train
from minielectra.nn.encoder import electra_encoder_forward
from minielectra.nn.heads import discriminator_head_forward, generator_head_forward
from minielectra.tokenizer import WordPieceTokenizer

FIG_DIR = Path("lessons/figures/09_pretrain_on_a_laptop")
FIG_DIR.mkdir(parents=True, exist_ok=True)
OUT = Path(os.environ.get("LESSON_OUT", "lessons/runs/09"))  # the run folder
STEPS = int(os.environ.get("LESSON_STEPS", "60"))

# %% [markdown]
# ## 1. The run
#
# The `tiny` preset: a discriminator of hidden size 128 with 4 layers and 2 heads, a generator a quarter as wide, a
# WordPiece vocabulary of up to 8192 tokens trained on the corpus (cached after the first run). To fit a short run we
# use sequences of 64 tokens (the preset has 128) in batches of 16, a shorter warm-up and a somewhat higher learning
# rate; everything else is the preset. `pretrain` prints a progress bar with the losses and the two accuracies as it goes.

# %%
model_config, train_config = config.preset("tiny")
train_config = config.override(train_config, dict(
    steps=STEPS, seq_len=64, batch_size=16, learning_rate=1e-3, warmup_steps=max(1, STEPS // 10),
    log_every=max(1, STEPS // 30), checkpoint_every=10**9))  # one checkpoint, at the end
summary = train.pretrain(OUT, model=model_config, train=train_config, progress=True)
print(train.summary_line(summary))
print("run folder:", sorted(p.name for p in OUT.iterdir()))

# %% [markdown]
# ## 2. Loss curves
#
# `metrics.jsonl` has one JSON line per logged step (and one per held-out evaluation). Three things to look for:
#
# - the first loss is about `ln V + 50 ln 2` (lesson 08);
# - **rtd** falls fast at first: the discriminator learns the base rate (most tokens are originals: predict
#   "original" everywhere and you are right about 87 % of the time), then has to learn actual language to go lower;
# - **mlm** falls from `ln V` as the generator learns word frequencies, then context.

# %%
records = train.read_metrics(OUT / "metrics.jsonl")
rows = [r for r in records if "loss" in r]
held_out = [r for r in records if "eval_loss" in r]
steps = [r["step"] for r in rows]
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
axes[0].plot(steps, [r["loss"] for r in rows], label="train")
run_model, _ = config.from_json((OUT / "config.json").read_text())  # the vocab size the run really had
axes[0].axhline(electra.starting_loss(run_model.vocab_size), color="gray", ls=":", label="ln V + 50 ln 2")
axes[0].set_title("loss = mlm + 50 rtd")
axes[1].plot(steps, [r["mlm_loss"] for r in rows], label="mlm (generator)")
axes[1].plot(steps, [50 * r["rtd_loss"] for r in rows], label="50 x rtd (discriminator)")
axes[1].set_title("the two parts")
axes[2].plot(steps, [r["gen_acc"] for r in rows], label="generator accuracy at masked positions")
axes[2].plot(steps, [r["disc_acc"] for r in rows], label="discriminator accuracy, all tokens")
axes[2].plot(steps, [1 - r["replaced_frac"] for r in rows], "k:", label="always say 'original'")
axes[2].set_title("accuracy")
for r in held_out:
    axes[0].plot(r["step"], r["eval_loss"], "rs", label="held-out")
for ax in axes:
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
fig.tight_layout()
path = FIG_DIR / "loss_curves.png"
fig.savefig(path, dpi=110)
plt.close(fig)
print("saved", path)
print(f"step {rows[0]['step']}: loss {rows[0]['loss']:.2f};  step {rows[-1]['step']}: loss {rows[-1]['loss']:.2f} "
      f"(mlm {rows[-1]['mlm_loss']:.2f}, rtd {rows[-1]['rtd_loss']:.3f})")

# %% [markdown]
# ## 3. Open the checkpoint
#
# The checkpoint is one safetensors file holding the params, the optimizer state, the configs and the vocabulary
# (lesson-independent: `minielectra.checkpoint.load_checkpoint`). The params dict is the one every lesson used; the
# two encoders and two heads are the functions from lessons 06–08.

# %%
ckpt = checkpoint.load_checkpoint(OUT / train.CHECKPOINT)
model, _ = config.from_json(ckpt.config_json)
tok = WordPieceTokenizer(ckpt.vocab)
params = ckpt.params
print(f"step {ckpt.step}; {electra.count_params(params) / 1e6:.2f} M parameters; vocab {tok.vocab_size}")


def encode(words):
    """A list of words and '[MASK]' -> (ids (1, T), mask (1, T)) with [CLS] ... [SEP]."""
    ids = [tok.cls_id]
    for w in words:
        ids += [tok.mask_id] if w == "[MASK]" else tok.encode(w)
    ids.append(tok.sep_id)
    ids = np.array([ids])
    return ids, np.ones_like(ids)


def hidden(which, ids, mask):
    d = electra.encoder_dims(model, which)
    h, _ = electra_encoder_forward(params, f"{which}.electra", electra.EMB, ids, np.zeros_like(ids), mask, d)
    return h  # (1, T, C), dropout off


# %% [markdown]
# ## 4. Ask the generator
#
# Mask some words, run the generator's encoder, and apply its tied LM head at the masked positions: the top-5 words
# by probability. The first thing a masked LM learns is word frequency: after the default 60 steps, expect the same
# few frequent tokens (`.`, `the`, `,`) at every position whatever the context, which already takes the MLM loss from
# `ln V ≈ 9` to about 6. Context-dependent guesses ("number", "list", "empty") need a few thousand steps.

# %%
sentence = "return the [MASK] of items in the [MASK] , or none if it is [MASK] ."
ids, mask = encode(sentence.split())
h = hidden(electra.GEN, ids, mask)
where = np.flatnonzero(ids[0] == tok.mask_id)
logits, _ = generator_head_forward(params, electra.GEN, electra.WORDS, h[0, where], model.layer_norm_eps)  # (N, V)
probs = np.exp(logits - logits.max(-1, keepdims=True))
probs /= probs.sum(-1, keepdims=True)
print(sentence)
for n, pos in enumerate(where):
    top = np.argsort(-probs[n])[:5]
    print(f"  position {pos:2d}: " + ", ".join(f"{tok.id_to_token(t)} {probs[n, t]:.2f}" for t in top))

# %% [markdown]
# ## 5. Ask the discriminator
#
# Swap one word for a wrong one and look at `P(replaced)` for every token: the discriminator's head gives one logit
# per token. The discriminator also learns the easy part first: the **base rate**. About 13 % of the tokens it sees
# are replaced, and predicting 0.13 for every token is the best answer that ignores the input, worth an rtd loss of
# `-(0.13 ln 0.13 + 0.87 ln 0.87) ≈ 0.39` instead of `ln 2 ≈ 0.69`. That is where a 60-step run stands, and it
# explains the quick early drop of the rtd curve. With longer training the swapped word's bar rises above the rest.
# How much longer depends on how hard the replacements are. At the tiny preset's size, an hour on one core is not
# enough at the paper's sampling temperature of 1: the generator's replacements become plausible faster than the
# discriminator learns to spot them, and it stays at the base rate. Sampled at temperature 2 (`--set temperature=2.0`)
# they stay easier, and in the same hour the rtd loss ends 18 % below the base rate (README: ELECTRA against its
# baselines).

# %%
original = "return the number of items in the list , or none if it is empty .".split()
swapped = list(original)
swapped[2] = "water"  # "return the water of items ...": one token in the corpus's vocab
fig, axes = plt.subplots(2, 1, figsize=(11, 5), sharey=True)
for ax, words, title in ((axes[0], original, "original"), (axes[1], swapped, "'number' swapped for 'water'")):
    ids, mask = encode(words)
    logits, _ = discriminator_head_forward(params, electra.DISC, hidden(electra.DISC, ids, mask))  # (1, T)
    p = 1 / (1 + np.exp(-logits[0]))
    toks = [tok.id_to_token(t) for t in ids[0]]
    colors = ["tab:red" if t == "water" else "tab:blue" for t in toks]
    ax.bar(range(len(toks)), p, color=colors)
    ax.set_xticks(range(len(toks)), toks, rotation=45, fontsize=8)
    ax.set_title(f"{title}: discriminator P(replaced) per token")
    print(f"{title:28}", " ".join(f"{t}:{q:.2f}" for t, q in zip(toks, p)))
rate = np.mean([r["replaced_frac"] for r in rows[-5:]])
print(f"replaced share in the last training batches: {rate:.3f}; "
      f"base-rate rtd loss {-(rate * np.log(rate) + (1 - rate) * np.log(1 - rate)):.3f}, "
      f"the run's last rtd loss {rows[-1]['rtd_loss']:.3f}")
fig.tight_layout()
path = FIG_DIR / "discriminator_swapped_word.png"
fig.savefig(path, dpi=110)
plt.close(fig)
print("saved", path)

# %% [markdown]
# ## The trained model's gradients, checked once more
#
# Training moved every weight far from its initial values, so it is worth checking the backward pass where it is
# used now, not only at initialisation. Cast the trained params to float64, take a short batch with a padded
# sequence, and compare the hand-written gradients with centred finite differences, holding the masking, dropout
# and samples fixed as lesson 08 did. The first loss of the run also matches the untrained model's ln V + 50 ln 2.

# %%
from minielectra import gradcheck  # noqa: E402

first = train.read_metrics(OUT / "metrics.jsonl")[0]
print(f"first logged loss {first['loss']:.2f} (logged at step {first['step']}); "
      f"ln V + 50 ln 2 = {electra.starting_loss(model.vocab_size):.2f}")
p64 = {k: v.astype(np.float64) for k, v in params.items()}
r = np.random.default_rng(0)
ids = r.integers(5, model.vocab_size, (2, 12))  # (B, T)
ids[:, 0], ids[:, -1] = model.cls_token_id, model.sep_token_id
mask = np.ones_like(ids)
ids[1, 8:], mask[1, 8:] = model.pad_token_id, 0
ids[1, 7] = model.sep_token_id
out = electra.forward(p64, (ids, mask), model, np.random.default_rng(3))
grads = electra.backward(out, p64, model)


def loss():
    return electra.forward(p64, (ids, mask), model, np.random.default_rng(3), samples=out.samples).losses["loss"]


names = [electra.WORDS, "generator.generator_lm_head.bias", "discriminator.electra.encoder.layer.3.output.dense.weight",
         "discriminator.discriminator_predictions.dense.weight", "generator.electra.encoder.layer.0.intermediate.dense.weight"]
rows = [gradcheck.check_backward(loss, p64[n], grads[n], n) for n in names]
print(gradcheck.format_table(rows, title="trained model, float64"))
assert all(row.ok for row in rows)

# %% [markdown]
# ## Where next
#
# Resume this run for longer with `minielectra pretrain --out lessons/runs/09 --resume` (after raising `--steps`), or
# start a bigger one with `minielectra pretrain --steps 2000`. The discriminator is the model you keep: lesson 10
# fine-tunes it for sentiment.
