"""kernels/cupy_gpu launchers without a GPU: the same names and signatures as the reference ops, argument checks
(dtype, shape, CuPy-only, contiguity), launch-configuration checks, and the dropout hash against the reference's."""

import importlib
import inspect
import re

import numpy as np
import pytest

from minielectra.kernels.cupy_gpu import _common
from minielectra.kernels.cupy_gpu import activations as kg
from minielectra.kernels.cupy_gpu import attention as ka
from minielectra.kernels.cupy_gpu import embedding as ke
from minielectra.kernels.cupy_gpu import layernorm as kl
from minielectra.kernels.cupy_gpu import losses as kls
from minielectra.kernels.cupy_gpu import optim as ko
from minielectra import backend
from minielectra.config import TrainConfig
from minielectra.ops import attention as ref_attention
from minielectra.ops import dropout
from minielectra.ops.embedding import EmbeddingCache
from minielectra.optim import adamw_init

f32 = np.float32


# The linear layer's ops have Numba kernels only: on a GPU the reference's own matmul is cuBLAS's, through CuPy.
CPU_ONLY = {"matmul_forward", "matmul_backward", "linear_forward", "linear_backward", "project"}


def test_every_other_dispatched_op_has_a_cuda_kernel():
    assert CPU_ONLY <= set(backend._OP_MODULES)
    assert backend._kernel_module("minielectra.kernels.cupy_gpu", "minielectra.ops.linear") is None


@pytest.mark.parametrize("op", sorted(set(backend._OP_MODULES) - CPU_ONLY))
def test_same_names_and_signatures_as_the_reference(op):
    reference = getattr(importlib.import_module(backend._OP_MODULES[op]), op)
    module = importlib.import_module("minielectra.kernels.cupy_gpu." + backend._OP_MODULES[op].rsplit(".", 1)[1])
    kernel = getattr(module, op)
    assert inspect.signature(kernel) == inspect.signature(reference)
    assert backend._OP_MODULES[op] in module.__doc__  # the docstring names the reference it replaces


def test_numpy_arrays_are_refused_with_the_reference_named():
    x = np.zeros((2, 3, 4), f32)
    with pytest.raises(TypeError, match="minielectra.ops.layernorm.layernorm_forward"):
        kl.layernorm_forward(x, np.ones(4, f32), np.zeros(4, f32))
    with pytest.raises(TypeError, match="cupy.asarray"):
        kg.bias_gelu_forward(x, np.zeros(4, f32))
    q = np.zeros((1, 2, 3, 4), f32)
    with pytest.raises(TypeError, match="CuPy arrays"):
        ka.attention_forward(q, q, q)
    with pytest.raises(TypeError, match="CuPy"):
        kls.softmax_cross_entropy(np.zeros((3, 5), f32), np.array([0, 1, 4]))
    with pytest.raises(TypeError, match="CuPy"):
        kls.sigmoid_cross_entropy(np.zeros(3, f32), np.array([0, 1, 1]))
    with pytest.raises(TypeError, match="CuPy"):
        ke.embedding_backward(np.zeros((2, 4), f32), EmbeddingCache(np.array([0, 1]), (3, 4)))
    params = {"w": np.zeros(3, f32)}
    with pytest.raises(TypeError, match="CuPy"):
        ko.adamw_step(params, {"w": np.zeros(3, f32)}, adamw_init(params), 1e-3, TrainConfig())


def test_attention_float64_and_large_heads_fall_back_to_the_reference():
    rng = np.random.default_rng(0)
    for dtype, D in ((np.float64, 4), (f32, 129)):
        q, k, v = (rng.standard_normal((1, 2, 3, D)).astype(dtype) for _ in range(3))
        out, cache = ka.attention_forward(q, k, v)  # NumPy arrays are fine here: the reference runs
        assert isinstance(cache, ref_attention.AttentionCache)
        np.testing.assert_array_equal(out, ref_attention.attention_forward(q, k, v)[0])
        for got, want in zip(ka.attention_backward(q, cache), ref_attention.attention_backward(q, cache)):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("call, error", [
    (lambda: ka.attention_forward(np.zeros((1, 1, 3, 2), np.int32), np.zeros((1, 1, 3, 2)), np.zeros((1, 1, 3, 2))),
     TypeError),
    (lambda: ka.attention_forward(np.zeros((1, 3, 2), f32), np.zeros((1, 3, 2), f32), np.zeros((1, 3, 2), f32)),
     ValueError),
    (lambda: ka.attention_forward(np.zeros((1, 1, 3, 2), f32), np.zeros((1, 1, 2, 2), f32),
                                  np.zeros((1, 1, 3, 2), f32)), ValueError),
    (lambda: ka.attention_forward(*[np.zeros((1, 1, 3, 2), f32)] * 3, mask=np.ones((1, 4))), ValueError),
    (lambda: ka.attention_forward(*[np.zeros((1, 1, 3, 2), f32)] * 3, p_drop=1.0, rng=np.random.default_rng(0)),
     ValueError),
    (lambda: ka.attention_forward(*[np.zeros((1, 1, 3, 2), f32)] * 3, p_drop=0.1, rng=None), TypeError),
    (lambda: kl.layernorm_forward(np.zeros((2, 3), np.int64), np.ones(3, f32), np.zeros(3, f32)), TypeError),
    (lambda: kl.layernorm_forward(np.zeros((2, 3), f32), np.ones(4, f32), np.zeros(3, f32)), ValueError),
    (lambda: kl.layernorm_forward(np.zeros((2, 3), f32), np.array([1, np.nan, 1], f32), np.zeros(3, f32)),
     ValueError),
    (lambda: kg.bias_gelu_forward(np.zeros((2, 3), f32), np.zeros(2, f32)), ValueError),
    (lambda: kg.bias_gelu_forward(np.zeros((2, 3), np.float16), np.zeros(3, np.float16)), TypeError),
    (lambda: kls.softmax_cross_entropy(np.zeros((3, 5), f32), np.array([0, 1, 5])), ValueError),
    (lambda: kls.softmax_cross_entropy(np.zeros((3, 5), f32), np.array([0.0, 1.0, 2.0])), TypeError),
    (lambda: kls.softmax_cross_entropy(np.zeros((3, 5), f32), np.array([0, 1])), ValueError),
    (lambda: kls.softmax_cross_entropy(np.zeros(5, f32), np.array([0])), ValueError),
    (lambda: kls.softmax_cross_entropy(np.zeros((3, 5), f32), np.array([0, 1, 2]), np.ones(2, f32)), ValueError),
    (lambda: kls.sigmoid_cross_entropy(np.zeros((2, 3), f32), np.zeros((3, 2))), ValueError),
    (lambda: kls.sigmoid_cross_entropy(np.zeros((2, 3), np.int32), np.zeros((2, 3))), TypeError),
    (lambda: ke.embedding_backward(np.zeros((2, 5), f32), EmbeddingCache(np.array([0, 1]), (3, 4))), ValueError),
    (lambda: ke.embedding_backward(np.zeros((2, 4), f32), EmbeddingCache(np.array([0.0, 1.0]), (3, 4))), TypeError),
])
def test_bad_arguments_fail_before_any_launch(call, error):
    with pytest.raises(error):
        call()


def test_backward_checks_dout_against_the_cache():
    from minielectra.ops.activations import bias_gelu_forward
    from minielectra.ops.layernorm import layernorm_forward

    x = np.zeros((2, 3), f32)
    _, c = layernorm_forward(x, np.ones(3, f32), np.zeros(3, f32))
    with pytest.raises(ValueError):
        kl.layernorm_backward(np.zeros((2, 4), f32), c)
    _, c = bias_gelu_forward(x, np.zeros(3, f32))
    with pytest.raises(ValueError):
        kg.bias_gelu_backward(np.zeros((3, 3), f32), c)
    with pytest.raises(TypeError):
        kg.bias_gelu_backward(np.zeros((2, 3), np.int32), c)


def test_adamw_checks_keys_dtypes_and_contiguity():
    params = {"w": np.zeros((3, 4), f32)}
    state = adamw_init(params)
    with pytest.raises(ValueError, match="w"):
        ko.adamw_step(params, {}, state, 1e-3, TrainConfig())
    with pytest.raises(ValueError, match="C-contiguous"):
        ko.adamw_step({"w": np.zeros((4, 3), f32).T}, {"w": np.zeros((3, 4), f32)}, state, 1e-3, TrainConfig())
    bad = adamw_init(params)
    bad.m["w"] = np.zeros((3, 4))
    with pytest.raises(TypeError, match="state.m"):
        ko.adamw_step(params, {"w": np.zeros((3, 4), f32)}, bad, 1e-3, TrainConfig())
    ints = {"w": np.zeros(3, np.int32)}
    with pytest.raises(TypeError, match="float32 or float64"):
        ko.adamw_step(ints, ints, adamw_init(ints), 1e-3, TrainConfig())
    assert ko.check_step({"a": np.zeros(2, f32), "b": np.zeros(3), "c": np.zeros(1, f32)},
                         {k: np.zeros(n) for k, n in (("a", 2), ("b", 3), ("c", 1))},
                         adamw_init({"a": np.zeros(2, f32), "b": np.zeros(3), "c": np.zeros(1, f32)})) == {
        np.dtype(f32): ["a", "c"], np.dtype(np.float64): ["b"]}


def test_launch_configuration_is_checked():
    assert _common.check_launch("k", (5,), (64,)) == ((5, 1, 1), (64, 1, 1))
    for grid, block, shared in (((0,), (32,), 0), ((1, 70000), (32,), 0), ((1,), (1025,), 0), ((1,), (32, 32, 2), 0),
                                ((1,), (32,), 64 * 1024), ((1, 1, 1, 1), (32,), 0)):
        with pytest.raises(ValueError, match="k"):
            _common.check_launch("k", grid, block, shared)
    with pytest.raises(TypeError, match="sized NumPy scalar"):
        _common.launch("optim", "adamw_step_f32", (1,), (32,), (3,))  # before anything is compiled or launched
    assert _common.blocks_for(0, 256) == 1 and _common.blocks_for(257, 256) == 2
    assert _common.blocks_for(10**9, 256) == _common.MAX_GRID_STRIDE_BLOCKS
    assert _common.n_partials(3) == 3 and _common.n_partials(10**6) == _common.N_PARTIALS
    assert _common.suffix(np.float32) == "f32" and _common.suffix(np.dtype(np.float64)) == "f64"


def test_kernel_names_used_by_the_launchers_exist_in_the_sources():
    import re

    for op, names in (("attention", [f"attention_{k}_d{m}" for k in ("forward", "backward_dq", "backward_dkdv")
                                     for m in ka.MAX_DS]),
                      ("layernorm", [f"layernorm_{k}_{s}" for k in ("forward", "backward_dx", "backward_partials")
                                     for s in ("f32", "f64")]),
                      ("activations", [f"bias_gelu_{k}_{s}" for k in ("forward", "backward") for s in ("f32", "f64")]),
                      ("losses", [f"{k}_cross_entropy_{s}" for k in ("softmax", "sigmoid") for s in ("f32", "f64")]),
                      ("embedding", ["embedding_backward_f32", "embedding_backward_f64"]),
                      ("optim", ["adamw_step_f32", "adamw_step_f64"])):
        src = _common.source(op)
        declared = set(re.findall(r"void\s+(?:__launch_bounds__\(\w+\)\s+)?(\w+)\s*\(", src))
        declared |= {m.replace("##MAXD", str(d)).replace("##SUFFIX", s)
                     for m in re.findall(r"void\s+(?:__launch_bounds__\(\w+\)\s+)?(\w+##\w+)", src)
                     for d in ka.MAX_DS for s in ("f32", "f64")}
        assert set(names) <= declared, (op, set(names) - declared)
    assert f"#define BR {ka.BR} " in _common.source("attention") and f"#define BC {ka.BC} " in _common.source(
        "attention")


def test_dropout_hash_is_the_references():
    """attn_keep in attention.cu is minielectra.ops.dropout.hashed_keep_mask (whose statistics tests/ops/test_dropout.py
    checks): the same splitmix64 constants and the same top bits. The emulator tests then check the kernels' masks
    against the reference's through their outputs."""
    src = _common.source("attention")
    body = src[src.index("attn_keep("):]
    body = body[:body.index("}")]
    constants = [int(c, 16) for c in re.findall(r"0x([0-9A-Fa-f]+)ULL", body)]
    assert constants == [dropout.HASH_GOLDEN, dropout.HASH_MIX1, dropout.HASH_MIX2]
    assert [int(n) for n in re.findall(r">> (\d+)", body)] == [30, 27, 31, 64 - dropout.HASH_KEEP_BITS]
    assert ka.drop_threshold is dropout.drop_threshold and ka.hashed_keep_mask is dropout.hashed_keep_mask
