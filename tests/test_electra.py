"""ELECTRA end to end: masking rules, sampling, the whole-model gradient check, the starting loss, overfitting."""

import math

import numpy as np
import pytest

from minielectra import electra as E
from minielectra import gradcheck as gc
from minielectra.config import ElectraConfig, preset
from model_checks import SMALL, float64_model, padded_batch
from minielectra.optim import adamw_init, adamw_step

@pytest.mark.parametrize("config", [SMALL, ElectraConfig(**{**SMALL.__dict__, "embedding_size": 8})],
                         ids=["E!=hidden", "E==hidden"])
def test_whole_model_gradient_check(config):
    params = float64_model(E.init_model, config)
    batch = padded_batch(np.random.default_rng(2), 3, 9, config.vocab_size)
    out = E.forward(params, batch, config, np.random.default_rng(7))  # dropout on
    grads = E.backward(out, params, config)
    assert set(grads) == set(params)

    def loss():  # same seed: same masks and dropout; samples held fixed
        return E.forward(params, batch, config, np.random.default_rng(7), samples=out.samples).losses["loss"]

    rows = [gc.check_backward(loss, params[k], grads[k], k) for k in sorted(params)]
    bad = [r for r in rows if not r.ok]
    assert not bad, gc.format_table(bad)
    # only the attention key biases, whose gradient is exactly zero, may pass on the zero rule
    assert all(r.rel_error < 1e-6 for r in rows if not r.name.endswith("key.bias"))


def test_shared_word_table_gets_three_gradients():
    """Sampled coordinates of the shared table, element by element: rows used by the generator's input, its tied LM
    head (every row: the softmax touches the whole vocabulary) and the discriminator's input."""
    config = SMALL
    params = float64_model(E.init_model, config)
    ids, mask = padded_batch(np.random.default_rng(3), 3, 9, config.vocab_size)
    out = E.forward(params, (ids, mask), config, np.random.default_rng(11))
    grads = E.backward(out, params, config)

    def loss():
        return E.forward(params, (ids, mask), config, np.random.default_rng(11), samples=out.samples).losses["loss"]

    Ecols = config.embedding_size
    rows = [int(ids[0, 1]), int(out.samples[0]), 4, 1]  # an input word, a sampled word, [MASK], [UNK] (head only)
    indices = [r * Ecols + c for r in rows for c in (0, Ecols - 1)]
    num = gc.numerical_grad(loss, params[E.WORDS], indices=indices)
    ana = grads[E.WORDS].reshape(-1)[indices]
    assert gc.rel_error(num, ana) < 1e-7
    # [UNK] never occurs in the batch, so only the LM head's softmax reaches its row, and it does reach it
    assert np.abs(grads[E.WORDS][1]).max() > 0


def test_masking_follows_the_paper():
    config = ElectraConfig(vocab_size=100)
    rng = np.random.default_rng(0)
    B, T = 64, 128
    ids = rng.integers(5, 100, (B, T))
    ids[:, 0], ids[:, -1] = config.cls_token_id, config.sep_token_id
    mask = np.ones_like(ids)
    ids[1, 20:], mask[1, 20:] = config.pad_token_id, 0  # a short sequence
    m = E.mask_tokens(ids, mask, config, rng)
    n = np.array([126] * B)
    n[1] = 19 - 1 + 1  # positions 1..19 are real words
    assert np.array_equal(m.weights.sum(axis=1), np.minimum(np.round(n * 0.15), E.max_predictions(config, T)))
    picked = m.positions[m.weights > 0]
    rows = np.nonzero(m.weights > 0)[0]
    assert not np.isin(ids[rows, picked], [config.pad_token_id, config.cls_token_id, config.sep_token_id]).any()
    for b in range(B):  # without replacement
        p = m.positions[b][m.weights[b] > 0]
        assert len(set(p)) == len(p)
    became_mask = m.masked_ids[rows, picked] == config.mask_token_id
    assert 0.8 < became_mask.mean() < 0.9  # 85 %
    unpicked = np.ones_like(ids, dtype=bool)
    unpicked[rows, picked] = False
    assert np.array_equal(m.masked_ids[unpicked], ids[unpicked])  # nothing else changes, no random words
    assert np.array_equal(m.masked_ids[rows, picked][~became_mask], ids[rows, picked][~became_mask])


def test_labels_mark_only_tokens_that_changed():
    config = SMALL
    params = E.init_model(config, np.random.default_rng(0))
    ids, mask = padded_batch(np.random.default_rng(5), 4, 12, config.vocab_size)
    out = E.forward(params, (ids, mask), config, np.random.default_rng(1), train=False)
    targets = ids.reshape(-1)[out.cache.gen_rows]
    assert out.metrics["replaced_frac"] == pytest.approx((out.samples != targets).sum() / mask.sum())
    # a sample equal to the original counts as original: replay with the originals as samples -> nothing replaced
    same = E.forward(params, (ids, mask), config, np.random.default_rng(1), train=False, samples=targets)
    assert same.metrics["replaced_frac"] == 0


def test_starting_loss_is_ln_v_plus_50_ln_2():
    config, _ = preset("tiny")
    params = E.init_model(config, np.random.default_rng(0))
    batch = padded_batch(np.random.default_rng(0), 8, 64, config.vocab_size)
    losses, _, _ = E.loss_and_grads(params, batch, config, np.random.default_rng(0))
    expected = math.log(config.vocab_size) + 50 * math.log(2)
    assert E.starting_loss(config.vocab_size) == pytest.approx(expected)
    assert losses["loss"] == pytest.approx(expected, rel=0.01)
    assert losses["mlm_loss"] == pytest.approx(math.log(config.vocab_size), rel=0.01)
    assert losses["rtd_loss"] == pytest.approx(math.log(2), rel=0.01)


@pytest.mark.slow
def test_tiny_overfits_one_batch():
    config, train = preset("tiny")
    params = E.init_model(config, np.random.default_rng(0))
    state = adamw_init(params)
    batch = padded_batch(np.random.default_rng(0), 4, 32, config.vocab_size)
    rng = np.random.default_rng(0)
    first = None
    for step in range(200):
        losses, _, grads = E.loss_and_grads(params, batch, config, rng)
        first = losses["loss"] if first is None else first
        adamw_step(params, grads, state, 1e-3, train)
    assert losses["loss"] < 0.5 * first


def test_bad_batch_is_reported():
    config = SMALL
    params = E.init_model(config, np.random.default_rng(0))
    ids, mask = padded_batch(np.random.default_rng(0), 2, 8, config.vocab_size)
    with pytest.raises(ValueError, match="vocab_size"):
        E.forward(params, (ids + 100, mask), config, np.random.default_rng(0))
    with pytest.raises(ValueError, match="attention_mask"):
        E.forward(params, (ids, mask[:, :3]), config, np.random.default_rng(0))
    with pytest.raises(TypeError, match="input_ids"):
        E.forward(params, (ids.astype(np.float32), mask), config, np.random.default_rng(0))


def test_small_preset_discriminator_has_13_5_million_parameters():
    """The paper's 13.5 M counts the discriminator (with the embeddings it shares), the model kept after pre-training."""
    config, _ = preset("small")
    shapes = E.param_shapes(config)
    n = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith(E.DISC))
    assert 13.4e6 < n < 13.6e6
    generator = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith(E.GEN))
    assert generator < 0.1 * n  # 1/4 the width: its layers are ~1/16 the size
