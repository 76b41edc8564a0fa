import numpy as np
import pytest

from minielectra import flat, optim
from minielectra.nn import zeros_like

WEIGHT = "layer.0.attention.self.query.weight"
BIAS = "layer.0.attention.self.query.bias"
LN = "layer.0.output.LayerNorm.weight"
TABLE = "embeddings.word_embeddings.weight"


def model(dtype=np.float32):
    rng = np.random.default_rng(0)
    shapes = {WEIGHT: (3, 4), BIAS: (4,), LN: (4,), TABLE: (5, 3)}
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


def test_flatten_copies_the_values_into_views_of_one_buffer_decayed_keys_first():
    params = model()
    fp, _ = optim.flatten(params)
    assert isinstance(fp, flat.FlatDict) and fp.intact()
    assert fp.layout.keys == (TABLE, WEIGHT, BIAS, LN)  # decayed, then the rest, each sorted
    assert fp.layout.split == 15 + 12 and fp.buffer.size == 15 + 12 + 4 + 4
    for k, v in params.items():
        assert fp[k].shape == v.shape and fp[k].dtype == v.dtype and np.array_equal(fp[k], v)
        assert fp[k].base is fp.buffer and fp[k].flags.c_contiguous
        assert not np.shares_memory(fp[k], v)  # a copy: the caller's arrays are left alone
    fp[BIAS] += 1.0  # in place, as the backward adds into grads and the optimizer updates params
    assert np.array_equal(fp.buffer[27:31], params[BIAS] + 1.0)


def test_grads_and_moments_of_flat_params_are_laid_out_alike():
    fp, state = optim.flatten(model(), optim.adamw_init(model()))
    grads = zeros_like(fp)
    fresh = optim.adamw_init(fp)
    for d in (grads, state.m, state.v, fresh.m, fresh.v):
        assert isinstance(d, flat.FlatDict) and d.layout is fp.layout and not d.buffer.any()
    assert flat.buffers(fp, grads, state.m, fresh.v) is not None


def test_a_replaced_entry_turns_the_flat_paths_off():
    fp, _ = optim.flatten(model())
    grads = zeros_like(fp)
    grads[WEIGHT] = np.ones((3, 4), np.float32)  # no longer a view of grads.buffer
    assert not grads.intact() and flat.buffers(fp, grads) is None
    assert isinstance(zeros_like(grads), dict) and not isinstance(zeros_like(grads), flat.FlatDict)
    other, _ = optim.flatten(model())
    assert flat.buffers(fp, other) is None  # same keys, another layout object: not known to match
    assert flat.buffers(fp, {k: v for k, v in fp.items()}) is None  # a plain dict


@pytest.mark.parametrize("params", [{}, {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float64)}])
def test_params_that_cannot_share_a_buffer_are_left_as_they_are(params):
    assert optim.flatten(params)[0] is params


def test_the_optimizer_gives_the_same_update_on_flat_params():
    from minielectra.config import TrainConfig

    config = TrainConfig(weight_decay=0.1)
    params = model()
    fp, fstate = optim.flatten(model(), optim.adamw_init(model()))
    state = optim.adamw_init(params)
    rng = np.random.default_rng(1)
    for _ in range(2):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        fgrads = zeros_like(fp)
        for k in grads:
            fgrads[k] += grads[k]
        assert optim.clip_scale(fgrads, 1.0)[0] == pytest.approx(optim.clip_scale(grads, 1.0)[0], rel=1e-12)
        optim.adamw_step(params, grads, state, 1e-2, config)
        optim.adamw_step(fp, fgrads, fstate, 1e-2, config)
    for k in params:
        assert np.array_equal(fp[k], params[k]) and np.array_equal(fstate.v[k], state.v[k])
