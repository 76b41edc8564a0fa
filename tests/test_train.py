"""The trainer: resume is bit-identical, NaN stops the run keeping the last good checkpoint, metrics and plot."""

import dataclasses
import json

import numpy as np
import pytest

from minielectra import checkpoint as ckpt
from minielectra import config as cfgmod
from minielectra import mlm, parallel, train
from minielectra.config import ElectraConfig, TrainConfig
from model_checks import interrupting_bar, write_corpus

MODEL = ElectraConfig(vocab_size=300, embedding_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, generator_hidden_size=8, generator_num_attention_heads=1,
                      generator_intermediate_size=16, max_position_embeddings=32)
TRAIN = TrainConfig(seq_len=32, batch_size=4, steps=8, warmup_steps=2, log_every=1, checkpoint_every=3,
                    eval_fraction=0.1)



@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


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
    real = parallel.loss_and_grads
    calls = []

    def poisoned(*args, **kw):
        losses, metrics, grads, outputs = real(*args, **kw)
        calls.append(1)
        if len(calls) == 5:  # step 5, after the checkpoint at step 3
            losses = {**losses, "loss": float("nan")}
        return losses, metrics, grads, outputs

    monkeypatch.setattr(parallel, "loss_and_grads", poisoned)
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


def test_mlm_objective_trains_resumes_and_plots(tmp_path, corpus):
    mlm_train = dataclasses.replace(TRAIN, objective="mlm")
    straight = train.pretrain(tmp_path / "straight", corpus=corpus, model=MODEL, train=mlm_train,
                              cache_dir=tmp_path / "cache", progress=False)
    half = train.pretrain(tmp_path / "halves", corpus=corpus, model=MODEL, train=mlm_train,
                          cache_dir=tmp_path / "cache", progress=False, stop_after=3)
    assert not half["finished"]
    resumed = train.pretrain(tmp_path / "halves", corpus=corpus, resume=True, cache_dir=tmp_path / "cache",
                             progress=False)  # the objective comes from the run's saved config
    assert resumed["objective"] == straight["objective"] == "mlm" and resumed["finished"]
    a, b = ckpt.load_checkpoint(straight["checkpoint"]), ckpt.load_checkpoint(resumed["checkpoint"])
    assert set(a.params) == set(mlm.param_shapes(cfgmod.from_json(a.config_json)[0]))
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k
    rows = train.read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert {"loss", "mlm_loss", "mlm_acc"} <= set(rows[0]) and "rtd_loss" not in rows[0]
    assert [r["step"] for r in rows if "eval_mlm_acc" in r] == [3, 6, 8]
    assert (tmp_path / "straight" / "curves.png").exists()
    line = train.summary_line(straight)
    assert "masked-LM loss" in line and "accuracy at the masked positions" in line


def test_max_minutes_stops_with_a_checkpoint(tmp_path, corpus):
    s = run(tmp_path, corpus, "budget", max_minutes=1e-9)  # spent after the first step
    assert s["step"] == 1 and not s["finished"] and s["seconds"] > 0
    saved = ckpt.load_checkpoint(tmp_path / "budget" / "checkpoint.safetensors")
    assert saved.step == 1
    assert "stopped at step 1 of 8" in train.summary_line(s)
    with pytest.raises(cfgmod.ConfigError, match="max_minutes must be positive"):
        run(tmp_path, corpus, "bad", max_minutes=0)


def test_ctrl_c_late_in_a_step_still_saves_a_checkpoint(tmp_path, corpus, monkeypatch):
    # The Ctrl-C handler may run between any two bytecodes; here it runs inside the progress bar's update, after the
    # step has decided whether to save. The next step must see the request and save before the loop ends.
    monkeypatch.setattr(train, "tqdm", interrupting_bar(at=4))  # step 4 is not a checkpoint step (every 3)
    s = run(tmp_path, corpus, "ctrl-c")
    saved = ckpt.load_checkpoint(tmp_path / "ctrl-c" / "checkpoint.safetensors")
    assert s["step"] == saved.step == 5 and not s["finished"]


def test_several_corpora_are_read_together(tmp_path, corpus):
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(["a discriminator decides which words were replaced"] * 40), encoding="utf-8")
    both = train.pretrain(tmp_path / "both", corpus=[corpus, other], model=MODEL, train=TRAIN,
                          cache_dir=tmp_path / "cache", progress=False, stop_after=1)
    assert both["step"] == 1
    vocab = (tmp_path / "both" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert "discriminator" in vocab and "fox" in vocab
