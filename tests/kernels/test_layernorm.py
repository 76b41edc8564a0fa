"""kernels/numba_cpu/layernorm.py against the reference minielectra.ops.layernorm (tolerance: numba_kernel_checks)."""

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from minielectra.gradcheck import check_op, format_table  # noqa: E402
from minielectra.ops import layernorm as ref  # noqa: E402
from minielectra.kernels.numba_cpu import layernorm as ker  # noqa: E402
from numba_kernel_checks import (DTYPES, KERNEL_SETTINGS, LAYOUTS, MAGNITUDES, SEEDS, assert_close,  # noqa: E402
                                 layernorm_floors, noncontiguous)

pytestmark = pytest.mark.numba

SHAPES = st.one_of(
    st.tuples(st.integers(1, 40), st.integers(1, 70)),
    st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 40)),
)


def _inputs(seed, shape, dtype, mag, layout):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * mag + rng.standard_normal(shape[:-1] + (1,)) * mag).astype(dtype)
    gamma = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(dtype)
    beta = (0.1 * rng.standard_normal(shape[-1])).astype(dtype)
    dout = (rng.standard_normal(shape) * mag).astype(dtype)
    return noncontiguous(x, layout), gamma, beta, noncontiguous(dout, layout)


@KERNEL_SETTINGS
@given(seed=SEEDS, shape=SHAPES, dtype=DTYPES, mag=MAGNITUDES, layout=LAYOUTS)
def test_forward_and_backward_match_reference(seed, shape, dtype, mag, layout):
    x, gamma, beta, dout = _inputs(seed, shape, dtype, mag, layout)
    y_ref, c_ref = ref.layernorm_forward(x, gamma, beta)
    y, c = ker.layernorm_forward(x, gamma, beta)
    floor_y, floor_xhat = layernorm_floors(np.abs(x), y_ref, c_ref)
    assert_close(y, y_ref, name="y", floor=floor_y)
    assert_close(c.xhat, c_ref.xhat, name="xhat", floor=floor_xhat)
    assert_close(c.rstd, c_ref.rstd, name="rstd")
    # The backwards on one cache, the reference's: each forward rounds xhat its own way (layernorm_floors), and dx
    # would carry that difference on. The kernel's backward on its own forward's cache is gradient-checked below.
    for name, got, want in zip(("dx", "dgamma", "dbeta"), ker.layernorm_backward(dout, c_ref),
                               ref.layernorm_backward(dout, c_ref)):
        assert_close(got, want, name=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_caches_interchange_with_reference(dtype):
    """Kernel and reference share LayerNormCache, so either backward inverts either forward."""
    x, gamma, beta, dout = _inputs(0, (6, 5, 24), dtype, 1.0, "C")
    _, c_ref = ref.layernorm_forward(x, gamma, beta)
    _, c = ker.layernorm_forward(x, gamma, beta)
    want = ref.layernorm_backward(dout, c_ref)
    for got in (ker.layernorm_backward(dout, c_ref), ref.layernorm_backward(dout, c)):
        for g, w in zip(got, want):
            assert_close(g, w)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constant_row_and_custom_eps(dtype):
    """A constant row has var = 0: xhat = 0 and the output is beta, with no NaN; eps is honoured."""
    x = np.full((3, 8), 3.0, dtype)
    gamma, beta = np.ones(8, dtype), np.arange(8, dtype=dtype)
    y, c = ker.layernorm_forward(x, gamma, beta)
    np.testing.assert_array_equal(y, np.broadcast_to(beta, (3, 8)))
    y_ref, _ = ref.layernorm_forward(x + np.arange(8, dtype=dtype), gamma, beta, eps=0.5)
    assert_close(ker.layernorm_forward(x + np.arange(8, dtype=dtype), gamma, beta, eps=0.5)[0], y_ref)


def test_rejects_what_the_reference_rejects():
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(TypeError):
        ker.layernorm_forward(x.astype(np.int64), np.ones(4), np.zeros(4))
    with pytest.raises(ValueError):
        ker.layernorm_forward(x, np.ones(3, np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError):
        ker.layernorm_forward(x, np.full(4, np.nan, np.float32), np.zeros(4, np.float32))
    _, c = ker.layernorm_forward(x, np.ones(4, np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError):
        ker.layernorm_backward(np.zeros((3, 4), np.float32), c)


@KERNEL_SETTINGS
@given(seed=SEEDS, shape=SHAPES, dtype=DTYPES, mag=MAGNITUDES, layout=LAYOUTS, p=st.sampled_from([0.0, 0.1, 0.5]),
       train=st.booleans())
# the rows layernorm_floors speaks of
@example(seed=2_439_067_075, shape=(14, 6), dtype=np.float64, mag=1000.0, layout="C", p=0.0, train=False)
def test_dropout_add_layernorm_matches_reference(seed, shape, dtype, mag, layout, p, train):
    x, gamma, beta, dout = _inputs(seed, shape, dtype, mag, layout)
    residual = noncontiguous(_inputs(seed + 1, shape, dtype, mag, "C")[0], layout)
    y_ref, c_ref = ref.dropout_add_layernorm_forward(x, residual, gamma, beta, p, np.random.default_rng(seed), train)
    y, c = ker.dropout_add_layernorm_forward(x, residual, gamma, beta, p, np.random.default_rng(seed), train)
    assert (c.seed, c.threshold, c.drop_scale) == (c_ref.seed, c_ref.threshold, c_ref.drop_scale)
    floor_y, floor_xhat = layernorm_floors(np.abs(residual) + np.abs(x) * c_ref.drop_scale, y_ref, c_ref.ln)
    assert_close(y, y_ref, name="y", floor=floor_y)
    assert_close(c.ln.xhat, c_ref.ln.xhat, name="xhat", floor=floor_xhat)
    assert_close(c.ln.rstd, c_ref.ln.rstd, name="rstd")
    got = ker.dropout_add_layernorm_backward(dout, c_ref)  # on one cache, as in the test above
    want = ref.dropout_add_layernorm_backward(dout, c_ref)
    for name, g, w in zip(("dx", "dresidual", "dgamma", "dbeta"), got, want):
        assert_close(g, w, name=name)
    dropped = (want[0] == 0) & (want[1] != 0)
    assert np.all(got[0][dropped] == 0)  # the same entries dropped, exactly


def test_dropout_add_layernorm_rejects_what_the_reference_rejects():
    x = np.zeros((2, 4), np.float32)
    g, b = np.ones(4, np.float32), np.zeros(4, np.float32)
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="^residual"):
        ker.dropout_add_layernorm_forward(x, x.astype(np.int64), g, b, 0.1, rng)
    with pytest.raises(ValueError, match="^residual"):
        ker.dropout_add_layernorm_forward(x, np.zeros((2, 5), np.float32), g, b, 0.1, rng)
    with pytest.raises(ValueError, match="^p"):
        ker.dropout_add_layernorm_forward(x, x, g, b, 1.5, rng)
    with pytest.raises(ValueError, match="^gamma"):
        ker.dropout_add_layernorm_forward(x, x, np.full(4, np.inf, np.float32), b, 0.1, rng)
    _, c = ker.dropout_add_layernorm_forward(x, x, g, b, 0.1, rng)
    with pytest.raises(ValueError, match="^dout"):
        ker.dropout_add_layernorm_backward(np.zeros((3, 4), np.float32), c)


@KERNEL_SETTINGS
@given(seed=SEEDS, shape=SHAPES, dtype=DTYPES, mag=MAGNITUDES, layout=LAYOUTS, p=st.sampled_from([0.0, 0.1, 0.5]),
       train=st.booleans())
def test_layernorm_dropout_matches_reference(seed, shape, dtype, mag, layout, p, train):
    x, gamma, beta, dout = _inputs(seed, shape, dtype, mag, layout)
    y_ref, c_ref = ref.layernorm_dropout_forward(x, gamma, beta, p, np.random.default_rng(seed), train)
    y, c = ker.layernorm_dropout_forward(x, gamma, beta, p, np.random.default_rng(seed), train)
    assert (c.seed, c.threshold, c.drop_scale) == (c_ref.seed, c_ref.threshold, c_ref.drop_scale)
    floor_y, floor_xhat = layernorm_floors(np.abs(x), y_ref, c_ref.ln)
    scale = c_ref.drop_scale if c_ref.threshold else 1.0
    assert_close(y, y_ref, name="y", floor=floor_y * scale)
    assert np.all((y == 0) >= (y_ref == 0) * (c.ln.xhat * gamma + beta != 0))  # the same entries dropped, exactly
    assert_close(c.ln.xhat, c_ref.ln.xhat, name="xhat", floor=floor_xhat)
    assert_close(c.ln.rstd, c_ref.ln.rstd, name="rstd")
    got = ker.layernorm_dropout_backward(dout, c_ref)  # on one cache, as in the tests above
    want = ref.layernorm_dropout_backward(dout, c_ref)
    for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want):
        assert_close(g, w, name=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", ["dropout_add_layernorm", "layernorm_dropout"])
def test_fused_ops_caches_interchange_with_reference(op, dtype):
    """The fused ops' kernels and references share their caches, so either backward inverts either forward."""
    x, gamma, beta, dout = _inputs(0, (6, 5, 24), dtype, 1.0, "C")
    inputs = (x, _inputs(1, (6, 5, 24), dtype, 1.0, "C")[0]) if op == "dropout_add_layernorm" else (x,)
    _, c_ref = getattr(ref, f"{op}_forward")(*inputs, gamma, beta, 0.1, np.random.default_rng(0))
    _, c = getattr(ker, f"{op}_forward")(*inputs, gamma, beta, 0.1, np.random.default_rng(0))
    ref_backward, ker_backward = getattr(ref, f"{op}_backward"), getattr(ker, f"{op}_backward")
    want = ref_backward(dout, c_ref)
    for got in (ker_backward(dout, c_ref), ref_backward(dout, c)):
        for g, w in zip(got, want):
            assert_close(g, w)


def test_layernorm_dropout_rejects_what_the_reference_rejects():
    x = np.zeros((2, 4), np.float32)
    g, b = np.ones(4, np.float32), np.zeros(4, np.float32)
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="^x"):
        ker.layernorm_dropout_forward(x.astype(np.int64), g, b, 0.1, rng)
    with pytest.raises(ValueError, match="^p"):
        ker.layernorm_dropout_forward(x, g, b, 1.5, rng)
    with pytest.raises(ValueError, match="^gamma"):
        ker.layernorm_dropout_forward(x, np.full(4, np.inf, np.float32), b, 0.1, rng)
    with pytest.raises(TypeError, match="Generator"):
        ker.layernorm_dropout_forward(x, g, b, 0.1, None)
    _, c = ker.layernorm_dropout_forward(x, g, b, 0.1, rng)
    with pytest.raises(ValueError, match="^dout"):
        ker.layernorm_dropout_backward(np.zeros((3, 4), np.float32), c)


def _spread_rows(rng, lead, C, scale, offset):
    """(*lead, C) rows of spread exactly `scale` around means of about `offset`: a gradient check of a layer norm needs
    rows that are not near-constant, where the centred difference itself is off (tests/ops/test_layernorm.py)."""
    z = rng.standard_normal((*lead, C))
    z -= z.mean(-1, keepdims=True)
    z /= z.std(-1, keepdims=True)
    return z * scale + offset + rng.standard_normal((*lead, 1)) * scale


GRAD_SETTINGS = settings(max_examples=20, deadline=None)
# (spread, mean) of the rows. +-1000 means with a spread of 0.1 or 1 are left out: there x - mean keeps 12 or 13 of
# float64's 16 digits, and the centred difference itself is off, for the reference op as for the kernel: by up to
# 2e-6 relative at a spread of 0.1 (2 draws in 300 each, C = 3), and by 1e-5 at a spread of 1 where dx is small
# (seed 630525515, C = 3: max abs diff 3.2e-8 on a dx of 3e-3).
SCALE_OFFSETS = st.sampled_from([(0.1, 0.0), (1.0, 0.0), (30.0, 0.0), (30.0, 1000.0), (30.0, -1000.0)])


@GRAD_SETTINGS
@given(seed=SEEDS, lead=st.lists(st.integers(1, 3), max_size=2), C=st.integers(3, 40), scale_offset=SCALE_OFFSETS)
def test_grads_against_its_own_forward(seed, lead, C, scale_offset):
    """Centred finite differences of the kernel's float64 forward against the kernel's backward on its cache."""
    rng = np.random.default_rng(seed)
    x = _spread_rows(rng, lead, C, *scale_offset)
    gamma, beta = 1.0 + 0.5 * rng.standard_normal(C), 0.5 * rng.standard_normal(C)
    rows = check_op(ker.layernorm_forward, ker.layernorm_backward, {"x": x, "gamma": gamma, "beta": beta},
                    ["x", "gamma", "beta"], rng)
    assert all(r.ok and r.rel_error <= 1e-6 for r in rows), format_table(rows)


@GRAD_SETTINGS
@given(seed=SEEDS, lead=st.lists(st.integers(1, 3), max_size=2), C=st.integers(3, 40), scale_offset=SCALE_OFFSETS,
       p=st.sampled_from([0.0, 0.1, 0.5]))
def test_dropout_add_layernorm_grads_against_its_own_forward(seed, lead, C, scale_offset, p):
    """As above for the fused op, the mask replayed from the same seed each call; +-1000 enters as the residual's mean.
    Draws whose x and residual rows nearly cancel are skipped, as in tests/ops/test_layernorm.py."""
    scale, offset = scale_offset
    rng = np.random.default_rng(seed)
    x, residual = _spread_rows(rng, lead, C, scale, 0.0), _spread_rows(rng, lead, C, scale, offset)
    gamma, beta = 1.0 + 0.5 * rng.standard_normal(C), 0.5 * rng.standard_normal(C)

    def forward(x, residual, gamma, beta):
        return ker.dropout_add_layernorm_forward(x, residual, gamma, beta, p, np.random.default_rng(seed))

    assume(np.all(1 / forward(x, residual, gamma, beta)[1].ln.rstd >= 0.5 * scale))
    rows = check_op(forward, ker.dropout_add_layernorm_backward,
                    {"x": x, "residual": residual, "gamma": gamma, "beta": beta}, ["x", "residual", "gamma", "beta"],
                    rng)
    assert all(r.ok and r.rel_error <= 1e-6 for r in rows), format_table(rows)


@GRAD_SETTINGS
@given(seed=SEEDS, lead=st.lists(st.integers(1, 3), max_size=2), C=st.integers(3, 40), scale_offset=SCALE_OFFSETS,
       p=st.sampled_from([0.0, 0.1, 0.5]))
def test_layernorm_dropout_grads_against_its_own_forward(seed, lead, C, scale_offset, p):
    """As above for dropout(LN(x)), the mask replayed from the same seed each call."""
    rng = np.random.default_rng(seed)
    x = _spread_rows(rng, lead, C, *scale_offset)
    gamma, beta = 1.0 + 0.5 * rng.standard_normal(C), 0.5 * rng.standard_normal(C)

    def forward(x, gamma, beta):
        return ker.layernorm_dropout_forward(x, gamma, beta, p, np.random.default_rng(seed))

    rows = check_op(forward, ker.layernorm_dropout_backward, {"x": x, "gamma": gamma, "beta": beta},
                    ["x", "gamma", "beta"], rng)
    assert all(r.ok and r.rel_error <= 1e-6 for r in rows), format_table(rows)
