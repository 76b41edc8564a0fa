"""The LSTM baseline classifier: every parameter against its own forward in float64, init, padding, bad input."""

import numpy as np
import pytest

from minielectra import gradcheck as gc
from minielectra import lstm_classifier as L
from minielectra.config import ConfigError

CONFIG = L.LSTMConfig(vocab_size=17, embedding_size=5, hidden_size=4, dropout=0.2)


def _float64_model(config, num_labels, seed=0):
    params = L.init_classifier(config, num_labels, np.random.default_rng(seed), np.float64)
    rng = np.random.default_rng(seed + 1)
    for k in params:  # off the init's special values (zero biases)
        params[k] += rng.standard_normal(params[k].shape) * 0.3
    return params


def _batch(rng, B, T, V, num_labels):
    ids = rng.integers(5, V, (B, T))
    ids[:, 0] = 2
    mask = np.ones_like(ids)
    ids[1, T - 2:], mask[1, T - 2:] = 0, 0  # a padded row
    ids[-1], mask[-1] = 0, 0  # a row of padding only
    return ids, mask, np.zeros_like(ids), rng.integers(0, num_labels, B)


@pytest.mark.parametrize("num_labels, train", [(2, True), (3, True), (2, False)])
def test_every_parameter_gradient_check(num_labels, train):
    params = _float64_model(CONFIG, num_labels)
    batch = _batch(np.random.default_rng(2), 4, 6, CONFIG.vocab_size, num_labels)
    loss, _, grads = L.loss_and_grads(params, batch, CONFIG, num_labels, np.random.default_rng(5), train=train)
    assert set(grads) == set(params)

    def f():  # the same seed: the same dropout masks
        return L.forward(params, batch, CONFIG, num_labels, np.random.default_rng(5), train=train)[0]

    rows = [gc.check_backward(f, params[k], grads[k], k) for k in sorted(params)]
    assert all(r.ok and r.rel_error <= 1e-7 for r in rows), gc.format_table(rows)
    # the padding row's ids (all [PAD] = 0) never reach the LSTM: only real tokens' rows of the table get gradient
    used = np.unique(batch[0][batch[1] != 0])
    unused = np.setdiff1d(np.arange(CONFIG.vocab_size), used)
    assert not grads[L.WORDS][unused].any()


def test_backward_with_given_dlogits():
    params = _float64_model(CONFIG, 2)
    ids, mask, types, _ = _batch(np.random.default_rng(3), 3, 5, CONFIG.vocab_size, 2)
    loss, logits, cache = L.forward(params, (ids, mask, types, None), CONFIG, 2)
    assert loss is None
    dlogits = np.random.default_rng(4).standard_normal(logits.shape)
    grads = L.backward(params, cache, dlogits)

    def f():
        return float(np.sum(L.forward(params, (ids, mask, types, None), CONFIG, 2)[1] * dlogits))

    rows = [gc.check_backward(f, params[k], grads[k], k) for k in sorted(params)]
    assert all(r.ok and r.rel_error <= 1e-7 for r in rows), gc.format_table(rows)
    with pytest.raises(ValueError, match="pass dlogits"):
        L.backward(params, cache)


def test_init_and_padding():
    params = L.init_classifier(L.LSTMConfig(vocab_size=50, embedding_size=8, hidden_size=6), 2,
                               np.random.default_rng(0))
    assert params[f"{L.RNN}.weight_hh"].shape == (6, 24) and params[f"{L.RNN}.weight_ih"].dtype == np.float32
    bias = params[f"{L.RNN}.bias"]
    assert np.array_equal(bias[6:12], np.ones(6)) and not bias[:6].any() and not bias[12:].any()  # forget gate 1
    assert np.abs(params[f"{L.RNN}.weight_hh"]).max() <= 1 / np.sqrt(6)
    config = L.LSTMConfig(vocab_size=50, embedding_size=8, hidden_size=6)
    ids = np.array([[2, 7, 9, 3]])
    padded = np.array([[2, 7, 9, 3, 0, 0]])
    a = L.forward(params, (ids, np.ones_like(ids), ids * 0, None), config, 2)[1]
    b = L.forward(params, (padded, (padded != 0).astype(int), padded * 0, None), config, 2)[1]
    np.testing.assert_array_equal(a, b)  # padding changes nothing


def test_bad_input_and_config_are_named():
    params = L.init_classifier(CONFIG, 2, np.random.default_rng(0), np.float64)
    ids, mask, types, labels = _batch(np.random.default_rng(0), 3, 4, CONFIG.vocab_size, 2)
    with pytest.raises(ValueError, match="vocab_size"):
        L.forward(params, (ids + 100, mask, types, labels), CONFIG, 2)
    with pytest.raises(ValueError, match="labels must lie in"):
        L.forward(params, (ids, mask, types, labels + 5), CONFIG, 2)
    with pytest.raises(ValueError, match="num_labels 3"):
        L.forward(params, (ids, mask, types, labels), CONFIG, 3)
    with pytest.raises(ConfigError, match="dropout"):
        L.LSTMConfig(dropout=1.0).validate()
    with pytest.raises(ConfigError, match="unknown LSTMConfig field"):
        L.LSTMConfig.from_dict({"hidden": 3})
    assert L.LSTMConfig.from_dict(CONFIG.to_dict()) == CONFIG


def test_step_on_a_device_matches_the_host_and_reads_nothing_back():
    """On tests/fake_device.py's CuPy-like arrays: the same loss, logits and gradients, no host read in the step."""
    import fake_device as fd

    from minielectra import backend

    before = backend.active_backend()
    backend.set_backend("numpy")
    try:
        params = L.init_classifier(CONFIG, 2, np.random.default_rng(0))
        batch = _batch(np.random.default_rng(1), 4, 6, CONFIG.vocab_size, 2)
        loss, logits, grads = L.loss_and_grads(params, batch, CONFIG, 2, np.random.default_rng(2))
        with fd.register(kernels=None) as device:
            dparams = fd.to_device(params)
            with fd.no_syncs("an LSTM classifier step"):
                dloss, dlogits, dgrads = L.loss_and_grads(dparams, batch, CONFIG, 2, np.random.default_rng(2))
            assert fd.is_device(dloss) and float(dloss) == loss
            np.testing.assert_array_equal(device.asnumpy(dlogits), logits)
            for k in params:
                np.testing.assert_array_equal(device.asnumpy(dgrads[k]), grads[k], err_msg=k)
    finally:
        backend.set_backend(before)
