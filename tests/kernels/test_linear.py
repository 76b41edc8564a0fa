"""kernels/numba_cpu/linear.py against the reference minielectra.ops.linear (tolerance: numba_kernel_checks, with the
floor of a matrix product: the same product on absolute values, the size of the terms it adds)."""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

pytest.importorskip("numba")

from minielectra.gradcheck import check_op, format_table  # noqa: E402
from minielectra.ops import linear as ref  # noqa: E402
from minielectra.kernels.numba_cpu import linear as ker  # noqa: E402
from numba_kernel_checks import DTYPES, KERNEL_SETTINGS, LAYOUTS, MAGNITUDES, SEEDS, assert_close, noncontiguous  # noqa: E402,E501

pytestmark = pytest.mark.numba

SHAPES = st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 70), st.integers(1, 70))  # B, T, C, OC


def draw(seed, shape, dtype, mag, layout, w_transposed):
    B, T, C, OC = shape
    rng = np.random.default_rng(seed)
    x = noncontiguous((rng.standard_normal((B, T, C)) * mag).astype(dtype), layout)
    W = rng.standard_normal((C, OC)).astype(dtype)
    if w_transposed:  # the same values as a transposed view, as the tied LM head passes its (V, E) table: table.T
        W = np.ascontiguousarray(W.T).T
    b = rng.standard_normal(OC).astype(dtype)
    dout = noncontiguous((rng.standard_normal((B, T, OC)) * mag).astype(dtype), layout)
    return x, W, b, dout


def magnitude(a, b):
    """|a| @ |b| in float64: the size of the terms each entry of a @ b adds, the floor for its rounding."""
    return np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))


@KERNEL_SETTINGS
@given(seed=SEEDS, shape=SHAPES, dtype=DTYPES, mag=MAGNITUDES, layout=LAYOUTS, w_transposed=st.booleans())
@example(seed=0, shape=(1, 1, 1, 1), dtype=np.float32, mag=1.0, layout="C", w_transposed=False)
def test_forward_and_backward_match_reference(seed, shape, dtype, mag, layout, w_transposed):
    x, W, b, dout = draw(seed, shape, dtype, mag, layout, w_transposed)
    C, OC = W.shape
    x2, d2 = x.reshape(-1, C), dout.reshape(-1, OC)
    for op, args in (("linear_forward", (x, W, b)), ("project", (x, W, b)), ("matmul_forward", (x, W))):
        got, got_cache = getattr(ker, op)(*args)
        want, _ = getattr(ref, op)(*args)
        floor = magnitude(x, W) + (np.abs(b) if len(args) == 3 else 0)
        assert_close(got, want, name=op, floor=floor)
        assert got_cache.x is x and got_cache.W is W  # the reference's cache: either backward takes it
    _, cache = ref.linear_forward(x, W, b)
    dx, dW, db = ker.linear_backward(dout, cache)
    dx_ref, dW_ref, db_ref = ref.linear_backward(dout, cache)
    assert_close(dx, dx_ref, name="dx", floor=magnitude(dout, W.T))
    assert_close(dW, dW_ref, name="dW", floor=magnitude(x2.T, d2))
    assert_close(db, db_ref, name="db", floor=np.abs(d2.astype(np.float64)).sum(axis=0))
    dx2, dW2 = ker.matmul_backward(dout, cache)
    np.testing.assert_array_equal(dx2, dx)  # the same products, without db
    np.testing.assert_array_equal(dW2, dW)


def test_float32_stays_float32_and_mixed_inputs_promote_as_the_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    W, b = rng.standard_normal((4, 5)), rng.standard_normal(5).astype(np.float32)
    for Wd in (W.astype(np.float32), W):
        out, cache = ker.linear_forward(x, Wd, b)
        assert out.dtype == ref.linear_forward(x, Wd, b)[0].dtype
        assert [g.dtype for g in ker.linear_backward(out, cache)] == [
            g.dtype for g in ref.linear_backward(out, cache)]


@pytest.mark.parametrize("shape", [(2, 0, 4, 3), (2, 3, 0, 3), (2, 3, 4, 0)])
def test_empty_sizes_give_the_exact_result(shape):
    """BLAS rejects empty matrices; an empty batch, input width or output width must still work: x @ W with no
    inputs is zeros, plus b, and the gradients of an empty product are zeros."""
    B, T, C, OC = shape
    rng = np.random.default_rng(1)
    x, W, b = rng.standard_normal((B, T, C)), rng.standard_normal((C, OC)), rng.standard_normal(OC)
    out, cache = ker.linear_forward(x, W, b)
    np.testing.assert_allclose(out, np.einsum("btc,co->bto", x, W) + b, rtol=1e-12)
    dout = rng.standard_normal(out.shape)
    dx, dW, db = ker.linear_backward(dout, cache)
    np.testing.assert_allclose(dx, np.einsum("bto,co->btc", dout, W), rtol=1e-12)
    np.testing.assert_allclose(dW, np.einsum("btc,bto->co", x, dout), rtol=1e-12)
    np.testing.assert_allclose(db, dout.sum(axis=(0, 1)), rtol=1e-12)


@KERNEL_SETTINGS
@given(seed=SEEDS, shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 6), st.integers(1, 6)),
       scales=st.sampled_from([(1.0, 1.0), (1000.0, 1.0), (1.0, 1000.0), (1e-3, 1e-3), (30.0, 30.0)]),
       w_transposed=st.booleans(), bias=st.booleans())
def test_grads_against_its_own_forward(seed, shape, scales, w_transposed, bias):
    """Centred finite differences of the kernel's float64 forward against the kernel's backward, with the reference's
    bounds and scales (tests/ops/test_linear.py: rel error 1e-6, entries of magnitude 0.5-2 times the scale, never
    both factors at 1000, whose loss would drown the differences in its rounding)."""
    B, T, C, OC = shape
    rng = np.random.default_rng(seed)

    def signed(*s):
        return rng.choice([-1.0, 1.0], s) * rng.uniform(0.5, 2.0, s)

    x, W, b = signed(B, T, C) * scales[0], signed(C, OC) * scales[1], signed(OC) * scales[1]
    if w_transposed:
        W = np.ascontiguousarray(W.T).T
    if bias:
        rows = check_op(ker.linear_forward, ker.linear_backward, {"x": x, "W": W, "b": b}, ["x", "W", "b"], rng)
    else:
        rows = check_op(ker.matmul_forward, ker.matmul_backward, {"x": x, "W": W}, ["x", "W"], rng)
    assert all(r.ok and r.rel_error <= 1e-6 for r in rows), format_table(rows)


def test_bad_arguments_are_named():
    x, W = np.zeros((2, 3), np.float32), np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="x must have shape"):
        ker.linear_forward(np.zeros((2, 5), np.float32), W, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="b must have shape"):
        ker.linear_forward(x, W, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="W contains NaN"):
        ker.matmul_forward(x, np.full((3, 4), np.nan, np.float32))
    _, cache = ker.linear_forward(x, W, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="dout must have shape"):
        ker.linear_backward(np.zeros((2, 5), np.float32), cache)
