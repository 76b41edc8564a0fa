# %% [markdown]
# # 13 · Hugging Face checkpoints: load, check, detect, fine-tune, export
#
# Google trained ELECTRA-Small for four days on a GPU; you do not have to. Its weights are on the Hugging Face hub
# (`google/electra-small-discriminator`), and because minielectra names every parameter exactly as Hugging Face's
# ELECTRA does, loading them is a rename plus a transpose.
#
# **You will learn**
# - what a Hugging Face model folder holds, and how its tensors map onto ours (`minielectra.hf.name_map`);
# - why a `.bin` file is refused (a pickle runs code when loaded) and safetensors is not;
# - that the imported model computes the same numbers as `transformers` (when it is installed);
# - `detect`: what the discriminator sees in a sentence with a swapped word;
# - fine-tuning the imported discriminator for sentiment, and exporting the result back to Hugging Face.
#
# **The real thing.** With a network connection, download the three files and import them:
#
#     pip install huggingface_hub
#     huggingface-cli download google/electra-small-discriminator config.json vocab.txt model.safetensors \
#         --local-dir electra-small-discriminator
#     minielectra import-hf electra-small-discriminator --out runs/electra-small
#     minielectra detect --model runs/electra-small "the chef drank the meal"
#     minielectra finetune --init runs/electra-small --task sst2 --epochs 3 --out runs/electra-small-sst2
#
# If a repository has only `pytorch_model.bin`, import-hf says how to convert it. **This lesson runs offline**: it
# builds a tiny random ElectraForPreTraining with transformers (the `interop` extra) and saves it the way the hub
# stores one, as a stand-in for the download. Without transformers it writes the stand-in with minielectra's own
# `export_hf`. A random model detects nothing, of course: the lesson shows the machinery and says what the real
# model does.
#
# Run it: `python lessons/13_huggingface.py` (seconds; `LESSON_EPOCHS` sets the fine-tuning epochs, default 3;
# `LESSON_OUT` the output folder, default a temporary one).

# %%
import dataclasses
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from minielectra import checkpoint as ckpt
from minielectra import config, detect, electra, finetune, hf
from minielectra.optim import adamw_init
from minielectra.tokenizer import train_wordpiece

FIG_DIR = Path("lessons/figures/13_huggingface")
FIG_DIR.mkdir(parents=True, exist_ok=True)
OUT = Path(os.environ.get("LESSON_OUT") or tempfile.mkdtemp(prefix="lesson13-"))
EPOCHS = int(os.environ.get("LESSON_EPOCHS", "3"))
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("torch")
np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. A stand-in for the download
#
# A hub folder is `config.json` (the sizes, `architectures`), `vocab.txt` (BERT's WordPiece vocabulary: one token a
# line, the line number is the id) and `model.safetensors` (a JSON header naming each tensor's dtype, shape and byte
# range, then the raw bytes). Our stand-in has a vocabulary trained on a few sentences and ELECTRA-Small's shape
# shrunk: embeddings 32 wide projected to a hidden size of 64, 2 layers.

# %%
POSITIVE = ["great", "wonderful", "superb", "moving", "delightful", "brilliant"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "clumsy", "tedious"]
SUBJECTS = ["the film", "the movie", "the plot", "the cast", "this story", "the ending"]
SENTENCES = [f"{s} was {a}" for s in SUBJECTS for a in POSITIVE + NEGATIVE] + [
    "the chef cooked the meal", "the chef ate the meal", "the chef drank the meal", "we ate it slowly"]
vocab = train_wordpiece(SENTENCES, 200, min_frequency=1)
download = OUT / "electra-tiny-discriminator"
download.mkdir(parents=True, exist_ok=True)
sizes = dict(embedding_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
             max_position_embeddings=64)

if HAVE_TRANSFORMERS:
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.ElectraConfig(vocab_size=vocab.vocab_size, hidden_act="gelu", **sizes)
    hf_model = transformers.ElectraForPreTraining(hf_config).eval()
    hf_model.save_pretrained(download)  # writes config.json and model.safetensors, as on the hub
    print("stand-in written by transformers", transformers.__version__)
else:
    # The same folder, written by minielectra from a random pre-training run (see section 6 for export_hf).
    model_config = config.ElectraConfig(vocab_size=vocab.vocab_size, generator_hidden_size=16,
                                        generator_intermediate_size=64, generator_num_attention_heads=1, **sizes)
    params = electra.init_model(model_config, np.random.default_rng(0))
    (OUT / "random-run").mkdir(exist_ok=True)
    ckpt.save_checkpoint(OUT / "random-run" / "checkpoint.safetensors", params, adamw_init(params), 0,
                         config.to_json(model_config, config.TrainConfig(seq_len=64)), np.random.default_rng(0),
                         vocab=vocab.vocab, extra={})
    hf.export_hf(OUT / "random-run", download)
    print("transformers is not installed (pip install -e '.[interop]'): stand-in written by minielectra.hf.export_hf")
vocab.save(download / "vocab.txt")
print(sorted(p.name for p in download.iterdir()))
print({k: json.loads((download / "config.json").read_text())[k] for k in ("architectures", "embedding_size", "hidden_size", "num_hidden_layers", "hidden_act")})

# %% [markdown]
# ## 2. The name map
#
# Each Hugging Face tensor has exactly one of ours. The names differ by a prefix (our pre-training runs hold a
# generator and a discriminator side by side, so the discriminator's live under `discriminator.`), and every linear
# weight is transposed: PyTorch's `nn.Linear` stores W as (out, in) and computes `x @ W.T`; we store (in, out) and
# compute `x @ W`. Lookup tables (word, position, token type) are rows per id in both, so they are not transposed.

# %%
weights = hf.read_safetensors(download / hf.WEIGHTS)
hf_cfg = json.loads((download / "config.json").read_text())
ours = hf.config_from_hf(hf_cfg, hf.PRETRAINING, vocab)
table = hf.name_map(hf.DISC, ours)
for name in ["electra.embeddings.word_embeddings.weight", "electra.embeddings_project.weight",
             "electra.encoder.layer.0.attention.self.query.weight", "electra.encoder.layer.1.output.LayerNorm.bias",
             "discriminator_predictions.dense_prediction.weight"]:
    mine, shape, transposed = table[name]
    print(f"{name:55s} {str(tuple(weights[name].shape)):10s} -> {mine:65s} {str(shape):10s}"
          f"{' (transposed)' if transposed else ''}")
assert set(table) == set(weights), "every tensor in the file has a place, and every place a tensor"

# %% [markdown]
# ## 3. Import, and check the numbers
#
# `import_hf` (the `minielectra import-hf` command) checks the config (only the exact erf GELU, absolute positions),
# that the vocabulary has `vocab_size` tokens, that nothing is missing or left over and every shape fits; then it writes
# a run folder: `checkpoint.safetensors` (discriminator only), `config.json`, `vocab.txt`. A PyTorch `.bin` would be
# refused: unpickling runs whatever code the file names.
#
# With transformers installed we run the same sentence through both. The tests (`tests/test_hf.py`) do this for three
# architectures, several sizes, lengths and padding patterns, and compare gradients too.

# %%
run = OUT / "run"
summary = hf.import_hf(download, run)
print(summary)
model = detect.load_discriminator(run)
broken = OUT / "pickled"
broken.mkdir(exist_ok=True)
for name in ("config.json", "vocab.txt"):
    (broken / name).write_bytes((download / name).read_bytes())
(broken / "pytorch_model.bin").write_bytes(b"\x80\x04")
try:
    hf.import_hf(broken, OUT / "never")
except hf.HFError as e:
    print("refused:", str(e)[:160], "...")

text = "the chef drank the meal"
(ours_d,) = detect.detect(model, [text])
if HAVE_TRANSFORMERS:
    ids = torch.tensor([ours_d.ids])
    with torch.no_grad():
        theirs = hf_model(input_ids=ids).logits[0].numpy()
    diff = float(np.max(np.abs(np.array(ours_d.logits) - theirs)))
    print(f"max |our logit - transformers' logit| = {diff:.2e}")
    assert diff < 1e-5

# %% [markdown]
# ## 4. What the discriminator sees
#
# `detect` encodes the text as in pre-training (`[CLS] ... [SEP]`) and gives each token sigmoid(logit), the
# probability that it was replaced. Swap one word for a plausible wrong one: a trained discriminator (the real
# electra-small-discriminator) gives "drank" a high probability and the rest low ones. Our random stand-in hovers
# around 0.5 for every token: it has learned nothing yet, and the plot shows exactly that.
#
#     minielectra detect --model runs/NAME "the chef drank the meal"
#     minielectra detect --model runs/NAME --json "the chef drank the meal"   # tokens, ids and raw logits

# %%
results = detect.detect(model, ["the chef ate the meal", "the chef drank the meal"])
print(detect.format_detection(results[1]))
fig, axes = plt.subplots(1, 2, figsize=(10, 3), sharey=True)
for ax, d in zip(axes, results):
    ax.bar(range(len(d.tokens)), d.probs, color=["C3" if p > 0.5 else "C0" for p in d.probs])
    ax.set_xticks(range(len(d.tokens)))
    ax.set_xticklabels(d.tokens, rotation=45)
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_title(f'"{d.text}"')
axes[0].set_ylabel("p(replaced)")
axes[0].set_ylim(0, 1)
fig.suptitle("the imported discriminator's view (random stand-in: no opinion yet)")
fig.tight_layout()
path = FIG_DIR / "detect_swapped_word.png"
fig.savefig(path, dpi=110)
plt.close(fig)
print("saved", path)

# %% [markdown]
# ## 5. Fine-tune it for sentiment
#
# The imported run is an ordinary `--init` for `finetune` (lesson 10): its discriminator encoder is copied and a
# classification head is put on the [CLS] vector. Here on toy sentences; with the real model use `--task sst2`.

# %%
rng = np.random.default_rng(0)


def toy(n):
    rows = []
    for _ in range(n):
        y = int(rng.integers(0, 2))
        rows.append(f"{rng.choice(SUBJECTS)} was {rng.choice(POSITIVE if y else NEGATIVE)}\t{y}\n")
    return "sentence\tlabel\n" + "".join(rows)


data = OUT / "data"
data.mkdir(exist_ok=True)
(data / "train.tsv").write_text(toy(192))
(data / "dev.tsv").write_text(toy(64))
_, base_train = config.preset("tiny")
train = dataclasses.replace(base_train, learning_rate=2e-3, batch_size=16, seq_len=16, seed=0)
result = finetune.finetune(OUT / "sentiment", data=data, init=run, train=train, epochs=EPOCHS, progress=False)
print(finetune.summary_line(result))
for sentence, (label, prob, _) in zip(["the plot was brilliant", "the ending was tedious"],
                                      finetune.predict(OUT / "sentiment", ["the plot was brilliant",
                                                                           "the ending was tedious"])):
    print(f"{label} ({prob:.3f})  {sentence}")

# %% [markdown]
# ## 6. And back to Hugging Face
#
# `export_hf` (the `minielectra export-hf` command) writes the fine-tuned model as ElectraForSequenceClassification:
# the same renames and transposes backwards, plus a config.json with the labels. A pre-training run exports its
# discriminator as ElectraForPreTraining (`--part generator`: its generator as ElectraForMaskedLM).
#
#     minielectra export-hf runs/electra-small-sst2 --out electra-small-sst2-hf

# %%
exported = OUT / "sentiment-hf"
print(hf.export_hf(OUT / "sentiment", exported))
clf_model = finetune.load_classifier(OUT / "sentiment")
probs = [p for _, _, p in finetune.predict(clf_model, ["the plot was brilliant"])]
if HAVE_TRANSFORMERS:
    back = transformers.ElectraForSequenceClassification.from_pretrained(exported).eval()
    ids = torch.tensor([[vocab.cls_id] + clf_model.tokenizer.encode("the plot was brilliant") + [vocab.sep_id]])
    with torch.no_grad():
        theirs = torch.softmax(back(input_ids=ids).logits, -1).numpy()
    print("transformers on the exported model:", theirs[0], "ours:", np.array(probs[0]), back.config.id2label)
    assert np.max(np.abs(theirs[0] - np.array(probs[0]))) < 1e-5

# %% [markdown]
# ## What to take away
#
# - minielectra's params are Hugging Face's state dict under a prefix, with linear weights transposed: import and
#   export are one table (`hf.name_map`), checked both ways.
# - Only safetensors is read; a pickle (`.bin`) is refused with the command that converts it.
# - The imported model is not an approximation: the tests show logits within 1e-5 and gradients within 1e-4 of
#   transformers' in float32, and ~1e-14 in float64.
# - `detect` shows replaced-token detection on any sentence; `finetune --init` takes the imported model as it takes
#   our own pre-training runs.
