"""LSTM: the forward against the textbook equations, padding semantics, and BPTT against its own forward in float64."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minielectra.gradcheck import H, check_op, format_table, numerical_grad, rel_error
from minielectra.ops.lstm import lstm_backward, lstm_forward

NAMES = ["x", "Wx", "Wh", "b"]


def assert_rows_ok(rows):
    """rel error <= 1e-7 on every gradient; only one that is zero in theory (a fully padded batch) may pass on the
    absolute rule instead."""
    for r in rows:
        assert r.ok and (r.rel_error <= 1e-7 or r.max_abs_diff <= 1e-9), format_table(rows)


def _inputs(rng, B, T, E, H, x_scale=1.0, w_scale=0.5):
    return {"x": rng.standard_normal((B, T, E)) * x_scale, "Wx": rng.standard_normal((E, 4 * H)) * w_scale,
            "Wh": rng.standard_normal((H, 4 * H)) * w_scale, "b": rng.standard_normal(4 * H) * w_scale}


def _op(mask, return_sequences):
    return (lambda x, Wx, Wh, b: lstm_forward(x, mask, Wx, Wh, b, return_sequences)), lstm_backward


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 3), T=st.integers(1, 5), E=st.integers(1, 4),
       H=st.integers(1, 4), seq=st.booleans(), data=st.data())
def test_grads_of_every_input_and_weight(seed, B, T, E, H, seq, data):
    rng = np.random.default_rng(seed)
    # any pattern of real and padded steps: right padding, gaps, rows of padding only
    mask = np.array(data.draw(st.lists(st.lists(st.integers(0, 1), min_size=T, max_size=T), min_size=B, max_size=B)))
    fwd, bwd = _op(mask, seq)
    assert_rows_ok(check_op(fwd, bwd, _inputs(rng, B, T, E, H), NAMES, rng))


def test_grads_directional_on_bigger_tensors():
    rng = np.random.default_rng(1)
    mask = np.ones((4, 7), dtype=np.int64)
    mask[1, 4:] = 0
    mask[3] = 0
    for seq in (False, True):
        fwd, bwd = _op(mask, seq)
        assert_rows_ok(check_op(fwd, bwd, _inputs(rng, 4, 7, 6, 5), NAMES, rng))


def test_one_step_is_the_textbook_cell():
    rng = np.random.default_rng(2)
    B, E, H = 3, 4, 2
    p = _inputs(rng, B, 1, E, H)
    a = p["x"][:, 0] @ p["Wx"] + p["b"]  # h_0 = 0: no recurrent term

    def sig(z):
        return 1.0 / (1.0 + np.exp(-z))

    i, f, g, o = sig(a[:, :H]), sig(a[:, H:2 * H]), np.tanh(a[:, 2 * H:3 * H]), sig(a[:, 3 * H:])
    c = f * 0.0 + i * g
    out, _ = lstm_forward(p["x"], np.ones((B, 1)), p["Wx"], p["Wh"], p["b"])
    np.testing.assert_allclose(out, o * np.tanh(c), rtol=1e-14, atol=1e-15)


def test_two_steps_use_the_previous_state():
    rng = np.random.default_rng(3)
    p = _inputs(rng, 2, 2, 3, 2)
    one, _ = lstm_forward(p["x"][:, :1], np.ones((2, 1)), p["Wx"], p["Wh"], p["b"])
    both, cache = lstm_forward(p["x"], np.ones((2, 2)), p["Wx"], p["Wh"], p["b"], return_sequences=True)
    np.testing.assert_array_equal(both[:, 0], one)
    H = 2
    a = p["x"][:, 1] @ p["Wx"] + one @ p["Wh"] + p["b"]
    f, i, g, o = (0.5 * (1 + np.tanh(0.5 * a[:, H:2 * H])), 0.5 * (1 + np.tanh(0.5 * a[:, :H])),
                  np.tanh(a[:, 2 * H:3 * H]), 0.5 * (1 + np.tanh(0.5 * a[:, 3 * H:])))
    c = f * cache.c[:, 1] + i * g
    np.testing.assert_allclose(both[:, 1], o * np.tanh(c), rtol=1e-13, atol=1e-15)


def test_padding_keeps_the_state_wherever_it_sits():
    rng = np.random.default_rng(4)
    p = _inputs(rng, 1, 3, 3, 4)
    alone, _ = lstm_forward(p["x"], np.ones((1, 3)), p["Wx"], p["Wh"], p["b"])
    noise = rng.standard_normal((1, 2, 3)) * 5
    for layout in ("right", "left", "middle"):
        if layout == "right":
            x, mask = np.concatenate([p["x"], noise], axis=1), [1, 1, 1, 0, 0]
        elif layout == "left":
            x, mask = np.concatenate([noise, p["x"]], axis=1), [0, 0, 1, 1, 1]
        else:
            x, mask = np.concatenate([p["x"][:, :1], noise, p["x"][:, 1:]], axis=1), [1, 0, 0, 1, 1]
        out, _ = lstm_forward(x, np.array([mask]), p["Wx"], p["Wh"], p["b"])
        np.testing.assert_array_equal(out, alone)
        dx = lstm_backward(np.ones_like(out), lstm_forward(x, np.array([mask]), p["Wx"], p["Wh"], p["b"])[1])[0]
        assert not dx[0, np.array(mask) == 0].any()  # the padded inputs were never read


def test_a_row_of_padding_ends_in_the_zero_state_and_gets_no_gradient():
    rng = np.random.default_rng(5)
    p = _inputs(rng, 3, 4, 2, 3)
    mask = np.ones((3, 4), dtype=bool)
    mask[1] = False
    out, cache = lstm_forward(p["x"], mask, p["Wx"], p["Wh"], p["b"])
    assert not out[1].any()
    alone, _ = lstm_forward(p["x"][[0, 2]], mask[[0, 2]], p["Wx"], p["Wh"], p["b"])
    np.testing.assert_array_equal(out[[0, 2]], alone)  # the other rows do not notice
    dx, dWx, dWh, db = lstm_backward(rng.standard_normal(out.shape), cache)
    assert not dx[1].any()
    everything_padded = lstm_forward(p["x"], np.zeros((3, 4)), p["Wx"], p["Wh"], p["b"])
    assert not everything_padded[0].any()
    grads = lstm_backward(np.ones((3, 3)), everything_padded[1])
    assert not any(g.any() for g in grads)


def test_thousand_magnitude_inputs_saturate_without_overflow():
    rng = np.random.default_rng(6)
    p = _inputs(rng, 2, 5, 3, 4, x_scale=1000.0)
    mask = np.ones((2, 5))
    mask[1, 3:] = 0
    with np.errstate(all="raise"):  # an exp(1000) anywhere would raise here
        out, cache = lstm_forward(p["x"], mask, p["Wx"], p["Wh"], p["b"], return_sequences=True)
        grads = lstm_backward(rng.standard_normal(out.shape), cache)
    assert np.all(np.isfinite(out)) and np.abs(out).max() <= 1.0
    assert all(np.all(np.isfinite(g)) for g in grads)
    _check_at_large_x(p, mask, True, rng)


def _check_at_large_x(p, mask, seq, rng):
    """check_op's rows for x, Wh and b; Wx probed with h / 1000. A step h in Wx moves the gates' pre-activations by
    |x| h = 1000 h, where the centred difference's O(step^2) error is no longer small; h / 1000 gives Wx the same
    step in the pre-activation as the other inputs get."""
    rows = check_op(*_op(mask, seq), p, NAMES, rng)
    assert_rows_ok([r for r in rows if r.name != "Wx"])
    out, cache = lstm_forward(p["x"], mask, p["Wx"], p["Wh"], p["b"], seq)
    dout = rng.standard_normal(out.shape)

    def loss():
        return float(np.sum(lstm_forward(p["x"], mask, p["Wx"], p["Wh"], p["b"], seq)[0] * dout))

    assert rel_error(numerical_grad(loss, p["Wx"], h=H / 1000), lstm_backward(dout, cache)[1]) <= 1e-7


def test_thousand_magnitude_inputs_under_small_weights():
    """Large inputs whose gates are not saturated: the gradients are far from zero and must still be exact."""
    rng = np.random.default_rng(10)
    p = _inputs(rng, 2, 4, 3, 3, x_scale=1000.0, w_scale=1e-3)
    mask = np.ones((2, 4))
    mask[0, 2:] = 0
    for seq in (False, True):
        _check_at_large_x(p, mask, seq, rng)


def test_t_equals_one_and_sequences_end_in_the_last_state():
    rng = np.random.default_rng(7)
    p = _inputs(rng, 2, 1, 3, 2)
    last, _ = lstm_forward(p["x"], np.ones((2, 1)), p["Wx"], p["Wh"], p["b"])
    seq, _ = lstm_forward(p["x"], np.ones((2, 1)), p["Wx"], p["Wh"], p["b"], return_sequences=True)
    assert last.shape == (2, 2) and seq.shape == (2, 1, 2)
    np.testing.assert_array_equal(seq[:, -1], last)
    assert_rows_ok(check_op(*_op(np.ones((2, 1)), False), p, NAMES, rng))


def test_float32_runs_in_float32():
    rng = np.random.default_rng(8)
    p = {k: v.astype(np.float32) for k, v in _inputs(rng, 2, 3, 3, 2).items()}
    out, cache = lstm_forward(p["x"], np.ones((2, 3)), p["Wx"], p["Wh"], p["b"])
    assert out.dtype == np.float32
    assert all(g.dtype == np.float32 for g in lstm_backward(np.ones_like(out), cache))
    p64 = {k: v.astype(np.float64) for k, v in p.items()}
    ref, _ = lstm_forward(p64["x"], np.ones((2, 3)), p64["Wx"], p64["Wh"], p64["b"])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_named():
    rng = np.random.default_rng(9)
    p = _inputs(rng, 2, 3, 3, 2)
    with pytest.raises(ValueError, match="Wx"):
        lstm_forward(p["x"], np.ones((2, 3)), p["Wx"][:2], p["Wh"], p["b"])
    with pytest.raises(ValueError, match="mask"):
        lstm_forward(p["x"], np.ones((2, 4)), p["Wx"], p["Wh"], p["b"])
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, E\)"):
        lstm_forward(p["x"][0], np.ones((2, 3)), p["Wx"], p["Wh"], p["b"])
    with pytest.raises(ValueError, match="Wh"):
        lstm_forward(p["x"], np.ones((2, 3)), p["Wx"], p["Wh"][:, :6], p["b"])
