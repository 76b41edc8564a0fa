"""Data parallelism (minielectra/parallel.py): a batch split into shards, run on threads, gives the gradient of the
whole batch's loss; the numbers depend on the shard count, never on the thread count."""

import numpy as np
import pytest

from minielectra import classifier as K
from minielectra import electra as E
from minielectra import gradcheck as gc
from minielectra import lstm_classifier as L
from minielectra import mlm as M
from minielectra import parallel
from minielectra.config import ElectraConfig
from model_checks import SMALL, float64_model, padded_batch


def all_padding_row(batch, row):
    """The batch with sequence `row` made entirely of [PAD]: no real token, nothing to pick."""
    ids, mask = (a.copy() for a in batch)
    ids[row], mask[row] = 0, 0
    return ids, mask


def test_split_gives_contiguous_near_equal_shards():
    batch = (np.arange(14).reshape(7, 2), np.ones((7, 2)))
    parts = parallel.split(batch, 3)
    assert [len(p[0]) for p in parts] == [2, 2, 3]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), batch[0])
    for bad in (0, 8):
        with pytest.raises(ValueError, match="cannot split a batch of 7 sequences into"):
            parallel.split(batch, bad)


def test_plan_chooses_one_shard_per_core_capped_at_the_batch():
    cores = parallel.cores()
    assert parallel.plan(0, 64, np) == (min(cores, 64), min(cores, 64))
    assert parallel.plan(0, 1, np) == (1, 1)
    assert parallel.plan(3, 64, np) == (3, min(3, cores))


@pytest.mark.parametrize("objective", [E, M], ids=["electra", "mlm"])
def test_one_shard_is_the_plain_step(objective):
    params = objective.init_model(SMALL, np.random.default_rng(0))
    batch = padded_batch(np.random.default_rng(1), 4, 9, SMALL.vocab_size)
    ref = objective.loss_and_grads(params, batch, SMALL, np.random.default_rng(5))
    losses, metrics, grads, _ = parallel.loss_and_grads(objective, params, batch, SMALL, np.random.default_rng(5))
    assert losses == ref[0] and metrics == ref[1]
    for k in grads:
        np.testing.assert_array_equal(grads[k], ref[2][k], err_msg=k)


def assert_gradients(loss, params, grads):
    """Every parameter's gradient against central differences of loss(); only the attention key biases, whose
    gradient is exactly zero, may pass on the zero rule."""
    rows = [gc.check_backward(loss, params[k], grads[k], k) for k in sorted(params)]
    bad = [r for r in rows if not r.ok]
    assert not bad, gc.format_table(bad)
    assert all(r.rel_error < 1e-6 for r in rows if not r.name.endswith("key.bias"))


def _replay(objective, outputs):
    """The keyword that makes each shard's forward repeat its draws: electra's samples, mlm's masking."""
    return {"samples": [o.samples for o in outputs]} if objective is E else {"masking": [o.masking for o in outputs]}


@pytest.mark.parametrize("objective", [E, M], ids=["electra", "mlm"])
@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_gradient_check(objective, shards):
    """float64: the summed shard gradients are the gradient of the combined loss, dropout on, with a fully padded
    sequence (a shard with no picked token and no real token when it is alone)."""
    params = float64_model(objective.init_model, SMALL)
    batch = all_padding_row(padded_batch(np.random.default_rng(2), 5, 9, SMALL.vocab_size), 4)
    losses, _, grads, outputs = parallel.loss_and_grads(objective, params, batch, SMALL, np.random.default_rng(7),
                                                        shards=shards, threads=2)
    assert set(grads) == set(params)
    replay = _replay(objective, outputs)

    def loss():  # same seeds: the same masks, dropout and samples in every shard
        return parallel.loss_and_grads(objective, params, batch, SMALL, np.random.default_rng(7), shards=shards,
                                       threads=1, **replay)[0]["loss"]

    assert_gradients(loss, params, grads)


@pytest.mark.parametrize("objective", [E, M], ids=["electra", "mlm"])
def test_combined_losses_and_metrics_are_whole_batch_means(objective):
    """Each mean loss is the sum over all shards' items over their count, as if the batch were one; each metric is
    all shards' hits over all shards' trials."""
    params = objective.init_model(SMALL, np.random.default_rng(0), np.float64)
    batch = padded_batch(np.random.default_rng(3), 6, 9, SMALL.vocab_size)
    losses, metrics, _, outputs = parallel.loss_and_grads(objective, params, batch, SMALL, np.random.default_rng(1),
                                                          shards=3, threads=2)
    for name in outputs[0].counts:
        sums = sum(o.losses[name] * o.counts[name] for o in outputs)
        assert losses[name] == pytest.approx(sums / sum(o.counts[name] for o in outputs), rel=1e-14)
    assert losses["loss"] == pytest.approx(objective.total_loss(losses, SMALL), rel=1e-14)
    if objective is E:
        # two sequences of 9 tokens per shard; the batch's last one ends in 3 [PAD]s
        assert [o.counts["rtd_loss"] for o in outputs] == [18, 18, 15]
        picks = sum(o.counts["mlm_loss"] for o in outputs)
        hits = sum(o.metrics["gen_acc"] * o.counts["mlm_loss"] for o in outputs)
        assert metrics["gen_acc"] == pytest.approx(hits / picks, rel=1e-14)
    else:
        hits = sum(o.metrics["mlm_acc"] * o.counts["mlm_loss"] for o in outputs)
        assert metrics["mlm_acc"] == pytest.approx(hits / sum(o.counts["mlm_loss"] for o in outputs), rel=1e-14)


@pytest.mark.parametrize("objective", [E, M], ids=["electra", "mlm"])
def test_thread_count_does_not_change_the_numbers(objective):
    config = ElectraConfig(**{**SMALL.__dict__, "hidden_dropout_prob": 0.2})
    params = objective.init_model(config, np.random.default_rng(0))
    batch = padded_batch(np.random.default_rng(4), 8, 12, config.vocab_size)
    runs = [parallel.loss_and_grads(objective, params, batch, config, np.random.default_rng(9), shards=4,
                                    threads=t) for t in (1, 2, 4)]
    for losses, metrics, grads, _ in runs[1:]:
        assert losses == runs[0][0] and metrics == runs[0][1]
        for k in grads:
            np.testing.assert_array_equal(grads[k], runs[0][2][k], err_msg=k)


@pytest.mark.parametrize("objective", [E, M], ids=["electra", "mlm"])
def test_flat_params_give_the_same_sharded_step(objective):
    """Params as views of one buffer (optim.flatten, as training runs them): each shard's grads are views of one
    buffer too, and the shards' buffers are added in one call, entry by entry as the dicts are, so to the bit."""
    from minielectra import flat, optim

    params = objective.init_model(SMALL, np.random.default_rng(0))
    fp, _ = optim.flatten(params)
    batch = padded_batch(np.random.default_rng(4), 6, 12, SMALL.vocab_size)
    runs = [parallel.loss_and_grads(objective, p, batch, SMALL, np.random.default_rng(9), shards=3, threads=2)
            for p in (params, fp)]
    assert isinstance(runs[1][2], flat.FlatDict) and runs[1][2].intact() and runs[1][2].layout is fp.layout
    assert runs[1][0] == runs[0][0]
    for k in params:
        np.testing.assert_array_equal(runs[1][2][k], runs[0][2][k], err_msg=k)


@pytest.mark.parametrize("objective", [E, M], ids=["electra", "mlm"])
def test_counts_from_the_batch_are_what_forward_counts(objective):
    """objective.counts gives, before any forward runs, the counts forward reports, on which the shards' shares rest:
    with padding, an all-padding sequence and short sequences; for mlm also with a replayed masking of fewer picks."""
    params = objective.init_model(SMALL, np.random.default_rng(0))
    for seed, (B, T) in enumerate([(5, 9), (3, 4), (6, 16)]):
        batch = all_padding_row(padded_batch(np.random.default_rng(seed), B, T, SMALL.vocab_size), B - 1)
        out = objective.forward(params, batch, SMALL, np.random.default_rng(seed))
        assert objective.counts(batch, SMALL) == out.counts
    if objective is M:
        fewer = out.masking._replace(weights=out.masking.weights * (np.arange(out.masking.weights.shape[1]) < 1))
        out = objective.forward(params, batch, SMALL, np.random.default_rng(0), masking=fewer)
        assert objective.counts(batch, SMALL, masking=fewer) == out.counts == {"mlm_loss": float(B - 1)}


def test_counts_that_disagree_with_the_forward_stop_the_step(monkeypatch):
    params = E.init_model(SMALL, np.random.default_rng(0))
    batch = padded_batch(np.random.default_rng(1), 4, 9, SMALL.vocab_size)
    monkeypatch.setattr(E, "counts", lambda batch, config, **replay: {"mlm_loss": 1.0, "rtd_loss": 1.0})
    with pytest.raises(RuntimeError, match="forward counted"):
        parallel.loss_and_grads(E, params, batch, SMALL, np.random.default_rng(0), shards=2, threads=2)


def test_a_shard_error_reaches_the_caller():
    params = E.init_model(SMALL, np.random.default_rng(0))
    ids, mask = padded_batch(np.random.default_rng(1), 4, 9, SMALL.vocab_size)
    ids[3, 2] = SMALL.vocab_size  # out of the vocab, in the second shard
    with pytest.raises(ValueError, match="input_ids must lie in"):
        parallel.loss_and_grads(E, params, (ids, mask), SMALL, np.random.default_rng(0), shards=2, threads=2)


def _classifier_case(module, seed=0):
    """(config, float64 params moved off their init, batch of 5 rows with a padded and an all-padding row, 3 labels)."""
    if module is L:
        config = L.LSTMConfig(vocab_size=SMALL.vocab_size, embedding_size=5, hidden_size=4, dropout=0.2)
        params = L.init_classifier(config, 3, np.random.default_rng(seed), np.float64)
    else:
        config = ElectraConfig(**{**SMALL.__dict__, "hidden_dropout_prob": 0.2})
        params = K.init_classifier(config, 3, np.random.default_rng(seed), dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    for k in params:
        params[k] += rng.standard_normal(params[k].shape) * 0.3
    ids, mask = all_padding_row(padded_batch(rng, 5, 9, SMALL.vocab_size), 4)
    ids[4, 0], mask[4, 0] = 2, 1  # a [CLS] alone: the classifier reads the [CLS] position of every row
    return config, params, (ids, mask, np.zeros_like(ids), rng.integers(0, 3, 5))


@pytest.mark.parametrize("module", [K, L], ids=["transformer", "lstm"])
@pytest.mark.parametrize("shards", [2, 3, 9])
def test_sharded_classifier_gradient_check(module, shards):
    """float64, dropout on: the summed shard gradients are the gradient of the combined mean loss; 9 shards of a
    5-row batch run as 5 (one row each)."""
    config, params, batch = _classifier_case(module)
    loss, logits, grads = parallel.classifier_loss_and_grads(module, params, batch, config, 3,
                                                             np.random.default_rng(4), shards=shards, threads=2)
    assert logits.shape == (5, 3) and set(grads) == set(params)

    def f():
        return parallel.classifier_loss_and_grads(module, params, batch, config, 3, np.random.default_rng(4),
                                                  shards=shards, threads=1)[0]

    assert_gradients(f, params, grads)


@pytest.mark.parametrize("module", [K, L], ids=["transformer", "lstm"])
def test_sharded_classifier_loss_is_the_batch_mean_without_dropout(module):
    """Without dropout the shards draw nothing at random: the sharded step is the unsharded step, up to rounding."""
    config, params, batch = _classifier_case(module)
    ref_loss, ref_logits, ref_grads = module.loss_and_grads(params, batch, config, 3, None, train=False)
    loss, logits, grads = parallel.classifier_loss_and_grads(module, params, batch, config, 3, None, train=False,
                                                             shards=2, threads=2)
    assert loss == pytest.approx(ref_loss, rel=1e-13)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-13)
    for k in grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-11, atol=1e-14, err_msg=k)


def test_limit_blas_sets_and_restores_the_limit_and_a_nested_equal_limit_costs_nothing(monkeypatch):
    from threadpoolctl import threadpool_info

    def blas_threads():
        return {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    before = blas_threads()
    with parallel.limit_blas(1):
        assert blas_threads() and all(n == 1 for n in blas_threads().values())
        calls = []
        monkeypatch.setattr(parallel._controller[0], "limit", lambda **kw: calls.append(kw))
        with parallel.limit_blas(1):  # what the attention kernel asks inside a sharded step
            assert all(n == 1 for n in blas_threads().values())
        assert calls == []  # the controller was not asked again
        monkeypatch.undo()
    assert blas_threads() == before
