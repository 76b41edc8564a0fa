"""kernels/numba_cpu/embedding.py against the reference minielectra.ops.embedding.

The kernel adds each table entry's terms in position order, like the reference's add.at, so results are bitwise
equal (no tolerance), repeated ids included.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("numba")

from minielectra.ops import embedding as ref  # noqa: E402
from minielectra.kernels.numba_cpu import embedding as ker  # noqa: E402
from numba_kernel_checks import DTYPES, KERNEL_SETTINGS, LAYOUTS, MAGNITUDES, SEEDS, noncontiguous  # noqa: E402

pytestmark = pytest.mark.numba


@KERNEL_SETTINGS
@given(seed=SEEDS, B=st.integers(1, 4), T=st.integers(1, 33), V=st.integers(1, 50), E=st.integers(1, 40),
       dtype=DTYPES, mag=MAGNITUDES, layout=LAYOUTS, idtype=st.sampled_from([np.int32, np.int64, np.uint8]))
def test_backward_matches_reference_bitwise(seed, B, T, V, E, dtype, mag, layout, idtype):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((V, E)).astype(dtype)
    ids = rng.integers(0, min(V, 256), (B, T)).astype(idtype)  # V small or B*T large -> many repeats
    _, cache = ref.embedding_forward(ids, table)
    dout = noncontiguous((rng.standard_normal((B, T, E)) * mag).astype(dtype), layout)
    got, want = ker.embedding_backward(dout, cache), ref.embedding_backward(dout, cache)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_rejects_bad_dout_and_ids():
    cache = ref.EmbeddingCache(np.array([[0, 1]]), (3, 4))
    with pytest.raises(ValueError):
        ker.embedding_backward(np.zeros((1, 2, 5), np.float32), cache)
    with pytest.raises(ValueError):  # the kernel does not bounds-check: out-of-range ids must not reach it
        ker.embedding_backward(np.zeros((1, 2, 4), np.float32), ref.EmbeddingCache(np.array([[0, 3]]), (3, 4)))
