"""The whole encoder stack, gradient-checked end to end: embeddings -> (project) -> 2 post-LN layers, dropout on."""

import numpy as np
import pytest

from minielectra import backend
from minielectra.gradcheck import check_backward, format_table
from minielectra.nn import init_params, zeros_like
from minielectra.nn.encoder import (
    EncoderDims,
    electra_encoder_backward,
    electra_encoder_forward,
    embeddings_shapes,
    encoder_shapes,
)

PREFIX, EMB = "discriminator.electra", "discriminator.electra.embeddings"
SEED = 1234

IDS = np.array([[1, 5, 2, 6], [3, 4, 0, 0]])
TYPES = np.array([[0, 0, 1, 1], [0, 1, 0, 0]])
MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])  # sequence 1 has two padded positions


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    """These tests are about the NumPy reference: whatever $MINIELECTRA_BACKEND says, dispatch returns it here."""
    monkeypatch.setattr(backend, "_active", "numpy")


def dims(E=6, C=4, dropout=0.2):
    return EncoderDims(vocab_size=7, embedding_size=E, hidden_size=C, num_layers=2, num_heads=2, intermediate_size=8,
                       max_positions=5, type_vocab_size=2, hidden_dropout=dropout, attention_dropout=dropout)


def make_params(d, dtype=np.float64):
    shapes = {**embeddings_shapes(EMB, d), **encoder_shapes(PREFIX, d)}
    rng = np.random.default_rng(0)
    params = init_params(shapes, rng, std=0.4, dtype=np.float64)
    for k, v in params.items():  # move biases off 0 and LayerNorm gains off 1, so their gradients are non-trivial
        if k.endswith(".bias") or "LayerNorm" in k:
            v += 0.3 * rng.standard_normal(v.shape)
    return {k: v.astype(dtype) for k, v in params.items()}


def forward(params, d, ids=IDS, types=TYPES, mask=MASK, train=True, seed=SEED):
    rng = np.random.default_rng(seed) if seed is not None else None  # a fresh Generator per call: same dropout masks
    return electra_encoder_forward(params, PREFIX, EMB, ids, types, mask, d, train=train, rng=rng)


def gradcheck_every_parameter(d):
    params = make_params(d)
    out, cache = forward(params, d)
    dout = np.random.default_rng(1).standard_normal(out.shape)
    grads = zeros_like(params)
    electra_encoder_backward(dout, cache, grads, PREFIX, EMB)
    assert grads.keys() == params.keys()

    def loss():
        return float(np.sum(forward(params, d)[0] * dout))

    rows = [check_backward(loss, params[k], grads[k], k) for k in sorted(params)]
    table = format_table(rows)
    for r in rows:
        assert r.ok and (r.rel_error <= 1e-6 or r.max_abs_diff <= 1e-9), table
        if not r.name.endswith("attention.self.key.bias"):  # softmax ignores a shift shared by a row: exactly 0
            assert np.abs(grads[r.name]).max() > 1e-6, f"{r.name} has a trivial gradient\n{table}"
    return params


def test_dropout_is_really_on_in_the_checked_forward():
    d = dims()
    params = make_params(d)
    train, _ = forward(params, d)
    evaluated, _ = forward(params, d, train=False, seed=None)
    assert not np.allclose(train, evaluated)


def test_every_parameter_passes_a_gradient_check_with_embeddings_project():
    d = dims(E=6, C=4)
    params = gradcheck_every_parameter(d)
    assert f"{PREFIX}.embeddings_project.weight" in params
    assert f"{PREFIX}.embeddings_project.bias" in params
    assert sum(k.startswith(f"{PREFIX}.encoder.layer.") for k in params) == 2 * 16


def test_every_parameter_passes_a_gradient_check_without_embeddings_project():
    d = dims(E=4, C=4)
    params = gradcheck_every_parameter(d)
    assert not any("embeddings_project" in k for k in params)


def test_eval_mode_is_deterministic_and_ignores_rng():
    d = dims()
    params = make_params(d)
    a, _ = forward(params, d, train=False, seed=None)
    b, _ = forward(params, d, train=False, seed=1)
    c, _ = forward(params, d, train=False, seed=2)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    t1, _ = forward(params, d, train=True, seed=1)
    t1b, _ = forward(params, d, train=True, seed=1)
    t2, _ = forward(params, d, train=True, seed=2)
    np.testing.assert_array_equal(t1, t1b)
    assert not np.allclose(t1, t2)
    no_dropout = dims(dropout=0.0)
    np.testing.assert_array_equal(forward(params, no_dropout, train=True, seed=None)[0], a)


@pytest.mark.parametrize("train", [False, True])
def test_padded_positions_do_not_reach_real_positions(train):
    d = dims()
    params = make_params(d)
    seed = SEED if train else None
    out, _ = forward(params, d, train=train, seed=seed)
    other_ids, other_types = IDS.copy(), TYPES.copy()
    other_ids[1, 2:] = [6, 5]  # change only what sits at the padded positions
    other_types[1, 2:] = [1, 1]
    changed, _ = forward(params, d, ids=other_ids, types=other_types, train=train, seed=seed)
    np.testing.assert_allclose(changed[1, :2], out[1, :2], rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(changed[0], out[0])
    assert not np.allclose(changed[1, 2:], out[1, 2:])  # the padded positions themselves did see the change
    # controls: without the mask the same change does reach the real positions; so does a change at a real position
    unmasked, _ = forward(params, d, mask=np.ones_like(MASK), train=train, seed=seed)
    unmasked_changed, _ = forward(params, d, ids=other_ids, types=other_types, mask=np.ones_like(MASK),
                                  train=train, seed=seed)
    assert not np.allclose(unmasked_changed[1, :2], unmasked[1, :2])
    real_changed_ids = IDS.copy()
    real_changed_ids[1, 1] = 6
    assert not np.allclose(forward(params, d, ids=real_changed_ids, train=train, seed=seed)[0][1, 0], out[1, 0])


def test_float32_forward_and_backward_stay_float32():
    d = dims()
    params = make_params(d, np.float32)
    out, cache = forward(params, d)
    assert out.dtype == np.float32
    grads = zeros_like(params)
    electra_encoder_backward(np.ones_like(out), cache, grads, PREFIX, EMB)
    assert all(g.dtype == np.float32 and np.isfinite(g).all() for g in grads.values())
    out64, _ = forward({k: v.astype(np.float64) for k, v in params.items()}, d)
    np.testing.assert_allclose(out, out64, rtol=1e-4, atol=1e-4)
