"""Hugging Face ELECTRA checkpoints in and out: `import_hf` reads a transformers folder, `export_hf` writes one.

A Hugging Face ELECTRA folder holds `config.json`, `vocab.txt` (BERT's WordPiece format, which our tokenizer reads
unchanged) and `model.safetensors` (or shards listed in `model.safetensors.index.json`). Three architectures map:

    ElectraForPreTraining             a discriminator (google/electra-*-discriminator) -> a run folder
                                      (checkpoint.safetensors + config.json + vocab.txt) holding the discriminator only:
                                      `finetune --init`, `detect` and `export-hf` take it; `pretrain --resume` cannot
                                      (there is no generator, nor a position in a corpus)
    ElectraForMaskedLM                a generator (google/electra-*-generator) -> a run folder holding the generator
                                      and the embeddings only, for `export-hf` (fine-tuning uses the discriminator)
    ElectraForSequenceClassification  a fine-tuned classifier -> a fine-tuned model folder (model.safetensors +
                                      config.json + vocab.txt + labels.json, labels from id2label) for evaluate/predict

and export_hf writes them back: a pre-training run as ElectraForPreTraining (its discriminator) or, asked for,
ElectraForMaskedLM (its generator); a masked-LM baseline run (`pretrain --objective mlm`) as ElectraForMaskedLM; a
fine-tuned model as ElectraForSequenceClassification.

Our parameter names are already Hugging Face's under a prefix (`discriminator.`, `generator.`; the shared embedding
tables live under `discriminator.electra.embeddings`), so converting is a rename plus a transpose of every linear
weight: we store W as (in, out) and compute x @ W, PyTorch's nn.Linear stores (out, in). `name_map` is the one place
that says which name becomes which; import and export both read it, and import checks that the file has exactly those
tensors with exactly those shapes.

Nothing here imports torch or transformers: the files are safetensors (a JSON header plus raw bytes) and JSON. PyTorch
`.bin` files are pickles, which run code when loaded, so they are refused with the command that converts them.
"""

import json
from pathlib import Path

import numpy as np
import safetensors.numpy

from minielectra import checkpoint as ckpt
from minielectra import classifier as clf
from minielectra import config as cfgmod
from minielectra import electra
from minielectra.electra import DISC, EMB, GEN
from minielectra.optim import adamw_init
from minielectra.tokenizer import WordPieceTokenizer

PRETRAINING = "ElectraForPreTraining"
MASKED_LM = "ElectraForMaskedLM"
CLASSIFICATION = "ElectraForSequenceClassification"
ARCHITECTURES = (PRETRAINING, MASKED_LM, CLASSIFICATION)
MLM = "mlm"  # mlm.HEAD: a masked-LM baseline run's head (`pretrain --objective mlm`)
CLASSIFIER = "classifier"
# What each part of a minielectra model exports as, and what each architecture imports as.
PARTS = {DISC: PRETRAINING, GEN: MASKED_LM, MLM: MASKED_LM, CLASSIFIER: CLASSIFICATION}
IMPORTS = {PRETRAINING: DISC, MASKED_LM: GEN, CLASSIFICATION: CLASSIFIER}

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
RUN_CHECKPOINT = "checkpoint.safetensors"  # train.CHECKPOINT (not imported: train pulls in the whole training loop)
FINETUNED_MODEL = "model.safetensors"  # finetune.MODEL_FILE
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
# Older transformers saved the position-id buffer (always 0..P-1) with the weights; it is not a parameter.
BUFFERS = ("electra.embeddings.position_ids",)
TIED_LM_HEAD = "generator_lm_head.weight"  # the word table itself, when a file stores it twice

# transformers.ElectraConfig's defaults (ELECTRA-Small), for the fields an older config.json leaves out.
HF_DEFAULTS = {"vocab_size": 30522, "embedding_size": 128, "hidden_size": 256, "num_hidden_layers": 12,
               "num_attention_heads": 4, "intermediate_size": 1024, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
               "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
               "initializer_range": 0.02, "layer_norm_eps": 1e-12, "position_embedding_type": "absolute"}

# safetensors dtype -> how to read its bytes; half precisions are widened to float32, which holds them exactly.
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4"}


class HFError(ckpt.CheckpointError):
    """A Hugging Face folder (or a run to export) that cannot be converted; the message says what and how to fix it."""


# ---- the name map: the one place that says which tensor is which ------------------------------------------------------

# (our prefix, Hugging Face prefix) per part; the first that matches a name renames it.
_RENAMES = {
    DISC: ((f"{DISC}.electra.", "electra."), (f"{DISC}.", "")),
    GEN: ((f"{EMB}.", "electra.embeddings."), (f"{GEN}.electra.", "electra."), (f"{GEN}.", "")),
    MLM: ((f"{DISC}.electra.", "electra."), (f"{MLM}.", "")),
    CLASSIFIER: ((f"{DISC}.electra.", "electra."), (f"{clf.HEAD}.", f"{clf.HEAD}.")),
}


def our_shapes(part, config, num_labels=None):
    """{our name: our shape} of the parameters of `part` (discriminator, generator, mlm, classifier) under `config`."""
    if part == CLASSIFIER:
        return clf.classifier_shapes(config, num_labels)
    if part == MLM:
        from minielectra import mlm

        return mlm.param_shapes(config)
    return {k: s for k, s in electra.param_shapes(config).items()
            if k.startswith(f"{part}.") or (part == GEN and k.startswith(f"{EMB}."))}


def _transposed(name, shape):
    """A linear layer's weight: 2-D and not one of the lookup tables (word, position, token-type embeddings)."""
    return len(shape) == 2 and not name.split(".")[-2].endswith("_embeddings")


def name_map(part, config, num_labels=None):
    """{Hugging Face name: (our name, our shape, transposed)} of `part` under `config`, as PARTS[part] names them."""
    table = {}
    for ours, shape in our_shapes(part, config, num_labels).items():
        prefix, hf_prefix = next((p, h) for p, h in _RENAMES[part] if ours.startswith(p))
        table[hf_prefix + ours[len(prefix):]] = (ours, tuple(shape), _transposed(ours, shape))
    return table


def parts_of(params, config):
    """The exportable parts of a pre-training run (discriminator, generator, mlm) whose every parameter params holds."""
    return [part for part in (DISC, GEN, MLM) if set(our_shapes(part, config)) <= set(params)]


# ---- configs --------------------------------------------------------------------------------------------------------


def config_from_hf(hf, arch, tok):
    """Our ElectraConfig for a Hugging Face config dict of architecture `arch`, token ids from the tokenizer `tok`."""
    c = {**HF_DEFAULTS, **hf}
    problems = []
    if c.get("model_type", "electra") != "electra":
        problems.append(f"model_type is {c['model_type']!r}, not 'electra'")
    if c["hidden_act"] != "gelu":
        problems.append(f"hidden_act is {c['hidden_act']!r}: minielectra implements only 'gelu' (the exact erf "
                        "GELU that ELECTRA uses); 'gelu_new' and friends are the tanh approximation")
    if c["position_embedding_type"] != "absolute":
        problems.append(f"position_embedding_type is {c['position_embedding_type']!r}: only 'absolute' (learned "
                        "position embeddings, as ELECTRA) is implemented")
    if c.get("is_decoder") or c.get("add_cross_attention"):
        problems.append("is_decoder / add_cross_attention is set: minielectra's encoder is bidirectional only")
    if c["vocab_size"] != tok.vocab_size:
        problems.append(f"vocab_size is {c['vocab_size']} but vocab.txt has {tok.vocab_size} tokens: the folder's "
                        "vocab.txt belongs to another model")
    if problems:
        raise HFError("cannot import this Hugging Face config: " + "; ".join(problems))
    encoder = {"hidden_size": c["hidden_size"], "num_attention_heads": c["num_attention_heads"],
               "intermediate_size": c["intermediate_size"]}
    if arch == MASKED_LM:
        # A generator alone: its sizes are the generator's; the discriminator's fields repeat them (no
        # discriminator parameters exist, and validate() wants a discriminator at least as wide).
        generator = encoder
    else:
        # A discriminator alone: the generator fields follow ELECTRA's rule (1/4 the width, 64-wide heads) and
        # describe no parameters; they matter only to a pre-training run, which this folder cannot resume.
        g = max(1, c["hidden_size"] // 4)
        heads = max(1, g // 64)
        generator = {"hidden_size": g, "num_attention_heads": heads if g % heads == 0 else 1,
                     "intermediate_size": 4 * g}
    model = cfgmod.ElectraConfig(
        vocab_size=c["vocab_size"], embedding_size=c["embedding_size"], num_hidden_layers=c["num_hidden_layers"],
        **encoder, **{f"generator_{k}": v for k, v in generator.items()},
        max_position_embeddings=c["max_position_embeddings"], type_vocab_size=c["type_vocab_size"],
        hidden_dropout_prob=c["hidden_dropout_prob"], attention_probs_dropout_prob=c["attention_probs_dropout_prob"],
        layer_norm_eps=c["layer_norm_eps"], initializer_range=c["initializer_range"],
        pad_token_id=tok.pad_id, cls_token_id=tok.cls_id, sep_token_id=tok.sep_id, mask_token_id=tok.mask_id)
    return model.validate()


def config_to_hf(config, part, labels=None):
    """The config.json dict transformers reads for `part` of a model of our `config` (labels: a classifier's names)."""
    d = electra.encoder_dims(config, GEN if part == GEN else DISC)  # the mlm baseline is discriminator-sized
    hf = {
        "architectures": [PARTS[part]], "model_type": "electra", "vocab_size": d.vocab_size,
        "embedding_size": d.embedding_size, "hidden_size": d.hidden_size, "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_heads, "intermediate_size": d.intermediate_size, "hidden_act": "gelu",
        "hidden_dropout_prob": d.hidden_dropout, "attention_probs_dropout_prob": d.attention_dropout,
        "max_position_embeddings": d.max_positions, "type_vocab_size": d.type_vocab_size,
        "initializer_range": config.initializer_range, "layer_norm_eps": d.layer_norm_eps,
        "pad_token_id": config.pad_token_id, "position_embedding_type": "absolute", "tie_word_embeddings": True,
    }
    if labels is not None:
        hf["id2label"] = {str(i): name for i, name in enumerate(labels)}
        hf["label2id"] = {name: i for i, name in enumerate(labels)}
        hf["problem_type"] = "single_label_classification"
    return hf


def _labels(hf):
    """A classifier's label names in id order, from id2label."""
    if hf.get("problem_type") not in (None, "single_label_classification"):
        raise HFError(f"problem_type is {hf['problem_type']!r}: minielectra's classifier is single-label "
                      "classification (softmax over the labels)")
    id2label = hf.get("id2label") or {str(i): f"LABEL_{i}" for i in range(int(hf.get("num_labels", 2)))}
    try:
        ids = sorted(int(i) for i in id2label)
    except ValueError:
        raise HFError(f"id2label's keys must be label ids 0, 1, ..., got {sorted(id2label)}") from None
    if ids != list(range(len(ids))) or len(ids) < 2:
        raise HFError(f"id2label must name labels 0 .. n-1 with n >= 2, got ids {ids}")
    return [str(id2label[str(i)] if str(i) in id2label else id2label[i]) for i in ids]


# ---- reading a Hugging Face folder ----------------------------------------------------------------------------------


def _pickle_error(path):
    return HFError(
        f"{path} is a PyTorch pickle: loading a pickle runs whatever code it contains, so minielectra never opens "
        f"one. Convert it to safetensors once, in an environment you trust (torch installed): python -c \"import "
        f"torch; from safetensors.torch import save_file; sd = torch.load('{path}', weights_only=True); "
        f"save_file({{k: v.clone().contiguous() for k, v in sd.items()}}, '{Path(path).parent / WEIGHTS}', "
        f"metadata={{'format': 'pt'}})\" (or load it with transformers and save_pretrained), then import the folder")


def read_safetensors(path):
    """{name: float32 (or integer) array} from a safetensors file, half precisions widened to float32.

    Read by hand rather than with safetensors.numpy because NumPy has no bfloat16, in which some checkpoints ship.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise HFError(f"cannot read {path}: {e.strerror}") from None
    n = int.from_bytes(data[:8], "little")
    try:
        if len(data) < 8 or 8 + n > len(data):
            raise ValueError(f"the header claims {n} bytes but the file has {len(data)}")
        header = json.loads(data[8:8 + n])
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"tensor {name} has dtype {info['dtype']}, which is not a float or int type")
            start, end = info["data_offsets"]
            dtype = np.dtype(_DTYPES[info["dtype"]])
            count = int(np.prod(info["shape"], dtype=np.int64))
            if not 0 <= start <= end <= len(data) - 8 - n or end - start != count * dtype.itemsize:
                raise ValueError(f"tensor {name}'s byte range does not fit its shape or the file")
            a = np.frombuffer(data, dtype=dtype, count=count, offset=8 + n + start).reshape(info["shape"])
            if info["dtype"] == "BF16":
                a = (a.astype(np.uint32) << 16).view(np.float32)  # bfloat16 is float32's top 16 bits
            tensors[name] = a.astype(np.float32) if a.dtype.kind == "f" else a.copy()
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise HFError(f"{path} is not a readable safetensors file: {e}") from None
    return tensors


def _read_weights(folder):
    index = folder / WEIGHTS_INDEX
    if (folder / WEIGHTS).exists():
        return read_safetensors(folder / WEIGHTS)
    if index.exists():  # a sharded checkpoint: the index maps each tensor to its shard
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise HFError(f"{index} is not a safetensors index (a JSON object with a weight_map): {e}") from None
        tensors = {}
        for shard in shards:
            tensors.update(read_safetensors(folder / shard))
        return tensors
    pickles = [folder / name for name in PICKLE_NAMES if (folder / name).exists()]
    if pickles:
        raise _pickle_error(pickles[0])
    raise HFError(f"{folder} has no {WEIGHTS} (nor {WEIGHTS_INDEX}): give a Hugging Face model folder as "
                  "save_pretrained writes it, or as downloaded with huggingface-cli download")


def read_hf_folder(path):
    """(config dict, tensors dict, vocab list) of a Hugging Face ELECTRA folder."""
    folder = Path(path)
    if folder.is_file() and folder.suffix in (".bin", ".pt", ".pth"):
        raise _pickle_error(folder)
    if not folder.is_dir():
        raise HFError(f"{folder} is not a folder: give the Hugging Face model folder (config.json, vocab.txt, "
                      f"{WEIGHTS})")
    try:
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFError(f"{folder} has no config.json: is it a Hugging Face model folder?") from None
    except ValueError as e:
        raise HFError(f"{folder / 'config.json'} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise HFError(f"{folder / 'config.json'} must hold a JSON object")
    if not (folder / "vocab.txt").exists():
        raise HFError(f"{folder} has no vocab.txt: ELECTRA uses BERT's WordPiece vocabulary, which Hugging Face "
                      "ships as vocab.txt beside the weights; download it too")
    try:
        vocab = WordPieceTokenizer.load(folder / "vocab.txt").vocab
    except ValueError as e:
        raise HFError(f"{folder / 'vocab.txt'}: {e}") from None
    return hf, _read_weights(folder), vocab


def architecture_of(hf, tensors):
    """The folder's architecture: config.json's `architectures`, else recognised from the head's tensor names."""
    named = hf.get("architectures") or []
    if named:
        arch = named[0]
    elif any(k.startswith("discriminator_predictions.") for k in tensors):
        arch = PRETRAINING
    elif any(k.startswith("generator_predictions.") for k in tensors):
        arch = MASKED_LM
    elif any(k.startswith("classifier.") for k in tensors):
        arch = CLASSIFICATION
    else:
        arch = "an unrecognised one"
    if arch not in ARCHITECTURES:
        raise HFError(f"the architecture is {arch}: minielectra imports {', '.join(ARCHITECTURES)}")
    return arch


def params_from_hf(tensors, arch, config, num_labels=None):
    """Our params dict from a Hugging Face state dict: every tensor renamed, linear weights transposed, shapes and
    the set of names checked (nothing missing, nothing left over)."""
    tensors = {k: a for k, a in tensors.items() if k not in BUFFERS}
    table = name_map(IMPORTS[arch], config, num_labels)
    if arch == MASKED_LM and TIED_LM_HEAD in tensors:
        words = tensors.get("electra.embeddings.word_embeddings.weight")
        if words is None or not np.array_equal(tensors.pop(TIED_LM_HEAD), words):
            raise HFError(f"{TIED_LM_HEAD} differs from the word-embedding table: ELECTRA's generator ties its LM head "
                          "to the word embeddings (tie_word_embeddings), and minielectra stores that table once")
    missing = sorted(set(table) - set(tensors))
    extra = sorted(set(tensors) - set(table))
    if missing or extra:
        raise HFError(f"the {arch} weights do not match its config.json: "
                      + "; ".join(f"{what} {len(names)} tensor(s), e.g. {', '.join(names[:3])}"
                                  for what, names in (("missing", missing), ("unexpected", extra)) if names))
    params, wrong = {}, []
    for hf_name, (ours, shape, transposed) in table.items():
        a = tensors[hf_name]
        if a.dtype.kind != "f":
            raise HFError(f"{hf_name} holds {a.dtype} numbers, not floating-point weights")
        a = a.T if transposed else a
        if a.shape != shape:
            wrong.append(f"{hf_name} {tuple(tensors[hf_name].shape)} (config.json implies "
                         f"{shape[::-1] if transposed else shape})")
        params[ours] = np.ascontiguousarray(a, dtype=np.float32)
    if wrong:
        raise HFError(f"tensor shapes do not match config.json: {'; '.join(wrong[:3])}")
    return params


def hf_tensors(params, part, config, num_labels=None):
    """The Hugging Face state dict of `part` of our params: renamed, linear weights transposed, float32."""
    return {hf: np.ascontiguousarray(params[ours].T if transposed else params[ours], dtype=np.float32)
            for hf, (ours, _, transposed) in name_map(part, config, num_labels).items()}


# ---- import and export ------------------------------------------------------------------------------------------------


def _fresh_out(out, name):
    if (out / name).exists():
        raise HFError(f"{out / name} exists: choose another --out (or delete it) rather than overwrite a model")


def import_hf(src, out):
    """Convert the Hugging Face ELECTRA folder `src` into a minielectra folder `out`; return a summary dict."""
    hf, tensors, vocab = read_hf_folder(src)
    arch = architecture_of(hf, tensors)
    tok = WordPieceTokenizer(vocab)
    config = config_from_hf(hf, arch, tok)
    labels = _labels(hf) if arch == CLASSIFICATION else None
    params = params_from_hf(tensors, arch, config, len(labels) if labels else None)
    # seq_len is what finetune and predict pad to; Hugging Face models take up to max_position_embeddings.
    tc = cfgmod.TrainConfig(seq_len=min(cfgmod.TrainConfig.seq_len, config.max_position_embeddings))
    config_json = cfgmod.to_json(config, tc)
    out = Path(out)
    extra = {"imported": {"from": "huggingface", "architecture": arch}}
    if arch == CLASSIFICATION:
        from minielectra import finetune

        _fresh_out(out, FINETUNED_MODEL)
        out.mkdir(parents=True, exist_ok=True)
        # Hugging Face does not record whether a classifier reads sentence pairs; predict takes single sentences.
        reader = {**finetune.task_reader(None), "pairs": False}
        finetune._save_model(out, params, config, tc, vocab, labels, reader, extra)
        (out / "labels.json").write_text(json.dumps(labels) + "\n")
        written = out / FINETUNED_MODEL
    else:
        _fresh_out(out, RUN_CHECKPOINT)
        out.mkdir(parents=True, exist_ok=True)
        written = out / RUN_CHECKPOINT
        ckpt.save_checkpoint(written, params, adamw_init(params), 0, config_json, np.random.default_rng(0),
                             vocab=vocab, extra=extra)
    tok.save(out / "vocab.txt")
    (out / "config.json").write_text(config_json)
    return {"architecture": arch, "out": str(out), "file": str(written), "tensors": len(params),
            "parameters": sum(int(a.size) for a in params.values()), "labels": labels}


def load_folder(path):
    """(params, ElectraConfig, vocab, labels or None) of a minielectra run folder or fine-tuned model folder."""
    path = Path(path)
    if (path / FINETUNED_MODEL).exists() or path.name == FINETUNED_MODEL:
        from minielectra import finetune

        m = finetune.load_classifier(path)
        return m.params, m.config, m.tokenizer.vocab, m.labels
    file = path / RUN_CHECKPOINT if path.is_dir() else path
    if not file.exists():
        raise HFError(f"{path} holds neither {RUN_CHECKPOINT} (a pre-training run) nor {FINETUNED_MODEL} (a "
                      "fine-tuned model)")
    params, meta = ckpt.load_params(file)
    if "config" not in meta:
        raise HFError(f"{file} has no config in its metadata: give a folder written by minielectra")
    model, _ = cfgmod.from_json(meta["config"])
    if "vocab" in meta:
        vocab = meta["vocab"].split("\n")
    elif (file.parent / "vocab.txt").exists():
        vocab = WordPieceTokenizer.load(file.parent / "vocab.txt").vocab
    else:
        raise HFError(f"{file} was saved without a vocab and there is no vocab.txt beside it")
    return params, model, vocab, None


def export_hf(src, out, part=None):
    """Write the minielectra folder `src` as a Hugging Face ELECTRA folder `out`; return a summary dict.

    A fine-tuned model becomes ElectraForSequenceClassification. A pre-training run becomes ElectraForPreTraining
    (its discriminator, what Hugging Face publishes as electra-*-discriminator), or with part="generator"
    ElectraForMaskedLM; a masked-LM baseline run (`pretrain --objective mlm`) becomes ElectraForMaskedLM. part=None
    picks the first the folder holds, in that order.
    """
    params, config, vocab, labels = load_folder(src)
    present = [CLASSIFIER] if labels is not None else parts_of(params, config)
    if not present:
        raise HFError(f"{src} holds no complete model part ({', '.join(PARTS)}): was it written by minielectra?")
    part = part or present[0]
    if part not in present:
        raise HFError(f"{src} has no {part} to export (it holds: {', '.join(present)})")
    num_labels = len(labels) if labels is not None else None
    tensors = hf_tensors(params, part, config, num_labels)
    out = Path(out)
    _fresh_out(out, WEIGHTS)
    out.mkdir(parents=True, exist_ok=True)
    # transformers checks the "format" entry to know the tensors are PyTorch-ordered ("pt").
    safetensors.numpy.save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_to_hf(config, part, labels), indent=2) + "\n")
    WordPieceTokenizer(vocab).save(out / "vocab.txt")
    tokenizer_config = {"tokenizer_class": "ElectraTokenizer", "do_lower_case": True,
                        "model_max_length": config.max_position_embeddings}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return {"architecture": PARTS[part], "part": part, "out": str(out), "tensors": len(tensors),
            "parameters": sum(int(a.size) for a in tensors.values())}
