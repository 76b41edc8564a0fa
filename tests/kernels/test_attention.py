"""kernels/numba_cpu/attention.py against the reference minielectra.ops.attention (tolerance: numba_kernel_checks).

Large inputs: q of magnitude 1000 with integer values and k in {-1, 0, 1} make scores of order 1e4 that every
summation order computes exactly, so the test exercises the stable softmax (one-hot and tied rows at huge logits)
rather than measuring how BLAS rounds a 1e6-sized dot product, which no tolerance in ulps of the output could absorb.

Beyond T = ker.KEEP_WEIGHTS_UP_TO the kernel keeps no (T, T) array: its cache is q, k, v, each score row's max and
exp-sum and the dropout seed, and its working memory is a few (BR, T) blocks per thread; up to it the cache also holds
the weights, which the backward reuses. The tests that draw inputs run both ways, whatever the drawn T. It walks the queries in blocks of ker.BR rows (256); these tests
set BR to 16, so the drawn T (up to 70) spans up to five blocks, the last one partial. One test runs the default BR
on a T that crosses its boundary, and the memory test measures the default.
"""

import contextlib
import tracemalloc

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

numba = pytest.importorskip("numba")

from minielectra.gradcheck import check_op, format_table  # noqa: E402
from minielectra.ops import attention as ref  # noqa: E402
from minielectra.ops.dropout import drop_threshold, hashed_keep_mask  # noqa: E402
from minielectra.kernels.numba_cpu import attention as ker  # noqa: E402
from numba_kernel_checks import DTYPES, KERNEL_SETTINGS, SEEDS, assert_close  # noqa: E402

pytestmark = pytest.mark.numba

DEFAULT_BR = ker.BR
SMALL_BR = 16


@pytest.fixture(autouse=True, scope="module")
def small_blocks():
    ker.BR = SMALL_BR
    yield
    ker.BR = DEFAULT_BR


DIMS = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 70), st.integers(1, 17))  # B, H, T, D


def _inputs(seed, dims, dtype, big, heads_view):
    """q, k, v, dout (B, H, T, D); heads_view makes them the (B, T, H, D) -> (B, H, T, D) transposed views
    that mha_forward passes, i.e. non-contiguous."""
    B, H, T, D = dims
    rng = np.random.default_rng(seed)
    shape = (B, T, H, D) if heads_view else (B, H, T, D)
    if big:
        q = np.round(rng.uniform(-1000, 1000, shape))
        k = rng.integers(-1, 2, shape).astype(float)
        v = rng.standard_normal(shape) * 1000
        dout = rng.standard_normal(shape) * 1000
    else:
        q, k, v, dout = (rng.standard_normal(shape) for _ in range(4))
    arrays = [a.astype(dtype) for a in (q, k, v, dout)]
    if heads_view:
        arrays = [a.transpose(0, 2, 1, 3) for a in arrays]
    return arrays


def _mask(seed, B, T, kind):
    """None, or a (B, T) padding mask whose sequences have random lengths in [0, T]: length 0 is fully masked."""
    if kind == "none":
        return None
    rng = np.random.default_rng(seed + 1)
    lengths = rng.integers(0, T + 1, B)
    if kind == "empty":
        lengths[0] = 0
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    return mask


def _term_magnitudes(q, k, v, dout, c_ref):
    """For each output, the magnitude of the terms summed to make it (module docstring of numba_kernel_checks):
    the reference's formulas on absolute values, in float64, including how rounding of the scores moves probs."""
    Q, K, V, G = (np.abs(a.astype(np.float64)) for a in (q, k, v, dout))
    P = c_ref.probs.astype(np.float64)
    keep_scale = 1.0 if c_ref.dropout.scale is None else c_ref.dropout.scale.astype(np.float64)
    S = (Q @ K.swapaxes(-1, -2)) * c_ref.scale  # |scores| terms
    m_probs = P * (S + (P * S).sum(-1, keepdims=True))  # softmax of scores moved by ~eps * S
    dropped = (P + m_probs) * keep_scale
    m_dp = (G @ V.swapaxes(-1, -2)) * keep_scale  # dprobs
    m_ds = (P + m_probs) * (m_dp + (P * m_dp).sum(-1, keepdims=True)) * c_ref.scale  # dscores
    return {"probs": m_probs, "out": dropped @ V, "dv": dropped.swapaxes(-1, -2) @ G,
            "dq": m_ds @ K, "dk": m_ds.swapaxes(-1, -2) @ Q}


@contextlib.contextmanager
def _weights_kept(keep):
    """The kernel keeps the forward's weights for its backward (True) or recomputes them (False), whatever T is."""
    before = ker.KEEP_WEIGHTS_UP_TO
    ker.KEEP_WEIGHTS_UP_TO = 2**62 if keep else 0
    try:
        yield
    finally:
        ker.KEEP_WEIGHTS_UP_TO = before


def _check(seed, dims, dtype, big, heads_view, mask_kind, p_drop, keep=False):
    q, k, v, dout = _inputs(seed, dims, dtype, big, heads_view)
    mask = _mask(seed, dims[0], dims[2], mask_kind)
    out_ref, c_ref = ref.attention_forward(q, k, v, mask, p_drop, np.random.default_rng(seed))
    with _weights_kept(keep):
        out, c = ker.attention_forward(q, k, v, mask, p_drop, np.random.default_rng(seed))
    assert (c.weights is not None) == keep
    floor = _term_magnitudes(q, k, v, dout, c_ref)
    assert_close(c.probs, c_ref.probs, name="probs", floor=floor["probs"])
    assert_close(out, out_ref, name="out", floor=floor["out"])
    for name, got, want in zip(("dq", "dk", "dv"), ker.attention_backward(dout, c), ref.attention_backward(dout, c_ref)):
        assert_close(got, want, name=name, floor=floor[name])
    return c, c_ref


@KERNEL_SETTINGS
@given(seed=SEEDS, dims=DIMS, dtype=DTYPES, big=st.booleans(), heads_view=st.booleans(),
       mask_kind=st.sampled_from(["none", "lengths", "empty"]), keep=st.booleans())
def test_forward_and_backward_match_reference(seed, dims, dtype, big, heads_view, mask_kind, keep):
    _check(seed, dims, dtype, big, heads_view, mask_kind, 0.0, keep)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("keep", [False, True])
def test_default_block_size_across_a_block_boundary(dtype, keep, monkeypatch):
    monkeypatch.setattr(ker, "BR", DEFAULT_BR)
    c, _ = _check(8, (2, 1, DEFAULT_BR + 44, 8), dtype, False, True, "lengths", 0.1, keep)
    assert c.block_rows == DEFAULT_BR


def test_keeps_the_weights_up_to_its_limit_and_the_backward_leaves_them_as_they_were():
    """At T <= KEEP_WEIGHTS_UP_TO the cache holds the forward's weights and keep bits, which the backward reads (twice
    here, with the same result: it works on a copy); beyond it, nothing (T, T)."""
    T = ker.KEEP_WEIGHTS_UP_TO
    for t, kept in ((T, True), (T + 1, False)):
        q, k, v, dout = _inputs(2, (1, 2, t, 4), np.float32, False, True)
        _, c = ker.attention_forward(q, k, v, None, 0.1, np.random.default_rng(0))
        assert (c.weights is not None) == (c.bits is not None) == kept
        before = None if c.weights is None else c.weights.copy()
        first, second = ker.attention_backward(dout, c), ker.attention_backward(dout, c)
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a, b)
        if kept:
            np.testing.assert_array_equal(c.weights, before)
            np.testing.assert_array_equal(c.bits, hashed_keep_mask(np, c.seed, c.bits.shape, c.threshold))


@KERNEL_SETTINGS
@given(seed=SEEDS, dims=DIMS, dtype=DTYPES, big=st.booleans(), p_drop=st.sampled_from([0.1, 0.5, 0.9]),
       keep=st.booleans())
# a fully masked sequence (length 0): its keep bits, kept but never used, once stayed unwritten
@example(seed=23538145, dims=(2, 1, 1, 1), dtype=np.float32, big=False, p_drop=0.1, keep=True)
def test_dropout_matches_reference_with_the_same_seed(seed, dims, dtype, big, p_drop, keep):
    """Same seed -> the very same keep mask as the reference, the same outputs and gradients, the same rng state."""
    c, c_ref = _check(seed, dims, dtype, big, True, "lengths", p_drop, keep)
    assert (c.seed, c.threshold) == (c_ref.seed, c_ref.threshold)
    np.testing.assert_array_equal(c.keep, c_ref.dropout.scale != 0)
    rng_ref, rng = np.random.default_rng(seed), np.random.default_rng(seed)
    q, k, v, _ = _inputs(seed, dims, dtype, big, False)
    ref.attention_forward(q, k, v, None, p_drop, rng_ref)
    ker.attention_forward(q, k, v, None, p_drop, rng)
    assert rng.random() == rng_ref.random()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p_drop", [0.1, 0.5])
def test_kernel_keep_bits_are_the_hashed_keep_mask(dtype, p_drop):
    """The bits the kernel computes in its loops, read back through its output: with q = 0 every weight is 1 / T, and
    with v = I (D = T) the output is the dropped weights themselves, so out != 0 exactly where the kernel kept."""
    B, H, T = 2, 3, 70
    q = np.zeros((B, H, T, T), dtype)
    v = np.broadcast_to(np.eye(T, dtype=dtype), q.shape)
    out, c = ker.attention_forward(q, q, v, None, p_drop, np.random.default_rng(4))
    keep = hashed_keep_mask(np, c.seed, (B, H, T, T), drop_threshold(p_drop))
    np.testing.assert_array_equal(out != 0, keep)
    np.testing.assert_array_equal(out[keep], dtype(1 / T) * dtype(1 / (1 - p_drop)))
    np.testing.assert_array_equal(c.keep, keep)


@pytest.mark.parametrize("p_drop", [0.0, 0.3])
def test_grads_against_its_own_forward(p_drop):
    """Centred finite differences of the kernel's forward (float64, the mask redrawn from the same seed each call)
    against the kernel's backward, which recomputes weights and keep bits rather than storing them; T = 67 spans five
    row blocks of SMALL_BR, and the padding leaves a fully masked sequence."""
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((3, 2, 67, 3)) for _ in range(3))
    mask = (np.arange(67)[None, :] < np.array([[67], [40], [0]])).astype(np.int64)

    def forward(q, k, v):
        return ker.attention_forward(q, k, v, mask, p_drop, np.random.default_rng(7) if p_drop else None)

    rows = check_op(forward, ker.attention_backward, {"q": q, "k": k, "v": v}, ["q", "k", "v"], rng)
    assert all(r.ok and r.rel_error <= 1e-7 for r in rows), format_table(rows)


def _cache_bytes(c):
    return sum(a.nbytes for a in c if isinstance(a, np.ndarray))


@pytest.mark.parametrize("p_drop", [0.0, 0.1])
def test_memory_grows_linearly_in_T(p_drop, monkeypatch):
    """The cache holds q, k, v (B, H, T, D), rowmax and rowsum (B, H, T) and the key mask (B, T): nothing (T, T).
    Everything forward + backward allocate (tracemalloc sees NumPy's and Numba's allocations) fits a budget linear in
    T: the outputs, plus per busy thread two (BR, T) blocks and a (T,) row of keep bits. At these
    sizes the budget is below a single head's (T, T) weights, so one such array anywhere fails the test."""
    monkeypatch.setattr(ker, "BR", DEFAULT_BR)
    B, H, D = 2, 2, 4
    workers = min(numba.get_num_threads(), B * H)

    def peak(T):
        rng = np.random.default_rng(0)
        q, k, v, dout = (rng.standard_normal((B, H, T, D)) for _ in range(4))
        mask = np.ones((B, T))
        tracemalloc.start()
        try:
            _, c = ker.attention_forward(q, k, v, mask, p_drop, np.random.default_rng(1))
            ker.attention_backward(dout, c)
            used = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        kept = B * H * T * T * (8 + (p_drop > 0)) if T <= ker.KEEP_WEIGHTS_UP_TO else 0  # weights and keep bits
        assert _cache_bytes(c) == (3 * B * H * T * D + 2 * B * H * T) * 8 + B * T + kept
        return used

    peak(64)  # compiled before measuring
    for T in (2048, 4096):  # beyond KEEP_WEIGHTS_UP_TO: the backward recomputes the weights
        outputs = (4 * B * H * T * D + 2 * B * H * T) * 8 + 2 * B * T  # out, dq, dk, dv, rowmax, rowsum; key masks
        scratch = workers * (2 * ker.BR * T * 8 + T)
        budget = outputs + scratch + 2**17  # + 128 KiB for the Python objects on the way
        assert budget < T * T * 8
        used = peak(T)
        assert used <= budget, (T, used, budget)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fully_masked_sequence_gives_zero_weights_and_gradients(dtype):
    q, k, v, dout = _inputs(3, (2, 2, 5, 4), dtype, False, False)
    mask = np.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    out, c = ker.attention_forward(q, k, v, mask)
    assert np.all(c.probs[1] == 0) and np.all(out[1] == 0)
    np.testing.assert_allclose(c.probs[0].sum(-1), 1, rtol=10 * np.finfo(dtype).eps)
    assert np.all(c.probs[0, :, :, 3:] == 0)
    dq, dk, dv = ker.attention_backward(dout, c)
    assert np.all(dq[1] == 0) and np.all(dk[1] == 0) and np.all(dv[1] == 0)
    assert np.all(dk[0, :, 3:] == 0)  # a padded key gets no gradient


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_accepts_the_reference_cache(dtype):
    q, k, v, dout = _inputs(5, (2, 3, 6, 4), dtype, False, True)
    _, c_ref = ref.attention_forward(q, k, v)
    for got, want in zip(ker.attention_backward(dout, c_ref), ref.attention_backward(dout, c_ref)):
        assert_close(got, want)


def test_heads_are_read_and_written_where_mha_keeps_them():
    """mha_forward's q, k, v are (B, T, H, D) -> (B, H, T, D) views: the kernel reads them in place (its cache holds
    those very arrays) and writes out, dq, dk, dv in that layout, so merging the heads back into (B, T, C) is a
    reshape, not a copy. Contiguous (B, H, T, D) inputs are read in place too."""
    for heads_view in (True, False):
        q, k, v, dout = _inputs(9, (2, 3, 5, 4), np.float32, False, heads_view)
        out, c = ker.attention_forward(q, k, v, None, 0.1, np.random.default_rng(0))
        assert c.q is q and c.k is k and c.v is v
        for a in (out, *ker.attention_backward(dout, c)):
            assert a.shape == q.shape and a.transpose(0, 2, 1, 3).flags.c_contiguous


def test_rejects_what_the_reference_rejects():
    q = np.zeros((1, 1, 3, 2), np.float32)
    with pytest.raises(ValueError):
        ker.attention_forward(q, q[:, :, :2], q)
    with pytest.raises(ValueError):
        ker.attention_forward(q[0], q[0], q[0])
    with pytest.raises(TypeError):
        ker.attention_forward(q.astype(np.int32), q, q)
    with pytest.raises(ValueError):
        ker.attention_forward(q, q, q, mask=np.ones((1, 4)))
    with pytest.raises(ValueError):
        ker.attention_forward(q, q, q, p_drop=1.0, rng=np.random.default_rng(0))
    with pytest.raises(TypeError):
        ker.attention_forward(q, q, q, p_drop=0.1, rng=None)
    _, c = ker.attention_forward(q, q, q)
    with pytest.raises(ValueError):
        ker.attention_backward(np.zeros((1, 1, 3, 3), np.float32), c)
