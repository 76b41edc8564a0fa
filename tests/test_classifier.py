"""The classification model: float64 gradient check of every parameter, init from a pre-training run, lr scales."""

import numpy as np
import pytest

from minielectra import classifier as K
from minielectra import electra as E
from minielectra import gradcheck as gc
from minielectra.config import ElectraConfig

SMALL = ElectraConfig(vocab_size=23, embedding_size=6, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=12, generator_hidden_size=4, generator_num_attention_heads=1,
                      generator_intermediate_size=8, max_position_embeddings=16, hidden_dropout_prob=0.2,
                      attention_probs_dropout_prob=0.2)


def _pair_batch(rng, B, T, V, num_labels):
    """[CLS] a [SEP] b [SEP] with token types 0 then 1; the last sequence padded."""
    ids = rng.integers(5, V, (B, T))
    types = np.zeros_like(ids)
    mask = np.ones_like(ids)
    ids[:, 0] = 2
    ids[:, 4] = 3  # end of sentence a
    types[:, 5:] = 1
    ids[:, -1] = 3
    ids[-1, T - 3:], mask[-1, T - 3:], types[-1, T - 3:] = 0, 0, 0
    ids[-1, T - 4] = 3
    labels = rng.integers(0, num_labels, B)
    return ids, mask, types, labels


def _float64_params(config, num_labels, seed=0):
    params = K.init_classifier(config, num_labels, np.random.default_rng(seed), dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    for k in params:  # move biases and gains off 0 and 1 so their gradients are not special cases
        params[k] += rng.standard_normal(params[k].shape) * 0.3
    return params


@pytest.mark.parametrize("config, num_labels", [
    (SMALL, 3),
    (ElectraConfig(**{**SMALL.__dict__, "embedding_size": 8}), 2),
], ids=["E!=hidden-3labels", "E==hidden-binary"])
def test_gradient_check_of_every_parameter(config, num_labels):
    params = _float64_params(config, num_labels)
    batch = _pair_batch(np.random.default_rng(2), 3, 9, config.vocab_size, num_labels)
    loss, logits, cache = K.forward(params, batch, config, num_labels, np.random.default_rng(7), train=True)
    assert logits.shape == (3, num_labels) and np.isfinite(loss)
    grads = K.backward(params, cache)
    assert set(grads) == set(params) == set(K.classifier_shapes(config, num_labels))

    def f():  # a fresh Generator with the same seed per call: the same dropout masks
        return K.forward(params, batch, config, num_labels, np.random.default_rng(7), train=True)[0]

    rows = [gc.check_backward(f, params[k], grads[k], k) for k in sorted(params)]
    bad = [r for r in rows if not r.ok]
    assert not bad, gc.format_table(bad)
    assert all(r.rel_error < 1e-6 for r in rows if not r.name.endswith("key.bias"))
    # token type 1 was used, so its embedding row learns; a padded position's word does not reach [CLS]
    assert np.abs(grads[f"{E.EMB}.token_type_embeddings.weight"][1]).max() > 0


def test_padding_does_not_change_the_logits():
    config, n = SMALL, 2
    params = _float64_params(config, n)
    ids, mask, types, labels = _pair_batch(np.random.default_rng(3), 3, 9, config.vocab_size, n)
    _, logits, _ = K.forward(params, (ids, mask, types, labels), config, n)
    ids2 = ids.copy()
    ids2[-1, -3:] = 7  # other words under the pads
    _, logits2, _ = K.forward(params, (ids2, mask, types, labels), config, n)
    np.testing.assert_allclose(logits, logits2, rtol=1e-12)
    # and a batch trimmed to the longest real sequence gives the same logits
    _, trimmed, _ = K.forward(params, (ids[-1:, :6], mask[-1:, :6], types[-1:, :6], None), config, n)
    np.testing.assert_allclose(trimmed, logits[-1:], rtol=1e-10)


def test_eval_is_deterministic_and_needs_no_rng():
    params = _float64_params(SMALL, 2)
    batch = _pair_batch(np.random.default_rng(4), 2, 9, SMALL.vocab_size, 2)
    a = K.forward(params, batch, SMALL, 2)[1]
    b = K.forward(params, batch, SMALL, 2)[1]
    np.testing.assert_array_equal(a, b)
    p = K.probabilities(a)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)


def test_init_copies_the_pretrained_encoder_and_only_it():
    pre = E.init_model(SMALL, np.random.default_rng(0))
    params = K.init_classifier(SMALL, 4, np.random.default_rng(1), init_params=pre)
    encoder = [k for k in params if not k.startswith("classifier.")]
    assert encoder and all(k.startswith("discriminator.electra.") for k in encoder)
    for k in encoder:
        np.testing.assert_array_equal(params[k], pre[k])
        assert params[k] is not pre[k]
    assert params["classifier.out_proj.weight"].shape == (SMALL.hidden_size, 4)
    assert not any(k.startswith("generator") for k in params)
    with pytest.raises(ValueError, match="lack"):
        K.init_classifier(SMALL, 2, np.random.default_rng(1), init_params={"x": np.zeros(1)})
    wider = ElectraConfig(**{**SMALL.__dict__, "intermediate_size": 16})
    with pytest.raises(ValueError, match="wrong shape"):
        K.init_classifier(wider, 2, np.random.default_rng(1), init_params=pre)


def test_bad_inputs_are_clear_errors():
    params = _float64_params(SMALL, 2)
    ids, mask, types, labels = _pair_batch(np.random.default_rng(5), 2, 9, SMALL.vocab_size, 2)
    with pytest.raises(ValueError, match="labels must lie"):
        K.forward(params, (ids, mask, types, labels + 5), SMALL, 2)
    with pytest.raises(ValueError, match="vocab"):
        K.forward(params, (ids + 100, mask, types, labels), SMALL, 2)
    with pytest.raises(ValueError, match="num_labels"):
        K.classifier_shapes(SMALL, 1)
    _, _, cache = K.forward(params, (ids, mask, types, None), SMALL, 2)
    with pytest.raises(ValueError, match="dlogits"):
        K.backward(params, cache)


def test_layer_lr_scales():
    params = K.init_classifier(SMALL, 2, np.random.default_rng(0))
    s = K.layer_lr_scales(params, SMALL.num_hidden_layers, 0.8)
    # the official _get_layer_lrs with 2 layers: head depth 4, layer i depth i + 1, embeddings depth 0
    assert s["classifier.out_proj.weight"] == 1.0
    assert s["discriminator.electra.encoder.layer.1.output.dense.weight"] == pytest.approx(0.8 ** 2)
    assert s["discriminator.electra.encoder.layer.0.output.dense.weight"] == pytest.approx(0.8 ** 3)
    assert s["discriminator.electra.embeddings.word_embeddings.weight"] == pytest.approx(0.8 ** 4)
    assert s["discriminator.electra.embeddings_project.weight"] == pytest.approx(0.8 ** 4)
