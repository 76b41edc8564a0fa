"""Every CUDA kernel of kernels/cupy_gpu against the NumPy reference (tolerance: numba_kernel_checks), float32 (and
float64 where the kernel has it), on two runtimes:

- "emulator": the same .cu sources and launchers on the CPU (kernels/cupy_gpu/emulator.py; needs g++). It checks the
  kernels' indexing, tiling, masking, synchronisation and arithmetic on every machine, with few small examples since
  each CUDA thread is an OS thread.
- "emulator-fma": the same, built with multiply-adds fused as NVRTC fuses them on the GPU (where the CPU has fma): a
  kernel whose result hangs on a product rounded on its own fails here too, not on a GPU only (layer norm's dx at
  C = 1 did, before it said so).
- "cupy": a real GPU (@pytest.mark.gpu), skipped with a reason when minielectra.backend.gpu_usable() is False.

Plus a whole pre-training step on CuPy arrays against the NumPy step (GPU only).
"""

import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from minielectra.kernels.cupy_gpu import _common
from minielectra.kernels.cupy_gpu import activations as kg
from minielectra.kernels.cupy_gpu import attention as ka
from minielectra.kernels.cupy_gpu import embedding as ke
from minielectra.kernels.cupy_gpu import layernorm as kl
from minielectra.kernels.cupy_gpu import losses as kls
from minielectra.kernels.cupy_gpu import optim as ko
from minielectra.kernels.cupy_gpu import softmax as ksm
from minielectra.kernels.cupy_gpu.emulator import EmulatorRuntime, fma_usable
from minielectra import backend
from minielectra import optim as ref_optim
from minielectra.config import TrainConfig
from minielectra.ops import activations as rg
from minielectra.ops import attention as ra
from minielectra.ops import embedding as re_
from minielectra.ops import layernorm as rl
from minielectra.ops import losses as rls
from numba_kernel_checks import (SEEDS, assert_close, assert_same_samples, gelu_backward_floor, gelu_floor,
                                 layernorm_dx_floor, layernorm_floors, padded_batch)

GPU = backend.gpu_usable()
RUNTIMES = [
    pytest.param("emulator", marks=pytest.mark.skipif(shutil.which("g++") is None,
                                                      reason="the CPU emulator needs g++ (C++20)")),
    pytest.param("emulator-fma", marks=pytest.mark.skipif(shutil.which("g++") is None or not fma_usable(),
                                                          reason="needs g++ (C++20) and a CPU with fma")),
    pytest.param("cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="no usable CUDA GPU: CuPy is "
                                                                    "missing or sees no device")]),
]

# Few examples per runtime: each emulated CUDA thread is an OS thread. The parametrized awkward-size tests below cover
# the tile and block boundaries deterministically.
examples = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Runtime:
    def __init__(self, name):
        self.name = name
        if name.startswith("emulator"):
            self.rt = EmulatorRuntime(fused=name == "emulator-fma")
        else:
            self.rt = _common.CupyRuntime()

    def __enter__(self):
        self._ctx = _common.using(self.rt)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    def dev(self, a):
        return a if a is None or self.name.startswith("emulator") else self.rt.xp.asarray(a)

    @staticmethod
    def host(a):
        return a.get() if hasattr(a, "get") else np.asarray(a)

    def dev_cache(self, cache):
        """A reference layer norm cache with its arrays on the runtime's device: the kernels take either forward's
        cache, so the backward is checked on the very xhat the reference's backward uses (each forward rounds xhat its
        own way, a GPU's with fused multiply-adds, and dx would carry the difference on), as the Numba kernel's test
        does. The kernels' own caches feed their backward in the whole-step tests."""
        return cache._replace(**{f: self.dev(getattr(cache, f)) for f in ("xhat", "rstd", "gamma")})

    def loss(self, loss):
        """A loss as a float, after checking the reference's contract (minielectra.ops.losses): a Python float from
        host arrays, a 0-d float64 array from device arrays (float() there would wait for the GPU)."""
        if self.name.startswith("emulator"):
            assert isinstance(loss, float)
            return loss
        assert isinstance(loss, self.rt.xp.ndarray) and loss.shape == () and loss.dtype == np.float64
        return float(loss.get())


# ---- attention -------------------------------------------------------------------------------------------------

def _attention_inputs(rng, dims, big):
    B, H, T, D = dims
    if big:  # scores exact in every summation order (see tests/kernels/test_attention.py)
        q = np.round(rng.uniform(-1000, 1000, dims))
        k = rng.integers(-1, 2, dims).astype(float)
        v, dout = rng.standard_normal(dims) * 1000, rng.standard_normal(dims) * 1000
    else:
        q, k, v, dout = (rng.standard_normal(dims) for _ in range(4))
    return [a.astype(np.float32) for a in (q, k, v, dout)]


def _mask(rng, B, T, kind):
    if kind == "none":
        return None
    lengths = rng.integers(0, T + 1, B)
    if kind == "empty":
        lengths[0] = 0
    return (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)


def _floors(q, k, v, dout, c_ref):
    Q, K, V, G = (np.abs(a.astype(np.float64)) for a in (q, k, v, dout))
    P = c_ref.probs.astype(np.float64)
    ks = 1.0 if c_ref.dropout.scale is None else c_ref.dropout.scale.astype(np.float64)
    S = (Q @ K.swapaxes(-1, -2)) * c_ref.scale
    # exp of a score far below the row max lands in float32's subnormal range, where ulps of |ref| mean nothing, and
    # the GPU's expf flushes such results to 0 (CUDA's libdevice takes it from ex2.approx.ftz): each weight carries an
    # absolute slack of tiny, a floor of tiny / eps, and the products below carry it on. Seen on an H200 (seed 0,
    # (1, 1, 9, 1), big): three weights of 4.1e-39 made the reference's dk[0] 1.07e-31 and the kernel's exactly 0.
    fi = np.finfo(np.float32)
    m_probs = P * (S + (P * S).sum(-1, keepdims=True)) + P + fi.tiny / fi.eps
    dropped = m_probs * ks
    m_dp = (G @ V.swapaxes(-1, -2)) * ks
    m_ds = m_probs * (m_dp + (P * m_dp).sum(-1, keepdims=True)) * c_ref.scale
    floors = {"probs": m_probs, "out": dropped @ V, "dv": dropped.swapaxes(-1, -2) @ G, "dq": m_ds @ K,
              "dk": m_ds.swapaxes(-1, -2) @ Q}
    return {k: f + fi.tiny / fi.eps for k, f in floors.items()}  # outputs that are subnormal themselves


def _check_attention(r, seed, dims, big, mask_kind, p_drop, transposed=False):
    rng = np.random.default_rng(seed)
    q, k, v, dout = _attention_inputs(rng, dims, big)
    mask = _mask(rng, dims[0], dims[2], mask_kind)
    dq_, dk_, dv_ = (r.dev(a) for a in (q, k, v))
    if transposed:  # the (B, T, H, D) -> (B, H, T, D) views mha_forward passes
        dq_, dk_, dv_ = (a.swapaxes(1, 2).copy().swapaxes(1, 2) for a in (dq_, dk_, dv_))
    out, c = ka.attention_forward(dq_, dk_, dv_, r.dev(mask), p_drop, np.random.default_rng(seed))
    # the same seed: the reference hashes the very dropout mask the kernels compute (attention.cu's attn_keep)
    out_ref, c_ref = ra.attention_forward(q, k, v, mask, p_drop, np.random.default_rng(seed))
    f = _floors(q, k, v, dout, c_ref)
    # The backward recomputes p = exp(s - lse) with lse rounded to float32: at scores of ~1e4 (big) that is a relative
    # error of ~|lse| eps in p the reference (exp(s - max) / sum) does not have, propagated through delta and ds
    # into sums that can cancel; k = 64 ulps covers it (k = 8 does for unit-scale inputs).
    kb = 64 if big else 8
    assert_close(r.host(c.probs), c_ref.probs, name="probs", floor=f["probs"])
    assert_close(r.host(out), out_ref, name="out", floor=f["out"])
    grads = ka.attention_backward(r.dev(dout), c)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ra.attention_backward(dout, c_ref)):
        assert_close(r.host(got), want, name=name, floor=f[name], k=kb)
    return c


@pytest.mark.parametrize("runtime", RUNTIMES)
@examples
@given(seed=SEEDS, B=st.integers(1, 2), H=st.integers(1, 2), T=st.integers(1, 70),
       D=st.integers(1, 17), big=st.booleans(), mask_kind=st.sampled_from(["none", "lengths", "empty"]))
@example(seed=0, B=1, H=1, T=9, D=1, big=True, mask_kind="none")  # subnormal weights (_floors)
def test_attention_matches_reference(runtime, seed, B, H, T, D, big, mask_kind):
    with Runtime(runtime) as r:
        _check_attention(r, seed, (B, H, T, D), big, mask_kind, 0.0, transposed=bool(seed % 2))


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("dims", [(1, 1, 1, 1), (2, 3, 1, 8), (1, 2, 33, 32), (1, 1, 65, 33), (1, 1, 40, 64),
                                  (1, 1, 20, 100), (1, 1, 9, 128)])
def test_attention_awkward_sizes(runtime, dims):
    """T = 1, T across the 32-row tile and the 64-row block, every head-size instantiation (D = 32, 64, 128)."""
    with Runtime(runtime) as r:
        _check_attention(r, 7, dims, False, "lengths", 0.0)
        _check_attention(r, 8, dims, True, "empty", 0.0)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("p_drop", [0.1, 0.5, 0.9])
def test_attention_dropout_matches_the_reference_with_the_same_seed(runtime, p_drop):
    """The reference run from the same seed (so with the same hashed keep mask) gives the kernel's output and
    gradients; the mask drops about p of the weights, and the same seed gives the same mask."""
    with Runtime(runtime) as r:
        c = _check_attention(r, 11, (2, 2, 37, 8), False, "lengths", p_drop)
        keep = r.host(c.keep)
        assert abs(keep.mean() - (1 - p_drop)) < 0.05
        c2 = _check_attention(r, 11, (2, 2, 37, 8), False, "lengths", p_drop)
        np.testing.assert_array_equal(r.host(c2.keep), keep)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_fully_masked_sequence_gives_zero_weights_and_gradients(runtime):
    with Runtime(runtime) as r:
        rng = np.random.default_rng(3)
        q, k, v, dout = _attention_inputs(rng, (2, 2, 5, 4), False)
        mask = np.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
        out, c = ka.attention_forward(r.dev(q), r.dev(k), r.dev(v), r.dev(mask))
        probs, out = r.host(c.probs), r.host(out)
        assert np.all(probs[1] == 0) and np.all(out[1] == 0) and np.all(probs[0, :, :, 3:] == 0)
        assert np.isinf(r.host(c.lse)[1]).all()
        dq, dk, dv = (r.host(g) for g in ka.attention_backward(r.dev(dout), c))
        assert np.all(dq[1] == 0) and np.all(dk[1] == 0) and np.all(dv[1] == 0)
        assert np.all(dk[0, :, 3:] == 0) and np.all(dv[0, :, 3:] == 0)


# ---- layer norm, bias + GELU, losses, embedding, AdamW ---------------------------------------------------------

DTYPES = st.sampled_from([np.float32, np.float64])
ROWS = st.tuples(st.integers(0, 3), st.integers(1, 9))
WIDTH = st.integers(1, 300)


@pytest.mark.parametrize("runtime", RUNTIMES)
@examples
@given(seed=SEEDS, dtype=DTYPES, rows=ROWS, C=WIDTH, mag=st.sampled_from([1.0, 1000.0]))
def test_layernorm_matches_reference(runtime, seed, dtype, rows, C, mag):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(rows + (C,)) * mag).astype(dtype)
    g, b = (rng.standard_normal(C).astype(dtype) for _ in range(2))
    dout = rng.standard_normal(x.shape).astype(dtype)
    y_ref, c_ref = rl.layernorm_forward(x, g, b)
    with Runtime(runtime) as r:
        y, c = kl.layernorm_forward(r.dev(x), r.dev(g), r.dev(b))
        got = kl.layernorm_backward(r.dev(dout), r.dev_cache(c_ref))
    floor_y, floor_xhat = layernorm_floors(np.abs(x), y_ref, c_ref)
    assert_close(r.host(y), y_ref, name="y", floor=floor_y)
    assert_close(r.host(c.xhat), c_ref.xhat, name="xhat", floor=floor_xhat)
    assert_close(r.host(c.rstd), c_ref.rstd, name="rstd")
    want = rl.layernorm_backward(dout, c_ref)
    floors = {"dx": layernorm_dx_floor(dout, c_ref, want[0])}
    for name, a, w in zip(("dx", "dgamma", "dbeta"), got, want):
        assert_close(r.host(a), w, name=name, k=16, floor=floors.get(name))


@pytest.mark.parametrize("runtime", RUNTIMES)
@examples
@given(seed=SEEDS, dtype=DTYPES, rows=ROWS, C=WIDTH, p=st.sampled_from([0.0, 0.1, 0.5]), train=st.booleans())
def test_dropout_add_layernorm_matches_reference(runtime, seed, dtype, rows, C, p, train):
    rng = np.random.default_rng(seed)
    x, residual, dout = ((rng.standard_normal(rows + (C,)) * 30).astype(dtype) for _ in range(3))
    g, b = (rng.standard_normal(C).astype(dtype) for _ in range(2))
    y_ref, c_ref = rl.dropout_add_layernorm_forward(x, residual, g, b, p, np.random.default_rng(seed), train)
    with Runtime(runtime) as r:
        y, c = kl.dropout_add_layernorm_forward(r.dev(x), r.dev(residual), r.dev(g), r.dev(b), p,
                                                np.random.default_rng(seed), train)
        got = kl.dropout_add_layernorm_backward(r.dev(dout), c_ref._replace(ln=r.dev_cache(c_ref.ln)))
    assert (c.seed, c.threshold) == (c_ref.seed, c_ref.threshold)
    floor_y, floor_xhat = layernorm_floors(np.abs(residual) + np.abs(x) * c_ref.drop_scale, y_ref, c_ref.ln)
    assert_close(r.host(y), y_ref, name="y", floor=floor_y)
    assert_close(r.host(c.ln.xhat), c_ref.ln.xhat, name="xhat", floor=floor_xhat)
    want = rl.dropout_add_layernorm_backward(dout, c_ref)
    dln = layernorm_dx_floor(dout, c_ref.ln, want[1])  # dresidual is the layer norm's dx; dx, that times the scale
    floors = {"dx": np.maximum(dln * c_ref.drop_scale, np.abs(want[0]).max(initial=0)), "dresidual": dln}
    for name, a, w in zip(("dx", "dresidual", "dgamma", "dbeta"), got, want):
        assert_close(r.host(a), w, name=name, k=16, floor=floors.get(name))


@pytest.mark.parametrize("runtime", RUNTIMES)
@examples
@given(seed=SEEDS, dtype=DTYPES, rows=ROWS, C=WIDTH, p=st.sampled_from([0.0, 0.1, 0.5]), train=st.booleans())
def test_layernorm_dropout_matches_reference(runtime, seed, dtype, rows, C, p, train):
    rng = np.random.default_rng(seed)
    x, dout = ((rng.standard_normal(rows + (C,)) * 30).astype(dtype) for _ in range(2))
    g, b = (rng.standard_normal(C).astype(dtype) for _ in range(2))
    y_ref, c_ref = rl.layernorm_dropout_forward(x, g, b, p, np.random.default_rng(seed), train)
    with Runtime(runtime) as r:
        y, c = kl.layernorm_dropout_forward(r.dev(x), r.dev(g), r.dev(b), p, np.random.default_rng(seed), train)
        got = kl.layernorm_dropout_backward(r.dev(dout), c_ref._replace(ln=r.dev_cache(c_ref.ln)))
    assert (c.seed, c.threshold) == (c_ref.seed, c_ref.threshold)
    scale = c_ref.drop_scale if c_ref.threshold else 1.0
    floor_y, floor_xhat = layernorm_floors(np.abs(x), y_ref, c_ref.ln)
    assert_close(r.host(y), y_ref, name="y", floor=floor_y * scale)
    assert_close(r.host(c.ln.xhat), c_ref.ln.xhat, name="xhat", floor=floor_xhat)
    want = rl.layernorm_dropout_backward(dout, c_ref)
    floors = {"dx": layernorm_dx_floor(dout * scale, c_ref.ln, want[0])}  # the layer norm's dx of dout * keep * scale
    for name, a, w in zip(("dx", "dgamma", "dbeta"), got, want):
        assert_close(r.host(a), w, name=name, k=16, floor=floors.get(name))


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layernorm_over_one_feature_has_exactly_zero_dx(runtime, dtype):
    """At C = 1, xhat is 0 and the output is beta whatever x, so dx is exactly 0, and the reference computes exactly 0
    (g - mean(g) is g - g). layernorm.cu rounds g = dout * gamma on its own for this: fused into the subtraction as
    fma(dout, gamma, -mean(g)), it left rstd * (the product's rounding error), and a GPU gave dx = -2.9e-4."""
    rng = np.random.default_rng(5)
    x, dout, residual = (rng.standard_normal((3, 4, 1)).astype(dtype) for _ in range(3))
    g, b = (rng.standard_normal(1).astype(dtype) for _ in range(2))
    with Runtime(runtime) as r:
        _, c = kl.layernorm_forward(r.dev(x), r.dev(g), r.dev(b))
        dx = r.host(kl.layernorm_backward(r.dev(dout), c)[0])
        _, c = kl.dropout_add_layernorm_forward(r.dev(x), r.dev(residual), r.dev(g), r.dev(b), 0.0, None, False)
        dx_sum, dresidual = (r.host(a) for a in kl.dropout_add_layernorm_backward(r.dev(dout), c)[:2])
    assert np.all(rl.layernorm_backward(dout, rl.layernorm_forward(x, g, b)[1])[0] == 0)  # the reference's exact 0
    for name, a in (("layernorm dx", dx), ("dropout_add_layernorm dx", dx_sum), ("dresidual", dresidual)):
        assert np.all(a == 0), f"{name}: {a.ravel()}"


@pytest.mark.parametrize("runtime", RUNTIMES)
@examples
@given(seed=SEEDS, dtype=DTYPES, N=st.integers(0, 4), V=st.integers(1, 700), mag=st.sampled_from([1.0, 1000.0]),
       temperature=st.sampled_from([0.05, 1.0]))
@example(seed=0, dtype=np.float32, N=2, V=3, mag=1.0, temperature=1.0)  # fewer columns than threads
def test_gumbel_sample_matches_reference(runtime, seed, dtype, N, V, mag, temperature):
    logits = (np.random.default_rng(seed).standard_normal((N, V)) * mag).astype(dtype)
    with Runtime(runtime) as r:
        got = r.host(ksm.gumbel_sample(r.dev(logits), temperature, np.random.default_rng(seed)))
    assert_same_samples(got, logits, temperature, seed)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_gumbel_sample_ties_go_to_the_first_index(runtime):
    logits = np.full((3, 600), -1e30, np.float32)
    logits[0, [7, 300]] = np.inf  # two threads' columns, both +inf: the lower column wins the tree
    logits[1, [263, 519]] = np.inf  # one thread's two columns (7 + 256, 7 + 512): its first
    logits[2, :] = -np.inf  # nothing reachable: index 0, as argmax
    with Runtime(runtime) as r:
        got = r.host(ksm.gumbel_sample(r.dev(logits), 1.0, np.random.default_rng(0)))
    assert got.tolist() == [7, 263, 0]


@pytest.mark.parametrize("runtime", RUNTIMES)
@examples
@given(seed=SEEDS, dtype=DTYPES, rows=ROWS, F=WIDTH, mag=st.sampled_from([1.0, 1000.0]), approximate=st.booleans())
@example(seed=8798453, dtype=np.float32, rows=(1, 1), F=2, mag=1.0, approximate=True)  # 1 + tanh cancels at h = -2.3
def test_bias_gelu_matches_reference(runtime, seed, dtype, rows, F, mag, approximate):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(rows + (F,)) * mag).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    dout = rng.standard_normal(x.shape).astype(dtype)
    with Runtime(runtime) as r:
        y, c = kg.bias_gelu_forward(r.dev(x), r.dev(b), approximate)
        dx, db = kg.bias_gelu_backward(r.dev(dout), c)
    y_ref, c_ref = rg.bias_gelu_forward(x, b, approximate)
    dx_ref, db_ref = rg.bias_gelu_backward(dout, c_ref)
    assert_close(r.host(y), y_ref, name="out", floor=gelu_floor(x, b, y_ref))
    a = np.abs(dx_ref.astype(np.float64))
    floor = np.maximum(gelu_backward_floor(dout, c_ref, approximate), a.max() if a.size else 0.0)
    assert_close(r.host(dx), dx_ref, name="dx", floor=floor)
    # db sums dx over rows, each within the dx tolerance k eps (|dx| + floor): that sum is db's floor
    assert_close(r.host(db), db_ref, name="db", floor=(a + floor).reshape(-1, F).sum(0))


@pytest.mark.parametrize("runtime", RUNTIMES)
@examples
@given(seed=SEEDS, dtype=DTYPES, N=st.integers(0, 9), V=st.integers(1, 700), mag=st.sampled_from([1.0, 1000.0]),
       weighting=st.sampled_from(["none", "random", "zeros"]))
def test_softmax_cross_entropy_matches_reference(runtime, seed, dtype, N, V, mag, weighting):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((N, V)) * mag).astype(dtype)
    targets = rng.integers(0, V, N)
    w = {"none": None, "random": rng.random(N).astype(dtype), "zeros": np.zeros(N, dtype)}[weighting]
    with Runtime(runtime) as r:
        loss, d = kls.softmax_cross_entropy(r.dev(logits), r.dev(targets), r.dev(w))
    loss_ref, d_ref = rls.softmax_cross_entropy(logits, targets, w)
    assert r.loss(loss) == pytest.approx(loss_ref, rel=float(16 * np.finfo(dtype).eps * max(1, V)), abs=1e-30)
    assert_close(r.host(d), d_ref, name="dlogits")


@pytest.mark.parametrize("runtime", RUNTIMES)
@examples
@given(seed=SEEDS, dtype=DTYPES, shape=st.tuples(st.integers(0, 4), st.integers(1, 70)),
       mag=st.sampled_from([1.0, 1000.0]), weighted=st.booleans())
def test_sigmoid_cross_entropy_matches_reference(runtime, seed, dtype, shape, mag, weighted):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal(shape) * mag).astype(dtype)
    y = rng.integers(0, 2, shape)
    w = rng.random(shape).astype(dtype) if weighted else None
    with Runtime(runtime) as r:
        loss, d = kls.sigmoid_cross_entropy(r.dev(z), r.dev(y), r.dev(w))
    loss_ref, d_ref = rls.sigmoid_cross_entropy(z, y, w)
    assert r.loss(loss) == pytest.approx(loss_ref, rel=float(16 * np.finfo(dtype).eps * max(1, z.size)), abs=1e-30)
    assert_close(r.host(d), d_ref, name="dlogits")


@pytest.mark.parametrize("runtime", RUNTIMES)
@examples
@given(seed=SEEDS, dtype=DTYPES, ids_shape=st.tuples(st.integers(0, 4), st.integers(1, 40)), V=st.integers(1, 30),
       E=st.integers(1, 40))
def test_embedding_backward_matches_reference(runtime, seed, dtype, ids_shape, V, E):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, ids_shape)
    dout = (rng.standard_normal(ids_shape + (E,)) * 1000).astype(dtype)
    with Runtime(runtime) as r:
        got = ke.embedding_backward(r.dev(dout), re_.EmbeddingCache(r.dev(ids), (V, E)))
    want = re_.embedding_backward(dout, re_.EmbeddingCache(ids, (V, E)))
    floor = np.zeros((V, E))
    np.add.at(floor, ids.reshape(-1), np.abs(dout.reshape(-1, E).astype(np.float64)))  # atomics: any order
    assert_close(r.host(got), want, name="dtable", floor=floor)


@pytest.mark.parametrize("runtime", RUNTIMES)
@examples
@given(seed=SEEDS, dtype=DTYPES, n=st.integers(0, 20000), scale=st.sampled_from([1.0, 0.37]),
       mag=st.sampled_from([1.0, 1000.0]))
def test_adamw_matches_reference(runtime, seed, dtype, n, scale, mag):
    rng = np.random.default_rng(seed)
    shapes = {"layer.dense.weight": (n, 3), "layer.dense.bias": (3,), "layer.LayerNorm.weight": (n,)}
    params = {k: (rng.standard_normal(s) * mag).astype(dtype) for k, s in shapes.items()}
    config = TrainConfig(weight_decay=0.1)
    with Runtime(runtime) as r:
        mine = {k: r.dev(v.copy()) for k, v in params.items()}
        s_ref, s_ker = ref_optim.adamw_init(params), ref_optim.adamw_init(mine)
        for _ in range(3):
            grads = {k: (rng.standard_normal(s) * mag).astype(dtype) for k, s in shapes.items()}
            ref_optim.adamw_step(params, grads, s_ref, 1e-2, config, grad_scale=scale)
            ko.adamw_step(mine, {k: r.dev(g) for k, g in grads.items()}, s_ker, 1e-2, config, grad_scale=scale)
    assert s_ker.step == s_ref.step == 3
    for k in shapes:
        assert_close(r.host(s_ker.m[k]), s_ref.m[k], name=f"m[{k}]")
        assert_close(r.host(s_ker.v[k]), s_ref.v[k], name=f"v[{k}]")
        assert_close(r.host(mine[k]), params[k], name=k)


@pytest.mark.parametrize("runtime", RUNTIMES)
@examples
@given(seed=SEEDS, sizes=st.lists(st.integers(0, 20000), min_size=1, max_size=4), mag=st.sampled_from([1.0, 1000.0]),
       mixed=st.booleans())
def test_clip_scale_matches_reference(runtime, seed, sizes, mag, mixed):
    """Tensors of several blocks, empty ones, and float32 beside float64 (one launch per dtype)."""
    rng = np.random.default_rng(seed)
    dtypes = [np.float64 if mixed and i % 2 else np.float32 for i in range(len(sizes))]
    grads = {f"p{i}": (rng.standard_normal(n) * mag).astype(dt) for i, (n, dt) in enumerate(zip(sizes, dtypes))}
    norm_ref, scale_ref = ref_optim.clip_scale(grads, 1.0)
    with Runtime(runtime) as r:
        norm, scale = (float(r.host(a)) for a in ko.clip_scale({k: r.dev(g) for k, g in grads.items()}, 1.0))
    # The same float64 squares added in other orders: a sum of n non-negative terms is within n eps of the exact one.
    bound = (sum(sizes) + 1) * np.finfo(np.float64).eps
    assert abs(norm - norm_ref) <= bound * norm_ref
    assert abs(scale - scale_ref) <= 2 * bound * scale_ref


# ---- a whole training step on the GPU ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="no usable CUDA GPU: CuPy is missing or sees no device")
def test_cupy_step_matches_numpy_step():
    """Params, batch, grads and optimizer state on the GPU, under the cupy backend, against the NumPy step."""
    import cupy

    from minielectra import electra
    from minielectra.config import ElectraConfig

    config = ElectraConfig(vocab_size=500, embedding_size=32, hidden_size=48, num_hidden_layers=2,
                           num_attention_heads=3, intermediate_size=96, generator_hidden_size=16,
                           generator_num_attention_heads=1, generator_intermediate_size=64,
                           max_position_embeddings=80)
    params = electra.init_model(config, np.random.default_rng(0))
    ids, mask = padded_batch(config, 4, 67, real_in_last=20)
    train = False  # no dropout: a GPU run draws its hidden-dropout masks with CuPy's generator, not NumPy's
    ref = electra.forward(params, (ids, mask), config, np.random.default_rng(3), train=train)
    ref_losses, ref_metrics, ref_grads = ref.losses, ref.metrics, electra.backward(ref, params, config)
    backend.set_backend("cupy")
    try:
        gparams = {k: cupy.asarray(p) for k, p in params.items()}
        # The GPU draws its own Gumbel noise (cupy.random): replay the NumPy run's samples so both discriminators see
        # the same input. The batch stays on the host, where forward masks it, as in training.
        losses, metrics, grads = electra.loss_and_grads(gparams, (ids, mask), config, np.random.default_rng(3),
                                                        train=train, samples=ref.samples)
        assert all(isinstance(v, cupy.ndarray) for v in {**losses, **metrics}.values())
        losses, metrics = backend.host_values(losses), backend.host_values(metrics)
        # AdamW: the kernel against the reference on the same gradients, the GPU's. Against the parameters the NumPy
        # step's gradients give there is no bound: the attention keys' biases have gradient 0 in exact arithmetic
        # (softmax ignores a score added to a whole row), so ~1e-12 of rounding either way, and Adam divides each
        # gradient by its own size.
        host_grads = {k: g.get() for k, g in grads.items()}
        stepped = {k: p.copy() for k, p in params.items()}
        state, gstate = ref_optim.adamw_init(stepped), ref_optim.adamw_init(gparams)
        tc = TrainConfig()
        ref_optim.adamw_step(stepped, host_grads, state, 1e-3, tc)
        assert backend.dispatch("adamw_step", next(iter(gparams.values()))) is ko.adamw_step
        ko.adamw_step(gparams, grads, gstate, 1e-3, tc)
    finally:
        backend.set_backend("numpy")
    for k in ref_losses:
        assert losses[k] == pytest.approx(ref_losses[k], rel=1e-5), k
    assert metrics == pytest.approx(ref_metrics)
    floor = 1e-6 * np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in ref_grads.values()))
    for k in ref_grads:
        g = grads[k]
        assert isinstance(g, cupy.ndarray) and g.dtype == np.float32, k
        err = np.linalg.norm((g.get() - ref_grads[k]).astype(np.float64))
        assert err <= 1e-5 * (np.linalg.norm(ref_grads[k].astype(np.float64)) + floor), k
        assert_close(gparams[k].get(), stepped[k], name=k)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", [p for p in RUNTIMES if p.values[0].startswith("emulator")])
def test_emulated_kernels_in_a_whole_step_match_the_numpy_step(monkeypatch, runtime):
    """Every dispatched op of a whole ELECTRA step routed to the minielectra.kernels.cupy_gpu launchers on the CPU
    emulator: checks that the launchers fit the model (views, shapes, caches, dtypes) the way the GPU run will use them, and
    the AdamW kernel on the step's gradients, as test_cupy_step_matches_numpy_step does on a GPU."""
    import importlib

    from minielectra import electra
    from minielectra.config import ElectraConfig

    config = ElectraConfig(vocab_size=200, embedding_size=16, hidden_size=24, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=40, generator_hidden_size=8,
                           generator_num_attention_heads=1, generator_intermediate_size=16,
                           max_position_embeddings=40)
    params = electra.init_model(config, np.random.default_rng(0))
    ids, mask = padded_batch(config, 2, 19, real_in_last=12)
    ref_losses, ref_metrics, ref_grads = electra.loss_and_grads(params, (ids, mask), config,
                                                                np.random.default_rng(3), train=False)
    used = set()

    def dispatch(op, *arrays):  # as backend.dispatch on a GPU: the CUDA kernel where there is one, else the reference
        kernels = backend._kernel_module("minielectra.kernels.cupy_gpu", backend._OP_MODULES[op])
        if not hasattr(kernels, op):
            return getattr(importlib.import_module(backend._OP_MODULES[op]), op)
        used.add(op)
        return getattr(kernels, op)

    for module in ("minielectra.electra", "minielectra.nn.encoder", "minielectra.nn.heads", "minielectra.ops.attention"):
        m = importlib.import_module(module)
        if hasattr(m, "dispatch"):
            monkeypatch.setattr(m, "dispatch", dispatch)
    stepped, mine = ({k: p.copy() for k, p in params.items()} for _ in range(2))
    with Runtime(runtime):
        losses, metrics, grads = electra.loss_and_grads(params, (ids, mask), config, np.random.default_rng(3),
                                                        train=False)
        ko.adamw_step(mine, grads, ref_optim.adamw_init(mine), 1e-3, TrainConfig())
    assert {"attention_forward", "layernorm_forward", "dropout_add_layernorm_forward", "bias_gelu_forward",
            "gumbel_sample", "softmax_cross_entropy", "sigmoid_cross_entropy", "embedding_backward"} <= used
    for k in ref_losses:
        assert losses[k] == pytest.approx(ref_losses[k], rel=1e-5), k
    assert metrics == pytest.approx(ref_metrics)
    floor = 1e-6 * np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in ref_grads.values()))
    for k in ref_grads:
        assert grads[k].dtype == np.float32, k
        err = np.linalg.norm((grads[k] - ref_grads[k]).astype(np.float64))
        assert err <= 1e-5 * (np.linalg.norm(ref_grads[k].astype(np.float64)) + floor), k
    ref_optim.adamw_step(stepped, grads, ref_optim.adamw_init(stepped), 1e-3, TrainConfig())
    for k in params:
        assert_close(mine[k], stepped[k], name=k)
