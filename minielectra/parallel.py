"""Data parallelism on the CPU cores: each batch is split into shards, and each shard's forward and backward pass runs
on a thread of its own; the shards' gradients are added up before the one optimizer update.

Why: a tiny or small model's matrices are too small for BLAS and the Numba kernels to keep two cores busy inside one
operation, while whole shards keep each core busy on its own. BLAS and Numba release Python's GIL, so plain threads
run concurrently and share the params without copies. Measured on 2 cores, `tiny`, batch 32 x 128, forward and
backward: one batch on 2 BLAS/Numba threads 10,500 tokens/s; two shards of 16 on one thread each 15,800 tokens/s.

The arithmetic is exact. Each objective's losses are means over the whole batch: ELECTRA's mlm_loss over its N picked
positions, rtd_loss over its R real tokens. A shard with N_i picks contributes N_i / N of its own mean (its share),
so the shares' sum is the whole batch's mean, and the whole batch's gradient is the sum of the shards' gradients, each
taken with its share (the objective's `backward(..., shares)`). N_i depends on the shard's batch alone (how many
non-special tokens each sequence has), not on the draw, so the objective's `counts` gives every share before any
shard runs, and each thread runs its shard's forward and backward in one go. Metrics add up their numerators and
denominators. Fine-tuning is simpler: the classification loss is a mean over the batch's rows, so a shard's share is
its rows over the batch's (classifier_loss_and_grads).

Randomness: shard i draws its masking, dropout and sampling from its own Generator, seeded from the step's rng. The
numbers depend on the number of shards, never on how many threads run them, so a run is reproducible on any machine;
the trainer records its shard count in the run's config.
"""

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import ThreadpoolController

from minielectra import backend, flat
from minielectra.electra import ratios


def cores():
    """The CPU cores this process may run on (its affinity mask, which taskset and containers narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def plan(shards, batch_size, xp):
    """(shards, threads) for a run whose config asks for `shards` (0: choose) with params in array module xp.

    0 becomes one shard per core on the host, capped at the batch size, and 1 on a GPU, where one stream runs the
    whole batch. On the host the shards run on min(shards, cores) threads; on a GPU one after the other.
    """
    device = backend.on_device(xp.zeros(0))
    if shards == 0:
        shards = 1 if device else max(1, min(cores(), batch_size))
    return shards, 1 if device else min(shards, cores())


def threads_busy(threads):
    """How many threads a step keeps busy when its shards run on `threads` threads: each runs BLAS and Numba with its
    part of the cores; one at a time, they run with all of BLAS's threads. bench --vs-torch gives PyTorch as many."""
    return threads * max(1, cores() // threads) if threads > 1 else blas_threads()


def blas_threads():
    """The number of threads NumPy's BLAS uses."""
    info = backend.numpy_blas()
    return int(info["num_threads"]) if info else cores()


_controller = []  # the one ThreadpoolController, made on first use
_pools = {}  # threads -> the ThreadPoolExecutor that runs shards, kept for the life of the process
_blas_limit = [None]  # the thread count the innermost limit_blas in force set; None outside every one


@contextlib.contextmanager
def limit_blas(threads):
    """A context in which BLAS runs on `threads` threads. The libraries are looked up once: threadpoolctl's
    threadpool_limits looks them up on every call (0.6 ms, twice a training step; a kept controller's limit takes 8 us,
    measured). SciPy's BLAS, which the Numba kernels call where NumPy's cannot be (kernels/numba_cpu/_blas.py), is
    loaded first so that it is found with NumPy's. Inside a limit to the same count it does nothing: the attention
    kernel asks for 1 thread on every call, and inside the sharded step (_run) BLAS already has 1 per shard on a
    2-core machine. (The limit is one setting of the whole process, whichever thread sets it, as it always was.)"""
    if _blas_limit[0] == threads:
        yield
        return
    if not _controller:
        import scipy.linalg.cython_blas  # noqa: F401

        _controller.append(ThreadpoolController())
    before = _blas_limit[0]
    with _controller[0].limit(limits=threads, user_api="blas"):
        _blas_limit[0] = threads
        try:
            yield
        finally:
            _blas_limit[0] = before


def split(batch, shards):
    """The batch's rows in `shards` contiguous parts, as even as possible (sizes differ by at most one)."""
    B = len(batch[0])
    if not 1 <= shards <= B:
        raise ValueError(f"cannot split a batch of {B} sequences into {shards} shards: use 1 to {B} shards")
    bounds = [B * i // shards for i in range(shards + 1)]
    return [tuple(a[lo:hi] for a in batch) for lo, hi in zip(bounds, bounds[1:])]


def shard_rngs(rng, shards):
    """One Generator per shard. A single shard draws from rng itself, so 1 shard is exactly the unsharded step; no
    rng (an evaluation step, which draws nothing) gives none to every shard."""
    if shards == 1 or rng is None:
        return [rng] * shards
    return [np.random.default_rng(s) for s in rng.integers(2**63, size=shards)]


def shares_of(counts):
    """Each shard's share of each mean loss, from the shards' counts [{loss name: count}]: its count over the whole
    batch's. A loss whose count is 0 over the whole batch (no token picked) is 0 in every shard, as in the unsharded
    step, and gets share 0."""
    totals = {name: sum(c[name] for c in counts) for name in counts[0]}
    return [{name: (c[name] / totals[name] if totals[name] else 0.0) for name in totals} for c in counts]


def combine(objective, outputs, config, shares):
    """(losses, metrics) of the whole batch from the shards' forward outputs and shares: each mean loss is the shards'
    means weighted by their shares, the total loss is the objective's sum of those, and each metric is the sum of the
    numerators over the sum of the denominators."""
    losses = {name: sum(s[name] * o.losses[name] for s, o in zip(shares, outputs)) for name in shares[0]}
    losses = {"loss": objective.total_loss(losses, config), **losses}
    tallies = {name: tuple(sum(o.tallies[name][j] for o in outputs) for j in (0, 1)) for name in outputs[0].tallies}
    return losses, ratios(tallies)


def loss_and_grads(objective, params, batch, config, rng, train=True, shards=1, threads=1, **replay):
    """(losses, metrics, grads, outputs) of one step of `objective` (electra or mlm: the module) on `batch`, split
    into `shards` shards run on up to `threads` threads. outputs are the shards' forward outputs.

    replay: per-shard lists of what the objective's forward takes to replay a step (electra's `samples`, mlm's
    `masking`), one entry per shard.
    """
    parts = split(batch, shards)
    rngs = shard_rngs(rng, shards)
    if shards == 1:
        out = objective.forward(params, parts[0], config, rngs[0], train, **{k: v[0] for k, v in replay.items()})
        return out.losses, out.metrics, objective.backward(out, params, config), [out]
    # The counts the losses divide by follow from the batch alone, so the shares are known before any shard runs and
    # each thread runs its shard's forward and backward in one go: no wait for the slower shard in between, and the
    # two threads, out of step, less often want Python's lock at the same moment (tiny, 2 cores: 1.5-1.8 ms a step).
    replays = [{k: v[i] for k, v in replay.items()} for i in range(shards)]
    counts = [objective.counts(parts[i], config, **replays[i]) for i in range(shards)]
    shares = shares_of(counts)

    def step(i):
        out = objective.forward(params, parts[i], config, rngs[i], train, **replays[i])
        if out.counts != counts[i]:  # the shares would weigh this shard's gradient wrongly
            raise RuntimeError(f"shard {i}: forward counted {out.counts}, {objective.__name__}.counts said "
                               f"{counts[i]}")
        return out, objective.backward(out, params, config, shares[i])

    results = _run(step, shards, threads)
    outputs = [out for out, _ in results]
    losses, metrics = combine(objective, outputs, config, shares)
    return losses, metrics, _sum([grads for _, grads in results]), outputs


def classifier_loss_and_grads(module, params, batch, config, num_labels, rng, train=True, shards=1, threads=1):
    """(loss, logits, grads) of one fine-tuning step of `module` (classifier or lstm_classifier) on batch =
    (input_ids, attention_mask, token_type_ids, labels), split into `shards` shards (fewer when the batch has fewer
    rows) on up to `threads` threads. The loss is a mean over the B rows, so shard i's share is B_i / B, known before
    any shard runs: each thread runs its shard's forward and backward in one go."""
    shards = min(shards, len(batch[0]))
    if shards == 1:
        return module.loss_and_grads(params, batch, config, num_labels, rng, train)
    parts = split(batch, shards)
    rngs = shard_rngs(rng, shards)

    def step(i):
        loss, logits, cache = module.forward(params, parts[i], config, num_labels, rngs[i], train)
        share = len(parts[i][0]) / len(batch[0])
        return share * loss, logits, module.backward(params, cache, cache.dlogits * cache.dlogits.dtype.type(share))

    results = _run(step, shards, threads)
    xp = backend.get_xp(results[0][1])
    return sum(r[0] for r in results), xp.concatenate([r[1] for r in results]), _sum([r[2] for r in results])


def _sum(grads_list):
    """The shards' grads dicts added into the first, in shard order: the sum is the same whatever ran first. Grads
    that are views of one buffer each (flat.py) are added buffer to buffer, in one call."""
    grads = grads_list[0]
    bufs = flat.buffers(*grads_list)
    if bufs is not None:
        for b in bufs[1:]:
            bufs[0] += b
        return grads
    for g in grads_list[1:]:
        for name in grads:
            grads[name] += g[name]
    return grads


def _run(fn, n, threads):
    """[fn(0), ..., fn(n - 1)], on `threads` threads that split the cores between them."""
    threads = min(threads, n)
    if threads == 1:
        return [fn(i) for i in range(n)]
    per_thread = max(1, cores() // threads)

    def task(i):
        if backend.active_backend() == "numba":
            import numba

            numba.set_num_threads(min(per_thread, numba.config.NUMBA_NUM_THREADS))  # a per-thread setting
        return fn(i)

    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="minielectra-shard")
    with limit_blas(per_thread):
        return list(_pools[threads].map(task, range(n)))

