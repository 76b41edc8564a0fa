"""Under the numba backend, backend.dispatch finds every kernel in kernels/numba_cpu, and a composed op runs on them."""

import importlib

import numpy as np
import pytest

pytest.importorskip("numba")

from minielectra import backend  # noqa: E402
from minielectra.ops.attention import mha_backward, mha_forward  # noqa: E402
from numba_kernel_checks import assert_close  # noqa: E402

pytestmark = pytest.mark.numba


@pytest.fixture
def numba_backend():
    previous = backend._active
    backend.set_backend("numba")
    try:
        yield
    finally:
        backend._active = previous
        backend._kernel_cache.clear()


# The ops kernels/numba_cpu covers, by kernel module: every op backend._OP_MODULES lists.
KERNEL_OPS = {
    "matmul_forward": "linear", "matmul_backward": "linear", "linear_forward": "linear", "linear_backward": "linear",
    "project": "linear",
    "attention_forward": "attention", "attention_backward": "attention",
    "layernorm_forward": "layernorm", "layernorm_backward": "layernorm",
    "dropout_add_layernorm_forward": "layernorm", "dropout_add_layernorm_backward": "layernorm",
    "layernorm_dropout_forward": "layernorm", "layernorm_dropout_backward": "layernorm",
    "bias_gelu_forward": "activations", "bias_gelu_backward": "activations",
    "gumbel_sample": "softmax",
    "softmax_cross_entropy": "losses", "sigmoid_cross_entropy": "losses",
    "embedding_backward": "embedding",
    "clip_scale": "optim", "adamw_step": "optim",
}


def test_every_dispatched_op_has_a_numba_kernel():
    assert sorted(KERNEL_OPS) == sorted(backend._OP_MODULES)


@pytest.mark.parametrize("op", sorted(KERNEL_OPS))
def test_dispatch_returns_the_kernel(numba_backend, op):
    module = importlib.import_module(f"minielectra.kernels.numba_cpu.{KERNEL_OPS[op]}")
    assert backend.dispatch(op, np.zeros(1)) is getattr(module, op)
    assert module.__doc__ and backend._OP_MODULES[op] in module.__doc__  # the docstring names its reference


def test_multi_head_attention_through_the_kernels_matches_numpy(numba_backend):
    rng = np.random.default_rng(0)
    B, T, C, H = 2, 7, 12, 3
    x = rng.standard_normal((B, T, C))
    W = [rng.standard_normal((C, C)) * 0.3 for _ in range(4)]
    b = [rng.standard_normal(C) * 0.1 for _ in range(4)]
    args = [a for pair in zip(W, b) for a in pair]
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3])
    dout = rng.standard_normal((B, T, C))
    out, cache = mha_forward(x, *args, mask=mask, n_heads=H, p_drop=0.2, rng=np.random.default_rng(1))
    grads = mha_backward(dout, cache)
    assert type(cache.attn).__module__ == "minielectra.kernels.numba_cpu.attention"
    backend._active = "numpy"
    backend._kernel_cache.clear()
    out_ref, cache_ref = mha_forward(x, *args, mask=mask, n_heads=H, p_drop=0.2, rng=np.random.default_rng(1))
    # A chain of ops on O(1) inputs: the terms are O(1), so floor 1; dbk is 0 in exact arithmetic (a key bias shifts
    # every score of a query equally), pure rounding noise, which is why the floor is not max|ref|.
    assert_close(out, out_ref, k=64, floor=1.0)
    for g_ref, g in zip(mha_backward(dout, cache_ref), grads):
        assert_close(g, g_ref, k=64, floor=1.0)
