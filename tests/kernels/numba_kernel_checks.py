"""Shared pieces of the Numba kernel tests: the tolerance, array drawing, and the hypothesis settings.

Tolerance (one rule for every kernel): elementwise
    |got - ref| <= k * eps(dtype) * (|ref| + floor)
i.e. a relative error of k ulps, plus k ulps of an absolute floor. The floor is there because kernel and reference
sum in different orders (sequential loops vs NumPy's pairwise sums and BLAS), and a sum that cancels to near zero
carries the rounding error of its large terms, not of its small result. By default the floor is max|ref|, the array's
largest entry. Where a result is a chain of sums that can cancel completely (attention's backward at +-1000 inputs),
the test passes the floor explicitly as the magnitude of the terms: the same formula evaluated on absolute values
(e.g. |A| @ |B| for A @ B), the classic running error bound without its factor n. k = 8; the errors seen are below
3 ulps. eps is float32's 1.2e-7 or float64's 2.2e-16, so float64 runs are held to float64 precision.

This directory has no __init__.py on purpose: as a package it would be named `kernels` (tests/ itself is not a
package) and shadow Hugging Face's package of that name, which transformers imports. pytest's default import mode puts
this folder on sys.path, which is how the test modules import this helper.
"""

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from minielectra.ops import softmax as ref_softmax
from minielectra.ops.activations import _TANH_C
from minielectra.ops.dropout import draw_seed, hashed_uniform

K_ULPS = 8

DTYPES = st.sampled_from([np.float32, np.float64])
SEEDS = st.integers(0, 2**32 - 1)
MAGNITUDES = st.sampled_from([1.0, 1000.0])

# The first example of each dtype compiles (or loads from cache) the kernel, so no per-example deadline.
KERNEL_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_close(got, ref, k=K_ULPS, name="output", floor=None):
    """got matches ref in shape and dtype, and elementwise within k ulps of |ref| + floor (default max|ref|)."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != reference {ref.shape}"
    assert got.dtype == ref.dtype, f"{name}: dtype {got.dtype} != reference {ref.dtype}"
    assert np.all(np.isfinite(got) == np.isfinite(ref)), f"{name}: non-finite entries differ"
    if ref.size == 0:
        return
    eps = np.finfo(ref.dtype).eps
    r = ref.astype(np.float64)
    err = np.abs(got.astype(np.float64) - r)
    floor = np.abs(r).max() if floor is None else np.asarray(floor, np.float64)
    bound = k * eps * (np.abs(r) + floor)
    worst = np.argmax(err - bound)
    assert np.all(err <= bound), (
        f"{name}: |got - ref| = {err.flat[worst]:.3e} > {bound.flat[worst]:.3e} at flat index {worst} "
        f"(got {got.flat[worst]!r}, ref {ref.flat[worst]!r})")


def layernorm_floors(s_abs, y_ref, ln_ref):
    """Floors (assert_close) for y = xhat * gamma + beta and xhat = (s - mean(s)) * rstd, with s_abs = |s| (or
    a bound on it) for the rows s that were normalised: the magnitude of their terms, max |s| * rstd per row. Where a
    row's mean is large against its spread, s - mean cancels, and both implementations carry the rounding error of
    the mean (eps |mean|) into xhat; the default floor, max |xhat|, would hold them to the spread's precision instead.
    Seed 2439067075 drew such rows (mean -3387, spread 212): there the Numba kernel's y was 1.0e-15 from the exact
    value, the reference's 3.1e-15, and their difference over the default bound."""
    terms = s_abs.max(axis=-1, keepdims=True) * ln_ref.rstd  # (..., 1)
    return (np.maximum(terms * np.abs(ln_ref.gamma), np.abs(y_ref).max(initial=0)),
            np.maximum(terms, np.abs(ln_ref.xhat).max(initial=0)))


def layernorm_dx_floor(dout, ln_ref, dx_ref):
    """Floor (assert_close) for layer norm's dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dout gamma: the size of
    its terms, rstd (|g| + mean |g| + |xhat| mean |g xhat|) per entry (the means' rounding errors scale with their
    terms' sizes), and never below the default, max |dx|. The terms cancel where dx is 0 in exact arithmetic, e.g. at
    C = 2, where the output is +-gamma + beta whatever x: there the reference's dx is ~1e-13, and a kernel that rounds
    in another order (a GPU's fused multiply-adds) is an ulp of the terms away, ~1e-9."""
    g = np.abs(dout.astype(np.float64) * ln_ref.gamma)
    xhat = np.abs(ln_ref.xhat.astype(np.float64))
    terms = ln_ref.rstd * (g + g.mean(axis=-1, keepdims=True) + xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return np.maximum(terms, np.abs(dx_ref).max(initial=0))


def noncontiguous(a, how):
    """The same values as `a`, as a non-contiguous view: 'T' a transposed copy transposed back, 'S' a strided slice."""
    if how == "T":
        return np.ascontiguousarray(a.T).T
    if how == "S":
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    return a


LAYOUTS = st.sampled_from(["C", "T", "S"])


def padded_batch(config, B, T, real_in_last, seed=1):
    """(ids, mask) of random words framed by [CLS] ... [SEP]; the last sequence has `real_in_last` tokens then pads."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, config.vocab_size, (B, T))
    ids[:, 0], ids[:, -1] = config.cls_token_id, config.sep_token_id
    mask = np.ones_like(ids)
    ids[-1, real_in_last:], mask[-1, real_in_last:] = config.pad_token_id, 0
    ids[-1, real_in_last - 1] = config.sep_token_id
    return ids, mask


def gelu_floor(x, b, out_ref):
    """The forward floor of GELU, h * 0.5 (1 + s) with h = x + b and s = erf(h / sqrt 2) or tanh(...): the running
    error bound 0.5 |h| (1 + |s|) <= |h|. 1 + s cancels where s is near -1 (h below about -2), so a one-ulp difference
    in s between two libraries' erf or tanh becomes an error of order |h| eps in a much smaller result; elementwise |h|,
    at least max|out| (assert_close's default)."""
    h = np.abs(x.astype(np.float64) + b.astype(np.float64))
    return np.maximum(h, np.abs(out_ref.astype(np.float64)).max() if out_ref.size else 0.0)


def gelu_backward_floor(dout, c_ref, approximate):
    """The running error bound of GELU's dx (the rule above for results that cancel): the derivative evaluated on
    absolute values. The tanh form's 0.5 (1 + s) + 0.5 h (1 - s^2) dinner cancels where s = tanh(...) is near -1, and
    NumPy's tanh and the C library's (which Numba and the CUDA emulator call) may differ there by an ulp of s, which
    the factor 0.5 |h| dinner (~15 at h = -6.6) magnifies. In the exact form s + h phi(h) the cancelling sum is inside
    s = Phi(h) = 0.5 (1 + erf): the reference's float32 s carries an error of order eps 0.5 (1 + |erf|), its running
    bound, so below h = -5.4 it is 0 where Phi is not, while the Numba kernel keeps the tail to float32 precision (dx
    -4.44e-19 against the reference's -4.49e-19 at h = -9.5). c_ref is the reference forward's cache."""
    if not approximate:
        s = c_ref.gelu.s.astype(np.float64)
        return np.abs(dout) * 0.5 * (1.0 + np.abs(2.0 * s - 1.0))
    h, s, _ = c_ref.gelu
    h, s = h.astype(np.float64), s.astype(np.float64)
    dinner = _TANH_C * (1.0 + 3 * 0.044715 * h * h)
    return np.abs(dout) * (0.5 * (1.0 + np.abs(s)) + 0.5 * np.abs(h) * (1.0 + s * s) * dinner)


# ---- Gumbel sampling: the kernels' float32 logs differ from NumPy's in their last bits (NumPy's is within a few ulps),
# so the noisy scores can too: the samples must be equal, except in a row where the reference's scores at the two
# indices are within a few ulps of each other (a near-tie the rounding may break either way).


def reference_scores(logits, temperature, seed):
    """The reference's noisy scores logits / t + g for the seed rng = default_rng(seed) gives the sampler, and the size
    of their terms |logits / t| + |g| + 1."""
    u = hashed_uniform(np, draw_seed(np.random.default_rng(seed)), logits.shape)
    g = -np.log(-np.log(u + np.float32(1e-9)) + np.float32(1e-9))
    scaled = logits / logits.dtype.type(temperature)
    return scaled + g, np.abs(scaled) + np.abs(g) + 1


def assert_same_samples(got, logits, temperature, seed):
    """got equals the reference's samples but where the two picks' reference scores are within 16 float32 ulps of
    their terms' size: each log is within a few ulps of the truth in both, and the sum rounds once more."""
    want = ref_softmax.gumbel_sample(logits, temperature, np.random.default_rng(seed))
    assert got.shape == want.shape and got.dtype == want.dtype
    differ = np.flatnonzero(got != want)
    if differ.size:
        scores, size = reference_scores(logits, temperature, seed)
        for i in differ:
            gap = abs(scores[i, got[i]] - scores[i, want[i]])
            assert gap <= 16 * np.finfo(np.float32).eps * max(size[i, got[i]], size[i, want[i]]), (i, got[i], want[i])
