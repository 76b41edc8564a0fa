import json
import os

import numpy as np
import pytest
import safetensors.numpy

from minielectra import checkpoint
from minielectra.checkpoint import (CheckpointError, load_checkpoint, load_params, restore_rng, save_checkpoint,
                                    save_params)
from minielectra.config import ElectraConfig, TrainConfig, from_json, to_json
from minielectra.optim import adamw_init, adamw_step

WEIGHT = "discriminator.electra.encoder.layer.0.attention.self.query.weight"
BIAS = "discriminator.electra.encoder.layer.0.attention.self.query.bias"
LN_WEIGHT = "discriminator.electra.embeddings.LayerNorm.weight"


def trained_state(seed=0):
    """Params and AdamW state after one real update, so the moments are not all zero."""
    rng = np.random.default_rng(seed)
    params = {WEIGHT: rng.standard_normal((4, 3)).astype(np.float32), BIAS: rng.standard_normal(3).astype(np.float32),
              LN_WEIGHT: np.ones(3, np.float32)}
    state = adamw_init(params)
    adamw_step(params, {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()}, state, 1e-2,
               TrainConfig())
    return params, state


def save(path, seed=0, step=7, rng=None, vocab=("[PAD]", "[UNK]", "hello", "##s"), extra=None):
    params, state = trained_state(seed)
    config_json = to_json(ElectraConfig(hidden_size=64), TrainConfig(steps=123))
    save_checkpoint(path, params, state, step, config_json, rng or np.random.default_rng(seed),
                    vocab=list(vocab) if vocab is not None else None,
                    extra={"epoch": 1, "offset": 2 ** 70} if extra is None else extra)
    return params, state, config_json


def test_round_trip_is_bit_identical(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    rng = np.random.default_rng(42)
    rng.standard_normal(5)  # a stream already in progress
    params, state, config_json = save(path, rng=rng)
    ckpt = load_checkpoint(path)

    for saved, loaded in ((params, ckpt.params), (state.m, ckpt.opt_state.m), (state.v, ckpt.opt_state.v)):
        assert set(saved) == set(loaded)
        for k in saved:
            assert loaded[k].dtype == np.float32 and loaded[k].tobytes() == saved[k].tobytes()
    assert ckpt.opt_state.step == state.step == 1
    assert ckpt.step == 7
    assert ckpt.config_json == config_json
    assert from_json(ckpt.config_json)[0].hidden_size == 64
    assert ckpt.vocab == ["[PAD]", "[UNK]", "hello", "##s"]
    assert ckpt.extra == {"epoch": 1, "offset": 2 ** 70}
    # The restored RNG continues the saved stream exactly.
    np.testing.assert_array_equal(restore_rng(ckpt.rng_state).standard_normal(10), rng.standard_normal(10))


def test_vocab_may_be_absent(tmp_path):
    save(tmp_path / "ckpt.safetensors", vocab=None, extra={})
    ckpt = load_checkpoint(tmp_path / "ckpt.safetensors")
    assert ckpt.vocab is None and ckpt.extra == {}


def test_loaded_state_trains_on(tmp_path):
    params, state, _ = save(tmp_path / "ckpt.safetensors")
    ckpt = load_checkpoint(tmp_path / "ckpt.safetensors")
    grads = {k: np.full(p.shape, 0.5, np.float32) for k, p in params.items()}
    adamw_step(params, grads, state, 1e-2, TrainConfig())
    adamw_step(ckpt.params, grads, ckpt.opt_state, 1e-2, TrainConfig())  # loaded arrays are writable
    for k in params:
        np.testing.assert_array_equal(ckpt.params[k], params[k])


def test_restore_rng_rejects_what_is_not_a_bit_generator_state():
    with pytest.raises(CheckpointError, match="bit_generator.state"):
        restore_rng({"bit_generator": "Generator"})


def test_save_rejects_what_it_could_not_load_back(tmp_path):
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save(tmp_path / "a.safetensors", extra={"x": object()})
    with pytest.raises(ValueError, match="newline"):
        save(tmp_path / "a.safetensors", vocab=["a\nb"])
    params, state = trained_state()
    del state.m[BIAS]
    with pytest.raises(ValueError, match="adamw_init"):
        save_checkpoint(tmp_path / "a.safetensors", params, state, 1, "{}", np.random.default_rng(0))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch, failure):
    path = tmp_path / "ckpt.safetensors"
    save(path, seed=0, step=1)
    before = path.read_bytes()

    def crash(src, dst):
        raise failure

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(type(failure)):
        save(path, seed=1, step=2)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temp file left
    assert load_checkpoint(path).step == 1


def test_an_interrupted_fsync_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(path)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_checkpoint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save(path, step=1)
    save(path, step=2)
    assert load_checkpoint(path).step == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save(path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 1, 4):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"ckpt\.safetensors is truncated or corrupted.*earlier checkpoint"):
            load_checkpoint(path)


def test_one_flipped_byte_in_the_tensor_data_is_detected(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save(path)
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[8 + header_len + 5] ^= 0x01  # a low mantissa bit of some weight: still a perfectly valid float
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupted.*SHA-256"):
        load_checkpoint(path)


def test_an_edited_metadata_value_is_detected(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save(path, step=7)
    data = path.read_bytes()
    assert data.count(b'"step":"7"') == 1
    path.write_bytes(data.replace(b'"step":"7"', b'"step":"8"'))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


def test_a_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file({WEIGHT: np.zeros((2, 2), np.float32)}, path)
    with pytest.raises(CheckpointError, match="not one minielectra wrote"):
        load_checkpoint(path)


def test_missing_metadata_is_reported(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    tensors = {"params/w": np.zeros(2, np.float32), "optim/m/w": np.zeros(2, np.float32),
               "optim/v/w": np.zeros(2, np.float32)}
    metadata = {"format": checkpoint.CHECKPOINT_FORMAT, "step": "3"}
    metadata["sha256"] = checkpoint._digest(tensors, metadata)
    safetensors.numpy.save_file(tensors, path, metadata=metadata)
    with pytest.raises(CheckpointError, match="metadata lacks optim_step, config, rng, extra"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.PTH"])
def test_pickles_are_never_loaded(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle.*safetensors"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="pickle"):
        load_params(path)
    with pytest.raises(CheckpointError, match="pickle"):
        save(path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*nowhere\.safetensors"):
        load_checkpoint(tmp_path / "nowhere.safetensors")


def test_params_only_files(tmp_path):
    params, _ = trained_state()
    save_params(tmp_path / "model.safetensors", params, metadata={"note": "fine-tune me"})
    loaded, metadata = load_params(tmp_path / "model.safetensors")
    assert metadata == {"note": "fine-tune me"}
    for k in params:
        assert loaded[k].tobytes() == params[k].tobytes()
    with pytest.raises(CheckpointError, match="only params.*load_params"):
        load_checkpoint(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="reserved"):
        save_params(tmp_path / "x.safetensors", params, metadata={"sha256": "mine"})
    with pytest.raises(ValueError, match=r"str to str; convert \['epochs'\]"):
        save_params(tmp_path / "x.safetensors", params, metadata={"epochs": 3})


def test_scalar_and_float64_tensors_keep_their_shape_and_dtype(tmp_path):
    params = {"scale": np.array(2.5, np.float64), "table": np.arange(6, dtype=np.float32).reshape(2, 3).T}
    save_params(tmp_path / "model.safetensors", params)
    loaded, _ = load_params(tmp_path / "model.safetensors")
    assert loaded["scale"].shape == () and loaded["scale"].dtype == np.float64 and loaded["scale"] == 2.5
    np.testing.assert_array_equal(loaded["table"], params["table"])  # a transposed (non-contiguous) input


def test_load_params_reads_a_full_checkpoint_too(tmp_path):
    params, _, config_json = save(tmp_path / "ckpt.safetensors", step=9)
    loaded, metadata = load_params(tmp_path / "ckpt.safetensors")
    assert set(loaded) == set(params)  # the optimizer moments are left out
    assert metadata["step"] == "9" and metadata["config"] == config_json
    assert json.loads(metadata["rng"])["bit_generator"] == "PCG64"


def test_save_creates_the_directory(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "step_1.safetensors"
    save(path)
    assert load_checkpoint(path).step == 7
    assert os.listdir(path.parent) == ["step_1.safetensors"]


class DeviceArray:
    """Stands in for a CuPy array: not a NumPy array, copied to the host with .get()."""

    def __init__(self, host):
        self.host = host

    def get(self):
        return self.host


def test_device_arrays_are_copied_to_the_host(tmp_path):
    params = {WEIGHT: np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_params(tmp_path / "model.safetensors", {k: DeviceArray(a) for k, a in params.items()})
    loaded, _ = load_params(tmp_path / "model.safetensors")
    np.testing.assert_array_equal(loaded[WEIGHT], params[WEIGHT])
