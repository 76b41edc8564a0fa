"""Fine-tuning end to end: a tiny model learns a separable task, the CLI round trip, init from pre-training, errors."""

import dataclasses
import io
import json

import numpy as np
import pytest

from minielectra import backend
from minielectra import checkpoint as ckpt
from minielectra import classifier as clf
from minielectra import config as cfgmod
from minielectra import finetune as F
from minielectra.cli import main
from minielectra.optim import adamw_init, adamw_step

POSITIVE = "wonderful superb brilliant delightful".split()
NEGATIVE = "terrible awful boring dreadful".split()
NEUTRAL = "average ordinary plain standard".split()
FILLER = "the movie plot actor scene was and a with its story film quite very really".split()
SMALL = ["--set", "embedding_size=32", "--set", "hidden_size=32", "--set", "intermediate_size=64",
         "--set", "num_hidden_layers=1", "--set", "num_attention_heads=2", "--set", "generator_hidden_size=8",
         "--set", "generator_intermediate_size=16", "--set", "vocab_size=200", "--set", "initializer_range=0.1",
         "--seq", "32", "--batch", "16",
         "--lr", "2e-3", "--backend", "numpy"]


def _sentence(rng, keyword):
    words = list(rng.choice(FILLER, rng.integers(3, 9)))
    words.insert(int(rng.integers(0, len(words) + 1)), str(keyword))
    return " ".join(words)


def make_tsv(path, n, seed):
    """GLUE SST-2's layout: a sentence with one word of POSITIVE (label 1) or NEGATIVE (label 0) among filler."""
    rng = np.random.default_rng(seed)
    lines = ["sentence\tlabel"]
    for _ in range(n):
        y = int(rng.integers(0, 2))
        lines.append(f"{_sentence(rng, rng.choice(POSITIVE if y else NEGATIVE))}\t{y}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_plain(path, n, seed):
    """Three string labels, 'label<TAB>text' lines."""
    rng = np.random.default_rng(seed)
    sets = {"pos": POSITIVE, "neg": NEGATIVE, "neu": NEUTRAL}
    lines = []
    for _ in range(n):
        y = str(rng.choice(list(sets)))
        lines.append(f"{y}\t{_sentence(rng, rng.choice(sets[y]))}")
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    return path


def _small_configs():
    model, train = cfgmod.preset("tiny")
    model = dataclasses.replace(model, embedding_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                generator_hidden_size=8, generator_intermediate_size=16, vocab_size=200,
                                initializer_range=0.1)  # a wider init: a model this small starts learning sooner
    return model, dataclasses.replace(train, learning_rate=2e-3, batch_size=16, seq_len=32)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIELECTRA_CACHE", str(tmp_path / "cache"))
    backend.set_backend("numpy")  # the reference ops (the CLI's default may pick Numba, and compiling takes long)
    yield
    backend.set_backend("numpy")


def test_tiny_model_learns_a_separable_task(tmp_path, capsys):
    model, train = _small_configs()
    s = F.finetune(tmp_path / "run", data=make_tsv(tmp_path / "train.tsv", 400, 0), model=model, train=train,
                   epochs=6, progress=False)
    printed = capsys.readouterr().out
    assert "epoch 1/6 - loss: " in printed and " - accuracy: " in printed and " - val_accuracy: " in printed
    assert s["train_rows"] == 360 and s["val_rows"] == 40  # 10 % held out
    assert s["best"]["val_accuracy"] > 0.95
    r = F.evaluate(tmp_path / "run", make_tsv(tmp_path / "test.tsv", 200, 1))
    assert r["accuracy"] > 0.95 and r["f1"] > 0.95 and r["n"] == 200
    assert np.sum(r["confusion"]) == 200
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == list(range(1, 7))
    # the kept model is the best epoch's: its accuracy on the held-out rows is the best one logged
    meta = ckpt.load_params(tmp_path / "run" / F.MODEL_FILE)[1]
    best = max(epochs, key=lambda e: (e["val_accuracy"], -e["val_loss"]))
    assert json.loads(meta["epoch"]) == best["epoch"] == s["best"]["epoch"]
    assert json.loads(meta["labels"]) == ["0", "1"]
    (label, p, probs), = F.predict(tmp_path / "run", ["the film was wonderful and superb"])
    assert label == "1" and p > 0.5 and len(probs) == 2


def test_cli_finetune_evaluate_predict_round_trip(tmp_path, capsys, monkeypatch):
    train = make_plain(tmp_path / "train.txt", 400, 2)
    dev = make_plain(tmp_path / "dev.txt", 60, 3)
    out = tmp_path / "m"
    assert main(["finetune", "--data", str(train), "--dev", str(dev), "--out", str(out), "--epochs", "8",
                 *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "epoch 8/8 - loss:" in printed and "best epoch" in printed
    assert json.loads((out / "labels.json").read_text()) == ["neg", "neu", "pos"]
    assert (out / "vocab.txt").exists() and (out / "config.json").exists()

    assert main(["evaluate", "--model", str(out), "--data", str(make_plain(tmp_path / "test.txt", 90, 4)),
                 "--backend", "numpy"]) == 0
    printed = capsys.readouterr().out
    accuracy = float(printed.split("accuracy ")[1].split()[0])
    assert accuracy > 0.95, printed
    assert "F1" in printed and "macro" in printed and "confusion matrix" in printed

    assert main(["predict", "--model", str(out), "--backend", "numpy", "a really boring and awful story",
                 "the plot was superb"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    assert [line.split("\t")[0] for line in lines] == ["neg", "pos"]
    assert all(0.0 < float(line.split("\t")[1]) <= 1.0 for line in lines)
    monkeypatch.setattr("sys.stdin", io.StringIO("quite an ordinary film\n\nthe actor was brilliant\r\n"))
    assert main(["predict", "--model", str(out), "--backend", "numpy"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    assert [line.split("\t")[0] for line in lines] == ["neu", "pos"]
    assert lines[1].split("\t")[2] == "the actor was brilliant"


def test_unknown_label_at_evaluation_is_an_error(tmp_path, capsys):
    model, train = _small_configs()
    F.finetune(tmp_path / "m", data=make_tsv(tmp_path / "train.tsv", 60, 0), model=model, train=train, epochs=1,
               progress=False)
    bad = tmp_path / "test.tsv"
    bad.write_text("sentence\tlabel\na wonderful film\t1\nan awful film\t2\nok\t0\n")
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--data", str(bad), "--backend", "numpy"]) == 2
    err = capsys.readouterr().err
    assert "line 3: '2'" in err and "Traceback" not in err


def test_sentence_pairs(tmp_path):
    """Label 1 when the second sentence repeats the first one's keyword: the model must look across [SEP]."""
    rng = np.random.default_rng(5)
    lines = ["sentence1\tsentence2\tlabel"]
    for _ in range(300):
        a, other = rng.choice(POSITIVE + NEGATIVE, 2, replace=False)
        y = int(rng.integers(0, 2))
        lines.append(f"{_sentence(rng, a)}\t{_sentence(rng, a if y else other)}\t{y}")
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    model, train = _small_configs()
    s = F.finetune(tmp_path / "m", data=tmp_path / "pairs.tsv", model=model, train=train, epochs=1, progress=False)
    assert s["best"] is not None
    m = F.load_classifier(tmp_path / "m")
    assert m.reader["pairs"] is True
    (label, p, _), = F.predict(m, ["the superb film\tthe superb story"])
    assert label in ("0", "1")
    with pytest.raises(F.datamod.DataError, match="sentence pairs"):
        F.predict(m, ["no tab here"])


def test_init_from_a_pretraining_run(tmp_path, capsys):
    from minielectra import train as T

    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    corpus.write_text("\n\n".join(_sentence(rng, rng.choice(POSITIVE + NEGATIVE)) for _ in range(200)))
    model, train = _small_configs()
    train = dataclasses.replace(train, steps=2, batch_size=4, warmup_steps=1)
    T.pretrain(tmp_path / "pre", corpus=corpus, model=model, train=train, progress=False)
    pre = ckpt.load_checkpoint(tmp_path / "pre" / T.CHECKPOINT)
    assert main(["finetune", "--init", str(tmp_path / "pre"), "--data", str(make_tsv(tmp_path / "t.tsv", 40, 0)),
                 "--out", str(tmp_path / "ft"), "--epochs", "1", "--seq", "32", "--lr", "1e-12",
                 "--set", "hidden_dropout_prob=0.0", "--backend", "numpy"]) == 0
    assert "from " + str(tmp_path / "pre") in capsys.readouterr().out
    m = F.load_classifier(tmp_path / "ft")
    assert m.tokenizer.vocab == pre.vocab
    assert m.config.hidden_size == 32 and m.config.hidden_dropout_prob == 0.0
    for k in m.params:
        if not k.startswith("classifier."):  # a learning rate of 1e-12 leaves the pre-trained encoder as it was
            np.testing.assert_allclose(m.params[k], pre.params[k], atol=1e-6)
    assert main(["finetune", "--init", str(tmp_path / "nope"), "--data", str(tmp_path / "t.tsv"),
                 "--out", str(tmp_path / "x"), "--backend", "numpy"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_sst2_without_data_fails_offline_with_a_message(tmp_path, capsys, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert main(["finetune", "--task", "sst2", "--out", str(tmp_path / "o"), "--backend", "numpy"]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "Network is unreachable" in err and "Traceback" not in err


def test_sst2_folder_uses_its_dev_file(tmp_path, capsys):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    make_tsv(folder / "train.tsv", 80, 0)
    make_tsv(folder / "dev.tsv", 20, 1)
    model, train = _small_configs()
    s = F.finetune(tmp_path / "m", data=folder, task="sst2", model=model, train=train, epochs=1, progress=False)
    assert s["train_rows"] == 80 and s["val_rows"] == 20


def test_metrics():
    r = F.classification_metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1], 2)
    assert r["accuracy"] == pytest.approx(0.6)
    assert r["f1"] == pytest.approx(2 * 2 / (3 + 3))  # tp 2, predicted 1: 3, actual 1: 3
    assert r["confusion"] == [[1, 1], [1, 2]]
    r = F.classification_metrics([0, 1, 2, 2], [0, 2, 2, 2], 3)
    assert r["f1"] == pytest.approx((1.0 + 0.0 + 0.8) / 3)


def test_layer_wise_learning_rates_equal_per_parameter_adamw():
    model, train = _small_configs()
    model = dataclasses.replace(model, num_hidden_layers=2)
    rng = np.random.default_rng(0)
    params = clf.init_classifier(model, 2, rng)
    grads = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}
    scales = clf.layer_lr_scales(params, 2, 0.8)
    fast = {k: v.copy() for k, v in params.items()}
    state = adamw_init(fast)
    F._grouped_adamw(fast, grads, state, 1e-2, train, scales, 0.5)
    assert state.step == 1
    for k, p in params.items():  # one parameter at a time, each with its own learning rate
        one = {k: p.copy()}
        adamw_step(one, {k: grads[k]}, adamw_init(one), 1e-2 * scales[k], train, grad_scale=0.5)
        np.testing.assert_array_equal(fast[k], one[k])
    assert len(set(scales.values())) == 4  # embeddings, layer 0, layer 1, head


def test_lstm_learns_a_separable_task(tmp_path, capsys):
    from minielectra.lstm_classifier import LSTMConfig

    _, train = _small_configs()
    train = dataclasses.replace(train, learning_rate=1e-2)
    s = F.finetune(tmp_path / "lstm", data=make_tsv(tmp_path / "train.tsv", 400, 0), kind="lstm",
                   model=LSTMConfig(vocab_size=200, embedding_size=16, hidden_size=16), train=train, epochs=6,
                   progress=False)
    assert "model: lstm, random init" in capsys.readouterr().out
    assert s["kind"] == "lstm" and s["best"]["val_accuracy"] > 0.95
    m = F.load_classifier(tmp_path / "lstm")
    assert m.kind == "lstm" and isinstance(m.config, LSTMConfig) and m.config.hidden_size == 16
    assert json.loads((tmp_path / "lstm" / "config.json").read_text())["lstm"]["embedding_size"] == 16
    r = F.evaluate(tmp_path / "lstm", make_tsv(tmp_path / "test.tsv", 200, 1))
    assert r["accuracy"] > 0.95
    (label, p, _), = F.predict(tmp_path / "lstm", ["the film was wonderful and superb"])
    assert label == "1" and p > 0.5


def test_cli_lstm_round_trip(tmp_path, capsys):
    train = make_plain(tmp_path / "train.txt", 200, 2)
    out = tmp_path / "m"
    assert main(["finetune", "--model", "lstm", "--data", str(train), "--out", str(out), "--epochs", "1",
                 "--set", "hidden_size=8", "--set", "dropout=0.0", "--set", "vocab_size=150", "--seq", "32",
                 "--backend", "numpy"]) == 0
    printed = capsys.readouterr().out
    assert "model: lstm" in printed and "lr 0.001 " in printed and "layer decay" not in printed  # its own lr default
    m = F.load_classifier(out)
    assert (m.config.hidden_size, m.config.dropout) == (8, 0.0)
    assert main(["evaluate", "--model", str(out), "--data", str(train), "--backend", "numpy"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["predict", "--model", str(out), "--backend", "numpy", "an awful story"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].split("\t")[0] in ("neg", "neu", "pos")


def test_model_kinds_check_the_init_runs_objective(tmp_path, capsys):
    from minielectra import train as T

    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    corpus.write_text("\n\n".join(_sentence(rng, rng.choice(POSITIVE + NEGATIVE)) for _ in range(200)))
    model, train = _small_configs()
    train = dataclasses.replace(train, steps=2, batch_size=4, warmup_steps=1)
    for objective in ("electra", "mlm"):
        T.pretrain(tmp_path / objective, corpus=corpus, model=model,
                   train=dataclasses.replace(train, objective=objective), progress=False)
    data = str(make_tsv(tmp_path / "t.tsv", 40, 0))

    def finetune(*argv):
        return main(["finetune", "--data", data, "--epochs", "1", "--seq", "32", "--backend", "numpy", *argv])

    assert finetune("--model", "mlm", "--init", str(tmp_path / "electra"), "--out", str(tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert "--model mlm needs a run pre-trained with --objective mlm" in err and "--objective electra" in err
    assert finetune("--model", "electra", "--out", str(tmp_path / "x")) == 2
    assert "--model electra fine-tunes a pre-trained encoder: give --init" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    pre = ckpt.load_checkpoint(tmp_path / "mlm" / "checkpoint.safetensors")
    assert finetune("--model", "mlm", "--init", str(tmp_path / "mlm"), "--out", str(tmp_path / "m"), "--lr",
                    "1e-12") == 0
    m = F.load_classifier(tmp_path / "m")
    assert m.kind == "mlm" and m.tokenizer.vocab == pre.vocab
    for k in m.params:
        if not k.startswith("classifier."):  # the encoder is the MLM run's (a learning rate of 1e-12 keeps it)
            np.testing.assert_allclose(m.params[k], pre.params[k], atol=1e-6)
    assert finetune("--init", str(tmp_path / "mlm"), "--out", str(tmp_path / "d")) == 0  # the run's objective
    assert F.load_classifier(tmp_path / "d").kind == "mlm"

    assert finetune("--model", "scratch", "--init", str(tmp_path / "electra"), "--out", str(tmp_path / "s"),
                    "--lr", "1e-12") == 0
    s = F.load_classifier(tmp_path / "s")
    pre = ckpt.load_checkpoint(tmp_path / "electra" / "checkpoint.safetensors")
    assert s.kind == "scratch" and s.tokenizer.vocab == pre.vocab and s.config.hidden_size == model.hidden_size
    assert set(s.params) == set(m.params)
    assert not np.allclose(s.params[F.clf.EMB + ".word_embeddings.weight"],
                           pre.params[F.clf.EMB + ".word_embeddings.weight"], atol=1e-6)  # random, not the run's

    assert finetune("--model", "lstm", "--init", str(tmp_path / "electra"), "--out", str(tmp_path / "l")) == 0
    lstm = F.load_classifier(tmp_path / "l")
    assert lstm.kind == "lstm" and lstm.tokenizer.vocab == pre.vocab and lstm.config.vocab_size == len(pre.vocab)


def test_length_batches_cover_every_row_once_with_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, 1000)
    batches = F.length_batches(rng.permutation(1000), lengths, 32, rng, window=10)
    assert len(batches) == -(-1000 // 32) and sorted(np.concatenate(batches).tolist()) == list(range(1000))
    assert sum(len(b) < 32 for b in batches) == 1
    padded = sum(len(b) * lengths[b].max() for b in batches)
    random = sum(len(b) * lengths[b].max() for b in np.array_split(rng.permutation(1000), len(batches)))
    assert padded < 0.7 * random  # far less padding than random batches
    again = F.length_batches(np.random.default_rng(1).permutation(1000), lengths, 32, np.random.default_rng(1),
                             window=10)
    assert [b.tolist() for b in again] != [b.tolist() for b in batches]  # the epoch order still depends on the seed
