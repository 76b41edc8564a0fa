"""softmax and sigmoid cross-entropy: weighted means, exact at +-1000, gradient of the scalar loss."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minielectra.gradcheck import check_backward, format_table
from minielectra.ops.losses import sigmoid_cross_entropy, softmax_cross_entropy


def assert_row_ok(row):
    assert row.ok and (row.rel_error <= 1e-6 or row.max_abs_diff <= 1e-9), format_table([row])


def softmax_ce_ref(logits, targets, weights=None):
    """-log softmax(logits_i)[t_i], weighted mean, in plain Python floats with a hand-written log-sum-exp."""
    N = len(targets)
    weights = [1.0] * N if weights is None else [float(w) for w in weights]
    total = 0.0
    for row, t, w in zip(np.asarray(logits, dtype=np.float64), targets, weights):
        m = max(row)
        lse = m + math.log(sum(math.exp(z - m) for z in row))
        total += w * (lse - row[t])
    return total / sum(weights) if sum(weights) > 0 else 0.0


def sigmoid_ce_ref(z, y, weights=None):
    z, y = np.ravel(z).astype(np.float64), np.ravel(y).astype(np.float64)
    weights = np.ones(z.size) if weights is None else np.ravel(weights).astype(np.float64)
    total = 0.0
    for zi, yi, wi in zip(z, y, weights):
        # -log s(z) = log(1 + e^-z) for y = 1, -log(1 - s(z)) = log(1 + e^z) for y = 0: accurate for |z| < 700
        total += wi * (yi * math.log1p(math.exp(-zi)) + (1.0 - yi) * math.log1p(math.exp(zi)))
    return total / weights.sum() if weights.sum() > 0 else 0.0


SEEDS = st.integers(0, 2**32 - 1)


def _ce_inputs(seed, N, V, scale, weighted):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((N, V)) * scale
    targets = rng.integers(0, V, N)
    weights = None
    if weighted:
        weights = rng.random(N) * (rng.random(N) < 0.7)  # some zeros, as unselected positions
        weights[0] = 0.5
    return logits, targets, weights


# softmax cross-entropy --------------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, N=st.integers(1, 6), V=st.integers(1, 7), scale=st.sampled_from([0.1, 1.0, 5.0, 30.0, 1000.0]),
       weighted=st.booleans())
def test_softmax_ce_matches_reference(seed, N, V, scale, weighted):
    logits, targets, weights = _ce_inputs(seed, N, V, scale, weighted)
    loss, dlogits = softmax_cross_entropy(logits, targets, weights)
    assert isinstance(loss, float)
    # abs 1e-14: a confident, correct row's loss log(1 + tiny) is ~1e-7 but only known to ~eps absolute
    assert loss == pytest.approx(softmax_ce_ref(logits, targets, weights), rel=1e-12, abs=1e-14)
    assert dlogits.shape == logits.shape
    np.testing.assert_allclose(dlogits.sum(-1), 0.0, atol=1e-15)  # softmax - onehot sums to 0 on every row


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, N=st.integers(1, 6), V=st.integers(1, 7), scale=st.sampled_from([0.1, 1.0, 2.0]),
       offset=st.sampled_from([0.0, 1000.0, -1000.0]), weighted=st.booleans())
def test_softmax_ce_gradient_checks(seed, N, V, scale, offset, weighted):
    # Moderate spreads (confident, correct rows have gradients ~exp(-spread), below the finite-difference noise
    # floor), with whole rows shifted to +-1000.
    logits, targets, weights = _ce_inputs(seed, N, V, scale, weighted)
    logits += offset
    loss, dlogits = softmax_cross_entropy(logits, targets, weights)
    assert_row_ok(check_backward(lambda: softmax_cross_entropy(logits, targets, weights)[0], logits, dlogits,
                                 "logits"))


def test_softmax_ce_gradient_directional_with_weights():
    logits, targets, weights = _ce_inputs(0, 8, 12, 3.0, True)  # 96 entries: directional
    loss, dlogits = softmax_cross_entropy(logits, targets, weights)
    assert_row_ok(check_backward(lambda: softmax_cross_entropy(logits, targets, weights)[0], logits, dlogits))


def test_softmax_ce_closed_form():
    loss, dlogits = softmax_cross_entropy(np.zeros((3, 5)), np.array([0, 4, 2]))
    assert loss == pytest.approx(math.log(5.0), rel=1e-15)
    expected = np.full((3, 5), 0.2)
    expected[[0, 1, 2], [0, 4, 2]] -= 1.0
    np.testing.assert_allclose(dlogits, expected / 3, rtol=1e-15)
    # weights (1, 3): loss (1 * l0 + 3 * l1) / 4, gradient rows scaled by w_i / 4
    logits = np.array([[0.0, np.log(3.0)], [np.log(3.0), 0.0]])
    loss, dlogits = softmax_cross_entropy(logits, np.array([1, 1]), np.array([1.0, 3.0]))
    assert loss == pytest.approx((1 * -np.log(0.75) + 3 * -np.log(0.25)) / 4, rel=1e-15)
    np.testing.assert_allclose(dlogits, [[0.25 / 4, -0.25 / 4], [3 * 0.75 / 4, -3 * 0.75 / 4]], rtol=1e-14)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_ce_at_plus_minus_1000(dtype):
    logits = np.array([[1000.0, -1000.0], [1000.0, -1000.0], [-1000.0, -1000.0]], dtype=dtype)
    loss, dlogits = softmax_cross_entropy(logits[:1], np.array([0]))
    assert loss == 0.0
    np.testing.assert_array_equal(dlogits, [[0.0, 0.0]])
    loss, dlogits = softmax_cross_entropy(logits[1:2], np.array([1]))
    assert loss == 2000.0
    np.testing.assert_array_equal(dlogits, [[1.0, -1.0]])
    loss, dlogits = softmax_cross_entropy(logits, np.array([0, 1, 1]))
    assert loss == pytest.approx((0.0 + 2000.0 + math.log(2.0)) / 3, rel=1e-6 if dtype == np.float32 else 1e-15)
    assert np.isfinite(dlogits).all() and dlogits.dtype == dtype
    np.testing.assert_allclose(dlogits, np.array([[0, 0], [1, -1], [0.5, -0.5]]) / 3, rtol=1e-6)


def test_softmax_ce_all_weights_zero():
    logits, targets, _ = _ce_inputs(1, 4, 3, 1.0, False)
    loss, dlogits = softmax_cross_entropy(logits, targets, np.zeros(4))
    assert loss == 0.0
    np.testing.assert_array_equal(dlogits, 0.0)
    loss, dlogits = softmax_cross_entropy(np.zeros((0, 3)), np.zeros(0, np.int64))
    assert loss == 0.0 and dlogits.shape == (0, 3)


def test_softmax_ce_zero_weight_rows_get_zero_gradient():
    logits, targets, _ = _ce_inputs(2, 4, 3, 1.0, False)
    w = np.array([1.0, 0.0, 2.0, 0.0])
    loss, dlogits = softmax_cross_entropy(logits, targets, w)
    np.testing.assert_array_equal(dlogits[[1, 3]], 0.0)
    kept, dkept = softmax_cross_entropy(logits[[0, 2]], targets[[0, 2]], w[[0, 2]])
    assert loss == pytest.approx(kept, rel=1e-15)
    np.testing.assert_allclose(dlogits[[0, 2]], dkept, rtol=1e-15)


def test_softmax_ce_float32_in_float32_out():
    logits, targets, weights = _ce_inputs(3, 4, 5, 2.0, True)
    loss, dlogits = softmax_cross_entropy(logits.astype(np.float32), targets, weights.astype(np.float32))
    assert dlogits.dtype == np.float32
    assert loss == pytest.approx(softmax_ce_ref(logits, targets, weights), rel=1e-5)


@pytest.mark.parametrize("logits, targets, weights, exc, name", [
    (np.zeros((2, 3)), np.array([0, 3]), None, ValueError, "targets"),
    (np.zeros((2, 3)), np.array([-1, 0]), None, ValueError, "targets"),
    (np.zeros((2, 3)), np.array([0.0, 1.0]), None, TypeError, "targets"),
    (np.zeros((2, 3)), np.array([0, 1, 2]), None, ValueError, "targets"),
    (np.zeros((2, 3)), np.array([[0, 1]]), None, ValueError, "targets"),
    (np.zeros((2, 3), np.int64), np.array([0, 1]), None, TypeError, "logits"),
    (np.zeros(3), np.array([0]), None, ValueError, "logits"),
    (np.zeros((2, 3)), np.array([0, 1]), np.ones(3), ValueError, "weights"),
])
def test_softmax_ce_bad_input_names_the_argument(logits, targets, weights, exc, name):
    with pytest.raises(exc, match=rf"^{name}\b"):
        softmax_cross_entropy(logits, targets, weights)


# sigmoid cross-entropy --------------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, shape=st.lists(st.integers(1, 4), min_size=1, max_size=2), scale=st.sampled_from([0.1, 1.0, 2.0]),
       weighted=st.booleans())
def test_sigmoid_ce_matches_reference_and_gradient_checks(seed, shape, scale, weighted):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(shape) * scale
    y = rng.integers(0, 2, shape)
    w = None
    if weighted:
        w = (rng.random(shape) < 0.7).astype(np.float64)
        w.flat[0] = 1.0
    loss, dz = sigmoid_cross_entropy(z, y, w)
    assert isinstance(loss, float)
    assert loss == pytest.approx(sigmoid_ce_ref(z, y, w), rel=1e-12, abs=1e-15)
    ww = np.ones(shape) if w is None else w
    sig = np.array([1.0 / (1.0 + math.exp(-v)) for v in z.ravel()]).reshape(shape)
    np.testing.assert_allclose(dz, (sig - y) * ww / ww.sum(), rtol=1e-12, atol=1e-16)
    assert_row_ok(check_backward(lambda: sigmoid_cross_entropy(z, y, w)[0], z, dz, "logits"))


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, shape=st.lists(st.integers(1, 4), min_size=1, max_size=2),
       scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]))
def test_sigmoid_ce_matches_reference_at_large_magnitudes(seed, shape, scale):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(shape) * scale
    y = rng.integers(0, 2, shape)
    loss, dz = sigmoid_cross_entropy(z, y)
    assert np.isfinite(dz).all()
    assert loss == pytest.approx(sigmoid_ce_ref(z, y), rel=1e-12, abs=1e-300)


def test_sigmoid_ce_gradient_directional():
    rng = np.random.default_rng(4)
    z = rng.standard_normal((6, 15)) * 3
    y = rng.integers(0, 2, (6, 15))
    w = (rng.random((6, 15)) < 0.8).astype(np.float64)
    _, dz = sigmoid_cross_entropy(z, y, w)
    assert_row_ok(check_backward(lambda: sigmoid_cross_entropy(z, y, w)[0], z, dz))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sigmoid_ce_at_plus_minus_1000(dtype):
    z = np.array([1000.0, -1000.0, 1000.0, -1000.0], dtype=dtype)
    y = np.array([1, 1, 0, 0])
    for i, expected in enumerate([0.0, 1000.0, 1000.0, 0.0]):
        loss, dz = sigmoid_cross_entropy(z[i:i + 1], y[i:i + 1])
        assert loss == expected
        assert np.isfinite(dz).all() and dz.dtype == dtype
    loss, dz = sigmoid_cross_entropy(z, y)
    assert loss == 500.0
    np.testing.assert_array_equal(dz, np.array([0.0, -1.0, 1.0, 0.0]) / 4)


def test_sigmoid_ce_closed_form():
    loss, dz = sigmoid_cross_entropy(np.zeros((2, 2)), np.array([[0, 1], [1, 1]]))
    assert loss == pytest.approx(math.log(2.0), rel=1e-15)
    np.testing.assert_allclose(dz, [[0.125, -0.125], [-0.125, -0.125]], rtol=1e-15)
    loss, dz = sigmoid_cross_entropy(np.array([np.log(3.0), 0.0]), np.array([1, 0]), np.array([3.0, 1.0]))
    assert loss == pytest.approx((3 * -np.log(0.75) + np.log(2.0)) / 4, rel=1e-15)
    np.testing.assert_allclose(dz, [3 * -0.25 / 4, 0.5 / 4], rtol=1e-14)


def test_sigmoid_ce_all_weights_zero():
    loss, dz = sigmoid_cross_entropy(np.array([1.0, -2.0]), np.array([1, 0]), np.zeros(2))
    assert loss == 0.0
    np.testing.assert_array_equal(dz, 0.0)


def test_sigmoid_ce_float32_in_float32_out():
    z = np.linspace(-5, 5, 6, dtype=np.float32)
    y = np.array([0, 1, 0, 1, 1, 0])
    loss, dz = sigmoid_cross_entropy(z, y)
    assert dz.dtype == np.float32
    assert loss == pytest.approx(sigmoid_ce_ref(z, y), rel=1e-5)


@pytest.mark.parametrize("logits, labels, weights, exc, name", [
    (np.zeros(3, np.int64), np.zeros(3, np.int64), None, TypeError, "logits"),
    (np.zeros(3), np.zeros(4, np.int64), None, ValueError, "labels"),
    (np.zeros((2, 3)), np.zeros(3, np.int64), None, ValueError, "labels"),
    (np.zeros(3), np.zeros(3, np.int64), np.ones(2), ValueError, "weights"),
])
def test_sigmoid_ce_bad_input_names_the_argument(logits, labels, weights, exc, name):
    with pytest.raises(exc, match=rf"^{name}\b"):
        sigmoid_cross_entropy(logits, labels, weights)


def test_sigmoid_ce_labels_outside_0_1_raise():
    with pytest.raises(ValueError, match="labels"):
        sigmoid_cross_entropy(np.array([1.0, 2.0]), np.array([2, -1]))
