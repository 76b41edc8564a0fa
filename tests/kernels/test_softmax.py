"""kernels/numba_cpu/softmax.py (gumbel_sample) against the reference minielectra.ops.softmax.gumbel_sample: the same
samples but at near-ties (numba_kernel_checks.assert_same_samples)."""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

pytest.importorskip("numba")

from minielectra.ops import softmax as ref  # noqa: E402
from minielectra.kernels.numba_cpu import softmax as ker  # noqa: E402
from numba_kernel_checks import (DTYPES, KERNEL_SETTINGS, LAYOUTS, MAGNITUDES, SEEDS, assert_same_samples,  # noqa: E402
                                 noncontiguous)

pytestmark = pytest.mark.numba


@KERNEL_SETTINGS
@given(seed=SEEDS, N=st.integers(1, 9), V=st.integers(1, 3000), dtype=DTYPES, mag=MAGNITUDES,
       temperature=st.sampled_from([0.05, 1.0, 3.0]), layout=LAYOUTS)
@example(seed=0, N=2, V=ker.W + 1, dtype=np.float32, mag=1.0, temperature=1.0, layout="C")  # a second block of one
def test_gumbel_sample_matches_reference(seed, N, V, dtype, mag, temperature, layout):
    logits = (np.random.default_rng(seed).standard_normal((N, V)) * mag).astype(dtype)
    logits = noncontiguous(logits, layout)
    assert_same_samples(ker.gumbel_sample(logits, temperature, np.random.default_rng(seed)), logits, temperature, seed)


def test_ties_go_to_the_first_index_across_blocks():
    """Equal logits far above the rest: the noise decides among them, and a tie of whole scores (both +inf) goes to
    the first index, also when the two sit in different blocks."""
    W = ker.W
    logits = np.full((3, 2 * W + 5), -1e30, np.float32)
    logits[0, [3, W + 3]] = np.inf
    logits[1, [W + 1, 2 * W + 2]] = np.inf
    logits[2, :] = -np.inf  # nothing reachable: argmax's answer is index 0
    got = ker.gumbel_sample(logits, 1.0, np.random.default_rng(0))
    assert got.tolist() == [3, W + 1, 0]
    assert got.tolist() == ref.gumbel_sample(logits, 1.0, np.random.default_rng(0)).tolist()


def test_samples_follow_the_softmax_at_the_step_s_size():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((304, 8192)).astype(np.float32)
    assert_same_samples(ker.gumbel_sample(logits, 1.0, np.random.default_rng(5)), logits, 1.0, 5)
    three = np.log(np.array([[0.5, 0.3, 0.2]] * 20000, dtype=np.float32))
    freq = np.bincount(ker.gumbel_sample(three, 1.0, np.random.default_rng(0)), minlength=3) / 20000
    assert np.allclose(freq, [0.5, 0.3, 0.2], atol=0.015)


def test_rejects_what_the_reference_rejects():
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="^logits"):
        ker.gumbel_sample(np.zeros((2, 3), np.int64), 1.0, rng)
    with pytest.raises(ValueError, match="^logits"):
        ker.gumbel_sample(np.zeros((2, 0), np.float32), 1.0, rng)
    with pytest.raises(ValueError, match="^temperature"):
        ker.gumbel_sample(np.zeros((2, 3), np.float32), 0.0, rng)
    with pytest.raises(TypeError, match="Generator"):
        ker.gumbel_sample(np.zeros((2, 3), np.float32), 1.0, None)
