"""kernels/numba_cpu/activations.py against the reference minielectra.ops.activations (tolerance: numba_kernel_checks)."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from minielectra.gradcheck import check_op, format_table  # noqa: E402
from minielectra.ops import activations as ref  # noqa: E402
from minielectra.kernels.numba_cpu import activations as ker  # noqa: E402
from numba_kernel_checks import (DTYPES, KERNEL_SETTINGS, LAYOUTS, MAGNITUDES, SEEDS, assert_close,  # noqa: E402
                                 gelu_backward_floor, gelu_floor, noncontiguous)

pytestmark = pytest.mark.numba

SHAPES = st.one_of(
    st.tuples(st.integers(1, 40), st.integers(1, 70)),
    st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 40)),
)


def _inputs(seed, shape, dtype, mag, layout):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * mag).astype(dtype)
    x.flat[:: max(1, x.size // 5)] = 0  # gelu(0) = 0, gelu'(0) = 1/2
    b = (rng.standard_normal(shape[-1]) * mag).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    return noncontiguous(x, layout), b, noncontiguous(dout, layout)


@KERNEL_SETTINGS
@given(seed=SEEDS, shape=SHAPES, dtype=DTYPES, mag=MAGNITUDES, layout=LAYOUTS, approximate=st.booleans())
@example(seed=1087, shape=(34, 68), dtype=np.float64, mag=1000.0, layout="C", approximate=True)  # tanh differs by an ulp
@example(seed=524289, shape=(33, 1), dtype=np.float32, mag=1000.0, layout="C", approximate=False)  # float32 Phi's tail
def test_forward_and_backward_match_reference(seed, shape, dtype, mag, layout, approximate):
    x, b, dout = _inputs(seed, shape, dtype, mag, layout)
    y_ref, c_ref = ref.bias_gelu_forward(x, b, approximate)
    y, c = ker.bias_gelu_forward(x, b, approximate)
    assert_close(y, y_ref, name="out", floor=gelu_floor(x, b, y_ref))
    dx_ref, db_ref = ref.bias_gelu_backward(dout, c_ref)
    dx, db = ker.bias_gelu_backward(dout, c)
    floor = gelu_backward_floor(dout, c_ref, approximate)
    assert_close(dx, dx_ref, name="dx", floor=np.maximum(floor, np.abs(dx_ref).max()))
    rows = tuple(range(dx_ref.ndim - 1))
    assert_close(db, db_ref, name="db", floor=np.maximum(floor.sum(axis=rows), np.abs(db_ref).max()))


@pytest.mark.parametrize("approximate", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_saturation_and_reference_cache(dtype, approximate):
    """At +-1000 gelu is the identity or 0 and its slope 1 or 0; the backward also inverts a reference forward."""
    x = np.array([[-1000.0, -40.0, -1.0, 0.0, 1.0, 40.0, 1000.0]], dtype)
    b = np.zeros(7, dtype)
    y, c = ker.bias_gelu_forward(x, b, approximate)
    assert y[0, 0] == 0 and y[0, -1] == 1000 and y[0, 3] == 0
    dx, _ = ker.bias_gelu_backward(np.ones_like(x), c)
    assert dx[0, 0] == 0 and dx[0, -1] == 1 and dx[0, 3] == 0.5
    _, c_ref = ref.bias_gelu_forward(x, b, approximate)
    for got, want in zip(ker.bias_gelu_backward(np.ones_like(x), c_ref), ref.bias_gelu_backward(np.ones_like(x), c_ref)):
        assert_close(got, want)


def test_rejects_what_the_reference_rejects():
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(TypeError):
        ker.bias_gelu_forward(x.astype(np.int32), np.zeros(4, np.float32))
    with pytest.raises(ValueError):
        ker.bias_gelu_forward(x, np.zeros(3, np.float32))
    _, c = ker.bias_gelu_forward(x, np.zeros(4, np.float32))
    with pytest.raises(ValueError):
        ker.bias_gelu_backward(np.zeros((2, 5), np.float32), c)


# Up to 108 entries: the centred difference's rounding error grows with the loss sum(out * dout), and at +-1000 over a
# thousand entries it reaches 1e-6 of the gradient by itself (seen: 17 x 65, rel error 1.2e-6 of a correct backward).
GRAD_SHAPES = st.one_of(st.tuples(st.integers(1, 6), st.integers(1, 12)),
                        st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 12)))


@settings(max_examples=20, deadline=None)
@given(seed=SEEDS, shape=GRAD_SHAPES, scale=st.sampled_from([0.3, 3.0, 1000.0]), approximate=st.booleans())
@example(seed=16777215, shape=(17, 65), scale=3.0, approximate=False)  # the large shape, at a scale it can take
def test_grads_against_its_own_forward(seed, shape, scale, approximate):
    """Centred finite differences of the kernel's float64 forward against the kernel's backward on its cache (the
    slope it kept). At +-1000 the slope is exactly 0 or 1. The bounds are tests/ops/test_activations.py's: rel error
    1e-6 (at +-1000 the centred difference itself is off by 2e-7), or an absolute difference below 1e-9 for a gradient
    that is zero in theory (gelu' at h = -8 is 1e-14, under the finite difference's noise)."""
    rng = np.random.default_rng(seed)
    x, b = rng.standard_normal(shape) * scale, rng.standard_normal(shape[-1]) * scale

    def forward(x, b):
        return ker.bias_gelu_forward(x, b, approximate)

    rows = check_op(forward, ker.bias_gelu_backward, {"x": x, "b": b}, ["x", "b"], rng)
    assert all(r.ok and (r.rel_error <= 1e-6 or r.max_abs_diff <= 1e-9) for r in rows), format_table(rows)
