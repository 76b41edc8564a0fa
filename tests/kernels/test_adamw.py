"""kernels/numba_cpu/optim.py against the reference minielectra.optim.adamw_step (tolerance: numba_kernel_checks)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("numba")

from minielectra import optim as ref  # noqa: E402
from minielectra.config import TrainConfig  # noqa: E402
from kernels.numba_cpu import optim as ker  # noqa: E402
from numba_kernel_checks import DTYPES, KERNEL_SETTINGS, MAGNITUDES, SEEDS, assert_close  # noqa: E402

pytestmark = pytest.mark.numba


@KERNEL_SETTINGS
@given(seed=SEEDS, dtype=DTYPES, mag=MAGNITUDES, n=st.integers(1, 300), scale=st.sampled_from([1.0, 0.37]))
def test_adamw_matches_reference(seed, dtype, mag, n, scale):
    rng = np.random.default_rng(seed)
    shapes = {"layer.dense.weight": (n, 3), "layer.dense.bias": (3,), "layer.LayerNorm.weight": (n,)}
    params = {k: (rng.standard_normal(s) * mag).astype(dtype) for k, s in shapes.items()}
    mine = {k: v.copy() for k, v in params.items()}
    s_ref, s_ker = ref.adamw_init(params), ref.adamw_init(mine)
    config = TrainConfig(weight_decay=0.1)
    for step in range(3):  # several steps so m and v are non-trivial
        grads = {k: (rng.standard_normal(s) * mag).astype(dtype) for k, s in shapes.items()}
        ref.adamw_step(params, grads, s_ref, 1e-2, config, grad_scale=scale)
        ker.adamw_step(mine, grads, s_ker, 1e-2, config, grad_scale=scale)
    assert s_ker.step == s_ref.step == 3
    for k in shapes:  # k ulps of |value| + max|value|: the update's terms are rounded in a different order
        assert_close(s_ker.m[k], s_ref.m[k], name=f"m[{k}]")
        assert_close(s_ker.v[k], s_ref.v[k], name=f"v[{k}]")
        assert_close(mine[k], params[k], name=k)


def test_adamw_kernel_rejects_mismatched_keys():
    params = {"w": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match="w"):
        ker.adamw_step(params, {}, ref.adamw_init(params), 1e-3, TrainConfig())
