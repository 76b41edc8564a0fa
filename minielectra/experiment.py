"""`minielectra experiment electra-vs-mlm`: the paper's headline claim at laptop scale, end to end.

ELECTRA's claim (Clark et al. 2020, Table 1 and Figure 3): at the same pre-training compute, replaced-token detection
learns a better encoder than masked-LM pre-training, because it learns from every token instead of the 15 % that were
masked. The experiment:

1. data: the labelled file is split once, 90 % training and 10 % held out (seed 0), into OUT/data/train.tsv and
   dev.tsv. Every model and seed is fine-tuned on the same 90 % and scored on the same 10 %. With --corpus-from-data the
   training part's sentences (never the held-out ones) are added to the unlabelled pre-training text
   (OUT/data/unlabelled.txt), as the issue asks for SST-2's sentences next to the movie reviews.
2. pre-training: `electra`, then `mlm` (or both at once, one process each with --only), each for the same wall-clock
   budget on the same corpus with the same encoder and the same WordPiece vocab. A short calibration times each
   objective's step first, so that the learning-rate schedule (warmup, then linear decay) is planned to end when the
   budget does; pretrain's max_minutes is the hard stop.
   Each run reports the model FLOPs it actually used: its steps x its step's FLOPs (bench.model_flops, mlm.model_flops).
3. fine-tuning: electra, mlm, scratch (the same encoder, random init, the same vocab) and lstm (embedding -> LSTM ->
   dense, the same vocab), each with seeds 0 .. S-1 (the seed sets the head's init, dropout and the data order),
   the same epochs and (with --finetune-lr) one peak learning rate for all four.
4. OUT/results.md (the table), OUT/results.png (mean accuracy, standard-deviation error bars), OUT/results.json.

Accuracy is the best epoch's accuracy on the held-out 10 % (finetune keeps the best epoch, as GLUE dev results are
reported); std is the sample standard deviation over the seeds (ddof 1). The same epoch is also scored on the unseen
rows, the held-out rows whose sentence appears nowhere word for word inside a training row (OUT/data/dev-unseen.tsv,
prepare_unseen): SST-2's training file holds every sub-phrase of its parsed sentences, so most of a random held-out
split can be answered from memory, and only the unseen rows measure reading new text.

Every stage writes a record when it completes (OUT/pretrain-<objective>/stage.json, OUT/finetune/<model>-seed<s>/
result.json) and a rerun skips the stages that have one, so an interrupted experiment continues where it stopped.
A stage that was interrupted is run again from its start.
"""

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minielectra import backend, bench
from minielectra import config as cfgmod
from minielectra import data as datamod
from minielectra import finetune as ft
from minielectra import mlm, parallel, train as trainmod
from minielectra.backend import dispatch
from minielectra.optim import adamw_init, learning_rate

EXPERIMENTS = ("electra-vs-mlm",)
OBJECTIVES = ("electra", "mlm")
MODELS = ("electra", "mlm", "scratch", "lstm")
FLOPS = {"electra": bench.model_flops, "mlm": mlm.model_flops}  # model FLOPs of one step, DESIGN.md's formula
CALIBRATION_STEPS = 10  # timed steps per objective (median), after 2 untimed ones (Numba compiles on the first)
SCHEDULE_SHARE = 0.97  # of the budget the planned steps fill: evaluation, checkpoints and batching take the rest
DEV_FRACTION = 0.1
SPLIT_SEED = 0


def _log(msg):
    tqdm.write(msg)


# ---- 1. data ---------------------------------------------------------------------------------------------------------


def _clean(text):
    """One TSV field: no tab or line break inside (GLUE's TSVs are read with quoting off)."""
    return " ".join(text.split())


def _write_tsv(path, rows: datamod.LabelledData):
    header = "sentence1\tsentence2\tlabel" if rows.pairs is not None else "sentence\tlabel"
    lines = [header]
    for i, (text, label) in enumerate(zip(rows.texts, rows.labels)):
        fields = [text] + ([rows.pairs[i]] if rows.pairs is not None else []) + [label]
        lines.append("\t".join(_clean(f) for f in fields))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a half-written split is never mistaken for a finished one


def prepare_data(out, data, max_rows=None, reader=None):
    """(train.tsv, dev.tsv, unlabelled.txt) under OUT/data, written once and reused on a rerun."""
    folder = Path(out) / "data"
    paths = folder / "train.tsv", folder / "dev.tsv", folder / "unlabelled.txt"
    if all(p.exists() for p in paths):
        return paths
    reader = reader or ft.task_reader(None)
    train_path, _ = ft.resolve_data(data)
    rows = ft._read(train_path, reader)
    if max_rows is not None:
        rows = datamod.subset(rows, range(min(max_rows, len(rows.texts))))
    train_rows, dev_rows = datamod.split_labelled(rows, DEV_FRACTION, SPLIT_SEED)
    folder.mkdir(parents=True, exist_ok=True)
    _write_tsv(paths[0], train_rows)
    _write_tsv(paths[1], dev_rows)
    texts = train_rows.texts + (train_rows.pairs or [])
    paths[2].write_text("\n\n".join(_clean(t) for t in texts if t.strip()) + "\n", encoding="utf-8")
    return paths


def prepare_unseen(out, reader=None):
    """OUT/data/dev-unseen.tsv: the held-out rows whose sentence does not appear, word for word, inside any training
    row; None for sentence-pair data. SST-2's training file holds every sub-phrase of its parsed sentences, so most
    held-out rows can be answered by remembering a training row: accuracy on these is accuracy on new text."""
    folder = Path(out) / "data"
    path = folder / "dev-unseen.tsv"
    if path.exists():
        return path
    reader = reader or ft.task_reader(None)
    train_rows, dev_rows = (ft._read(folder / name, reader) for name in ("train.tsv", "dev.tsv"))
    if dev_rows.pairs is not None:
        return None
    # Each training row padded with spaces, one per line: " s " inside it is a match on word boundaries, and no match
    # can run across two rows, as the pattern holds no line break.
    seen = "\n".join(f" {_clean(t)} " for t in train_rows.texts)
    keep = [i for i, t in enumerate(dev_rows.texts) if f" {_clean(t)} " not in seen]
    if not keep:
        return None
    _write_tsv(path, datamod.subset(dev_rows, keep))
    return path


# ---- 2. pre-training -------------------------------------------------------------------------------------------------


def seconds_per_step(model, tc, steps=CALIBRATION_STEPS):
    """The median wall-clock seconds of one full training step (forward, backward, clipping, AdamW) of the
    objective tc.objective, on a random batch of full-length sequences (as the packed corpus gives)."""
    module = trainmod.OBJECTIVES[tc.objective]
    xp = backend.array_module()  # where pretrain keeps the params: the GPU under cupy
    params = module.init_model(model, np.random.default_rng(0))
    params, state = trainmod._place(params, adamw_init(params), xp)
    rng = np.random.default_rng(1)
    ids = rng.integers(5, model.vocab_size, (tc.batch_size, tc.seq_len))
    ids[:, 0], ids[:, -1] = model.cls_token_id, model.sep_token_id
    batch = ids, np.ones_like(ids)
    update = dispatch("adamw_step", next(iter(params.values())))
    clip_scale = dispatch("clip_scale", next(iter(params.values())))
    shards, threads = parallel.plan(tc.shards, tc.batch_size, xp)

    def step():
        _, _, grads, _ = parallel.loss_and_grads(module, params, batch, model, rng, train=True, shards=shards,
                                                 threads=threads)
        _, scale = clip_scale(grads, tc.max_grad_norm)
        update(params, grads, state, learning_rate(0, tc), tc, grad_scale=scale)
        backend.synchronize(xp)  # a GPU step is timed to its end, not to its last launch

    return bench.time_calls(step, steps, warmup=2)[0]


def plan_steps(budget_minutes, step_seconds, base_train):
    """(steps, warmup_steps): the steps that fill SCHEDULE_SHARE of the budget, warmup in the preset's proportion."""
    steps = max(1, int(SCHEDULE_SHARE * 60.0 * budget_minutes / step_seconds))
    warmup = int(round(steps * base_train.warmup_steps / max(base_train.steps, 1)))
    return steps, warmup


def pretrain_stage(out, objective, corpora, model, base_train, budget_minutes, progress=True, cache_dir=None):
    """Pre-train one objective for the budget into OUT/pretrain-<objective>; its record (from stage.json if done)."""
    run = Path(out) / f"pretrain-{objective}"
    record_path = run / "stage.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        _log(f"pretrain {objective}: done before ({record['steps']} steps, {record['minutes']:.1f} min), skipped")
        return record
    tc = dataclasses.replace(base_train, objective=objective)
    tc.validate(model)
    step_s = seconds_per_step(model, tc)
    steps, warmup = plan_steps(budget_minutes, step_s, base_train)
    tc = dataclasses.replace(tc, steps=steps, warmup_steps=warmup)
    _log(f"pretrain {objective}: {step_s:.3f} s per step -> {steps} steps (warmup {warmup}) in {budget_minutes:g} min")
    t0 = time.perf_counter()
    s = trainmod.pretrain(run, corpus=list(corpora), model=model, train=tc, max_minutes=budget_minutes,
                          progress=progress, cache_dir=cache_dir)
    _log(trainmod.summary_line(s))
    saved = ft.load_pretrained_run(run)[1]  # the config with the tokenizer's vocab size, which FLOPs depend on
    per_step = FLOPS[objective](saved, tc.batch_size, tc.seq_len)
    record = {"objective": objective, "steps": s["step"], "planned_steps": steps, "seconds_per_step": step_s,
              "minutes": s["seconds"] / 60.0, "stage_minutes": (time.perf_counter() - t0) / 60.0,
              "flops_per_step": per_step, "flops": per_step * s["step"], "machine": _machine(),
              "last": s["last"]}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


# ---- 3. fine-tuning --------------------------------------------------------------------------------------------------


def finetune_stage(out, kind, seed, train_tsv, dev_tsv, init, seq_len, epochs, progress=True, cache_dir=None,
                   unseen_tsv=None, lr=None):
    """Fine-tune one model with one seed into OUT/finetune/<kind>-seed<seed>; its record (from result.json if done).
    The kept (best) epoch is also scored on unseen_tsv, when given (see prepare_unseen). lr: the peak learning rate,
    None for finetune's default for the kind."""
    folder = Path(out) / "finetune" / f"{kind}-seed{seed}"
    record_path = folder / "result.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        _log(f"finetune {kind} seed {seed}: done before (accuracy {100 * record['accuracy']:.2f} %), skipped")
        return record
    _, base = cfgmod.preset("tiny")
    lr = ft.DEFAULT_LR[kind] if lr is None else lr
    tc = dataclasses.replace(base, learning_rate=lr, batch_size=32, seq_len=seq_len, seed=seed)
    s = ft.finetune(folder, data=train_tsv, dev=dev_tsv, init=init, train=tc, epochs=epochs, kind=kind,
                    progress=progress, cache_dir=cache_dir)
    record = {"model": kind, "seed": seed, "lr": lr, "accuracy": s["best"]["val_accuracy"], "epoch": s["best"]["epoch"],
              "last_accuracy": s["history"][-1]["val_accuracy"], "minutes": s["seconds"] / 60.0,
              "train_rows": s["train_rows"], "val_rows": s["val_rows"]}
    if unseen_tsv is not None:
        unseen = ft.evaluate(folder, unseen_tsv)
        record.update(unseen_accuracy=unseen["accuracy"], unseen_rows=unseen["n"])
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    _log(f"finetune {kind} seed {seed}: accuracy {100 * record['accuracy']:.2f} % (epoch {record['epoch']}), "
         f"{record['minutes']:.1f} min")
    return record


# ---- 4. results ------------------------------------------------------------------------------------------------------


def _mean_std(values):
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(pretrained, finetuned):
    """One row per model: mean and std accuracy over the seeds, per-seed accuracies, the same on the unseen rows
    (when scored), pre-training FLOPs and minutes (None for the models that were not pre-trained), mean fine-tuning
    minutes."""
    rows = []
    for kind in MODELS:
        runs = sorted((r for r in finetuned if r["model"] == kind), key=lambda r: r["seed"])
        if not runs:
            continue
        acc = [r["accuracy"] for r in runs]
        pre = pretrained.get(kind)
        mean, std = _mean_std(acc)
        unseen = [r["unseen_accuracy"] for r in runs if "unseen_accuracy" in r]
        if unseen:
            unseen_mean, unseen_std = _mean_std(unseen)
            unseen = {"unseen_mean": unseen_mean, "unseen_std": unseen_std, "unseen_rows": runs[0]["unseen_rows"]}
        rows.append({"model": kind, "mean": mean, "std": std, **(unseen or {}),
                     "accuracies": acc, "seeds": [r["seed"] for r in runs],
                     "pretrain_flops": pre["flops"] if pre else None,
                     "pretrain_steps": pre["steps"] if pre else None,
                     "pretrain_minutes": pre["minutes"] if pre else None,
                     "finetune_minutes": statistics.fmean(r["minutes"] for r in runs)})
    return rows


def format_table(rows):
    unseen = all("unseen_mean" in r for r in rows)
    lines = ["| model | accuracy (mean ± std) | " + ("on unseen rows | " if unseen else "")
             + "pre-training FLOPs | pre-training steps | pre-training minutes | fine-tuning minutes (per seed) | "
             "accuracy per seed |",
             "|---|---|---|---|---|---|---|" + ("---|" if unseen else "")]
    for r in rows:
        if r["pretrain_flops"] is None:
            pre = "- | - | -"
        else:
            pre = f"{r['pretrain_flops']:.3g} | {r['pretrain_steps']} | {r['pretrain_minutes']:.2f}"
        per_seed = ", ".join(f"{100 * a:.2f}" for a in r["accuracies"])
        on_unseen = f"{100 * r['unseen_mean']:.2f} ± {100 * r['unseen_std']:.2f} % | " if unseen else ""
        lines.append(f"| {r['model']} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} % | {on_unseen}{pre} | "
                     f"{r['finetune_minutes']:.2f} | {per_seed} |")
    return "\n".join(lines)


def ordering_line(rows, prefix=""):
    """Whether electra > mlm > scratch holds with gaps of more than one standard deviation (the larger of the two);
    prefix "unseen_" asks it of the accuracies on the unseen rows."""
    by = {r["model"]: r for r in rows}
    mean, std = prefix + "mean", prefix + "std"
    parts = []
    for a, b in (("electra", "mlm"), ("mlm", "scratch")):
        if a in by and b in by and mean in by[a] and mean in by[b]:
            gap, sd = by[a][mean] - by[b][mean], max(by[a][std], by[b][std])
            verdict = "yes" if gap > sd else "no"
            parts.append(f"{a} - {b} = {100 * gap:+.2f} points (larger std {100 * sd:.2f}): more than one std? "
                         f"{verdict}")
    return "; ".join(parts)


def write_markdown(path, rows, info):
    text = [f"# {info['experiment']}: ELECTRA vs masked-LM pre-training at equal wall-clock time", "",
            f"Pre-training: {', '.join(info['corpora'])}; {info['budget_minutes']:g} minutes per objective "
            f"({'; '.join(f'{o} on {m}' for o, m in info['pretrain_machines'].items())}), config {info['config']}.",
            f"Fine-tuning: {info['data']} ({info['train_rows']} training rows; accuracy on {info['val_rows']} "
            f"held-out rows, a fixed 10 % split), {info['epochs']} epoch(s), peak learning rate {_lr_text(info)}, "
            f"seeds {info['seeds']}.", "",
            format_table(rows), "",
            "Accuracy: the best epoch's, on the held-out split; ± is the sample standard deviation over the seeds. "
            "Pre-training FLOPs: model FLOPs (DESIGN.md) of the steps each objective completed in its budget. "
            "scratch: the same encoder and vocab, random init; lstm: embedding -> LSTM -> dense, the same vocab.", "",
            "On all held-out rows: " + ordering_line(rows), ""]
    if all("unseen_mean" in r for r in rows):
        text[-1:] = ["", f"Unseen rows: the {rows[0]['unseen_rows']} held-out rows whose sentence does not appear word "
                     "for word inside any training row (the same best epoch, scored on them).", "",
                     "On the unseen rows: " + ordering_line(rows, "unseen_"), ""]
    Path(path).write_text("\n".join(text), encoding="utf-8")


def _lr_text(info):
    lr = info["finetune_lr"]
    if lr is not None:
        return f"{lr:g} for every model"
    return ", ".join(f"{ft.DEFAULT_LR[m]:g} ({m})" for m in MODELS)


def plot_results(path, rows, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = [r["model"] for r in rows]
    means = [100 * r["mean"] for r in rows]
    stds = [100 * r["std"] for r in rows]
    bars = ax.bar(names, means, yerr=stds, capsize=6, color=["C0", "C1", "C2", "C3"][:len(rows)])
    for bar, m, sd in zip(bars, means, stds):
        ax.annotate(f"{m:.1f}", (bar.get_x() + bar.get_width() / 2, m + sd), xytext=(0, 4), textcoords="offset points",
                    ha="center")  # above the error bar
    low = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(max(0.0, math.floor(low / 5) * 5 - 5), 100)  # the differences matter, not the distance from 0
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- the whole experiment --------------------------------------------------------------------------------------------


def run(out, corpora, data, budget_minutes, seeds=3, corpus_from_data=False, model=None, train=None, epochs=3,
        max_rows=None, config_name="tiny", progress=True, cache_dir=None, only=None, finetune_lr=None):
    """Run (or continue) the experiment into `out`; returns (rows, markdown path, png path).

    finetune_lr: one peak learning rate for fine-tuning all four models; None: each model's finetune default
    (ELECTRA-Small's 3e-4 for the encoders, 1e-3 for the lstm).

    only: an objective ("electra" or "mlm"): prepare the data, pre-train that objective alone and return its stage
    record. Two processes, one per objective, pre-train both at the same time (on a machine with the cores for it);
    a later call without `only` finds both stages done and goes on with the fine-tuning.
    """
    if only is not None and only not in OBJECTIVES:
        raise cfgmod.ConfigError(f"--only must be one of {', '.join(OBJECTIVES)}, got {only!r}")
    if not budget_minutes or budget_minutes <= 0:
        raise cfgmod.ConfigError(f"--budget-minutes must be positive, got {budget_minutes}")
    if seeds < 1 or epochs < 1:
        raise cfgmod.ConfigError(f"--seeds and --epochs must be at least 1, got {seeds} and {epochs}")
    if finetune_lr is not None and not finetune_lr > 0:
        raise cfgmod.ConfigError(f"--finetune-lr must be positive, got {finetune_lr}")
    corpora = [str(c) for c in corpora or []]
    if not corpora and not corpus_from_data:
        raise cfgmod.ConfigError("no pre-training text: give --corpus PATH (repeatable) and/or --corpus-from-data")
    preset_model, preset_train = cfgmod.preset("tiny")
    model = (model or preset_model).validate()
    base_train = (train or preset_train).validate(model)
    out = Path(out)
    _check_settings(out, {"corpora": corpora, "corpus_from_data": corpus_from_data, "data": str(data),
                          "max_rows": max_rows, "budget_minutes": budget_minutes, "epochs": epochs,
                          "finetune_lr": finetune_lr,
                          "config": json.loads(cfgmod.to_json(model, base_train))})
    t0 = time.perf_counter()

    train_tsv, dev_tsv, unlabelled = prepare_data(out, data, max_rows)
    if corpus_from_data:
        corpora.append(str(unlabelled))
    _log(f"data: {train_tsv} and {dev_tsv} (a fixed {DEV_FRACTION:.0%} split); pre-training text: "
         f"{', '.join(corpora)}")

    if only is not None:
        return pretrain_stage(out, only, corpora, model, base_train, budget_minutes, progress, cache_dir)
    pretrained = {o: pretrain_stage(out, o, corpora, model, base_train, budget_minutes, progress, cache_dir)
                  for o in OBJECTIVES}
    unseen_tsv = prepare_unseen(out)
    finetuned = []
    for kind in MODELS:
        # electra and mlm fine-tune their run's encoder; scratch and lstm take the electra run's vocab (and scratch its
        # config), so that all four read the same tokens
        init = out / f"pretrain-{'mlm' if kind == 'mlm' else 'electra'}"
        finetuned += [finetune_stage(out, kind, seed, train_tsv, dev_tsv, init, base_train.seq_len, epochs, progress,
                                     cache_dir, unseen_tsv, finetune_lr) for seed in range(seeds)]

    rows = summarise(pretrained, finetuned)
    info = {"experiment": "electra-vs-mlm", "corpora": corpora, "budget_minutes": budget_minutes,
            "machine": _machine(), "pretrain_machines": {o: r["machine"] for o, r in pretrained.items()},
            "config": config_name, "data": str(data), "train_rows": finetuned[0]["train_rows"],
            "val_rows": finetuned[0]["val_rows"], "epochs": epochs, "seeds": f"0..{seeds - 1}",
            "finetune_lr": finetune_lr}
    md = out / "results.md"
    write_markdown(md, rows, info)
    png = plot_results(out / "results.png", rows, f"after {budget_minutes:g} min of pre-training per objective")
    (out / "results.json").write_text(json.dumps({"info": info, "rows": rows, "pretrain": pretrained,
                                                  "finetune": finetuned}, indent=2) + "\n")
    _log(f"experiment: {(time.perf_counter() - t0) / 60:.1f} min in this call")
    return rows, md, png


def _check_settings(out, settings):
    """Record the settings in OUT/experiment.json, or check that a rerun uses the recorded ones: the stages it would
    skip were computed with those (only --seeds may change, to add seeds)."""
    path = out / "experiment.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise cfgmod.ConfigError(f"{out} holds an experiment run with other settings ({', '.join(changed)} "
                                     "differ): rerun with the same ones to continue it, or give another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def _machine():
    return f"{parallel.cores()} CPU core(s), backend {backend.active_backend()}"
