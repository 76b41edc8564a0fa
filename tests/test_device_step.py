"""Training on a device, without a GPU: every step on tests/fake_device.py's DeviceArrays, which behave as CuPy arrays
(a NumPy array mixed in is a TypeError; every read on the host is counted).

Checked: a whole ELECTRA step (forward, backward, clipping, AdamW), an evaluation forward, a classifier fine-tuning
step and train.pretrain keep params, grads, optimizer state and batches on the device, read nothing on the host during
a step (only the metrics, once per logging interval), and give the NumPy run's numbers bit for bit; checkpoints
written from the device load on the host and back. Dispatch keeps the reference ops here, except in the last test,
where the CUDA launchers run the .cu kernels on the CPU emulator on device arrays.
"""

import dataclasses
import shutil
import numpy as np
import pytest

import fake_device as fd
import model_checks
from model_checks import CORPUS_WORDS, write_corpus
from minielectra import backend, electra, finetune, parallel, train
from minielectra import checkpoint as ckpt
from minielectra import classifier as K
from minielectra.config import ElectraConfig, TrainConfig
from minielectra.optim import adamw_init, adamw_step, clip_scale, learning_rate

CONFIG = ElectraConfig(vocab_size=1000, embedding_size=16, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=40, generator_hidden_size=8, generator_num_attention_heads=1,
                       generator_intermediate_size=16, max_position_embeddings=32)
TC = TrainConfig(max_grad_norm=0.5)  # low enough that clipping scales the step


def padded_batch(B=3, T=20, pad_last=8, seed=1):
    """(ids, mask) (B, T); the last sequence ends in pad_last [PAD]s."""
    return model_checks.padded_batch(np.random.default_rng(seed), B, T, CONFIG.vocab_size, pad_last)


def host(tree):
    """A dict of device arrays copied to the host (an explicit transfer, counted)."""
    return {k: fd.fakecupy.asnumpy(v) for k, v in tree.items()}


def count_reads_before_each_step(monkeypatch, step_name):
    """A list that gets the host-read count before each call of parallel.<step_name> (the trainers' step), whose
    params must all be on the device; the differences are what each step cost."""
    syncs = []
    step_fn = getattr(parallel, step_name)

    def counted(module, params, *args, **kw):
        assert all(fd.is_device(p) for p in params.values())
        syncs.append(fd.counts.syncs)
        return step_fn(module, params, *args, **kw)

    monkeypatch.setattr(parallel, step_name, counted)
    return syncs


def full_step(params, state, batch, rng, step):
    losses, metrics, grads = electra.loss_and_grads(params, batch, CONFIG, rng, train=True)
    norm, scale = clip_scale(grads, TC.max_grad_norm)
    adamw = backend.dispatch("adamw_step", params[electra.WORDS])
    adamw(params, grads, state, learning_rate(step, TC), TC, grad_scale=scale)
    return {**losses, **metrics, "grad_norm": norm}, grads


@pytest.fixture(autouse=True)
def numpy_backend():
    """The host runs compared against use the reference ops (another test may have left the numba backend on)."""
    before = backend.active_backend()
    backend.set_backend("numpy")
    yield
    backend.set_backend(before)


@pytest.fixture
def device():
    with fd.register(kernels=None) as xp:
        yield xp


def test_fake_device_refuses_host_arrays_and_counts_host_reads(device):
    """The fake is only useful if it fails where CuPy would: these are the behaviours the tests below rely on."""
    a = device.asarray(np.arange(6.0).reshape(2, 3))
    with pytest.raises(TypeError, match="numpy.ndarray mixed"):
        a + np.ones(3)
    with pytest.raises(TypeError, match="numpy.ndarray mixed"):
        a[np.array([0, 1])]
    with pytest.raises(fd.ImplicitTransferError):
        np.asarray(a)
    total = a.sum()
    assert fd.is_device(total) and total.shape == ()  # a reduction stays on the device
    before = fd.counts.syncs
    float(total), int(a[0, 1]), bool(a[0, 0] > 0), device.asnumpy(a)
    assert fd.counts.syncs == before + 4
    assert backend.get_xp(a) is device and backend.on_device(a) and not backend.on_device(np.ones(2))


def test_whole_step_stays_on_the_device_and_matches_numpy(device):
    params = electra.init_model(CONFIG, np.random.default_rng(0))
    batch = padded_batch()
    dparams = fd.to_device(params)
    state, dstate = adamw_init(params), adamw_init(dparams)
    ref, ref_grads = full_step(params, state, batch, np.random.default_rng(3), 0)
    rng = np.random.default_rng(3)
    largest = fd.counts.largest_upload
    fd.counts.largest_upload = 0
    with fd.no_syncs("a whole training step"):
        out, grads = full_step(dparams, dstate, batch, rng, 0)
    # The (N, V) Gumbel noise and the dropout masks are drawn on the device: the largest copy up is a (B, T) array of
    # the batch (ids, masked ids, attention mask), int64 at most.
    assert 0 < fd.counts.largest_upload <= batch[0].size * 8
    fd.counts.largest_upload = max(largest, fd.counts.largest_upload)
    assert all(fd.is_device(v) for v in out.values()), "losses, metrics and the norm stay on the device"
    for tree in (dparams, grads, dstate.m, dstate.v):
        assert set(tree) == set(params) and all(fd.is_device(v) for v in tree.values())
    assert backend.host_values(out) == ref
    for k in params:
        np.testing.assert_array_equal(device.asnumpy(grads[k]), ref_grads[k], err_msg=k)
        np.testing.assert_array_equal(device.asnumpy(dparams[k]), params[k], err_msg=k)
        np.testing.assert_array_equal(device.asnumpy(dstate.v[k]), state.v[k], err_msg=k)


def test_host_values_copies_a_dict_of_device_scalars_in_one_transfer(device):
    values = {"a": device.asarray(np.float32(1.5)).sum(), "b": device.zeros(()) + 2, "step": 3, "lr": 0.5}
    before = fd.counts.syncs
    assert backend.host_values(values) == {"a": 1.5, "b": 2.0, "step": 3, "lr": 0.5}
    assert fd.counts.syncs == before + 1


def test_evaluation_forward_on_the_device(device):
    params = electra.init_model(CONFIG, np.random.default_rng(0))
    batch = padded_batch(seed=5)
    ref = electra.forward(params, batch, CONFIG, np.random.default_rng(9), train=False)
    with fd.no_syncs("an evaluation forward"):
        out = electra.forward(fd.to_device(params), batch, CONFIG, np.random.default_rng(9), train=False)
    assert fd.is_device(out.samples) and fd.is_device(out.cache.dmlm)
    assert backend.host_values(out.losses) == ref.losses
    assert backend.host_values(out.metrics) == ref.metrics


def test_a_device_batch_is_copied_down_once_for_masking(device):
    """forward masks on the host: a batch already on the device costs its two arrays' transfers, nothing more."""
    params = fd.to_device(electra.init_model(CONFIG, np.random.default_rng(0)))
    ids, mask = padded_batch()
    ref = electra.forward(params, (ids, mask), CONFIG, np.random.default_rng(9), train=False)
    before = fd.counts.syncs
    out = electra.forward(params, (device.asarray(ids), device.asarray(mask)), CONFIG, np.random.default_rng(9),
                          train=False)
    assert fd.counts.syncs == before + 2
    assert backend.host_values(out.losses) == backend.host_values(ref.losses)


def test_classifier_fine_tuning_step_on_the_device(device):
    num_labels = 3
    params = K.init_classifier(CONFIG, num_labels, np.random.default_rng(0))
    ids, mask = padded_batch(B=4, seed=2)
    batch = (ids, mask, np.zeros_like(ids), np.array([0, 2, 1, 2]))
    dparams = fd.to_device(params)
    state, dstate = adamw_init(params), adamw_init(dparams)
    loss, logits, grads = K.loss_and_grads(params, batch, CONFIG, num_labels, np.random.default_rng(4), train=True)
    adamw_step(params, grads, state, 1e-3, TC)
    with fd.no_syncs("a fine-tuning step"):
        dloss, dlogits, dgrads = K.loss_and_grads(dparams, batch, CONFIG, num_labels, np.random.default_rng(4),
                                                  train=True)
        adamw_step(dparams, dgrads, dstate, 1e-3, TC)
    assert fd.is_device(dloss) and fd.is_device(dlogits)
    assert float(dloss) == loss
    np.testing.assert_array_equal(device.asnumpy(dlogits), logits)
    for k in params:
        assert fd.is_device(dgrads[k]) and fd.is_device(dparams[k]), k
        np.testing.assert_array_equal(device.asnumpy(dgrads[k]), grads[k], err_msg=k)
        np.testing.assert_array_equal(device.asnumpy(dparams[k]), params[k], err_msg=k)


FINETUNE_LOG_EVERY = 2


def finetune_run(tmp_path, name):
    """Two epochs of fine-tuning a random-init classifier on 48 generated sentiment rows (written on the first call),
    logging every FINETUNE_LOG_EVERY steps."""
    data = tmp_path / "train.tsv"
    if not data.exists():
        rng = np.random.default_rng(0)
        lines = ["sentence\tlabel"] + [
            f"{'good fine great' if y else 'bad dull awful'} {' '.join(rng.choice(CORPUS_WORDS, 5))}\t{y}"
            for y in rng.integers(0, 2, 48)]
        data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    model = dataclasses.replace(CONFIG, vocab_size=200)
    tc = dataclasses.replace(PRETRAIN, batch_size=8, log_every=FINETUNE_LOG_EVERY, learning_rate=1e-3)
    return finetune.finetune(tmp_path / name, data=data, model=model, train=tc, epochs=2, progress=False,
                             cache_dir=tmp_path / "cache", kind="scratch")


def test_finetune_on_the_device_matches_numpy_and_reads_only_at_log_steps(tmp_path, monkeypatch):
    host_run = finetune_run(tmp_path, "host")
    with fd.register(kernels=None) as device:
        monkeypatch.setattr(backend, "array_module", lambda: device)
        syncs = count_reads_before_each_step(monkeypatch, "classifier_loss_and_grads")
        dev_run = finetune_run(tmp_path, "device")
    steps = host_run["history"][0]["step"]  # steps per epoch
    assert len(syncs) == 2 * steps
    per_step = np.diff(syncs)[:steps - 1]  # the first epoch's steps 1 .. steps-1 (the last one also evaluates)
    for step, n in enumerate(per_step, start=1):
        assert n == (1 if step % FINETUNE_LOG_EVERY == 0 else 0), f"step {step} read the device {n} times"
    drop = ("seconds",)
    assert ([{k: v for k, v in r.items() if k not in drop} for r in dev_run["history"]]
            == [{k: v for k, v in r.items() if k not in drop} for r in host_run["history"]])
    a, b = ckpt.load_params(host_run["model"]), ckpt.load_params(dev_run["model"])
    for k in a[0]:
        np.testing.assert_array_equal(b[0][k], a[0][k], err_msg=k)


def test_ctrl_c_in_device_fine_tuning_brings_the_sums_to_the_host_before_it_stops(tmp_path, monkeypatch):
    with fd.register(kernels=None) as device:
        monkeypatch.setattr(backend, "array_module", lambda: device)
        monkeypatch.setattr(finetune, "tqdm", model_checks.interrupting_bar(at=3))  # 3 is not a log step
        run = finetune_run(tmp_path, "device")
    assert [r["epoch"] for r in run["history"]] == [1] and run["history"][0]["step"] == 4
    assert isinstance(run["history"][0]["loss"], float) and run["best"] is run["history"][0]


# ---- train.pretrain on the device ---------------------------------------------------------------------------------

# Two shards: the host run splits each batch over two threads, the device run (one stream) takes the shards in turn,
# and the two must agree bit for bit.
PRETRAIN = TrainConfig(seq_len=32, batch_size=4, steps=8, warmup_steps=2, log_every=2, checkpoint_every=6,
                       eval_fraction=0.1, shards=2)


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def pretrain(tmp_path, corpus, name, **kw):
    model = dataclasses.replace(CONFIG, vocab_size=300)  # the corpus gives a smaller vocab anyway
    return train.pretrain(tmp_path / name, corpus=corpus, model=model, train=PRETRAIN, cache_dir=tmp_path / "cache",
                          progress=False, **kw)


def logged(path):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in train.read_metrics(path)]


def test_pretrain_on_the_device_matches_numpy_and_reads_only_at_log_steps(tmp_path, corpus, monkeypatch):
    host_run = pretrain(tmp_path, corpus, "host")
    with fd.register(kernels=None) as device:
        monkeypatch.setattr(backend, "array_module", lambda: device)
        syncs = count_reads_before_each_step(monkeypatch, "loss_and_grads")
        dev_run = pretrain(tmp_path, corpus, "device")
    assert len(syncs) == PRETRAIN.steps
    per_step = np.diff(syncs)  # the host reads of steps 1 .. 7 (each counted up to the start of the next)
    for step, n in enumerate(per_step, start=1):
        if step == PRETRAIN.checkpoint_every:  # metrics, the evaluation, and the checkpoint's tensors
            assert n > 2, step
        elif step % PRETRAIN.log_every == 0:
            assert n == 1, f"step {step}: the logging interval's metrics are one transfer, got {n}"
        else:
            assert n == 0, f"step {step} read the device {n} times"
    assert logged(tmp_path / "device" / "metrics.jsonl") == logged(tmp_path / "host" / "metrics.jsonl")
    a, b = ckpt.load_checkpoint(host_run["checkpoint"]), ckpt.load_checkpoint(dev_run["checkpoint"])
    for k in a.params:  # the device checkpoint loads on the host, as NumPy arrays equal to the host run's
        assert type(b.params[k]) is np.ndarray and type(b.opt_state.m[k]) is np.ndarray
        np.testing.assert_array_equal(b.params[k], a.params[k], err_msg=k)
        np.testing.assert_array_equal(b.opt_state.v[k], a.opt_state.v[k], err_msg=k)


def resume(tmp_path, corpus, name):
    return train.pretrain(tmp_path / name, corpus=corpus, resume=True, cache_dir=tmp_path / "cache", progress=False)


def test_checkpoints_move_between_device_and_host_runs(tmp_path, corpus, monkeypatch):
    """Half a run on the device resumed on the host, and half a run on the host resumed on the device, both end
    exactly where a run on the host alone does."""
    half = PRETRAIN.steps // 2
    straight = pretrain(tmp_path, corpus, "straight")
    pretrain(tmp_path, corpus, "host_then_device", stop_after=half)
    with fd.register(kernels=None) as device, monkeypatch.context() as m:
        m.setattr(backend, "array_module", lambda: device)
        pretrain(tmp_path, corpus, "device_then_host", stop_after=half)
        resumed_on_device = resume(tmp_path, corpus, "host_then_device")
    resumed_on_host = resume(tmp_path, corpus, "device_then_host")
    a = ckpt.load_checkpoint(straight["checkpoint"])
    for run in (resumed_on_device, resumed_on_host):
        assert run["finished"]
        b = ckpt.load_checkpoint(run["checkpoint"])
        assert b.step == PRETRAIN.steps
        for k in a.params:
            np.testing.assert_array_equal(b.params[k], a.params[k], err_msg=k)
            np.testing.assert_array_equal(b.opt_state.m[k], a.opt_state.m[k], err_msg=k)
    def trained(name):  # the training rows: a stopped half adds an evaluation at its checkpoint
        return [r for r in logged(tmp_path / name / "metrics.jsonl") if "loss" in r]

    assert trained("host_then_device") == trained("straight")
    assert trained("device_then_host") == trained("straight")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU emulator needs g++ (C++20)")
def test_cuda_launchers_on_device_arrays_read_nothing_on_the_host():
    """The whole step with every dispatched op on the minielectra.kernels.cupy_gpu launchers (the .cu kernels on the
    CPU emulator), on device arrays: no host reads, and the reference step's numbers within float32 rounding."""
    from minielectra.kernels.cupy_gpu import _common

    config = dataclasses.replace(CONFIG, vocab_size=200, num_hidden_layers=1, max_position_embeddings=24)
    params = electra.init_model(config, np.random.default_rng(0))
    ids, mask = padded_batch(B=2, T=11, pad_last=4)
    ids[ids >= config.vocab_size] %= config.vocab_size - 5
    ref = electra.forward(params, (ids, mask), config, np.random.default_rng(3), train=False)
    ref_grads = electra.backward(ref, params, config)
    dparams = fd.to_device(params)
    state = adamw_init(params)
    adamw_step(params, ref_grads, state, 1e-3, TC, grad_scale=clip_scale(ref_grads, TC.max_grad_norm)[1])
    with fd.register(kernels="minielectra.kernels.cupy_gpu"), _common.using(fd.DeviceEmulatorRuntime()):
        dstate = adamw_init(dparams)
        with fd.no_syncs("a step on the CUDA launchers"):
            out = electra.forward(dparams, (ids, mask), config, np.random.default_rng(3), train=False,
                                  samples=ref.samples)
            grads = electra.backward(out, dparams, config)
            adamw = backend.dispatch("adamw_step", dparams[electra.WORDS])
            adamw(dparams, grads, dstate, 1e-3, TC, grad_scale=clip_scale(grads, TC.max_grad_norm)[1])
        for op in ("attention_forward", "softmax_cross_entropy", "adamw_step"):
            kernel = backend.dispatch(op, dparams[electra.WORDS])
            assert kernel.__module__.startswith("minielectra.kernels.cupy_gpu."), op
        losses, metrics = backend.host_values(out.losses), backend.host_values(out.metrics)
    for k in ref.losses:
        assert losses[k] == pytest.approx(ref.losses[k], rel=1e-5), k
    assert metrics == pytest.approx(ref.metrics)
    floor = 1e-6 * np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in ref_grads.values()))
    for k in ref_grads:
        err = np.linalg.norm((fd.fakecupy.asnumpy(grads[k]) - ref_grads[k]).astype(np.float64))
        assert err <= 1e-5 * (np.linalg.norm(ref_grads[k].astype(np.float64)) + floor), k
        # one AdamW update of size ~lr from nearly equal gradients: the params agree to float32 rounding of that
        np.testing.assert_allclose(fd.fakecupy.asnumpy(dparams[k]), params[k], rtol=0, atol=1e-6, err_msg=k)
