"""kernels/numba_cpu/optim.py against the reference minielectra.optim's adamw_step (tolerance: numba_kernel_checks)
and clip_scale (the error bound of a sum of non-negative terms)."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("numba")

from minielectra import optim as ref  # noqa: E402
from minielectra.config import TrainConfig  # noqa: E402
from minielectra.kernels.numba_cpu import optim as ker  # noqa: E402
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


@KERNEL_SETTINGS
@given(seed=SEEDS, dtype=DTYPES, mag=MAGNITUDES, sizes=st.lists(st.integers(1, 700), min_size=1, max_size=5),
       strided=st.booleans())
def test_clip_scale_matches_reference(seed, dtype, mag, sizes, strided):
    rng = np.random.default_rng(seed)
    grads = {f"p{i}": (rng.standard_normal(2 * n) * mag).astype(dtype) for i, n in enumerate(sizes)}
    grads = {k: g[::2] if strided else g[: len(g) // 2] for k, g in grads.items()}  # strided: non-contiguous
    norm_ref, scale_ref = ref.clip_scale(grads, 1.0)
    norm, scale = ker.clip_scale(grads, 1.0)
    # Both sum the same float64 squares, in other orders: a sum of n non-negative terms is within n eps of the exact
    # one, so the two totals are within 2 n eps of each other, and their square roots within n eps.
    n = sum(sizes)
    eps = np.finfo(np.float64).eps
    assert abs(norm - norm_ref) <= n * eps * norm_ref
    assert abs(scale - scale_ref) <= 2 * n * eps * scale_ref


def test_clip_scale_edges():
    zeros = {"w": np.zeros((3, 5), np.float32)}
    assert ker.clip_scale(zeros, 1.0) == (0.0, 1.0)
    assert ker.clip_scale({"w": np.array([3.0, 4.0], np.float32)}, 10.0) == (5.0, 1.0)
    assert ker.clip_scale({"w": np.array([30.0, 40.0], np.float32)}, 10.0) == (50.0, 0.2)
    for bad in (np.inf, np.nan):  # reported as they are (inf stays inf, NaN NaN), with a NaN scale, as the reference
        grads = {"w": np.array([1.0, bad], np.float32), "b": np.ones(3, np.float32)}
        norm, scale = ker.clip_scale(grads, 1.0)
        norm_ref, _ = ref.clip_scale(grads, 1.0)
        assert (math.isinf(norm), math.isnan(norm)) == (math.isinf(norm_ref), math.isnan(norm_ref)) == (bad == np.inf,
                                                                                                      bad != bad)
        assert math.isnan(scale)


def test_adamw_runs_on_the_calling_thread_alone_and_restores_its_setting(monkeypatch):
    """The update's parallel loop runs with one Numba thread (see the kernel module: the thread pool slowed the next
    step's shards), and the caller's own setting is back afterwards; a tensor past the 65,536 entries that once went
    to the pool still matches the reference."""
    import numba

    seen = []
    real = ker._adamw_flat

    def spy(*args):
        seen.append(numba.get_num_threads())
        return real(*args)

    monkeypatch.setattr(ker, "_adamw_flat", spy)
    rng = np.random.default_rng(3)
    shapes = {"big.weight": (70_001,), "small.bias": (5,)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    mine = {k: v.copy() for k, v in params.items()}
    s_ref, s_ker = ref.adamw_init(params), ref.adamw_init(mine)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    ker.adamw_step(mine, grads, s_ker, 1e-2, TrainConfig(), grad_scale=0.5)
    assert seen == [1, 1] and numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    ref.adamw_step(params, grads, s_ref, 1e-2, TrainConfig(), grad_scale=0.5)
    for k in shapes:
        assert_close(s_ker.m[k], s_ref.m[k], name=f"m[{k}]")
        assert_close(s_ker.v[k], s_ref.v[k], name=f"v[{k}]")
        assert_close(mine[k], params[k], name=k)


@KERNEL_SETTINGS
@given(seed=SEEDS, dtype=DTYPES, mag=MAGNITUDES, n=st.integers(1, 300), scale=st.sampled_from([1.0, 0.37]))
def test_flat_params_update_in_one_call_as_tensor_by_tensor(seed, dtype, mag, n, scale):
    """Params, grads and moments as views of one buffer each (optim.flatten) take the kernels' one-call paths: the
    update is the per-tensor kernel's to the bit (the same arithmetic on each entry, the decayed part and the rest
    with their own constants), and the global norm the reference's up to the order of the additions."""
    from minielectra import flat
    from minielectra.nn import zeros_like

    rng = np.random.default_rng(seed)
    shapes = {"layer.dense.weight": (n, 3), "layer.dense.bias": (3,), "layer.LayerNorm.weight": (n,),
              "embeddings.word_embeddings.weight": (n + 2, 2)}
    params = {k: (rng.standard_normal(s) * mag).astype(dtype) for k, s in shapes.items()}
    state = ref.adamw_init(params)
    fp, fstate = ref.flatten(params, ref.adamw_init(params))
    config = TrainConfig(weight_decay=0.1)
    calls = []
    real = ker._adamw_flat

    def spy(*args):
        calls.append(args[0].size)
        return real(*args)

    for step in range(3):
        grads = {k: (rng.standard_normal(s) * mag).astype(dtype) for k, s in shapes.items()}
        fgrads = zeros_like(fp)
        for k in grads:
            fgrads[k] += grads[k]
        assert flat.buffers(fp, fgrads, fstate.m, fstate.v) is not None
        norm, _ = ker.clip_scale(fgrads, 1.0)
        norm_ref, _ = ref.clip_scale(grads, 1.0)
        assert abs(norm - norm_ref) <= fp.buffer.size * np.finfo(np.float64).eps * norm_ref
        ker.adamw_step(params, grads, state, 1e-2, config, grad_scale=scale)
        ker._adamw_flat = spy
        try:
            ker.adamw_step(fp, fgrads, fstate, 1e-2, config, grad_scale=scale)
        finally:
            ker._adamw_flat = real
    assert calls == [fp.layout.split, fp.buffer.size - fp.layout.split] * 3  # two calls a step, not one per tensor
    assert fstate.step == state.step == 3
    for k in shapes:
        assert np.array_equal(fp[k], params[k]) and np.array_equal(fstate.m[k], state.m[k])
        assert np.array_equal(fstate.v[k], state.v[k])


def test_a_flat_dict_with_a_replaced_entry_is_updated_tensor_by_tensor():
    """After params[k] = new_array the buffer no longer holds params[k]: the kernel must update the new array."""
    params = {"w": np.ones(4, np.float32), "b": np.ones(2, np.float32)}
    fp, fstate = ref.flatten(params, ref.adamw_init(params))
    fp["w"] = np.ones(4, np.float32)
    grads = {k: np.ones_like(v) for k, v in params.items()}
    ker.adamw_step(fp, grads, fstate, 0.1, TrainConfig())
    ref.adamw_step(params, grads, ref.adamw_init(params), 0.1, TrainConfig())
    for k in params:
        assert_close(fp[k], params[k], name=k)
