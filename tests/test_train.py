"""The trainer: resume is bit-identical, NaN stops the run keeping the last good checkpoint, metrics and plot."""

import json

import numpy as np
import pytest

from minielectra import checkpoint as ckpt
from minielectra import electra, train
from minielectra.config import ElectraConfig, TrainConfig

MODEL = ElectraConfig(vocab_size=300, embedding_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, generator_hidden_size=8, generator_num_attention_heads=1,
                      generator_intermediate_size=16, max_position_embeddings=32)
TRAIN = TrainConfig(seq_len=32, batch_size=4, steps=8, warmup_steps=2, log_every=1, checkpoint_every=3,
                    eval_fraction=0.1)

WORDS = ("the quick brown fox jumps over the lazy dog while a generator proposes words and a discriminator "
         "decides which of them were replaced").split()


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=rng.integers(20, 60))) + "." for _ in range(80)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path


def run(tmp_path, corpus, name, **kw):
    return train.pretrain(tmp_path / name, corpus=corpus, model=MODEL, train=TRAIN, cache_dir=tmp_path / "cache",
                          progress=False, **kw)


def test_resume_is_bit_identical(tmp_path, corpus):
    straight = run(tmp_path, corpus, "straight")
    half = run(tmp_path, corpus, "halves", stop_after=TRAIN.steps // 2)
    assert not half["finished"] and half["step"] == TRAIN.steps // 2
    resumed = train.pretrain(tmp_path / "halves", corpus=corpus, resume=True, cache_dir=tmp_path / "cache",
                             progress=False)
    assert resumed["finished"]
    a = ckpt.load_checkpoint(straight["checkpoint"])
    b = ckpt.load_checkpoint(resumed["checkpoint"])
    assert a.step == b.step == TRAIN.steps
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k
        assert np.array_equal(a.opt_state.m[k], b.opt_state.m[k]), k
    # the resumed run logged the straight run's losses and metrics, step for step (timings aside)
    def logged(name):
        rows = train.read_metrics(tmp_path / name / "metrics.jsonl")
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows if "loss" in r]

    assert logged("straight") == logged("halves")


def test_run_folder_holds_everything(tmp_path, corpus):
    s = run(tmp_path, corpus, "r")
    out = tmp_path / "r"
    for name in ("checkpoint.safetensors", "config.json", "vocab.txt", "metrics.jsonl", "curves.png"):
        assert (out / name).exists(), name
    rows = train.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, TRAIN.steps + 1))
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6, 8]
    c = ckpt.load_checkpoint(out / "checkpoint.safetensors")
    assert json.loads(c.config_json)["model"]["vocab_size"] == len(c.vocab)
    assert (out / "vocab.txt").read_text(encoding="utf-8").splitlines() == c.vocab
    assert "loss" in train.summary_line(s) and "discriminator accuracy" in train.summary_line(s)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    real = electra.loss_and_grads
    calls = []

    def poisoned(*args, **kw):
        losses, metrics, grads = real(*args, **kw)
        calls.append(1)
        if len(calls) == 5:  # step 5, after the checkpoint at step 3
            losses = {**losses, "loss": float("nan")}
        return losses, metrics, grads

    monkeypatch.setattr(electra, "loss_and_grads", poisoned)
    with pytest.raises(train.TrainingError, match="diverged"):
        run(tmp_path, corpus, "nan")
    assert ckpt.load_checkpoint(tmp_path / "nan" / "checkpoint.safetensors").step == 3


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, corpus):
    with pytest.raises(ckpt.CheckpointError, match="no .*checkpoint"):
        train.pretrain(tmp_path / "none", corpus=corpus, resume=True, progress=False)


def test_a_corpus_too_small_for_one_batch_is_reported(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words here", encoding="utf-8")
    with pytest.raises(Exception, match="fewer than one batch|cannot be split"):
        train.pretrain(tmp_path / "x", corpus=tiny, model=MODEL, train=TRAIN, cache_dir=tmp_path / "c",
                       progress=False)
