"""A whole pre-training step on the numba backend gives the numpy backend's losses and gradients (float32), also when
the batch is split into shards whose kernels run on two threads at once."""

import numpy as np
import pytest

pytest.importorskip("numba")

from minielectra import backend, electra, parallel  # noqa: E402
from minielectra.config import ElectraConfig  # noqa: E402
from numba_kernel_checks import padded_batch  # noqa: E402

pytestmark = pytest.mark.numba

CONFIG = ElectraConfig(vocab_size=500, embedding_size=32, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                       intermediate_size=96, generator_hidden_size=16, generator_num_attention_heads=1,
                       generator_intermediate_size=64, max_position_embeddings=64)


def _step(name, params, batch, shards):
    backend.set_backend(name)
    try:
        return parallel.loss_and_grads(electra, params, batch, CONFIG, np.random.default_rng(3), train=True,
                                       shards=shards, threads=shards)[:3]
    finally:
        backend.set_backend("numpy")


@pytest.mark.parametrize("shards", [1, 2], ids=["one batch", "two shards on two threads"])
def test_numba_step_matches_numpy_step(shards):
    params = electra.init_model(CONFIG, np.random.default_rng(0))
    ids, mask = padded_batch(CONFIG, 4, 37, real_in_last=20)
    ref_losses, ref_metrics, ref_grads = _step("numpy", params, (ids, mask), shards)
    losses, metrics, grads = _step("numba", params, (ids, mask), shards)
    for k in ref_losses:  # float32 sums in a different order: a few ulps on a loss of ~40
        assert losses[k] == pytest.approx(ref_losses[k], rel=1e-5), k
    assert metrics == pytest.approx(ref_metrics)  # the same masks, samples and decisions
    assert set(grads) == set(ref_grads)
    # Each tensor's error against its own norm: float32 rounding through two encoders gives ~4e-7. The attention key
    # biases' gradient is zero in theory (~1e-14 of rounding either way), so norms are floored at 1e-6 of the global
    # gradient norm.
    floor = 1e-6 * np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in ref_grads.values()))
    for k in ref_grads:
        assert grads[k].dtype == np.float32
        err = np.linalg.norm((grads[k] - ref_grads[k]).astype(np.float64))
        assert err <= 1e-5 * (np.linalg.norm(ref_grads[k].astype(np.float64)) + floor), k
