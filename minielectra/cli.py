"""The `minielectra` command (also `python -m minielectra`): pretrain, finetune, evaluate, predict, detect, bench, ...

Subcommands: pretrain, finetune, evaluate, predict, detect, experiment, gradcheck, bench, import-hf, export-hf.

Every command takes --backend (numpy | numba | cupy | auto; default $MINIELECTRA_BACKEND, else auto: the GPU if
CuPy sees one, else the Numba kernels if installed, else the NumPy reference) and prints the active backend first. Errors the user can fix (a bad config, a missing file, a corrupted checkpoint) are printed as
one line and exit with status 2, never as a traceback.
"""

import argparse
import os
import sys

from minielectra import allocator, backend, config as cfgmod

# Shortcut flags for the training fields people change most; any other field goes through --set NAME=VALUE.
_TRAIN_FLAGS = {"steps": int, "batch": ("batch_size", int), "seq": ("seq_len", int), "lr": ("learning_rate", float),
                "objective": str,
                "warmup": ("warmup_steps", int), "seed": int, "log_every": int, "checkpoint_every": int,
                "shards": int}


def _add_backend(p):
    p.add_argument("--backend", choices=backend.BACKENDS, default=None,
                   help="array backend: numpy reference, numba CPU kernels, cupy GPU kernels, or auto")
    p.add_argument("--tf32", action="store_true",
                   help="cupy backend only: float32 GEMMs on TF32 tensor cores (faster, ~1e-3 relative error)")


def _configs(args):
    """(ElectraConfig, TrainConfig) from --config (a preset name or a JSON file), then --set and the shortcut flags."""
    if args.config.endswith(".json"):
        try:
            text = open(args.config, encoding="utf-8").read()
        except OSError as e:
            raise cfgmod.ConfigError(f"cannot read config file {args.config}: {e.strerror}") from None
        model, train = cfgmod.from_json(text)
    else:
        model, train = cfgmod.preset(args.config)
    model_values, train_values = {}, {}
    model_fields = {f for f in cfgmod.ElectraConfig.__dataclass_fields__}
    train_fields = {f for f in cfgmod.TrainConfig.__dataclass_fields__}
    for item in args.set or []:
        name, eq, value = item.partition("=")
        if not eq:
            raise cfgmod.ConfigError(f"--set takes NAME=VALUE, got {item!r}")
        if name in model_fields:
            model_values[name] = value
        elif name in train_fields:
            train_values[name] = value
        else:
            raise cfgmod.ConfigError(f"--set {name}: no such config field; model fields: {', '.join(sorted(model_fields))}; "
                                     f"training fields: {', '.join(sorted(train_fields))}")
    for flag, spec in _TRAIN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            field = spec[0] if isinstance(spec, tuple) else flag
            train_values[field] = value
    model = cfgmod.override(model, model_values)
    train = cfgmod.override(train, train_values)
    return model.validate(), train.validate(model)


def _add_config_flags(p):
    p.add_argument("--config", default="tiny", help="preset (tiny, small) or a JSON file from config.to_json")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="override any config field (repeatable)")
    for flag, spec in _TRAIN_FLAGS.items():
        kind = spec[1] if isinstance(spec, tuple) else spec
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, default=None)


def cmd_pretrain(args):
    from minielectra import train

    model, tc = _configs(args)
    if args.resume:  # the run's saved configs win; only an explicit --steps extends (or shortens) it
        model, tc = None, (tc if args.steps is not None else None)
    summary = train.pretrain(args.out, corpus=args.corpus, model=model, train=tc, resume=args.resume,
                             vocab_path=args.vocab, stop_after=args.stop_after, max_minutes=args.max_minutes)
    print(train.summary_line(summary))
    return 0


def cmd_experiment(args):
    from minielectra import experiment

    model, tc = _configs(args)
    result = experiment.run(args.out, args.corpus, args.data, args.budget_minutes, seeds=args.seeds,
                            corpus_from_data=args.corpus_from_data, model=model, train=tc, epochs=args.epochs,
                            max_rows=args.max_rows, only=args.only, finetune_lr=args.finetune_lr,
                            config_name=" ".join([args.config, *(f"--set {s}" for s in args.set or [])]))
    if args.only:
        print(f"pre-trained {args.only}: {result['steps']} steps in {result['minutes']:.1f} min; run again without "
              "--only once every objective is done")
        return 0
    rows, md, png = result
    print(experiment.format_table(rows))
    print("On all held-out rows: " + experiment.ordering_line(rows))
    if all("unseen_mean" in r for r in rows):
        print("On the unseen rows: " + experiment.ordering_line(rows, "unseen_"))
    print(f"written: {md}, {png}")
    return 0


def cmd_gradcheck(args):
    from minielectra.gradcheck import run_report

    return 0 if run_report() else 1


def cmd_bench(args):
    from minielectra import bench

    model, tc = _configs(args)
    batch, seq = tc.batch_size, tc.seq_len
    if args.vs_numpy and backend.active_backend() != "numba":
        raise cfgmod.ConfigError(f"--vs-numpy compares the numba kernels with the numpy reference; this run uses the "
                                 f"{backend.active_backend()} backend: add --backend numba")
    if args.ops:
        print(f"per-op times at the step's shapes (batch {batch}, seq {seq}), median of 10 calls:")
        print(bench.format_ops(bench.bench_ops(model, tc, batch, seq)))
    result = bench.bench_step(model, tc, batch, seq, steps=args.bench_steps, warmup=args.bench_warmup)
    print(bench.format_step(result))
    if args.vs_numpy:
        result["vs_numpy"] = bench.compare_backends(model, tc, batch, seq, steps=args.bench_steps,
                                                    warmup=args.bench_warmup)
        print(bench.format_backends(result["vs_numpy"]))
    if args.vs_torch:
        from minielectra import bench_torch

        result["vs_torch"] = bench_torch.compare(model, tc, batch, seq, steps=args.bench_steps,
                                                 warmup=args.bench_warmup)
        print(bench_torch.format_comparison(result["vs_torch"]))
    if args.json:
        print(bench.to_json_line(result))
    return 0


def _add_reader_flags(p):
    p.add_argument("--format", default=None, choices=("auto", "tsv", "csv", "plain"),
                   help="tsv: GLUE-style with a header; csv: with a header, CSV quoting; plain: label<TAB>text lines")
    p.add_argument("--text-column", default=None, help="column (header name or 0-based index) of the text")
    p.add_argument("--pair-column", default=None, help="column of the second sentence, for sentence pairs")
    p.add_argument("--label-column", default=None, help="column of the label (default 'label')")


def _reader(args):
    """Reader settings from the flags; None when none is given (then: the task's layout, or the model's saved one)."""
    given = {k: getattr(args, k) for k in ("format", "text_column", "pair_column", "label_column")}
    if all(v is None for v in given.values()):
        return None
    return {**given, "format": given["format"] or "auto"}


def cmd_finetune(args):
    from minielectra import finetune
    from minielectra.lstm_classifier import LSTMConfig

    lstm_model = None
    if args.model == "lstm":  # its own config fields; the rest of --set goes to the training config
        lstm_fields = set(LSTMConfig.__dataclass_fields__)
        sets = [s.partition("=") for s in args.set or []]
        lstm_model = cfgmod.override(LSTMConfig(), {n: v for n, eq, v in sets if eq and n in lstm_fields})
        args.set = [n + eq + v for n, eq, v in sets if not (eq and n in lstm_fields)]
    model, tc = _configs(args)
    if args.lr is None:
        tc = cfgmod.override(tc, {"learning_rate": finetune.DEFAULT_LR["lstm" if args.model == "lstm" else "electra"]})
    model_fields = set(cfgmod.ElectraConfig.__dataclass_fields__)
    overrides = {n: v for n, _, v in (s.partition("=") for s in args.set or []) if n in model_fields}
    transformer_init = args.init and args.model != "lstm"
    summary = finetune.finetune(args.out, data=args.data, task=args.task, dev=args.dev, init=args.init,
                                model=lstm_model or (None if args.init else model), train=tc, epochs=args.epochs,
                                layer_decay=args.layer_decay, warmup_fraction=args.warmup_fraction,
                                reader=_reader(args), max_rows=args.max_rows, kind=args.model,
                                model_overrides=overrides if transformer_init else None)
    print(finetune.summary_line(summary))
    return 0


def cmd_evaluate(args):
    from minielectra import finetune

    data = args.data
    if data is None:
        if args.task is None:
            raise FileNotFoundError("evaluate needs --data FILE (or --task sst2 for the GLUE SST-2 dev set)")
        data = finetune.resolve_data(None, args.task)[1]
    result = finetune.evaluate(args.model, data, reader=_reader(args), batch_size=args.batch)
    print(finetune.format_evaluation(result))
    return 0


def cmd_predict(args):
    from minielectra import finetune

    model = finetune.load_classifier(args.model)
    texts = args.sentences or [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
    for text, (label, prob, _) in zip(texts, finetune.predict(model, texts)):
        print(f"{label}\t{prob:.4f}\t{text}")
    return 0


def cmd_import_hf(args):
    from minielectra import hf

    s = hf.import_hf(args.folder, args.out)
    labels = f", labels {', '.join(s['labels'])}" if s["labels"] else ""
    print(f"imported {s['architecture']}: {s['tensors']} tensors, {s['parameters'] / 1e6:.2f} M parameters{labels}; "
          f"wrote {s['file']}")
    return 0


def cmd_export_hf(args):
    from minielectra import hf

    s = hf.export_hf(args.model, args.out, part=args.part)
    print(f"exported the {s['part']} as {s['architecture']}: {s['tensors']} tensors, {s['parameters'] / 1e6:.2f} M "
          f"parameters; load it with transformers.{s['architecture']}.from_pretrained({s['out']!r})")
    return 0


def cmd_detect(args):
    import json

    from minielectra import detect

    model = detect.load_discriminator(args.model)
    texts = args.sentences or [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
    for d in detect.detect(model, texts):
        print(json.dumps(detect.to_json(d)) if args.json else detect.format_detection(d) + "\n")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="minielectra", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pre-train ELECTRA (generator + discriminator), or a masked LM, on a corpus")
    p.add_argument("--corpus", action="append", default=None,
                   help="UTF-8 text file or folder of .txt files, repeatable (read together); default: the Python "
                        "standard library's docstrings")
    p.add_argument("--out", default="runs/pretrain", help="run folder for checkpoints, metrics and the plot")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--vocab", default=None, help="an existing vocab.txt (BERT format) instead of training one")
    p.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop (with a checkpoint) once the training loop has run this many minutes")
    _add_config_flags(p)
    _add_backend(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("bench", help="time the full training step: tokens/s, model FLOPs, MFU; --ops per op")
    p.add_argument("--config", default="tiny", help="preset (tiny, small) or a JSON config file")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="override any config field (repeatable)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--shards", type=int, default=None,
                   help="split each batch into this many shards, run side by side on the CPU cores (default: one "
                        "per core; 1 on a GPU)")
    p.add_argument("--steps", dest="bench_steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", dest="bench_warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--ops", action="store_true", help="also time each op: reference vs kernel")
    p.add_argument("--vs-torch", action="store_true", help="also time the same step in PyTorch + transformers")
    p.add_argument("--vs-numpy", action="store_true",
                   help="also time the step on the numpy reference, interleaved with the numba backend's")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    _add_backend(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("finetune", help="fine-tune a classifier (from a pre-training run, or random init)")
    p.add_argument("--model", default=None, choices=("electra", "mlm", "scratch", "lstm"),
                   help="electra / mlm: the encoder of an --init run of that objective; scratch: the same encoder, "
                        "random init (with --init: the run's config and vocab); lstm: embedding -> LSTM -> dense "
                        "(with --init: the run's vocab). Default: the --init run's objective, else scratch")
    p.add_argument("--init", default=None, help="pre-training run folder; omit for a random init")
    p.add_argument("--data", default=None, help="labelled training file, or a folder with train.tsv (and dev.tsv)")
    p.add_argument("--task", default=None, choices=("sst2",), help="a GLUE task: its layout; downloaded without --data")
    p.add_argument("--dev", default=None, help="validation file (default: dev.tsv beside train.tsv, else 10 %% of it)")
    p.add_argument("--out", default="runs/finetune", help="model folder (the best epoch by validation accuracy)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 3e-4 as ELECTRA-Small; 1e-3 for --model lstm). The tiny "
                        "preset fine-tunes better at 1e-3 (README: ELECTRA against its baselines)")
    p.add_argument("--seq", type=int, default=128, help="tokens per example, [CLS] and [SEP] included")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layer-decay", type=float, default=0.8, help="layer-wise lr decay (ELECTRA-Small: 0.8)")
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="share of the steps spent warming up")
    p.add_argument("--max-rows", type=int, default=None, help="use only the first N rows of the training file")
    p.add_argument("--config", default="tiny", help="model preset or JSON for a random init (ignored with --init)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a config field (repeatable)")
    _add_reader_flags(p)
    _add_backend(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="accuracy, F1 and confusion matrix of a fine-tuned model on labelled data")
    p.add_argument("--model", required=True, help="a `minielectra finetune` output folder")
    p.add_argument("--data", default=None, help="labelled file")
    p.add_argument("--task", default=None, choices=("sst2",), help="without --data: the task's dev set")
    p.add_argument("--batch", type=int, default=64)
    _add_reader_flags(p)
    _add_backend(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="label and probability of each sentence (arguments, else stdin lines)")
    p.add_argument("--model", required=True, help="a `minielectra finetune` output folder")
    p.add_argument("sentences", nargs="*", help="sentences to classify; none: read one per line from stdin")
    _add_backend(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("import-hf", help="convert a Hugging Face ELECTRA folder (config.json, vocab.txt, "
                                         "model.safetensors) into a minielectra run or fine-tuned model folder")
    p.add_argument("folder", help="the Hugging Face model folder (ElectraForPreTraining, ElectraForMaskedLM or "
                                  "ElectraForSequenceClassification)")
    p.add_argument("--out", required=True, help="the minielectra folder to write (must not hold a model yet)")
    _add_backend(p)
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("export-hf", help="write a minielectra run or fine-tuned model as a Hugging Face folder")
    p.add_argument("model", help="a pre-training run folder or a `minielectra finetune` output folder")
    p.add_argument("--out", required=True, help="the Hugging Face folder to write (transformers from_pretrained)")
    p.add_argument("--part", default=None, choices=("discriminator", "generator", "mlm"),
                   help="which part of a pre-training run to export (default: the discriminator, else what there is)")
    _add_backend(p)
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("detect", help="each token's probability of having been replaced, as the discriminator sees it")
    p.add_argument("--model", required=True, help="a pre-training run folder (or an imported discriminator)")
    p.add_argument("--json", action="store_true", help="print one JSON object per text: tokens, ids and raw logits")
    p.add_argument("sentences", nargs="*", help="texts to inspect; none: read one per line from stdin")
    _add_backend(p)
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("experiment", help="electra-vs-mlm: pre-train ELECTRA and a masked LM for the same time, "
                                          "fine-tune them, a random init and an LSTM with several seeds, tabulate")
    p.add_argument("name", choices=("electra-vs-mlm",), help="the experiment to run")
    p.add_argument("--corpus", action="append", default=None,
                   help="pre-training text (file or folder of .txt files), repeatable")
    p.add_argument("--corpus-from-data", action="store_true",
                   help="also pre-train on the sentences of --data's training part (never the held-out 10 %%)")
    p.add_argument("--data", required=True, help="labelled file (e.g. SST-2's train.tsv); 10 %% of it is held out")
    p.add_argument("--budget-minutes", type=float, required=True, help="pre-training wall-clock minutes per objective")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per model (0 .. N-1)")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="one fine-tuning peak learning rate for all four models (default: each model's finetune "
                        "default, 3e-4 for the encoders as ELECTRA-Small, 1e-3 for the lstm)")
    p.add_argument("--max-rows", type=int, default=None, help="use only the first N rows of --data")
    p.add_argument("--out", default="runs/experiment",
                   help="folder for the runs and results.md / results.png; a rerun skips the finished stages")
    p.add_argument("--config", default="tiny", help="model and pre-training preset (tiny, small) or JSON file")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a config field (repeatable)")
    p.add_argument("--only", choices=("electra", "mlm"), default=None,
                   help="pre-train this objective alone and stop (one process per objective pre-trains both at "
                        "once); rerun without --only to fine-tune and tabulate")
    _add_backend(p)
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("gradcheck", help="gradient-check every op and block; exit 0 only if all pass")
    _add_backend(p)
    p.set_defaults(func=cmd_gradcheck)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    allocator.keep_freed_memory()  # a step's arrays reuse freed memory instead of page-faulting in fresh (allocator.py)
    from minielectra.checkpoint import CheckpointError
    from minielectra.data import DataError
    from minielectra.train import TrainingError

    try:
        name = backend.set_backend(args.backend or os.environ.get("MINIELECTRA_BACKEND") or "auto")
        if args.tf32:
            if name != "cupy":
                raise cfgmod.ConfigError(f"--tf32 needs the cupy backend (this run uses {name}): TF32 is a GPU "
                                         "tensor-core mode; NumPy and Numba GEMMs are always full float32")
            backend.set_tf32(True)  # before the first float32 GEMM, which is when CuPy reads it
        print(backend.describe(), flush=True)
        return args.func(args)
    except (cfgmod.ConfigError, DataError, CheckpointError, TrainingError, ImportError, FileNotFoundError) as e:
        print(f"minielectra {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
