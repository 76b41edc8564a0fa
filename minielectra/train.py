"""The pre-training loop: data in, checkpoints, metrics and a plot out; resumable to the bit.

A run folder holds:
    checkpoint.safetensors   params, AdamW state, step, config, vocab, RNG and data-order state (atomic writes)
    config.json              the configs the run used, next to the checkpoint
    vocab.txt                the WordPiece vocabulary, in BERT's format
    metrics.jsonl            one JSON object per logged step, and one per evaluation
    curves.png               loss and accuracy curves, drawn at the end
"""

import dataclasses
import json
import math
import signal
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minielectra import checkpoint as ckpt
from minielectra import config as cfgmod
from minielectra import data as datamod
from minielectra import electra, mlm, parallel
from minielectra import backend
from minielectra.backend import dispatch, on_device
from minielectra.optim import adamw_init, flatten, learning_rate
from minielectra.tokenizer import WordPieceTokenizer

CHECKPOINT = "checkpoint.safetensors"
EVAL_BATCHES = 8  # held-out batches per evaluation: enough for a stable number, cheap next to training
# TrainConfig.objective -> the module with its init_model, forward and loss_and_grads (the same interface)
OBJECTIVES = {"electra": electra, "mlm": mlm}


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, say); the last good checkpoint is kept."""


def _log(msg):
    tqdm.write(msg)


def with_tokenizer(model, tok):
    """The model config with the vocab size and special-token ids of `tok` (a small corpus may give a smaller vocab)."""
    return dataclasses.replace(model, vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, cls_token_id=tok.cls_id,
                               sep_token_id=tok.sep_id, mask_token_id=tok.mask_id)


def evaluate(params, input_ids, attention_mask, model, batch_size, seed=0, objective="electra"):
    """Mean losses and metrics over up to EVAL_BATCHES held-out batches, dropout off, fixed masking seed."""
    rng = np.random.default_rng(seed)
    n = min(len(input_ids) // batch_size, EVAL_BATCHES) or 1
    totals = {}
    for i in range(n):
        rows = slice(i * batch_size, (i + 1) * batch_size)
        out = OBJECTIVES[objective].forward(params, (input_ids[rows], attention_mask[rows]), model, rng, train=False)
        for k, v in {**out.losses, **out.metrics}.items():
            totals[k] = totals.get(k, 0.0) + v / n
    return backend.host_values(totals)  # on a device: summed there, one transfer per evaluation


class _StopFlag:
    """Turns the first Ctrl-C into a request to stop after the current step (the params are never half-updated);
    a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        _log("Ctrl-C: saving a checkpoint after this step (press again to abort without saving)")

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)


def pretrain(out_dir, corpus=None, model=None, train=None, resume=False, vocab_path=None, stop_after=None,
             cache_dir=None, progress=True, max_minutes=None):
    """Pre-train ELECTRA (or, with train.objective 'mlm', a masked LM) into out_dir and return a summary dict.

    corpus: a text file, a folder of .txt files, a list of those (their documents together), or None for the
    built-in corpus. model/train: the configs (the 'tiny' preset when None). resume: continue from out_dir's
    checkpoint (its configs win; `train.steps` may be raised). stop_after: stop (with a checkpoint) after this many
    steps of this call, as a Ctrl-C would. max_minutes: the same, once this call's training loop has run this long
    (a wall-clock budget: the step that crosses it is finished and saved).
    """
    out = Path(out_dir)
    path = out / CHECKPOINT
    if resume:
        if not path.exists():
            raise ckpt.CheckpointError(f"--resume: there is no {path}; start without --resume")
        saved = ckpt.load_checkpoint(path)
        if "batches" not in saved.extra:  # e.g. a model imported from Hugging Face: weights, but no run to continue
            imported = saved.extra.get("imported", {}).get("architecture")
            raise ckpt.CheckpointError(f"--resume: {path} is not a pre-training run's checkpoint (no corpus position"
                                       f"{'; imported from Hugging Face as ' + imported if imported else ''}), so "
                                       "there is no run to continue: use it with finetune --init, detect or export-hf")
        model, saved_train = cfgmod.from_json(saved.config_json)
        train = dataclasses.replace(saved_train, steps=train.steps if train is not None else saved_train.steps)
        tok = WordPieceTokenizer(saved.vocab)
    else:
        base_model, base_train = cfgmod.preset("tiny")
        model, train = model or base_model, train or base_train
    model.validate()
    train.validate(model)

    if max_minutes is not None and not max_minutes > 0:
        raise cfgmod.ConfigError(f"max_minutes must be positive, got {max_minutes}")
    objective = OBJECTIVES[train.objective]

    t0 = time.perf_counter()
    if isinstance(corpus, (list, tuple)):
        docs = [doc for c in corpus for doc in datamod.load_corpus(c)]
    else:
        docs = datamod.load_corpus(corpus)
    if not resume:
        if vocab_path is not None:
            tok = WordPieceTokenizer.load(vocab_path)
        else:
            t1 = time.perf_counter()
            tok = datamod.train_or_load_tokenizer(docs, model.vocab_size, cache_dir)
            _log(f"WordPiece vocab of {tok.vocab_size} tokens, trained on this corpus or read from the cache "
                 f"({time.perf_counter() - t1:.1f} s)")
        model = with_tokenizer(model, tok).validate()
    ids = datamod.tokenize_corpus(docs, tok, cache_dir=cache_dir)
    input_ids, attention_mask = datamod.pack_sequences(ids, train.seq_len, tok.cls_id, tok.sep_id, tok.pad_id)
    (tr_ids, tr_mask), (ev_ids, ev_mask) = datamod.split_train_eval(input_ids, attention_mask, train.eval_fraction,
                                                                    train.seed)
    batches = datamod.Batches(tr_ids, tr_mask, train.batch_size, np.random.default_rng(train.seed + 1))
    _log(f"corpus: {len(docs)} documents, {sum(len(i) for i in ids):,} tokens -> {len(tr_ids)} training and "
         f"{len(ev_ids)} held-out sequences of {train.seq_len} ({time.perf_counter() - t0:.1f} s)")

    if resume:
        params, state, start = saved.params, saved.opt_state, saved.step
        rng = ckpt.restore_rng(saved.rng_state)
        batches.load_state_dict(saved.extra["batches"])
        _truncate_metrics(out / "metrics.jsonl", start)
        _log(f"resumed {path} at step {start} of {train.steps}")
    else:
        params = objective.init_model(model, np.random.default_rng(train.seed))
        state, start = adamw_init(params), 0
        rng = np.random.default_rng(train.seed + 2)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("")
    params, state = _place(params, state, backend.array_module())
    shards, threads = parallel.plan(train.shards, train.batch_size, backend.array_module())
    train = dataclasses.replace(train, shards=shards)  # saved with the run: a resumed run splits its batches alike
    tok.save(out / "vocab.txt")
    (out / "config.json").write_text(cfgmod.to_json(model, train))
    disc = sum(int(np.prod(v.shape)) for k, v in params.items() if k.startswith(electra.DISC))
    _log(f"model: {train.objective}, the encoder fine-tuning keeps {disc / 1e6:.2f} M parameters, all "
         f"{electra.count_params(params) / 1e6:.2f} M; steps {start} -> {train.steps}, batch {train.batch_size} x "
         f"{train.seq_len} in {shards} shard(s) on {threads} thread(s)")

    def save(step):
        ckpt.save_checkpoint(path, params, state, step, cfgmod.to_json(model, train), rng, vocab=tok.vocab,
                             extra={"batches": batches.state_dict()})

    end = train.steps if stop_after is None else min(train.steps, start + stop_after)
    first = last = None
    pending = []  # records whose device scalars have not crossed to the host yet
    tokens = 0
    t_start = time.perf_counter()
    bar = tqdm(total=end - start, initial=0, disable=not progress, dynamic_ncols=True, unit="step")
    deadline = None if max_minutes is None else t_start + 60.0 * max_minutes
    out_of_time = stopping = False
    with _StopFlag() as stop, open(out / "metrics.jsonl", "a") as log:
        step = start
        while step < end and not stopping:
            batch = next(batches)
            losses, metrics, grads, _ = parallel.loss_and_grads(objective, params, batch, model, rng, train=True,
                                                                shards=shards, threads=threads)
            norm, scale = dispatch("clip_scale", params[electra.WORDS])(grads, train.max_grad_norm)
            lr = learning_rate(step, train)
            record = {"step": step + 1, **losses, **metrics, "lr": lr, "grad_norm": norm}
            device = on_device(norm)
            if not device:  # on the host the check is free, so a diverged step is caught before its update
                _check_finite(record, path)
            dispatch("adamw_step", params[electra.WORDS])(params, grads, state, lr, train, grad_scale=scale)
            step += 1
            tokens += batch[0].size
            record["tokens_per_s"] = tokens / (time.perf_counter() - t_start)
            pending.append(record)
            out_of_time = deadline is not None and time.perf_counter() >= deadline
            # Read the Ctrl-C flag once per step: a request that lands after this line (its handler may run between
            # any two bytecodes) is seen by the next step, which saves; reading it again in the loop's test would
            # end the loop without a checkpoint.
            stopping = stop.requested or out_of_time
            checkpoint_now = step % train.checkpoint_every == 0 or step == end or stopping
            if not device or step % train.log_every == 0 or step == end or checkpoint_now:
                # A device run's losses, metrics and norms cross to the host here, the interval's all at once, and
                # are checked before any checkpoint is written: a diverged step has updated the params in memory,
                # but the last good checkpoint stays as it is.
                for record in _host_records(pending):
                    _check_finite(record, path)
                    first = first or record
                    last = record
                    if record["step"] % train.log_every == 0 or record["step"] == end:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                pending = []
                bar.set_postfix_str(_postfix(last, {}) + f" {last['tokens_per_s']:,.0f} tok/s")
            bar.update(1)
            if checkpoint_now:
                ev = (evaluate(params, ev_ids, ev_mask, model, train.batch_size, objective=train.objective)
                      if len(ev_ids) else {})
                if ev:
                    log.write(json.dumps({"step": step, **{f"eval_{k}": v for k, v in ev.items()}}) + "\n")
                    log.flush()
                save(step)
    bar.close()
    if out_of_time:
        _log(f"the {max_minutes:g}-minute budget is spent: stopped at step {step} with a checkpoint")
    summary = {"out": str(out), "step": step, "steps": train.steps, "finished": step >= train.steps,
               "first": first, "last": last, "checkpoint": str(path), "objective": train.objective,
               "start_step": start, "seconds": time.perf_counter() - t_start}
    if last is not None:
        summary["plot"] = str(plot_curves(out / "metrics.jsonl", out / "curves.png"))
    return summary


def _place(params, state, xp):
    """Params and AdamW moments in the array module `xp` (a copy to the GPU for cupy), as views of one buffer each
    (optim.flatten: the step's sum of the shards' gradients, clipping and update then run on whole buffers)."""
    params = {k: xp.asarray(v) for k, v in params.items()}
    state.m = {k: xp.asarray(v) for k, v in state.m.items()}
    state.v = {k: xp.asarray(v) for k, v in state.v.items()}
    return flatten(params, state)


def _host_records(records):
    """The records with their 0-d device arrays (losses, metrics, gradient norm) as floats, in one transfer."""
    flat = backend.host_values({(i, k): v for i, r in enumerate(records) for k, v in r.items()})
    return [{k: flat[i, k] for k in r} for i, r in enumerate(records)]


def _check_finite(record, path):
    if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
        raise TrainingError(
            f"step {record['step'] - 1}: the loss is {record['loss']} and the gradient norm {record['grad_norm']}; "
            f"training has diverged. The last good checkpoint is kept in {path}: lower --lr or raise warmup_steps and "
            "resume or restart")


def _truncate_metrics(path, step):
    """Drop metric lines after the checkpoint's step: a resumed run logs them again."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def read_metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def _postfix(losses, metrics):
    """The progress bar's numbers: ELECTRA's loss, mlm, rtd, gen and disc accuracy; an MLM run's loss and accuracy."""
    names = (("loss", "loss"), ("mlm_loss", "mlm"), ("rtd_loss", "rtd"), ("gen_acc", "gen"), ("disc_acc", "disc"),
             ("mlm_acc", "acc"))
    values = {**losses, **metrics}
    return " ".join(f"{short} {values[k]:.3f}" for k, short in names if k in values)


def plot_curves(metrics_path, png_path):
    """Loss curves (total, MLM, RTD) and accuracies (generator, discriminator; an MLM run's accuracy), training and
    held-out, as a PNG. Curves a run does not log are left out."""
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    electra_run = any("rtd_loss" in r for r in train_rows)
    for ax, keys, title in ((axes[0], ("loss",), "loss = mlm + 50 rtd" if electra_run else "loss = mlm"),
                            (axes[1], ("mlm_loss", "rtd_loss"), "losses"),
                            (axes[2], ("gen_acc", "disc_acc", "mlm_acc"), "accuracy")):
        for k in (k for k in keys if train_rows and k in train_rows[0]):
            ax.plot([r["step"] for r in train_rows], [r[k] for r in train_rows], label=f"train {k}")
            if eval_rows:
                ax.plot([r["step"] for r in eval_rows], [r[f"eval_{k}"] for r in eval_rows], "o--", label=f"held-out {k}")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def summary_line(s):
    """One line on what was learned, from pretrain's summary."""
    f, l = s["first"], s["last"]
    if l is None:
        return f"nothing to do: {s['out']} is already at step {s['step']} of {s['steps']}"
    state = "finished" if s["finished"] else f"stopped at step {s['step']} of {s['steps']} (resume with --resume)"
    if "rtd_loss" not in l:  # a masked-LM run
        return (f"{state}: masked-LM loss {f['loss']:.2f} -> {l['loss']:.2f}; accuracy at the masked positions "
                f"{100 * l['mlm_acc']:.1f} %; {l['tokens_per_s']:,.0f} tokens/s; checkpoint {s['checkpoint']}, plot "
                f"{s.get('plot')}")
    return (f"{state}: loss {f['loss']:.2f} -> {l['loss']:.2f} (mlm {f['mlm_loss']:.2f} -> {l['mlm_loss']:.2f}, "
            f"rtd {f['rtd_loss']:.3f} -> {l['rtd_loss']:.3f}); generator accuracy {100 * l['gen_acc']:.1f} %, "
            f"discriminator accuracy {100 * l['disc_acc']:.1f} % (replaced-token precision "
            f"{100 * l['disc_precision']:.1f} %, recall {100 * l['disc_recall']:.1f} %); "
            f"{l['tokens_per_s']:,.0f} tokens/s; checkpoint {s['checkpoint']}, plot {s.get('plot')}")
