"""Embedding lookup: forward is a row gather, backward a scatter-add that sums repeated ids."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minielectra.gradcheck import check_op, format_table
from minielectra.ops.embedding import embedding_backward, embedding_forward


def assert_rows_ok(rows):
    """Every row ok with rel error <= 1e-6; a gradient that is zero in theory (e.g. gelu' at x = -30 is 1e-114, the
    finite difference exactly 0: rel error 1) may pass on an absolute difference below 1e-9 instead."""
    for r in rows:
        assert r.ok and (r.rel_error <= 1e-6 or r.max_abs_diff <= 1e-9), format_table(rows)


SEEDS = st.integers(0, 2**32 - 1)
ID_SHAPES = st.lists(st.integers(1, 4), min_size=1, max_size=3)


def _inputs(seed, id_shape, V, E, scale=1.0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, id_shape)
    table = rng.standard_normal((V, E)) * scale
    return ids, table


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, id_shape=ID_SHAPES, V=st.integers(1, 6), E=st.integers(1, 4))
def test_forward_gathers_rows(seed, id_shape, V, E):
    ids, table = _inputs(seed, id_shape, V, E)
    out, _ = embedding_forward(ids, table)
    assert out.shape == (*id_shape, E)
    for idx in np.ndindex(*id_shape):
        np.testing.assert_array_equal(out[idx], table[ids[idx]])


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, id_shape=ID_SHAPES, V=st.integers(1, 6), E=st.integers(1, 4))
def test_backward_equals_a_loop_of_row_additions(seed, id_shape, V, E):
    ids, table = _inputs(seed, id_shape, V, E)
    out, cache = embedding_forward(ids, table)
    dout = np.random.default_rng(seed + 1).standard_normal(out.shape)
    expected = np.zeros((V, E))
    for idx in np.ndindex(*id_shape):
        expected[ids[idx]] += dout[idx]
    np.testing.assert_allclose(embedding_backward(dout, cache), expected, rtol=1e-14, atol=1e-14)


def test_repeated_ids_sum_their_gradients():
    table = np.random.default_rng(0).standard_normal((5, 3))
    ids = np.full((2, 4), 2)
    out, cache = embedding_forward(ids, table)
    dout = np.arange(24.0).reshape(2, 4, 3)
    dtable = embedding_backward(dout, cache)
    np.testing.assert_array_equal(dtable[2], dout.sum(axis=(0, 1)))  # (0 + 3 + ... + 21, ...) = (84, 92, 100)
    np.testing.assert_array_equal(dtable[2], [84.0, 92.0, 100.0])
    np.testing.assert_array_equal(np.delete(dtable, 2, axis=0), 0.0)


@settings(max_examples=20, deadline=None)
@given(seed=SEEDS, id_shape=ID_SHAPES, V=st.integers(1, 6), E=st.integers(1, 4),
       scale=st.sampled_from([1e-3, 1.0, 1000.0]))
def test_grad_of_table(seed, id_shape, V, E, scale):
    ids, table = _inputs(seed, id_shape, V, E, scale)
    assert_rows_ok(check_op(embedding_forward, embedding_backward, {"ids": ids, "table": table}, ["table"]))


def test_grad_of_table_directional_with_repeats():
    ids, table = _inputs(0, (3, 7), 4, 20)  # 80 entries, 21 lookups into 4 rows
    assert_rows_ok(check_op(embedding_forward, embedding_backward, {"ids": ids, "table": table}, ["table"]))


def test_float32_in_float32_out_and_any_integer_ids():
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    for dtype in (np.int32, np.int64, np.uint8):
        out, cache = embedding_forward(np.array([[3, 0]], dtype=dtype), table)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, [[[9, 10, 11], [0, 1, 2]]])
        assert embedding_backward(np.ones_like(out), cache).dtype == np.float32


def test_empty_ids():
    out, cache = embedding_forward(np.zeros((0, 3), np.int64), np.ones((4, 2)))
    assert out.shape == (0, 3, 2)
    np.testing.assert_array_equal(embedding_backward(out, cache), np.zeros((4, 2)))


TABLE = np.ones((4, 3))


@pytest.mark.parametrize("ids, table, exc, name", [
    (np.array([0, 4]), TABLE, ValueError, "ids"),
    (np.array([-1, 0]), TABLE, ValueError, "ids"),
    (np.array([0.0, 1.0]), TABLE, TypeError, "ids"),
    (np.array([True, False]), TABLE, TypeError, "ids"),
    ([0, 1], TABLE, TypeError, "ids"),
    (np.array([0, 1]), TABLE.astype(np.int64), TypeError, "table"),
    (np.array([0, 1]), np.ones(4), ValueError, "table"),
    (np.array([0, 1]), np.ones((4, 3, 1)), ValueError, "table"),
    (np.array([0, 1]), np.where(np.eye(4, 3) > 0, np.nan, 1.0), ValueError, "table"),
])
def test_bad_input_names_the_argument(ids, table, exc, name):
    with pytest.raises(exc, match=rf"^{name}\b"):
        embedding_forward(ids, table)
