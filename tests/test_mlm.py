"""The BERT-style masked-LM baseline: BERT's 80/10/10 corruption, the whole-model gradient check, the starting loss,
overfitting one batch, the parameter names fine-tuning reads, and the model-FLOPs count."""

import math

import numpy as np
import pytest

from minielectra import bench
from minielectra import classifier as clf
from minielectra import electra as E
from minielectra import gradcheck as gc
from minielectra import mlm as M
from minielectra.config import ElectraConfig, preset
from model_checks import SMALL, float64_model, padded_batch
from minielectra.optim import adamw_init, adamw_step

@pytest.mark.parametrize("config", [SMALL, ElectraConfig(**{**SMALL.__dict__, "embedding_size": 8})],
                         ids=["E!=hidden", "E==hidden"])
def test_whole_model_gradient_check(config):
    params = float64_model(M.init_model, config)
    batch = padded_batch(np.random.default_rng(2), 3, 9, config.vocab_size)
    out = M.forward(params, batch, config, np.random.default_rng(7))  # dropout on
    grads = M.backward(out, params, config)
    assert set(grads) == set(params)
    # the corrupted input holds all three kinds of picks, so every path through the embeddings is checked
    ids = batch[0]
    picked = out.masking.positions[out.masking.weights > 0]
    rows = np.nonzero(out.masking.weights > 0)[0]
    now, before = out.masking.masked_ids[rows, picked], ids[rows, picked]
    assert (now == config.mask_token_id).any() and (now == before).any()

    def loss():  # same seed: same dropout; the corrupted input held fixed as well
        return M.forward(params, batch, config, np.random.default_rng(7), masking=out.masking).losses["loss"]

    rows = [gc.check_backward(loss, params[k], grads[k], k) for k in sorted(params)]
    bad = [r for r in rows if not r.ok]
    assert not bad, gc.format_table(bad)
    # only the attention key biases, whose gradient is exactly zero, may pass on the zero rule
    assert all(r.rel_error < 1e-6 for r in rows if not r.name.endswith("key.bias"))


def test_tied_word_table_gets_lookup_and_lm_head_gradients():
    config = SMALL
    params = float64_model(M.init_model, config)
    ids, mask = padded_batch(np.random.default_rng(3), 3, 9, config.vocab_size)
    out = M.forward(params, (ids, mask), config, np.random.default_rng(11))
    grads = M.backward(out, params, config)

    def loss():
        return M.forward(params, (ids, mask), config, np.random.default_rng(11), masking=out.masking).losses["loss"]

    Ecols = config.embedding_size
    rows = [int(ids[0, 1]), 4, 1]  # an input word, [MASK], [UNK] (never in the batch: the LM head's softmax only)
    indices = [r * Ecols + c for r in rows for c in (0, Ecols - 1)]
    num = gc.numerical_grad(loss, params[E.WORDS], indices=indices)
    assert gc.rel_error(num, grads[E.WORDS].reshape(-1)[indices]) < 1e-7
    assert np.abs(grads[E.WORDS][1]).max() > 0


def test_masking_is_bert_80_10_10_on_electras_picks():
    config = ElectraConfig(vocab_size=100)
    B, T = 256, 128
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 100, (B, T))
    ids[:, 0], ids[:, -1] = config.cls_token_id, config.sep_token_id
    mask = np.ones_like(ids)
    ids[1, 20:], mask[1, 20:] = config.pad_token_id, 0
    m = M.mask_tokens(ids, mask, config, np.random.default_rng(1))
    picks = E.mask_tokens(ids, mask, config, np.random.default_rng(1))
    assert np.array_equal(m.positions, picks.positions) and np.array_equal(m.weights, picks.weights)
    rows, picked = np.nonzero(m.weights > 0)[0], m.positions[m.weights > 0]
    now, before = m.masked_ids[rows, picked], ids[rows, picked]
    masked = now == config.mask_token_id
    kept = now == before
    randomised = ~masked & ~kept
    assert 0.78 < masked.mean() < 0.82
    # a random word equal to the original reads as kept: 10 % + 10 % / 95 words of the picks
    assert 0.09 < kept.mean() < 0.12 and 0.08 < randomised.mean() < 0.11
    assert not np.isin(now[randomised], M.special_ids(config)).any()
    unpicked = np.ones_like(ids, dtype=bool)
    unpicked[rows, picked] = False
    assert np.array_equal(m.masked_ids[unpicked], ids[unpicked])


def test_lm_head_runs_at_the_picks_only():
    config = SMALL
    params = M.init_model(config, np.random.default_rng(0), np.float64)
    ids, mask = padded_batch(np.random.default_rng(4), 2, 10, config.vocab_size)
    out = M.forward(params, (ids, mask), config, np.random.default_rng(0), train=False)
    n = int(out.masking.weights.sum())
    assert out.cache.dlogits.shape == (n, config.vocab_size)
    assert out.losses["loss"] == out.losses["mlm_loss"]
    assert 0.0 <= out.metrics["mlm_acc"] <= 1.0


def test_starting_loss_is_ln_v():
    config, _ = preset("tiny")
    params = M.init_model(config, np.random.default_rng(0))
    batch = padded_batch(np.random.default_rng(0), 8, 64, config.vocab_size)
    losses, metrics, _ = M.loss_and_grads(params, batch, config, np.random.default_rng(0))
    assert M.starting_loss(config.vocab_size) == pytest.approx(math.log(config.vocab_size))
    assert losses["loss"] == pytest.approx(math.log(config.vocab_size), rel=0.01)
    assert set(metrics) == {"mlm_acc"}


def test_overfits_one_batch():
    config = ElectraConfig(vocab_size=60, embedding_size=16, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64, generator_hidden_size=8,
                           generator_intermediate_size=16, max_position_embeddings=32, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    _, train = preset("tiny")
    params = M.init_model(config, np.random.default_rng(0))
    state = adamw_init(params)
    batch = padded_batch(np.random.default_rng(0), 4, 16, config.vocab_size)
    first = None
    for _ in range(150):
        # the same corruption every step: a model can only memorise a fixed question
        losses, metrics, grads = M.loss_and_grads(params, batch, config, np.random.default_rng(0))
        first = losses["loss"] if first is None else first
        adamw_step(params, grads, state, 3e-3, train)
    assert losses["loss"] < 0.1 * first and metrics["mlm_acc"] == 1.0


def test_encoder_keys_are_the_classifiers():
    """finetune --init copies the classifier's encoder keys: an MLM run holds exactly those, same shapes, plus its
    head."""
    config, _ = preset("tiny")
    shapes = M.param_shapes(config)
    encoder = {k: s for k, s in clf.classifier_shapes(config, 2).items() if not k.startswith(f"{clf.HEAD}.")}
    assert {k: s for k, s in shapes.items() if not k.startswith(f"{M.HEAD}.")} == encoder
    electra_encoder = {k: s for k, s in E.param_shapes(config).items() if k.startswith(f"{E.DISC}.electra.")}
    assert electra_encoder == encoder


def test_model_flops_counts_every_weight_on_its_rows():
    config, _ = preset("tiny")
    B, T = 4, 64
    shapes = M.param_shapes(config)
    masked = bench.masked_tokens(config, B, T)
    total = 0
    for k, s in shapes.items():
        if len(s) != 2 or "embeddings." in k:  # biases, norms and lookups are not counted
            continue
        total += 6 * s[0] * s[1] * (masked if k.startswith(f"{M.HEAD}.") else B * T)
    total += 6 * config.embedding_size * config.vocab_size * masked  # the tied LM head (the word table, read out)
    total += 12 * config.num_hidden_layers * T * T * config.hidden_size * B  # attention scores and values
    assert M.model_flops(config, B, T) == total
    assert M.model_flops(config, B, T) < bench.model_flops(config, B, T)  # no generator, no discriminator head


def test_bad_batch_is_reported():
    params = M.init_model(SMALL, np.random.default_rng(0))
    ids, mask = padded_batch(np.random.default_rng(0), 2, 8, SMALL.vocab_size)
    with pytest.raises(ValueError, match="vocab_size"):
        M.forward(params, (ids + 100, mask), SMALL, np.random.default_rng(0))


def test_step_on_a_device_matches_the_host_and_reads_nothing_back():
    """On tests/fake_device.py's CuPy-like arrays: the same losses and gradients, and no host read during the step."""
    import fake_device as fd

    from minielectra import backend
    from minielectra.optim import adamw_init

    before = backend.active_backend()
    backend.set_backend("numpy")
    try:
        config = ElectraConfig(**{**SMALL.__dict__, "vocab_size": 60})
        params = M.init_model(config, np.random.default_rng(0))
        batch = padded_batch(np.random.default_rng(1), 3, 12, config.vocab_size)
        losses, metrics, grads = M.loss_and_grads(params, batch, config, np.random.default_rng(3))
        with fd.register(kernels=None) as device:
            dparams = fd.to_device(params)
            with fd.no_syncs("an MLM step"):
                dlosses, dmetrics, dgrads = M.loss_and_grads(dparams, batch, config, np.random.default_rng(3))
                adamw_step(dparams, dgrads, adamw_init(dparams), 1e-3, preset("tiny")[1])
            assert all(fd.is_device(v) for v in {**dlosses, **dmetrics}.values())
            assert backend.host_values({**dlosses, **dmetrics}) == {**losses, **metrics}
            for k in params:
                np.testing.assert_array_equal(device.asnumpy(dgrads[k]), grads[k], err_msg=k)
    finally:
        backend.set_backend(before)
