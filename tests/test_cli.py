"""The command line: errors are one clear line (exit 2), Ctrl-C saves and exits cleanly, gradcheck's exit code."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minielectra import checkpoint as ckpt
from minielectra.cli import main

SMALL_MODEL = ["--set", "vocab_size=300", "--set", "embedding_size=16", "--set", "hidden_size=16",
               "--set", "intermediate_size=32", "--set", "generator_hidden_size=8",
               "--set", "generator_intermediate_size=16", "--set", "num_hidden_layers=1",
               "--seq", "32", "--batch", "4", "--log-every", "1"]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIELECTRA_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words, 40)) for _ in range(60)), encoding="utf-8")
    return path


def test_pretrain_runs_and_prints_a_summary(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--corpus", str(corpus), "--out", str(out), "--steps", "3", *SMALL_MODEL]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("backend: ")  # auto: numba when installed, else numpy
    assert "finished: loss" in printed and "discriminator accuracy" in printed
    assert ckpt.load_checkpoint(out / "checkpoint.safetensors").step == 3


@pytest.mark.parametrize("argv, message", [
    (["--set", "hidden_size=129"], "not divisible by num_attention_heads"),
    (["--set", "generator_hidden_size=256"], "larger than the discriminator"),
    (["--seq", "1024"], "exceeds max_position_embeddings"),
    (["--set", "vocab_size=4"], "special tokens"),
    (["--set", "hiden_size=4"], "no such config field"),
    (["--set", "hidden_size=big"], "must be int"),
    (["--config", "huge"], "unknown preset"),
])
def test_bad_configs_are_rejected_before_any_work(tmp_path, corpus, capsys, argv, message):
    assert main(["pretrain", "--corpus", str(corpus), "--out", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_missing_corpus_and_corrupted_checkpoint_are_one_line_errors(tmp_path, corpus, capsys):
    assert main(["pretrain", "--corpus", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r")]) == 2
    assert "nope.txt" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["pretrain", "--corpus", str(corpus), "--out", str(out), "--steps", "2", *SMALL_MODEL]) == 0
    path = out / "checkpoint.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    assert main(["pretrain", "--corpus", str(corpus), "--out", str(out), "--resume"]) == 2
    assert "truncated or corrupted" in capsys.readouterr().err


def test_resume_keeps_the_runs_step_count_unless_steps_is_given(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", "--corpus", str(corpus), "--out", str(out), "--backend", "numpy"]
    assert main([*argv, "--steps", "4", "--stop-after", "2", *SMALL_MODEL]) == 0
    assert main([*argv, "--resume"]) == 0  # not the preset's default step count
    assert ckpt.load_checkpoint(out / "checkpoint.safetensors").step == 4
    assert main([*argv, "--resume", "--steps", "6"]) == 0
    assert ckpt.load_checkpoint(out / "checkpoint.safetensors").step == 6
    assert "finished" in capsys.readouterr().out


def test_missing_backend_package_names_the_extra(monkeypatch, capsys):
    import minielectra.backend as backend

    monkeypatch.setattr(backend, "_importable", lambda module: False)
    assert main(["gradcheck", "--backend", "cupy"]) == 2
    assert "pip install" in capsys.readouterr().err


def test_gradcheck_command_passes_and_prints_the_table(capsys):
    assert main(["gradcheck"]) == 0
    printed = capsys.readouterr().out
    assert "electra: discriminator.electra.embeddings.word_embeddings.weight" in printed
    assert "mha: Wq" in printed and "lstm: Wh" in printed and " NO" not in printed


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, corpus):
    out = tmp_path / "run"
    env = {**os.environ, "MINIELECTRA_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "minielectra", "pretrain", "--corpus", str(corpus), "--out",
                             str(out), "--steps", "100000", "--checkpoint-every", "100000", *SMALL_MODEL],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):  # a few steps done
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped at step" in stdout and "Traceback" not in stderr
    saved = ckpt.load_checkpoint(out / "checkpoint.safetensors")
    assert 3 <= saved.step < 100000


def test_pretrain_objective_mlm_and_max_minutes(tmp_path, corpus, capsys):
    out = tmp_path / "mlm"
    assert main(["pretrain", "--corpus", str(corpus), "--corpus", str(corpus), "--out", str(out), "--steps", "50",
                 "--objective", "mlm", "--max-minutes", "1e-9", "--backend", "numpy", *SMALL_MODEL]) == 0
    printed = capsys.readouterr().out
    assert "stopped at step 1 of 50" in printed and "masked-LM loss" in printed
    saved = ckpt.load_checkpoint(out / "checkpoint.safetensors")
    assert saved.step == 1 and '"objective": "mlm"' in saved.config_json
    assert main(["pretrain", "--corpus", str(corpus), "--out", str(tmp_path / "x"), "--objective", "bert"]) == 2
    assert "objective must be one of electra, mlm, got 'bert'" in capsys.readouterr().err
