"""`minielectra bench`: throughput and model FLOPs of the full ELECTRA training step, and per-op kernel speed-ups.

The step timed is everything a training step does: masking, generator, Gumbel sampling, discriminator, both losses,
the backward pass, gradient clipping and the AdamW update, on a random batch of full-length sequences, split into
shards run side by side on the CPU cores as training splits it (parallel.py; `--shards`, default one per core).

Model FLOPs follow DESIGN.md: 6 x (weights x rows) summed over the linear layers (2 for the forward matmul, 4 for
the two backward ones), plus 12 x layers x T^2 x hidden x B per encoder for the attention score and value matmuls.
MFU divides the achieved model FLOP/s by this machine's float32 GEMM FLOP/s, measured in the same run.
"""

import gc
import json
import statistics
import time
import tracemalloc

import numpy as np

from minielectra import backend, electra, parallel
from minielectra.backend import dispatch
from minielectra.config import ElectraConfig
from minielectra.optim import adamw_init, flatten, learning_rate


def masked_tokens(config: ElectraConfig, batch_size, seq_len):
    """Picks per batch for full-length sequences ([CLS] + T-2 words + [SEP]), as electra.mask_tokens makes them."""
    n = seq_len - 2
    return batch_size * min(max(1, round(n * config.mask_prob)), electra.max_predictions(config, seq_len))


def model_flops(config: ElectraConfig, batch_size, seq_len):
    """Model FLOPs of one training step (forward + backward) by DESIGN.md's formula."""
    rows = batch_size * seq_len
    masked = masked_tokens(config, batch_size, seq_len)
    E, V, L = config.embedding_size, config.vocab_size, config.num_hidden_layers
    total = 0
    for C, F in ((config.generator_hidden_size, config.generator_intermediate_size),
                 (config.hidden_size, config.intermediate_size)):
        weights = L * (4 * C * C + 2 * C * F) + (E * C if E != C else 0)  # Q, K, V, O, FFN; embeddings_project
        total += 6 * weights * rows + 12 * L * seq_len ** 2 * C * batch_size
    C = config.hidden_size
    total += 6 * (C * C + C) * rows  # discriminator head: dense, dense_prediction
    total += 6 * (config.generator_hidden_size * E + E * V) * masked  # generator head dense, tied LM head
    return total


def gemm_flops_per_s(n=1024, repeats=7, xp=np):
    """This machine's float32 GEMM throughput: median of repeated (n x n) @ (n x n) products on BLAS, or on cuBLAS
    for xp = cupy (in TF32 when that is on, as the step's GEMMs are)."""
    rng = np.random.default_rng(0)
    a, b = (xp.asarray(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
    a @ b  # warm up the BLAS threads (or cuBLAS's handle)
    backend.synchronize(xp)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        backend.synchronize(xp)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def _random_batch(config, batch_size, seq_len, rng):
    ids = rng.integers(5, config.vocab_size, (batch_size, seq_len))
    ids[:, 0], ids[:, -1] = config.cls_token_id, config.sep_token_id
    return ids, np.ones_like(ids)


def make_step(config: ElectraConfig, train, batch_size, seq_len, seed=0):
    """(step, params, plan): a function running one full training step on a fixed random batch, the params it
    trains, and how it runs: {"shards", "threads", "threads_busy"} (train.shards, as parallel.plan resolves it).

    Under the cupy backend params and optimizer state live on the GPU, and the host batch is copied up by the step,
    as in training; the step waits for the GPU before it returns, so timing it times the work. It returns the loss
    (a 0-d device array on the GPU)."""
    xp = backend.array_module()
    params, _ = flatten({k: xp.asarray(v) for k, v in electra.init_model(config, np.random.default_rng(seed)).items()})
    state = adamw_init(params)
    rng = np.random.default_rng(seed + 1)
    batch = _random_batch(config, batch_size, seq_len, rng)
    shards, threads = parallel.plan(train.shards, batch_size, xp)
    counter = [0]

    def step():
        losses, _, grads, _ = parallel.loss_and_grads(electra, params, batch, config, rng, train=True, shards=shards,
                                                      threads=threads)
        _, scale = dispatch("clip_scale", params[electra.WORDS])(grads, train.max_grad_norm)
        dispatch("adamw_step", params[electra.WORDS])(params, grads, state, learning_rate(counter[0], train), train,
                                                         grad_scale=scale)
        counter[0] += 1
        backend.synchronize(xp)
        return losses["loss"]

    return step, params, {"shards": shards, "threads": threads, "threads_busy": parallel.threads_busy(threads)}


def time_calls(fn, steps, warmup):
    """(median seconds, first call seconds, all timed seconds) of fn() over `steps` calls after `warmup` calls."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    for _ in range(max(0, warmup - 1)):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), first, times


def peak_memory(fn, xp=np):
    """Peak bytes allocated during one call of fn, timed separately: host memory through tracemalloc (which sees
    NumPy's buffers), or for CuPy how much the device memory pool grew. The pool keeps freed blocks for reuse, so once
    emptied of them it holds only the live arrays (params, optimizer state), and what it adds during the call is the
    step's peak."""
    gc.collect()
    if xp is not np:
        pool = xp.get_default_memory_pool()
        pool.free_all_blocks()
        before = pool.total_bytes()
        fn()
        return pool.total_bytes() - before
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def bench_step(config, train, batch_size, seq_len, steps=20, warmup=3):
    """The full-step benchmark as a dict (see the module docstring)."""
    step, params, plan = make_step(config, train, batch_size, seq_len)
    median, first, times = time_calls(step, steps, warmup)
    flops = model_flops(config, batch_size, seq_len)
    gemm = gemm_flops_per_s(xp=backend.array_module())
    return {
        "backend": backend.active_backend(),
        "tf32": backend.tf32_enabled(),
        "kernels": backend.kernel_names(),
        "blas": "cuBLAS" if backend.active_backend() == "cupy" else backend.blas_library(),  # who runs the GEMMs
        "batch": batch_size, "seq": seq_len, **plan,
        "params_m": electra.count_params(params) / 1e6,
        "tokens_per_s": batch_size * seq_len / median,
        "s_per_step_median": median,
        "s_per_step_min": min(times),
        "model_gflop_per_step": flops / 1e9,
        "achieved_gflop_per_s": flops / median / 1e9,
        "gemm_gflop_per_s": gemm / 1e9,
        "mfu": flops / median / gemm,
        "peak_memory_mb": peak_memory(step, backend.array_module()) / 2**20,
        "compile_s": max(0.0, first - median),  # the first step's extra time: JIT compilation and caches
        "steps": steps, "warmup": warmup,
    }


def time_interleaved(fns, steps, sync=lambda: None):
    """{name: [seconds of each call]} for fns = {name: fn}: `steps` rounds, each timing one call of every fn, the
    order reversed every other round, so that load from other work on the machine and thermal drift fall on all
    alike. sync() runs before and after each call (a GPU's synchronisation, so the time is the work's)."""
    items = list(fns.items())
    times = {name: [] for name in fns}
    for i in range(steps):
        for name, fn in items if i % 2 == 0 else items[::-1]:
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    return times


def compare_backends(config, train, batch_size, seq_len, steps=20, warmup=3):
    """The step on the active backend (numba) and on the numpy reference, timed by time_interleaved: medians,
    tokens/s, ratio (active / numpy). Both run the same batch, shards and threads."""
    active = backend.active_backend()
    ours, _, plan = make_step(config, train, batch_size, seq_len)
    reference, _, _ = make_step(config, train, batch_size, seq_len)

    def on_numpy():
        backend.set_backend("numpy")  # dispatch reads the active backend at each call
        try:
            reference()
        finally:
            backend.set_backend(active)

    for _ in range(warmup):
        ours()
        on_numpy()
    times = time_interleaved({"ours": ours, "numpy": on_numpy}, steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = batch_size * seq_len
    return {"backend": active, "batch": batch_size, "seq": seq_len, "steps": steps, "warmup": warmup, **plan,
            "s_per_step_ours": med["ours"], "s_per_step_numpy": med["numpy"],
            "tokens_per_s_ours": tokens / med["ours"], "tokens_per_s_numpy": tokens / med["numpy"],
            "ratio": med["numpy"] / med["ours"]}


def format_backends(d):
    return "\n".join([
        f"vs the numpy reference: {d['steps']} interleaved steps after {d['warmup']} warm-up, batch {d['batch']} x "
        f"seq {d['seq']}, {d['shards']} shard(s) on {d['threads']} thread(s) each",
        f"{'':<16} {d['backend']:>10} {'numpy':>10}",
        f"{'s/step median':<16} {d['s_per_step_ours']:>10.4f} {d['s_per_step_numpy']:>10.4f}",
        f"{'tokens/s':<16} {d['tokens_per_s_ours']:>10,.0f} {d['tokens_per_s_numpy']:>10,.0f}",
        f"tokens/s ratio {d['backend']} / numpy: {d['ratio']:.2f}x",
    ])


def format_step(r):
    return "\n".join([
        f"backend {r['backend']}" + (f" (kernels: {', '.join(r['kernels'])})" if r["kernels"] else "")
        + (f"; TF32 GEMMs {'on' if r['tf32'] else 'off'}" if r["backend"] == "cupy" else f"; BLAS: {r['blas']}"),
        f"batch {r['batch']} x seq {r['seq']}, {r['params_m']:.2f} M params, {r['steps']} timed steps after "
        f"{r['warmup']} warm-up; {r['shards']} shard(s) on {r['threads']} thread(s), {r['threads_busy']} busy",
        f"tokens/s            {r['tokens_per_s']:,.0f}",
        f"s/step (median)     {r['s_per_step_median']:.4f}   (min {r['s_per_step_min']:.4f})",
        f"model GFLOP/step    {r['model_gflop_per_step']:.2f}",
        f"achieved GFLOP/s    {r['achieved_gflop_per_s']:.1f}",
        f"GEMM GFLOP/s ({'tf32' if r['tf32'] else 'fp32'}) {r['gemm_gflop_per_s']:.1f}",
        f"MFU                 {r['mfu']:.3f}",
        f"peak memory         {r['peak_memory_mb']:.0f} MB",
        f"compile time        {r['compile_s']:.1f} s",
    ])


def _op_cases(config: ElectraConfig, train, batch_size, seq_len, rng, xp=np):
    """(name, reference-module op pairs, inputs) for every dispatched op at the shapes the step uses, with the arrays
    in xp (cupy: on the GPU, where its kernels take them)."""
    from minielectra.ops.embedding import EmbeddingCache

    B, T, C, H = batch_size, seq_len, config.hidden_size, config.num_attention_heads
    D, F, V, E = C // H, config.intermediate_size, config.vocab_size, config.embedding_size
    N = masked_tokens(config, B, T)
    f32 = np.float32

    def r(*shape):
        return xp.asarray(rng.standard_normal(shape).astype(f32))

    def ints(high, shape):
        return xp.asarray(rng.integers(0, high, shape))

    mask = xp.ones((B, T), dtype=np.int64)
    ids = ints(V, (B, T))
    params = {"w": r(C, F), "b.bias": r(F)}
    return [
        ("attention fwd+bwd", ("attention_forward", "attention_backward"),
         (r(B, H, T, D), r(B, H, T, D), r(B, H, T, D), mask, config.attention_probs_dropout_prob,
          np.random.default_rng(0)), r(B, H, T, D)),
        ("layernorm fwd+bwd", ("layernorm_forward", "layernorm_backward"), (r(B, T, C), r(C), r(C)), r(B, T, C)),
        ("dropout+add+LN", ("dropout_add_layernorm_forward", "dropout_add_layernorm_backward"),
         (r(B, T, C), r(B, T, C), r(C), r(C), config.hidden_dropout_prob, np.random.default_rng(0)), r(B, T, C)),
        ("LN+dropout (emb.)", ("layernorm_dropout_forward", "layernorm_dropout_backward"),
         (r(B, T, E), r(E), r(E), config.hidden_dropout_prob, np.random.default_rng(0)), r(B, T, E)),
        ("bias+gelu fwd+bwd", ("bias_gelu_forward", "bias_gelu_backward"), (r(B, T, F), r(F)), r(B, T, F)),
        ("softmax CE (MLM)", ("softmax_cross_entropy",), (r(N, V), ints(V, N)), None),
        ("gumbel sample", ("gumbel_sample",), (r(N, V), config.temperature, np.random.default_rng(0)), None),
        ("sigmoid CE (RTD)", ("sigmoid_cross_entropy",), (r(B, T), ints(2, (B, T)), xp.ones((B, T), f32)), None),
        ("embedding bwd", ("embedding_backward",), (r(B, T, E), EmbeddingCache(ids, (V, E))), None),
        ("adamw (C x F)", ("adamw_step",), (params, {k: r(*v.shape) for k, v in params.items()}, adamw_init(params),
                                            1e-4, train, 1.0), None),
        # Last: its products run on all of BLAS's threads, which spin for a while afterwards and would slow the
        # Numba kernels timed next (attention 1.5x its reference instead of 2.8x, tiny).
        ("linear fwd+bwd (FFN)", ("linear_forward", "linear_backward"), (r(B, T, C), r(C, F), r(F)), r(B, T, F)),
    ]


def bench_ops(config: ElectraConfig, train, batch_size, seq_len, repeats=10):
    """[(op, reference s, kernel s or None, reference peak bytes, kernel peak bytes or None)]: medians of `repeats`
    calls at the step's shapes, side by side, and the memory one call allocates at its peak (caches included: a
    forward's cache lives until its backward). Under the cupy backend both run on the GPU, the reference as CuPy array
    code, each call timed up to the device's synchronisation, its memory from CuPy's pool."""
    import importlib

    rng = np.random.default_rng(0)
    xp = backend.array_module()
    package = backend.KERNEL_PACKAGES.get(backend.active_backend())
    rows = []
    for name, ops, args, dout in _op_cases(config, train, batch_size, seq_len, rng, xp):
        def runner(fns):
            def call():
                if len(fns) == 1:
                    fns[0](*args)
                else:
                    fns[1](dout, fns[0](*args)[1])
                backend.synchronize(xp)
            return call

        ref = [getattr(importlib.import_module(backend._OP_MODULES[op]), op) for op in ops]
        ker = [backend.dispatch(op, xp.zeros(1)) for op in ops]
        has_kernel = package is not None and all(k is not r for k, r in zip(ker, ref))
        ref_t, _, _ = time_calls(runner(ref), repeats, 2)
        ker_t = time_calls(runner(ker), repeats, 2)[0] if has_kernel else None
        ref_mem = peak_memory(runner(ref), xp)
        ker_mem = peak_memory(runner(ker), xp) if has_kernel else None
        rows.append((name, ref_t, ker_t, ref_mem, ker_mem))
    return rows


def format_ops(rows):
    lines = [f"{'op':<20} {'reference ms':>12} {'kernel ms':>10} {'speed-up':>9} {'ref peak MiB':>13} "
             f"{'kernel MiB':>11}", "-" * 80]
    for name, ref_t, ker_t, ref_mem, ker_mem in rows:
        if ker_t is None:
            lines.append(f"{name:<20} {ref_t * 1e3:>12.2f} {'-':>10} {'-':>9} {ref_mem / 2**20:>13.1f} {'-':>11}")
        else:
            lines.append(f"{name:<20} {ref_t * 1e3:>12.2f} {ker_t * 1e3:>10.2f} {ref_t / ker_t:>8.2f}x "
                         f"{ref_mem / 2**20:>13.1f} {ker_mem / 2**20:>11.1f}")
    return "\n".join(lines)


def to_json_line(result):
    return json.dumps(result, sort_keys=True)
