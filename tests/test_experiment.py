"""`minielectra experiment electra-vs-mlm` end to end on tiny generated data with a budget of seconds."""

import json

import numpy as np
import pytest

from minielectra import backend, parallel
from minielectra import experiment as X
from minielectra.cli import main

POSITIVE = "wonderful superb brilliant delightful".split()
NEGATIVE = "terrible awful boring dreadful".split()
FILLER = "the movie plot actor scene was and a with its story film quite very really".split()
TINY = ["--set", "vocab_size=120", "--set", "embedding_size=16", "--set", "hidden_size=16",
        "--set", "intermediate_size=32", "--set", "num_hidden_layers=1", "--set", "num_attention_heads=2",
        "--set", "generator_hidden_size=8", "--set", "generator_intermediate_size=16", "--set", "seq_len=32",
        "--set", "batch_size=8", "--set", "checkpoint_every=1000", "--backend", "numpy"]


def _sentence(rng, keyword):
    words = list(rng.choice(FILLER, rng.integers(3, 9)))
    words.insert(int(rng.integers(0, len(words) + 1)), str(keyword))
    return " ".join(words)


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIELECTRA_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    lines = ["sentence\tlabel"]
    for _ in range(160):
        y = int(rng.integers(0, 2))
        lines.append(f"{_sentence(rng, rng.choice(POSITIVE if y else NEGATIVE))}\t{y}")
    data = tmp_path / "train.tsv"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = tmp_path / "reviews.txt"
    corpus.write_text("\n\n".join(_sentence(rng, rng.choice(POSITIVE + NEGATIVE)) for _ in range(150)),
                      encoding="utf-8")
    yield data, corpus
    backend.set_backend("numpy")


def test_experiment_runs_every_stage_and_writes_the_results(tmp_path, files, capsys):
    data, corpus = files
    out = tmp_path / "exp"
    argv = ["experiment", "electra-vs-mlm", "--corpus", str(corpus), "--corpus-from-data", "--data", str(data),
            "--budget-minutes", "0.01", "--seeds", "2", "--epochs", "1", "--out", str(out), *TINY]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| model | accuracy (mean ± std) | on unseen rows | pre-training FLOPs |" in printed and "written:" in printed
    for name in ("results.md", "results.png", "results.json", "data/train.tsv", "data/dev.tsv",
                 "pretrain-electra/stage.json", "pretrain-mlm/stage.json", "finetune/lstm-seed1/result.json"):
        assert (out / name).exists(), name

    # the held-out 10 % is fixed and its sentences are not in the pre-training text
    dev = (out / "data" / "dev.tsv").read_text().splitlines()[1:]
    unlabelled = (out / "data" / "unlabelled.txt").read_text()
    assert len(dev) == 16 and len((out / "data" / "train.tsv").read_text().splitlines()) == 1 + 144
    assert not any(line.split("\t")[0] in unlabelled.split("\n\n") for line in dev)

    results = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    assert list(rows) == ["electra", "mlm", "scratch", "lstm"]
    for name, r in rows.items():
        assert r["seeds"] == [0, 1] and all(0.0 <= a <= 1.0 for a in r["accuracies"])
        assert r["mean"] == pytest.approx(np.mean(r["accuracies"]))
        assert r["std"] == pytest.approx(np.std(r["accuracies"], ddof=1))
    for objective in ("electra", "mlm"):
        stage = results["pretrain"][objective]
        assert stage["steps"] >= 1 and stage["flops"] == stage["steps"] * stage["flops_per_step"] > 0
        assert stage["minutes"] < 0.01 + 0.05  # the budget, and the one step that crosses it
        assert rows[objective]["pretrain_flops"] == stage["flops"]
    assert rows["scratch"]["pretrain_flops"] is None and rows["lstm"]["pretrain_flops"] is None
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 5 and "| lstm |" in md and "| scratch |" in md and "- | - | -" in md
    assert "On all held-out rows: electra - mlm" in md and "On the unseen rows: electra - mlm" in md
    assert "config tiny --set vocab_size=120 --set embedding_size=16" in md  # the overrides name the config too
    assert "peak learning rate 0.0003 (electra), 0.0003 (mlm), 0.0003 (scratch), 0.001 (lstm)" in md
    assert {r["model"]: r["lr"] for r in results["finetune"]} == {"electra": 3e-4, "mlm": 3e-4, "scratch": 3e-4,
                                                                  "lstm": 1e-3}
    unseen = (out / "data" / "dev-unseen.tsv").read_text().splitlines()[1:]
    assert 0 < len(unseen) <= len(dev) and set(unseen) <= set(dev)
    for name, r in rows.items():
        assert r["unseen_rows"] == len(unseen) and 0.0 <= r["unseen_mean"] <= 1.0

    # a rerun skips every stage that finished; a third seed only adds its fine-tuning runs
    assert main([*argv[:10], "3", *argv[11:]]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 2 + 4 * 2 and "finetune electra seed 2: accuracy" in printed
    assert [r["seeds"] for r in json.loads((out / "results.json").read_text())["rows"]] == [[0, 1, 2]] * 4

    # other settings in the same folder are refused before any work
    assert main([*argv[:8], "0.02", *argv[9:]]) == 2
    assert "budget_minutes differ" in capsys.readouterr().err


def test_bad_arguments_are_one_line_errors(tmp_path, files, capsys):
    data, corpus = files
    base = ["experiment", "electra-vs-mlm", "--data", str(data), "--out", str(tmp_path / "e"), "--backend", "numpy"]
    assert main([*base, "--budget-minutes", "1"]) == 2
    assert "no pre-training text" in capsys.readouterr().err
    assert main([*base, "--corpus", str(corpus), "--budget-minutes", "0"]) == 2
    assert "--budget-minutes must be positive" in capsys.readouterr().err
    assert main([*base, "--corpus", str(corpus), "--budget-minutes", "1", "--seeds", "0"]) == 2
    assert "--seeds and --epochs must be at least 1" in capsys.readouterr().err
    assert main([*base, "--corpus", str(corpus), "--budget-minutes", "1", "--finetune-lr", "0"]) == 2
    assert "--finetune-lr must be positive, got 0.0" in capsys.readouterr().err


def test_plan_fills_the_budget_with_the_presets_warmup_share():
    from minielectra.config import preset

    _, base = preset("tiny")  # 80 warmup steps of 800
    steps, warmup = X.plan_steps(10, 0.5, base)
    assert steps == int(0.97 * 600 / 0.5) and warmup == round(steps * 0.1)


def test_only_pretrains_one_objective_and_a_full_run_then_skips_both(tmp_path, files, capsys):
    data, corpus = files
    out = tmp_path / "exp"
    argv = ["experiment", "electra-vs-mlm", "--corpus", str(corpus), "--data", str(data), "--budget-minutes", "0.01",
            "--seeds", "1", "--epochs", "1", "--finetune-lr", "2e-3", "--out", str(out), *TINY]
    for objective in ("electra", "mlm"):
        assert main([*argv, "--only", objective]) == 0
        assert f"pre-trained {objective}:" in capsys.readouterr().out
        assert (out / f"pretrain-{objective}" / "stage.json").exists()
    assert not (out / "finetune").exists()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "pretrain electra: done before" in printed and "pretrain mlm: done before" in printed
    md = (out / "results.md").read_text()
    assert f"electra on {parallel.cores()} CPU core(s)" in md
    assert "peak learning rate 0.002 for every model" in md
    assert [r["lr"] for r in json.loads((out / "results.json").read_text())["finetune"]] == [2e-3] * 4


def test_unseen_rows_are_the_held_out_rows_not_inside_any_training_row(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.tsv").write_text("sentence\tlabel\na truly great movie\t1\nthe goods were bad\t0\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\ngreat movie\t1\ngood\t1\nthe goods\t0\nbad a truly\t0\n"
                                    "a truly great movie\t1\n")
    path = X.prepare_unseen(tmp_path)
    # "great movie" and "the goods" sit inside training rows, word for word; "good" only inside a longer word, and
    # "bad a truly" only across two training rows
    assert path.read_text().splitlines() == ["sentence\tlabel", "good\t1", "bad a truly\t0"]
