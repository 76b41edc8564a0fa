"""Checkpoints without pickle: one safetensors file, written atomically, verified by a SHA-256 digest on load.

A checkpoint is a single safetensors file. Its tensors are the model and Adam's moments, under prefixed names:

    params/<key>    optim/m/<key>    optim/v/<key>

and its string metadata holds everything else a resumed run needs: `format`, `step`, `optim_step`, `config` (the JSON
of config.to_json), `rng` (the JSON of the Generator's bit_generator.state), `extra` (a JSON object the trainer
chooses, e.g. the data iterator's position), optionally `vocab` (one token per line), and `sha256`.

Why not pickle (torch.save, np.save with allow_pickle): unpickling runs whatever code the file names, so opening a
downloaded checkpoint would be running a stranger's program. safetensors is a JSON header plus raw bytes; reading it
runs nothing.

Why a digest: safetensors checks that the header parses and that the byte ranges it lists fit the file, so a
truncated file is caught, but a flipped bit inside the tensor data loads as a slightly wrong weight and nobody notices.
`sha256` covers every tensor's name, dtype, shape and bytes and every other metadata entry.

Why atomic: the file is written under a temporary name in the same directory, flushed to disk, then renamed over the
old checkpoint with os.replace, which POSIX makes atomic. A crash or Ctrl-C mid-write leaves the previous checkpoint
whole, never half of a new one.
"""

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from minielectra.optim import AdamWState

CHECKPOINT_FORMAT = "minielectra-checkpoint-1"
PARAMS_FORMAT = "minielectra-params-1"
_RESERVED = ("format", "sha256")  # metadata keys this module writes itself
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file, what is wrong and what to do."""


class Checkpoint(NamedTuple):
    params: dict  # key -> NumPy array (move to the GPU yourself if training there)
    opt_state: AdamWState
    step: int  # the trainer's step count when the checkpoint was written
    config_json: str  # config.to_json output: config.from_json(config_json) rebuilds the configs
    rng_state: dict  # the Generator's bit_generator.state: restore_rng(rng_state) continues its stream
    vocab: list  # the tokens in id order, or None when the checkpoint was saved without one
    extra: dict  # whatever JSON object the trainer saved


# ---- saving ---------------------------------------------------------------------------------------------------------


def save_checkpoint(path, params, opt_state, step, config_json, rng, vocab=None, extra=None):
    """Write params, AdamW state, step, config JSON, the RNG's state, vocab and `extra` to `path`, atomically.

    `rng` is the numpy.random.Generator the run draws from; `vocab` a list of tokens in id order; `extra` any
    JSON-able dict. Arrays may be NumPy or CuPy (CuPy arrays are copied to the host).
    """
    if not set(params) == set(opt_state.m) == set(opt_state.v):
        raise ValueError("opt_state.m and opt_state.v must have exactly the params' keys: build the state with "
                         "adamw_init(params)")
    if vocab is not None and any("\n" in token for token in vocab):
        raise ValueError("a vocab token contains a newline; tokens are stored one per line, so none may contain one")
    tensors = {f"params/{k}": a for k, a in params.items()}
    tensors.update({f"optim/m/{k}": a for k, a in opt_state.m.items()})
    tensors.update({f"optim/v/{k}": a for k, a in opt_state.v.items()})
    metadata = {
        "step": str(int(step)),
        "optim_step": str(int(opt_state.step)),
        "config": config_json,
        "rng": json.dumps(rng.bit_generator.state),  # PCG64's 128-bit integers are plain JSON integers
        "extra": _to_json(extra or {}, "extra"),
    }
    if vocab is not None:
        metadata["vocab"] = "\n".join(vocab)
    _write(path, tensors, metadata, CHECKPOINT_FORMAT)


def save_params(path, params, metadata=None):
    """Write only the params (for sharing or fine-tuning) with optional string metadata, atomically."""
    metadata = dict(metadata or {})
    clash = [k for k in _RESERVED if k in metadata]
    if clash:
        raise ValueError(f"metadata keys {', '.join(clash)} are reserved for the file format; rename them")
    not_str = sorted(k for k, s in metadata.items() if not isinstance(k, str) or not isinstance(s, str))
    if not_str:
        raise ValueError(f"safetensors metadata maps str to str; convert {not_str} (json.dumps for structured values)")
    _write(path, {f"params/{k}": a for k, a in params.items()}, metadata, PARAMS_FORMAT)


def _to_json(value, what):
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable (dicts, lists, str, int, float, bool, None): {e}") from None


def _write(path, tensors, metadata, file_format):
    """Host copies of `tensors`, the format tag and the digest, serialised, then moved onto `path` atomically."""
    path = Path(path)
    _refuse_pickle_name(path, "save")
    # .get() is CuPy's device-to-host copy; the digest and safetensors both want C-contiguous host memory.
    tensors = {k: np.asarray(a.get() if hasattr(a, "get") else a, order="C") for k, a in tensors.items()}
    metadata = {**metadata, "format": file_format}
    metadata["sha256"] = _digest(tensors, metadata)
    blob = safetensors.numpy.save(tensors, metadata=metadata)  # serialise before touching the disk

    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target, so os.replace is a rename within one filesystem (a cross-device move is not atomic).
    tmp = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with tmp:
            tmp.write(blob)
            tmp.flush()
            os.fsync(tmp.fileno())  # the bytes must be on disk before the rename makes them the checkpoint
        os.replace(tmp.name, path)
    except BaseException:  # KeyboardInterrupt too: never leave a stray temp file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp.name)
        raise


def _digest(tensors, metadata):
    """SHA-256 over every tensor (name, dtype, shape, bytes; sorted by name) and every metadata entry but sha256."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.asarray(tensors[name], order="C")
        h.update(f"{name}\0{a.dtype}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    for key in sorted(k for k in metadata if k != "sha256"):
        h.update(f"{key}\0{metadata[key]}\0".encode())
    return h.hexdigest()


# ---- loading --------------------------------------------------------------------------------------------------------


def load_checkpoint(path):
    """The Checkpoint saved at `path`; CheckpointError when it is missing, corrupted, or not a full checkpoint."""
    path = Path(path)
    tensors, metadata = _read(path)
    if metadata["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} holds only params (format {metadata['format']!r}), not a training checkpoint: "
                              f"load it with load_params, or resume from a file written by save_checkpoint")
    missing = [k for k in ("step", "optim_step", "config", "rng", "extra") if k not in metadata]
    if missing:
        raise _corrupted(path, f"metadata lacks {', '.join(missing)}")
    params, m, v = (_strip(tensors, prefix) for prefix in ("params/", "optim/m/", "optim/v/"))
    if not set(params) == set(m) == set(v):
        raise _corrupted(path, "the params and the optimizer moments have different keys")
    try:
        return Checkpoint(
            params=params,
            opt_state=AdamWState(m=m, v=v, step=int(metadata["optim_step"])),
            step=int(metadata["step"]),
            config_json=metadata["config"],
            rng_state=json.loads(metadata["rng"]),
            vocab=metadata["vocab"].split("\n") if "vocab" in metadata else None,
            extra=json.loads(metadata["extra"]),
        )
    except ValueError as e:  # int() and json.loads (JSONDecodeError is a ValueError)
        raise _corrupted(path, f"unreadable metadata: {e}") from None


def load_params(path):
    """(params, metadata) from a file written by save_params, or the params of a full checkpoint.

    metadata is the file's string metadata without the format tag and digest (for a full checkpoint: step, config, ...).
    """
    path = Path(path)
    tensors, metadata = _read(path)
    return _strip(tensors, "params/"), {k: s for k, s in metadata.items() if k not in _RESERVED}


def restore_rng(state):
    """A numpy.random.Generator whose next draws equal those of the Generator whose bit_generator.state this was."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if name not in _BIT_GENERATORS:
        raise CheckpointError(f"cannot restore an RNG from {state!r}: expected a bit_generator.state dict of one of "
                              f"{', '.join(_BIT_GENERATORS)}")
    bit_generator = getattr(np.random, name)()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


def _strip(tensors, prefix):
    return {name[len(prefix):]: a for name, a in tensors.items() if name.startswith(prefix)}


def _corrupted(path, detail):
    return CheckpointError(f"{path} is truncated or corrupted ({detail}); it cannot be trusted: "
                           f"resume from an earlier checkpoint, or re-run from the start")


def _refuse_pickle_name(path, verb):
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise CheckpointError(
            f"refusing to {verb} {path}: a {path.suffix} file is a PyTorch pickle, and loading a pickle runs any code "
            f"it contains, so minielectra never does. Convert it with safetensors (in PyTorch: "
            f"safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')), "
            f"and use a .safetensors name for minielectra's own files")


def _read(path):
    """(tensors, metadata) from the minielectra safetensors file at `path`, its digest checked."""
    _refuse_pickle_name(path, "load")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}: check the path (or start a fresh run)") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None

    # The safetensors layout: an 8-byte little-endian header length, a JSON header, then the raw tensor bytes.
    header_len = int.from_bytes(data[:8], "little")
    if len(data) < 8 or 8 + header_len > len(data):
        raise _corrupted(path, f"the header claims {header_len} bytes but the file has {len(data)}")
    try:
        header = json.loads(data[8:8 + header_len])
        tensors = safetensors.numpy.load(data)
    except (ValueError, SafetensorError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _corrupted(path, f"not a readable safetensors file: {e}") from None
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") not in (CHECKPOINT_FORMAT, PARAMS_FORMAT):
        raise CheckpointError(f"{path} is a safetensors file but not one minielectra wrote (format "
                              f"{metadata.get('format')!r}): minielectra reads only files written by "
                              f"save_checkpoint or save_params")
    if metadata.get("sha256") != _digest(tensors, metadata):
        raise _corrupted(path, "SHA-256 digest mismatch")
    # Older safetensors versions return read-only views of the file's bytes; the optimizer updates params in place.
    return {k: a if a.flags.writeable else a.copy() for k, a in tensors.items()}, metadata
