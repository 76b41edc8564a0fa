import math

import numpy as np
import pytest

from minielectra.backend import gpu_usable
from minielectra.config import TrainConfig
from minielectra.optim import AdamWState, adamw_init, adamw_step, clip_scale, learning_rate, no_decay

WEIGHT = "discriminator.electra.encoder.layer.0.attention.self.query.weight"
BIAS = "discriminator.electra.encoder.layer.0.attention.self.query.bias"
LN_WEIGHT = "discriminator.electra.encoder.layer.0.output.LayerNorm.weight"

# Betas and eps picked so that every square root below is exact: 1 - b2 = 1/4 makes sqrt(v) = |g| / 2 after one step.
HAND = TrainConfig(adam_beta1=0.5, adam_beta2=0.75, adam_epsilon=0.5, weight_decay=0.1)


def f32(*values):
    return np.array(values, dtype=np.float32)


def test_no_decay_follows_the_official_exclude_list():
    assert not no_decay(WEIGHT)
    assert not no_decay("discriminator.electra.embeddings.word_embeddings.weight")
    assert no_decay(BIAS)
    assert no_decay(LN_WEIGHT)
    assert no_decay("discriminator.electra.embeddings.LayerNorm.bias")
    assert no_decay("generator_lm_head.bias")
    assert no_decay("some.layer_norm.weight")


def test_two_steps_by_hand_for_a_decayed_weight_and_undecayed_bias_and_layernorm():
    params = {WEIGHT: f32(2.0, -1.0), BIAS: f32(2.0, -1.0), LN_WEIGHT: f32(2.0, -1.0)}
    state = adamw_init(params)

    # Step 1, g = (2, 1):  m = g/2 = (1, 1/2);  v = g^2/4 = (1, 1/4);  sqrt(v) = (1, 1/2)
    # m / (sqrt(v) + eps) = (1/1.5, 0.5/1) = (2/3, 1/2)  -- no bias correction, eps outside the root
    # weight: update += 0.1 * (2, -1) = (2/3 + 0.2, 0.4);  w = (2, -1) - 0.1 * update = (1.91333.., -1.04)
    # bias and LayerNorm: w = (2, -1) - 0.1 * (2/3, 1/2) = (1.93333.., -1.05)
    adamw_step(params, {k: f32(2.0, 1.0) for k in params}, state, lr=0.1, config=HAND)
    np.testing.assert_allclose(state.m[WEIGHT], [1.0, 0.5])
    np.testing.assert_allclose(state.v[WEIGHT], [1.0, 0.25])
    np.testing.assert_allclose(params[WEIGHT], [2 - 0.1 * (2 / 3 + 0.2), -1.04], rtol=1e-6)
    for k in (BIAS, LN_WEIGHT):
        np.testing.assert_allclose(params[k], [2 - 0.1 * 2 / 3, -1.05], rtol=1e-6)

    # Step 2, g = (-1, 1/2):  m = m/2 + g/2 = (0, 1/2);  v = 3v/4 + g^2/4 = (1, 1/4);  m / (sqrt(v) + eps) = (0, 1/2)
    # weight: update = (0, 1/2) + 0.1 * w  with w from step 1;  bias and LayerNorm: only the second entry moves, by 0.05
    w1 = params[WEIGHT].astype(np.float64)
    adamw_step(params, {k: f32(-1.0, 0.5) for k in params}, state, lr=0.1, config=HAND)
    np.testing.assert_allclose(state.m[WEIGHT], [0.0, 0.5])
    np.testing.assert_allclose(state.v[WEIGHT], [1.0, 0.25])
    np.testing.assert_allclose(params[WEIGHT], w1 - 0.1 * (np.array([0.0, 0.5]) + 0.1 * w1), rtol=1e-6)
    np.testing.assert_allclose(params[WEIGHT], [1.8942, -1.0796], rtol=1e-6)
    for k in (BIAS, LN_WEIGHT):
        np.testing.assert_allclose(params[k], [2 - 0.1 * 2 / 3, -1.1], rtol=1e-6)
    assert state.step == 2


def test_grad_scale_is_the_same_as_scaling_the_grads_first():
    rng = np.random.default_rng(0)
    params = {WEIGHT: rng.standard_normal((3, 4)).astype(np.float32), BIAS: rng.standard_normal(4).astype(np.float32)}
    grads = {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()}
    a = {k: p.copy() for k, p in params.items()}
    b = {k: p.copy() for k, p in params.items()}
    state_a, state_b = adamw_init(a), adamw_init(b)
    adamw_step(a, {k: g * 2 for k, g in grads.items()}, state_a, 1e-3, TrainConfig(), grad_scale=0.5)
    adamw_step(b, grads, state_b, 1e-3, TrainConfig())
    for k in params:  # halving a doubled float is exact, so the results are bit-identical
        np.testing.assert_array_equal(a[k], b[k])


def test_float32_stays_float32_even_with_numpy_float64_scalars():
    params = {WEIGHT: f32(1.0, 2.0), BIAS: f32(0.5)}
    state = adamw_init(params)
    adamw_step(params, {WEIGHT: f32(0.1, 0.2), BIAS: f32(0.3)}, state, lr=np.float64(1e-3), config=TrainConfig(),
               grad_scale=np.float64(0.5))
    for d in (params, state.m, state.v):
        assert all(a.dtype == np.float32 for a in d.values())


def test_adamw_init_gives_zero_moments_like_the_params():
    params = {WEIGHT: np.ones((2, 3), np.float32), BIAS: np.ones(3, np.float64)}
    state = adamw_init(params)
    assert state.step == 0
    for moments in (state.m, state.v):
        assert set(moments) == set(params)
        for k, p in params.items():
            assert moments[k].shape == p.shape and moments[k].dtype == p.dtype and not moments[k].any()
            assert moments[k] is not p


def test_mismatched_keys_and_shapes_are_named():
    params = {WEIGHT: f32(1.0, 2.0), BIAS: f32(0.5)}
    state = adamw_init(params)
    with pytest.raises(ValueError, match=r"grads lacks .*query\.bias.*not params: stray"):
        adamw_step(params, {WEIGHT: f32(0.1, 0.2), "stray": f32(1.0)}, state, 1e-3, TrainConfig())
    with pytest.raises(ValueError, match=r"grads\[.*query\.weight'\] has shape \(3,\) but the param has \(2,\)"):
        adamw_step(params, {WEIGHT: f32(0.1, 0.2, 0.3), BIAS: f32(0.3)}, state, 1e-3, TrainConfig())
    del state.v[BIAS]
    with pytest.raises(ValueError, match=r"state\.v lacks .*query\.bias.*adamw_init"):
        adamw_step(params, {WEIGHT: f32(0.1, 0.2), BIAS: f32(0.3)}, state, 1e-3, TrainConfig())
    np.testing.assert_array_equal(params[WEIGHT], [1.0, 2.0])  # nothing was updated before the check failed


def test_state_carries_everything_a_resumed_run_needs():
    rng = np.random.default_rng(1)
    init = {WEIGHT: rng.standard_normal((2, 3)).astype(np.float32), BIAS: rng.standard_normal(3).astype(np.float32)}
    grads = [{k: rng.standard_normal(p.shape).astype(np.float32) for k, p in init.items()} for _ in range(3)]
    config = TrainConfig(learning_rate=1e-2, warmup_steps=1, steps=3)

    straight = {k: p.copy() for k, p in init.items()}
    state = adamw_init(straight)
    for step, g in enumerate(grads):
        adamw_step(straight, g, state, learning_rate(step, config), config)

    resumed = {k: p.copy() for k, p in init.items()}
    state = adamw_init(resumed)
    adamw_step(resumed, grads[0], state, learning_rate(0, config), config)
    # What a checkpoint stores: copies of the params, moments and step; the run continues from those alone.
    resumed = {k: p.copy() for k, p in resumed.items()}
    state = AdamWState(m={k: a.copy() for k, a in state.m.items()}, v={k: a.copy() for k, a in state.v.items()},
                       step=state.step)
    for step in (1, 2):
        adamw_step(resumed, grads[step], state, learning_rate(step, config), config)

    assert state.step == 3
    for k in init:
        np.testing.assert_array_equal(resumed[k], straight[k])


def test_learning_rate_schedule():
    config = TrainConfig(learning_rate=1.0, warmup_steps=4, steps=10)
    assert learning_rate(0, config) == 0.25  # (0 + 1) / 4: the first update already moves
    assert learning_rate(3, config) == 1.0  # warmup - 1: the ramp reaches the base rate
    assert learning_rate(4, config) == 1.0  # warmup: decay starts from the base rate
    assert learning_rate(7, config) == 0.5  # (10 - 7) / (10 - 4)
    assert learning_rate(9, config) == pytest.approx(1 / 6)  # the last update
    assert learning_rate(10, config) == 0.0
    assert learning_rate(11, config) == 0.0


def test_learning_rate_without_warmup_and_with_warmup_past_the_end():
    assert learning_rate(0, TrainConfig(learning_rate=2.0, warmup_steps=0, steps=4)) == 2.0
    assert learning_rate(2, TrainConfig(learning_rate=2.0, warmup_steps=0, steps=4)) == 1.0
    long_warmup = TrainConfig(learning_rate=1.0, warmup_steps=8, steps=4)
    assert learning_rate(3, long_warmup) == 0.5
    assert learning_rate(4, long_warmup) == 0.0


def test_clip_scale_by_hand():
    grads = {WEIGHT: f32(3.0, 0.0), BIAS: np.array([[4.0]], dtype=np.float32)}  # global norm sqrt(9 + 16) = 5
    assert clip_scale(grads, max_norm=1.0) == (5.0, pytest.approx(0.2))
    assert clip_scale(grads, max_norm=10.0) == (5.0, 1.0)
    assert clip_scale(grads, max_norm=5.0) == (5.0, 1.0)
    assert clip_scale({WEIGHT: f32(0.0, 0.0)}, max_norm=1.0) == (0.0, 1.0)


def test_clip_scale_sums_in_float64():
    # Each square, 1e40, overflows float32 (max ~3.4e38); the float64 sum keeps the norm finite.
    norm, scale = clip_scale({WEIGHT: np.full(4, 1e20, dtype=np.float32)}, max_norm=1.0)
    assert norm == pytest.approx(2e20)
    assert scale == pytest.approx(5e-21)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_clip_scale_returns_a_non_finite_norm_for_the_caller_to_handle(bad):
    norm, scale = clip_scale({WEIGHT: f32(1.0, bad), BIAS: f32(1.0)}, max_norm=1.0)
    assert not math.isfinite(norm)
    assert math.isnan(scale)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_usable(), reason="needs CuPy and a CUDA GPU")
def test_cupy_arrays_give_the_numpy_result():
    import cupy

    rng = np.random.default_rng(2)
    params = {WEIGHT: rng.standard_normal((8, 5)).astype(np.float32),
              LN_WEIGHT: rng.standard_normal(5).astype(np.float32)}
    grads = {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()}
    on_gpu = {k: cupy.asarray(p) for k, p in params.items()}
    grads_gpu = {k: cupy.asarray(g) for k, g in grads.items()}
    state, state_gpu = adamw_init(params), adamw_init(on_gpu)
    norm, scale = clip_scale(grads, 1.0)
    norm_gpu, scale_gpu = clip_scale(grads_gpu, 1.0)
    assert isinstance(norm_gpu, cupy.ndarray) and norm_gpu.shape == () and isinstance(scale_gpu, cupy.ndarray)
    assert float(norm_gpu.get()) == pytest.approx(norm, rel=1e-12)
    for _ in range(2):
        adamw_step(params, grads, state, 1e-2, TrainConfig(), grad_scale=scale)
        adamw_step(on_gpu, grads_gpu, state_gpu, 1e-2, TrainConfig(), grad_scale=scale_gpu)
    for k in params:
        assert isinstance(on_gpu[k], cupy.ndarray) and on_gpu[k].dtype == np.float32
        np.testing.assert_allclose(on_gpu[k].get(), params[k], rtol=1e-6, atol=1e-7)
