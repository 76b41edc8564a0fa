"""kernels/numba_cpu/losses.py against the reference minielectra.ops.losses (tolerance: numba_kernel_checks).

The loss is a Python float: it must match the reference's to k ulps of the dtype relative to the loss's terms
(sum of |w_i * loss_i| / sum(w)).
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("numba")

from minielectra.ops import losses as ref  # noqa: E402
from minielectra.kernels.numba_cpu import losses as ker  # noqa: E402
from numba_kernel_checks import DTYPES, K_ULPS, KERNEL_SETTINGS, MAGNITUDES, SEEDS, assert_close  # noqa: E402

pytestmark = pytest.mark.numba

WEIGHTS = st.sampled_from(["none", "random", "binary", "zeros"])


def _weights(rng, kind, shape, dtype):
    if kind == "none":
        return None
    if kind == "zeros":
        return np.zeros(shape, dtype)
    if kind == "binary":
        return (rng.random(shape) < 0.5).astype(dtype)
    return rng.random(shape).astype(dtype)


def _assert_loss_close(got, want, dtype, terms):
    assert isinstance(got, float)
    assert abs(got - want) <= K_ULPS * np.finfo(dtype).eps * (abs(want) + terms), (got, want)


@KERNEL_SETTINGS
@given(seed=SEEDS, N=st.integers(1, 40), V=st.integers(1, 300), dtype=DTYPES, mag=MAGNITUDES, wkind=WEIGHTS,
       transposed=st.booleans(), tdtype=st.sampled_from([np.int32, np.int64]))
def test_softmax_cross_entropy_matches_reference(seed, N, V, dtype, mag, wkind, transposed, tdtype):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((V, N) if transposed else (N, V)) * mag).astype(dtype)
    if transposed:
        logits = logits.T  # (N, V), non-contiguous
    targets = rng.integers(0, V, N).astype(tdtype)
    w = _weights(rng, wkind, (N,), dtype)
    loss_ref, d_ref = ref.softmax_cross_entropy(logits, targets, w)
    loss, d = ker.softmax_cross_entropy(logits, targets, w)
    assert_close(d, d_ref, name="dlogits")
    ww = np.ones(N) if w is None else w.astype(np.float64)
    lse = np.abs(logits.astype(np.float64)).max(axis=1) * 2 + np.log(V)  # bounds |logit_t - max - log sum|
    _assert_loss_close(loss, loss_ref, dtype, float((ww * lse).sum() / max(ww.sum(), 1e-300)) if ww.sum() else 0.0)


@KERNEL_SETTINGS
@given(seed=SEEDS, shape=st.lists(st.integers(1, 30), min_size=1, max_size=3).map(tuple), dtype=DTYPES,
       mag=MAGNITUDES, wkind=WEIGHTS, ldtype=st.sampled_from([bool, np.int64, np.float32]), transposed=st.booleans())
def test_sigmoid_cross_entropy_matches_reference(seed, shape, dtype, mag, wkind, ldtype, transposed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(shape) * mag).astype(dtype)
    logits.flat[::3] = 0
    if transposed:
        logits = logits.T
    labels = (rng.random(logits.shape) < 0.5).astype(ldtype)
    w = _weights(rng, wkind, logits.shape, dtype)
    loss_ref, d_ref = ref.sigmoid_cross_entropy(logits, labels, w)
    loss, d = ker.sigmoid_cross_entropy(logits, labels, w)
    assert_close(d, d_ref, name="dlogits")
    ww = np.ones(logits.shape) if w is None else w.astype(np.float64)
    terms = (ww * (np.abs(logits.astype(np.float64)) + 1)).sum() / (ww.sum() if ww.sum() else 1.0)
    _assert_loss_close(loss, loss_ref, dtype, float(terms))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_logits_are_exact(dtype):
    """+-1000 logits: no overflow, the loss is exactly the margin, the gradient exactly +-1 or 0."""
    logits = np.array([[1000.0, -1000.0], [-1000.0, 1000.0]], dtype)
    loss, d = ker.softmax_cross_entropy(logits, np.array([1, 1]))
    assert loss == 1000.0 and np.array_equal(d, np.array([[0.5, -0.5], [0.0, 0.0]], dtype))
    loss, d = ker.sigmoid_cross_entropy(np.array([1000.0, -1000.0], dtype), np.array([0, 1]))
    assert loss == 1000.0 and np.array_equal(d, np.array([0.5, -0.5], dtype))


def test_rejects_what_the_reference_rejects():
    logits = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError):
        ker.softmax_cross_entropy(logits, np.array([0, 1, 4]))
    with pytest.raises(ValueError):
        ker.softmax_cross_entropy(logits, np.array([0, -1, 2]))
    with pytest.raises(TypeError):
        ker.softmax_cross_entropy(logits, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError):
        ker.softmax_cross_entropy(logits[0], np.array([0]))
    with pytest.raises(ValueError):
        ker.softmax_cross_entropy(logits, np.array([0, 1, 2]), np.ones(2, np.float32))
    with pytest.raises(ValueError):
        ker.sigmoid_cross_entropy(logits, np.zeros((3, 3)))
