"""Fine-tuning, evaluating and predicting with a sequence classifier (ELECTRA's discriminator + a head).

    finetune(out_dir, data=..., task=..., init=runs/NAME, kind=...)   train, keep the best epoch by validation
                                                             accuracy (ties: the lower validation loss)
    evaluate(model_dir, data_path)                           accuracy, F1, confusion matrix
    predict(model_dir, texts)                                label and probability per text

The recipe is ELECTRA's for GLUE (Clark et al. 2020, appendix; the official `finetune` code): AdamW with weight decay
0.01, linear warmup over the first 10 % of the steps then linear decay to 0, learning rate 3e-4 for Small, and
layer-wise learning-rate decay 0.8: the head learns at the full rate, each encoder layer below it at 0.8 times the one
above, the embeddings slowest.

The model kinds (`kind`, the CLI's --model), compared by `minielectra experiment electra-vs-mlm`:
    electra   the encoder of an ELECTRA pre-training run (--init, a run with objective electra)
    mlm       the same encoder pre-trained as a BERT-style masked LM (--init, a run with objective mlm)
    scratch   the same encoder, randomly initialised; with --init, the run's config and vocab (not its weights)
    lstm      embedding -> LSTM -> dense (lstm_classifier.py), from scratch; with --init, the run's vocab. Its
              learning rate defaults to 1e-3 (DEFAULT_LR), the usual Adam rate for an LSTM, and has no layer decay
Without a kind, a run given with --init is fine-tuned as its objective says, and no --init means scratch.

A fine-tuned model folder holds:
    model.safetensors   the params, with the config, vocab, label names and reader settings in its metadata
    config.json  vocab.txt  labels.json     the same, readable
    metrics.jsonl       one line per epoch
"""

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from minielectra import checkpoint as ckpt
from minielectra import classifier as clf
from minielectra import config as cfgmod
from minielectra import data as datamod
from minielectra import lstm_classifier as lstm_clf
from minielectra import backend, parallel
from minielectra.backend import dispatch, get_xp, on_device
from minielectra.optim import AdamWState, adamw_init, learning_rate
from minielectra.tokenizer import WordPieceTokenizer

MODEL_FILE = "model.safetensors"
PRETRAIN_CHECKPOINT = "checkpoint.safetensors"  # train.CHECKPOINT, the file a pre-training run folder holds
EVAL_BATCH = 64
BUCKET_BATCHES = 50  # batches per window of rows sorted by length (length_batches)
KINDS = ("electra", "mlm", "scratch", "lstm")
DEFAULT_LR = {"electra": 3e-4, "mlm": 3e-4, "scratch": 3e-4, "lstm": 1e-3}


def _log(msg):
    tqdm.write(msg)


# ---- inputs: a pre-training run, the data -----------------------------------------------------------------------------


def load_pretrained(init):
    """(params, ElectraConfig, vocab list) of a pre-training run folder (or its checkpoint file)."""
    params, model, _, vocab = load_pretrained_run(init)
    return params, model, vocab


def load_pretrained_run(init):
    """(params, ElectraConfig, TrainConfig, vocab list) of a pre-training run; TrainConfig.objective says which."""
    path = Path(init)
    if path.is_dir():
        path = path / PRETRAIN_CHECKPOINT
    saved = ckpt.load_checkpoint(path)
    model, train = cfgmod.from_json(saved.config_json)
    vocab = saved.vocab
    if vocab is None:
        vocab_file = path.parent / "vocab.txt"
        if not vocab_file.exists():
            raise ckpt.CheckpointError(f"{path} was saved without a vocab and there is no {vocab_file}")
        vocab = WordPieceTokenizer.load(vocab_file).vocab
    return saved.params, model, train, vocab


def resolve_kind(kind, init, objective):
    """The model kind to fine-tune, checked against --init and the run's objective (None when there is no run)."""
    if kind is None:
        return objective if init is not None else "scratch"
    if kind not in KINDS:
        raise cfgmod.ConfigError(f"unknown model {kind!r}: choose one of {', '.join(KINDS)}")
    if kind in ("electra", "mlm"):
        if init is None:
            raise cfgmod.ConfigError(f"--model {kind} fine-tunes a pre-trained encoder: give --init, a run of "
                                     f"`minielectra pretrain --objective {kind}`")
        if objective != kind:
            raise cfgmod.ConfigError(f"--model {kind} needs a run pre-trained with --objective {kind}, but {init} was "
                                     f"pre-trained with --objective {objective}: use --model {objective} or another "
                                     "--init")
    return kind


def _module(config):
    """The classifier module for a model config: the LSTM baseline's, or the Transformer's."""
    return lstm_clf if isinstance(config, lstm_clf.LSTMConfig) else clf


def config_json(model, train):
    """config.json of a fine-tuned model: the Transformer's {"model", "train"}, or the LSTM's {"lstm", "train"}."""
    if isinstance(model, lstm_clf.LSTMConfig):
        return json.dumps({"lstm": model.to_dict(), "train": dataclasses.asdict(train)}, indent=2)
    return cfgmod.to_json(model, train)


def config_from_json(text):
    """(model config, TrainConfig) from config_json's output."""
    data = json.loads(text)
    if isinstance(data, dict) and "lstm" in data:
        return lstm_clf.LSTMConfig.from_dict(data["lstm"]), cfgmod.from_json(json.dumps({"train": data["train"]}))[1]
    return cfgmod.from_json(text)


def task_reader(task):
    """The reader settings of a known task (GLUE's column names), or auto-detection."""
    if task is None:
        return {"format": "auto", "text_column": None, "pair_column": None, "label_column": None}
    spec = datamod.TASKS.get(task)
    if spec is None:
        raise datamod.DataError(f"unknown task {task!r}: known tasks are {', '.join(datamod.TASKS)}")
    return {"format": "tsv", "text_column": spec["text"], "pair_column": spec["pair"], "label_column": spec["label"]}


def resolve_data(data=None, task=None, dev=None, cache_dir=None):
    """(train file, dev file or None). data: a file, a folder with train.tsv (and maybe dev.tsv), or None to download
    the GLUE `task`."""
    if data is None:
        if task is None:
            raise datamod.DataError("no training data: pass --data FILE_OR_FOLDER, or --task sst2 to download GLUE SST-2")
        data = datamod.download_glue_task(task, cache_dir)
    data = Path(data)
    if data.is_dir():
        train = data / "train.tsv"
        if not train.exists():
            raise datamod.DataError(f"the folder {data} holds no train.tsv: give the training file itself with --data")
        if dev is None and (data / "dev.tsv").exists():
            dev = data / "dev.tsv"
        data = train
    elif not data.exists():
        raise datamod.DataError(f"no data file at {data}: check the path")
    return data, (Path(dev) if dev is not None else None)


def _read(path, reader, require_labels=True):
    return datamod.read_labelled(path, reader["format"], reader["text_column"], reader["label_column"],
                                 reader["pair_column"], require_labels)


class Encoded(NamedTuple):
    input_ids: np.ndarray  # (N, T) int32
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    labels: np.ndarray  # (N,) int64, or None


def encode(tok, rows: datamod.LabelledData, names, seq_len):
    ids, mask, types = datamod.encode_texts(tok, rows.texts, rows.pairs, seq_len)
    labels = datamod.encode_labels(rows, names) if names is not None else None
    return Encoded(ids, mask, types, labels)


def length_batches(order, lengths, batch_size, rng, window=BUCKET_BATCHES):
    """One epoch's batches of row indices, ceil(N / batch_size) of them: the rows in `order` (a random permutation),
    sorted by length within windows of `window` batches, cut into batches, and the batches shuffled.

    Each batch then holds rows of about the same length, so _trim cuts nearly all its padding (on SST-2 a step reads
    about a third of the tokens of a random batch), while each epoch is still a random pass over the data.
    """
    rows = batch_size * window  # a multiple of batch_size: only the last window can leave a short batch
    batches = []
    for start in range(0, len(order), rows):
        chunk = order[start:start + rows]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _trim(ids, mask, types):
    """Cut the columns that are padding in every row: the logits do not change and short batches run much faster."""
    T = max(int(mask.sum(axis=1).max()), 1)
    return ids[:, :T], mask[:, :T], types[:, :T]


# ---- metrics -------------------------------------------------------------------------------------------------------


def predict_logits(params, config, num_labels, enc: Encoded, batch_size=EVAL_BATCH):
    """Logits (N, labels), dropout off; rows are run in order of length so each batch carries little padding."""
    n = len(enc.input_ids)
    order = np.argsort(enc.attention_mask.sum(axis=1), kind="stable")
    logits = np.zeros((n, num_labels), dtype=np.float64)
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        ids, mask, types = _trim(enc.input_ids[rows], enc.attention_mask[rows], enc.token_type_ids[rows])
        logits[rows] = backend.asnumpy(_module(config).forward(params, (ids, mask, types, None), config,
                                                               num_labels)[1])  # one copy per batch on a device
    return logits


def classification_metrics(y_true, y_pred, num_labels, probs=None):
    """accuracy, f1 (binary: of label 1; more labels: the macro mean), confusion[true][predicted], and loss when the
    probabilities are given (mean cross-entropy)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(np.float64)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    f1 = np.divide(2 * tp, predicted + actual, out=np.zeros(num_labels), where=(predicted + actual) > 0)
    out = {"n": int(len(y_true)), "accuracy": float(tp.sum() / max(len(y_true), 1)),
           "f1": float(f1[1] if num_labels == 2 else f1.mean()), "confusion": confusion.tolist()}
    if probs is not None:
        p = np.clip(probs[np.arange(len(y_true)), y_true], 1e-300, None)
        out["loss"] = float(-np.log(p).mean()) if len(y_true) else 0.0
    return out


def _evaluate_encoded(params, config, num_labels, enc):
    probs = clf.probabilities(predict_logits(params, config, num_labels, enc))
    return classification_metrics(enc.labels, probs.argmax(axis=1), num_labels, probs)


# ---- fine-tuning ---------------------------------------------------------------------------------------------------


def _check_finite(loss, norm, where, out):
    from minielectra.train import TrainingError

    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise TrainingError(f"{where}: the loss is {loss} and the gradient norm {norm}: training has diverged; lower "
                            f"--lr (the best model so far is kept in {out})")


def _grouped_adamw(params, grads, state, lr, tc, scales, grad_scale):
    """AdamW with a learning rate per parameter: one adamw_step per group of parameters sharing a scale, over sub-dicts
    that hold the same arrays (the update is in place), then one shared step count."""
    groups = {}
    for k, s in scales.items():
        groups.setdefault(s, []).append(k)
    step = dispatch("adamw_step", next(iter(params.values())))
    for s, keys in groups.items():
        sub = AdamWState({k: state.m[k] for k in keys}, {k: state.v[k] for k in keys}, state.step)
        step({k: params[k] for k in keys}, {k: grads[k] for k in keys}, sub, lr * s, tc, grad_scale=grad_scale)
    state.step += 1


def _save_model(out, params, model, tc, vocab, names, reader, extra):
    meta = {"config": config_json(model, tc), "vocab": "\n".join(vocab), "labels": json.dumps(names),
            "reader": json.dumps(reader), **{k: json.dumps(v) for k, v in extra.items()}}
    ckpt.save_params(out / MODEL_FILE, params, meta)


def finetune(out_dir, data=None, task=None, dev=None, init=None, model=None, train=None, epochs=3, layer_decay=0.8,
             warmup_fraction=0.1, dev_fraction=0.1, reader=None, max_rows=None, model_overrides=None, cache_dir=None,
             progress=True, kind=None):
    """Fine-tune a classifier into out_dir; return a summary dict (best epoch, its validation metrics, times).

    kind: electra, mlm, scratch or lstm (see the module docstring); None: as init's objective, else scratch.
    init: a pre-training run folder (its discriminator, vocab and config are used), or None for a random init with a
    WordPiece vocab trained on the training texts (model: its ElectraConfig, the 'tiny' preset when None; for lstm,
    an LSTMConfig, the defaults when None).
    train: a TrainConfig whose learning_rate, batch_size, seq_len, seed, weight_decay, Adam settings and max_grad_norm
    are used (steps and warmup follow from epochs and warmup_fraction). dev: a labelled file; without one,
    dev_fraction of the training rows (chosen by the seed) are held out. max_rows: use only the first N training rows.
    model_overrides: ElectraConfig fields to change (e.g. dropout), also on top of an --init config.
    """
    t_begin = time.perf_counter()
    out = Path(out_dir)
    run = load_pretrained_run(init) if init is not None else None
    kind = resolve_kind(kind, init, run[2].objective if run else None)
    base_model, base_train = cfgmod.preset("tiny")
    tc = train or dataclasses.replace(base_train, learning_rate=DEFAULT_LR[kind], batch_size=32, seq_len=128)
    reader = reader or task_reader(task)
    if not epochs or epochs < 1:
        raise cfgmod.ConfigError(f"epochs must be at least 1, got {epochs}")
    if not 0.0 < layer_decay <= 1.0 or not 0.0 <= warmup_fraction < 1.0:
        raise cfgmod.ConfigError("layer_decay must be in (0, 1] and warmup_fraction in [0, 1)")

    train_path, dev_path = resolve_data(data, task, dev, cache_dir)
    rows = _read(train_path, reader)
    if max_rows is not None:
        rows = datamod.subset(rows, range(min(max_rows, len(rows.texts))))
    if dev_path is not None:
        dev_rows = _read(dev_path, reader)
    else:
        rows, dev_rows = datamod.split_labelled(rows, dev_fraction, tc.seed)
    names = datamod.build_label_map(rows.labels)
    reader = {**reader, "pairs": rows.pairs is not None}  # predict() must know whether to expect 'a<TAB>b'

    t0 = time.perf_counter()
    pre_params = run[0] if kind in ("electra", "mlm") else None  # scratch and lstm take only the run's vocab
    if run is not None:
        tok = WordPieceTokenizer(run[3])
    else:
        texts = rows.texts + (rows.pairs or [])
        tok = datamod.train_or_load_tokenizer(texts, (model or base_model).vocab_size, cache_dir)
    num_labels = len(names)
    if kind == "lstm":
        if model is not None and not isinstance(model, lstm_clf.LSTMConfig):
            raise TypeError(f"the lstm model takes an LSTMConfig, not a {type(model).__name__}")
        model = dataclasses.replace(model or lstm_clf.LSTMConfig(), vocab_size=tok.vocab_size)
        if model_overrides:
            model = cfgmod.override(model, model_overrides)
        model.validate()
        tc.validate()
        params = lstm_clf.init_classifier(model, num_labels, np.random.default_rng(tc.seed))
        scales = lstm_clf.layer_lr_scales(params)
    else:
        if run is not None:
            model = run[1]
        else:
            from minielectra.train import with_tokenizer

            model = with_tokenizer(model or base_model, tok)
        if model_overrides:
            model = cfgmod.override(model, model_overrides)
        model.validate()
        tc.validate(model)
        try:
            params = clf.init_classifier(model, num_labels, np.random.default_rng(tc.seed), init_params=pre_params)
        except ValueError as e:
            raise ckpt.CheckpointError(f"{init}: {e}") from None
        scales = clf.layer_lr_scales(params, model.num_hidden_layers, layer_decay)
    tr = encode(tok, rows, names, tc.seq_len)
    dv = encode(tok, dev_rows, names, tc.seq_len)
    n = len(tr.labels)
    lengths = tr.attention_mask.sum(axis=1)
    steps_per_epoch = -(-n // tc.batch_size)
    total = epochs * steps_per_epoch
    shards, threads = parallel.plan(tc.shards, tc.batch_size, backend.array_module())
    tc = dataclasses.replace(tc, steps=total, warmup_steps=int(round(warmup_fraction * total)), shards=shards)
    _log(f"data: {n} training and {len(dv.labels)} validation rows from {train_path}"
         f"{' and ' + str(dev_path) if dev_path else ' (held-out split)'}; labels {names}; "
         f"{'pairs' if rows.pairs is not None else 'single sentences'}, seq_len {tc.seq_len} "
         f"({time.perf_counter() - t0:.1f} s)")
    _log(f"model: {kind}, {'from ' + str(init) if pre_params is not None else 'random init'}, "
         f"{clf_params(params) / 1e6:.2f} M parameters, vocab {tok.vocab_size}; {epochs} epoch(s) x "
         f"{steps_per_epoch} steps of batch {tc.batch_size} in {shards} shard(s) on {threads} thread(s), "
         f"lr {tc.learning_rate:g} (warmup {tc.warmup_steps} steps"
         f"{', layer decay ' + str(layer_decay) if kind != 'lstm' else ''})")

    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / "vocab.txt")
    (out / "config.json").write_text(config_json(model, tc))
    (out / "labels.json").write_text(json.dumps(names) + "\n")
    (out / "metrics.jsonl").write_text("")

    from minielectra.train import _StopFlag, _place

    params, state = _place(params, adamw_init(params), backend.array_module())  # on the GPU under cupy
    xp = get_xp(*params.values())
    order_rng = np.random.default_rng(tc.seed + 1)
    dropout_rng = np.random.default_rng(tc.seed + 2)
    best = None
    history = []
    step = 0
    with _StopFlag() as stop, open(out / "metrics.jsonl", "a") as log:
        for epoch in range(1, epochs + 1):
            t_epoch = time.perf_counter()
            batches = length_batches(order_rng.permutation(n), lengths, tc.batch_size, order_rng)
            loss_sum = norm_sum = correct = seen = 0.0
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{epochs}", disable=not progress,
                       dynamic_ncols=True, unit="step", leave=False)
            for b in range(steps_per_epoch):
                rows_b = batches[b]
                ids, mask, types = _trim(tr.input_ids[rows_b], tr.attention_mask[rows_b], tr.token_type_ids[rows_b])
                labels = tr.labels[rows_b]
                loss, logits, grads = parallel.classifier_loss_and_grads(
                    _module(model), params, (ids, mask, types, labels), model, num_labels, dropout_rng, train=True,
                    shards=shards, threads=threads)
                norm, clip = dispatch("clip_scale", next(iter(params.values())))(grads, tc.max_grad_norm)
                device = on_device(norm)
                if not device:  # on the host the check is free, so a diverged step is caught before its update
                    _check_finite(loss, norm, f"epoch {epoch} step {b + 1}", out)
                _grouped_adamw(params, grads, state, learning_rate(step, tc), tc, scales, clip)
                step += 1
                loss_sum = loss_sum + loss * len(rows_b)
                norm_sum = norm_sum + norm
                correct = correct + (logits.argmax(axis=1) == xp.asarray(labels)).sum()
                seen += len(rows_b)
                stopping = stop.requested  # read once: a device run must bring its sums to the host before it stops
                if not device or (b + 1) % tc.log_every == 0 or b + 1 == steps_per_epoch or stopping:
                    # A device run's running sums cross to the host here, once per logging interval; a NaN anywhere
                    # in the interval makes its sum NaN. The best model on disk is never one saved after it.
                    sums = backend.host_values({"loss": loss_sum, "norm": norm_sum, "correct": correct})
                    if device:
                        _check_finite(sums["loss"], sums["norm"], f"epoch {epoch} by step {b + 1}", out)
                    loss_sum, correct = sums["loss"], float(sums["correct"])
                    bar.set_postfix_str(f"loss {loss_sum / seen:.4f} accuracy {correct / seen:.4f}")
                bar.update(1)
                if stopping:
                    break
            bar.close()
            val = _evaluate_encoded(params, model, num_labels, dv)
            record = {"epoch": epoch, "step": step, "loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1),
                      "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_f1": val["f1"],
                      "seconds": time.perf_counter() - t_epoch}
            improved = best is None or (record["val_accuracy"], -record["val_loss"]) > (best["val_accuracy"],
                                                                                       -best["val_loss"])
            if improved:
                best = record
                _save_model(out, params, model, tc, tok.vocab, names, reader,
                            {"epoch": epoch, "val_accuracy": val["accuracy"], "task": task, "model": kind})
            history.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            _log(f"epoch {epoch}/{epochs} - loss: {record['loss']:.4f} - accuracy: {record['accuracy']:.4f} - "
                 f"val_loss: {record['val_loss']:.4f} - val_accuracy: {record['val_accuracy']:.4f} - "
                 f"{record['seconds']:.1f} s" + (" - best, saved" if improved else ""))
            if stop.requested:
                _log(f"Ctrl-C: stopped in epoch {epoch}; the best model is in {out / MODEL_FILE}")
                break
    return {"out": str(out), "model": str(out / MODEL_FILE), "kind": kind, "best": best, "history": history,
            "labels": names, "train_rows": n, "val_rows": int(len(dv.labels)),
            "seconds": time.perf_counter() - t_begin}


def clf_params(params):
    return sum(int(np.prod(v.shape)) for v in params.values())


def summary_line(s):
    b = s["best"]
    return (f"best epoch {b['epoch']}: val_accuracy {b['val_accuracy']:.4f}, val_f1 {b['val_f1']:.4f}, val_loss "
            f"{b['val_loss']:.4f}; {s['train_rows']} training rows, {s['seconds']:.1f} s; model {s['model']}")


# ---- using a fine-tuned model ----------------------------------------------------------------------------------------


class Classifier(NamedTuple):
    params: dict
    config: object  # ElectraConfig, or LSTMConfig for the LSTM baseline
    tokenizer: WordPieceTokenizer
    labels: list  # label names in id order
    reader: dict  # how the training file was read
    seq_len: int
    kind: str  # electra, mlm, scratch or lstm; None for a model saved before the kind was recorded


def load_classifier(model_dir):
    """A fine-tuned model from its folder (or its model.safetensors)."""
    path = Path(model_dir)
    if path.is_dir():
        path = path / MODEL_FILE
    params, meta = ckpt.load_params(path)
    missing = [k for k in ("config", "vocab", "labels", "reader") if k not in meta]
    if missing:
        raise ckpt.CheckpointError(f"{path} is not a fine-tuned classifier (its metadata lacks {', '.join(missing)}): "
                                   "give the --out folder of `minielectra finetune`")
    model, tc = config_from_json(meta["config"])
    return Classifier(params, model, WordPieceTokenizer(meta["vocab"].split("\n")), json.loads(meta["labels"]),
                      json.loads(meta["reader"]), tc.seq_len, json.loads(meta.get("model", "null")))


def evaluate(model_dir, data, reader=None, batch_size=EVAL_BATCH):
    """Metrics of a fine-tuned model on a labelled file: n, accuracy, f1, loss, confusion, labels."""
    m = load_classifier(model_dir)
    rows = _read(data, reader or m.reader)
    enc = encode(m.tokenizer, rows, m.labels, m.seq_len)
    probs = clf.probabilities(predict_logits(m.params, m.config, len(m.labels), enc, batch_size))
    return {**classification_metrics(enc.labels, probs.argmax(axis=1), len(m.labels), probs), "labels": m.labels}


def format_evaluation(r):
    labels = r["labels"]
    f1_what = f"of the positive label {labels[1]!r}" if len(labels) == 2 else "macro average"
    width = max(max(len(s) for s in labels), len(str(max(max(row) for row in r["confusion"]))), 5)
    lines = [f"accuracy {r['accuracy']:.4f} on {r['n']} rows", f"F1 {r['f1']:.4f} ({f1_what})",
             f"loss {r['loss']:.4f}", "confusion matrix (rows: true label, columns: predicted label):",
             " " * width + "".join(f"  {s:>{width}}" for s in labels)]
    for name, row in zip(labels, r["confusion"]):
        lines.append(f"{name:>{width}}" + "".join(f"  {c:>{width}}" for c in row))
    return "\n".join(lines)


def predict(model, texts):
    """[(label, probability of that label, all probabilities)] per text; `model` a folder or a loaded Classifier.
    For a model trained on sentence pairs, each text is 'sentence a<TAB>sentence b'."""
    m = model if isinstance(model, Classifier) else load_classifier(model)
    texts = list(texts)
    if not texts:
        return []
    pairs = None
    if m.reader.get("pairs"):
        split = [t.split("\t", 1) for t in texts]
        bad = [i + 1 for i, s in enumerate(split) if len(s) != 2]
        if bad:
            raise datamod.DataError(f"this model classifies sentence pairs: give 'sentence a<TAB>sentence b' "
                                    f"(input(s) {bad[:10]} have no tab)")
        texts, pairs = [s[0] for s in split], [s[1] for s in split]
    ids, mask, types = datamod.encode_texts(m.tokenizer, texts, pairs, m.seq_len)
    probs = clf.probabilities(predict_logits(m.params, m.config, len(m.labels), Encoded(ids, mask, types, None)))
    return [(m.labels[int(p.argmax())], float(p.max()), p.tolist()) for p in probs]
