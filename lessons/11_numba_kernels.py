# %% [markdown]
# # 11 · Numba kernels: fusing the small ops
#
# Every op of lessons 01–08 was written as a few lines of NumPy, one array expression per formula. That is the
# clearest way to write them, and the matrix products (the FLOPs) are already as fast as BLAS makes them. What is slow
# is everything **between** the matrix products: layer norm, bias + GELU, the softmax of attention, the losses. Each
# NumPy expression reads its inputs from memory and writes a new array, so a five-line formula walks over memory ten
# times for a handful of FLOPs per element. A **kernel** does the whole formula in one loop, one element (or one row)
# at a time, while the numbers are still in registers and cache.
#
# **You will learn**
# - to count the memory passes of a reference op and of its fused kernel, and why that count, not the FLOPs, sets
#   their speed;
# - how the Numba attention kernel is organised: one parallel iteration per (batch, head), blocks of query rows, a
#   stable masked softmax in place, the reference's hashed dropout mask, memory linear in T, single-threaded BLAS
#   inside the parallel loop;
# - why `minielectra.kernels.numba_cpu` sets `OMP_WAIT_POLICY=PASSIVE`;
# - how to check a float32 kernel against the reference, and how to time it (`minielectra.bench.bench_ops`);
# - why two shards of a batch on two threads beat one batch on two cores, and how their gradients add up exactly;
# - what the BLAS's GEMM kernels and the memory allocator do to a step's time, outside every kernel;
# - two things that keep a Numba loop from becoming SIMD code: a sum kept in order, a division that may raise.
#
# Needs the `numba` extra (`pip install -e '.[numba]'`); without it the lesson says so and stops.
#
# Run it: `python lessons/11_numba_kernels.py` (seconds once the kernels are compiled and cached; the first run
# compiles them, which can take a minute).

# %%
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

try:
    import numba
except ImportError:
    print("numba is not installed: this lesson needs it (pip install -e '.[numba]'). Nothing to run.")
    sys.exit(0)

import minielectra.kernels.numba_cpu  # noqa: F401  sets OMP_WAIT_POLICY before any parallel kernel runs (section 4)
from minielectra.kernels.numba_cpu import activations as k_act
from minielectra.kernels.numba_cpu import attention as k_attn
from minielectra.kernels.numba_cpu import layernorm as k_ln
from minielectra import backend, bench, config
from minielectra.ops import activations as ref_act
from minielectra.ops import attention as ref_attn
from minielectra.ops import layernorm as ref_ln

FIG_DIR = Path("lessons/figures/11_numba_kernels")
FIG_DIR.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
print(f"numba {numba.__version__}, {numba.get_num_threads()} threads")

# %% [markdown]
# ## 1. Count the memory passes
#
# Take bias + GELU, `out = gelu(x + b)` on x of shape (N, F). The reference (lesson 03) is
#
# ```
# h = x + b                        read x,       write h
# t = h / sqrt(2)                  read h,       write t
# t = erf(t)                       read t,       write t
# t = 1 + t;  s = 0.5 * t          read, write;  read, write      s = Phi(h), kept for the backward
# out = h * s                      read h and s, write out
# ```
#
# 7 reads and 6 writes of an (N, F) array: 13 passes over memory. The kernel loops over rows and, for each element,
# computes h, Phi(h), h Phi(h) and the slope gelu'(h) = Phi(h) + h phi(h) in registers: it reads x once and writes out
# and the slope once, 3 passes. Its backward is then dx = dout * slope, where the reference's recomputes
# phi(h) = exp(-h^2 / 2) / sqrt(2 pi) from x. The erf is most of the arithmetic; the kernel computes Phi with
# polynomials and an exp in plain float32 arithmetic, which the compiler turns into SIMD code, sixteen elements at a
# time, where a call to the C library's erf would run one element at a time (17x slower on one core, measured). Below
# the pass count for every op the kernels fuse, read off the reference code line by line, in MB at the shape of a real
# step.

# %%
N, C, F = 16 * 128, 128, 512  # tokens in a batch of 16 x 128, the tiny preset's width and FFN width
PASSES = [  # (op, elements per pass, reference passes, kernel passes); a pass = one read or write of an array
    ("bias+gelu forward", N * F, 7 + 6, 1 + 2),  # kernel: read x; write out, slope
    ("bias+gelu backward", N * F, 12 + 7, 2 + 1),  # kernel: read dout, slope; write dx (db: one small row per chunk)
    ("layernorm forward", N * C, 7 + 5, 1 + 2),  # kernel: read x; write y, xhat (a row of 512 B stays in L1)
    ("layernorm backward", N * C, 14 + 7, 2 + 1),  # kernel: read dout, xhat; write dx
]
print(f"{'op':<20} {'reference MB':>12} {'kernel MB':>10} {'ratio':>6}")
for name, n, ref_p, ker_p in PASSES:
    print(f"{name:<20} {n * 4 * ref_p / 1e6:>12.1f} {n * 4 * ker_p / 1e6:>10.1f} {ref_p / ker_p:>6.1f}")

# %% [markdown]
# A core can do tens of GFLOP/s with its vector units but streams only about 10 GB/s (2.5 G floats) from main memory,
# and GELU or layer norm do 5 to 20 FLOPs per element: they are **memory-bound**, so their time follows the MB column.
# The ratio is an upper bound on what fusing alone can win: arrays of a few MB partly stay in the L2/L3 caches.
# Section 5 measures what it wins here.
#
# ## 2. Same answers: checking a float32 kernel
#
# A kernel must compute what the reference computes. It cannot match it bit for bit: it sums a row in SIMD partial
# sums (section 8) while NumPy sums pairwise and BLAS in blocks, and float32 addition is not associative. So the
# check is `assert_allclose` with a float32 tolerance: a relative error of about 1e-5 (float32 has 7 significant
# digits, and a sum of 128 terms loses a few bits), plus an absolute floor for entries that cancel to near zero.

# %%
RTOL = 1e-5


def close(got, want, name):
    """float32 agreement: relative 1e-5, plus an absolute floor of 1e-5 times the array's scale."""
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max(), err_msg=name)


x = rng.standard_normal((4, 33, C)).astype(np.float32)
gamma = (1 + 0.1 * rng.standard_normal(C)).astype(np.float32)
beta = (0.1 * rng.standard_normal(C)).astype(np.float32)
dout = rng.standard_normal(x.shape).astype(np.float32)
y_ref, c_ref = ref_ln.layernorm_forward(x, gamma, beta)
y_ker, c_ker = k_ln.layernorm_forward(x, gamma, beta)
close(y_ker, y_ref, "layernorm y")
for name, g_ker, g_ref in zip(("dx", "dgamma", "dbeta"), k_ln.layernorm_backward(dout, c_ker),
                              ref_ln.layernorm_backward(dout, c_ref)):
    assert g_ker.dtype == np.float32
    close(g_ker, g_ref, f"layernorm {name}")

h = rng.standard_normal((4, 33, F)).astype(np.float32)
b = rng.standard_normal(F).astype(np.float32)
g = rng.standard_normal(h.shape).astype(np.float32)
o_ref, c_ref = ref_act.bias_gelu_forward(h, b)
o_ker, c_ker = k_act.bias_gelu_forward(h, b)
close(o_ker, o_ref, "bias_gelu out")
for name, g_ker, g_ref in zip(("dx", "db"), k_act.bias_gelu_backward(g, c_ker), ref_act.bias_gelu_backward(g, c_ref)):
    close(g_ker, g_ref, f"bias_gelu {name}")
print(f"layernorm and bias+GELU kernels agree with the reference (float32, rtol {RTOL})")

# %% [markdown]
# ## 3. The attention kernel
#
# The reference attention (lesson 05) makes one (B, H, T, T) pass each for the scale, the mask, the row max, the
# exponential, the row sum, the division, the dropout mask and its scale, and as many again in the backward. The
# kernel (`kernels/numba_cpu/attention.py`) is organised like this:
#
# - **one `prange` iteration per (batch, head)**: B·H independent problems, spread over the cores by Numba's thread
#   pool. Each iteration writes only its own (b, h) slices, so there are no races and no locks.
# - the iteration walks its queries in **blocks of rows** (`BR` = 256 in the kernel, 64 in the loop below):
#   `scores = q_blk kᵀ` goes to BLAS into a (BR, T) scratch block, and the softmax
#   runs in place on it, one row at a time: scale and mask while finding the row max, then `exp(s - max)` and the
#   sum, then the division. The max trick of lesson 02 keeps it stable; a row whose keys are all padding becomes
#   zeros, as in the reference. Then `out_blk = weights @ v` (BLAS).
# - **nothing (T, T) is kept** on long sequences: the cache holds q, k, v and, per query row, its max and its sum
#   (B, H, T). The backward redoes the same product on the same block and rebuilds each weight as `exp(s - max) / sum`,
#   the forward's very numbers, so memory grows linearly in T where the reference keeps `probs` and a dropout scale of
#   (B, H, T, T) each. `cache.probs` recomputes the weights when you want to plot them. Up to T = 128
#   (`KEEP_WEIGHTS_UP_TO`) a head's weights take no more memory than its q, k and v, and the forward keeps them and
#   the dropout's keep bits: the backward then skips that product, the exps and the hash.
# - **dropout is the reference's hashed mask**: one 64-bit seed drawn from the Generator, and keep(b, h, i, j) a hash
#   of the seed and the entry's flat index (`minielectra.ops.dropout.hashed_keep_mask`), computed inside the loops in
#   the forward and again in the backward. The reference and the CUDA kernel use the same hash, so the same Generator
#   state drops the same weights on every backend, and a seeded run is replayed exactly whichever backend it uses.
# - **each head is read and written where it lies**: q, k, v come from `mha_forward` as (B, H, T, D) views of the
#   (B, T, C) projections, a head's rows C entries apart. BLAS takes that row stride as its "leading dimension", so
#   the kernel calls BLAS's gemm on the head in place (`kernels/numba_cpu/_blas.py`; numba's `np.dot` would want a
#   contiguous copy) and writes out, dq, dk, dv in the same (B, T, H, D) layout, which merges back into (B, T, C)
#   with a reshape.
# - **BLAS runs single-threaded inside the `prange`** (threadpoolctl limits it for the call): the parallel loop already
#   keeps every core busy, and a multithreaded BLAS call from each of those threads would put several threads on each
#   core (2 to 3 times slower, measured).
#
# Here is one iteration written out in NumPy, run over every (b, h) in a plain loop, against the reference and the
# kernel, with a padding mask and dropout.

# %%
def kernel_iteration(q, k, v, keys, keep, p_drop, rows=64):
    """One prange iteration: q, k, v (T, D) of one (b, h); keys (T,) bool real tokens; keep (T, T) bool or None
    (the kernel hashes each bit where it needs it). Returns out (T, D) and the row max and sum it saves (T,)."""
    T, D = q.shape
    out, row_max, row_sum = np.empty_like(q), np.empty(T, q.dtype), np.empty(T, q.dtype)
    for r0 in range(0, T, rows):  # one (rows, T) scratch block at a time
        P = q[r0:r0 + rows] @ k.T  # scores
        P = np.where(keys, P * np.float32(1 / np.sqrt(D)), -np.inf)  # scale and mask (here: some real key in every row)
        row_max[r0:r0 + rows] = P.max(axis=1)
        P = np.exp(P - row_max[r0:r0 + rows, None])  # stable: the largest entry of each row is exp(0) = 1
        row_sum[r0:r0 + rows] = P.sum(axis=1)
        P = P / row_sum[r0:r0 + rows, None]  # the weights; the backward rebuilds them from row_max and row_sum
        if keep is not None:
            P = np.where(keep[r0:r0 + rows], P * np.float32(1 / (1 - p_drop)), 0)
        out[r0:r0 + rows] = P @ v
    return out, row_max, row_sum


B, H, T, D = 2, 2, 80, 16  # T = 80: two row blocks of the loop's 64
q, k, v = (rng.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(3))
mask = np.ones((B, T), np.int64)
mask[1, 25:] = 0  # the second sequence: 25 real tokens, 55 pads
p_drop = 0.1
out_ref, c_ref = ref_attn.attention_forward(q, k, v, mask, p_drop, np.random.default_rng(3))
out_ker, c_ker = k_attn.attention_forward(q, k, v, mask, p_drop, np.random.default_rng(3))
assert np.array_equal(c_ker.keep, c_ref.dropout.scale != 0)  # the very same dropout mask, rebuilt from one seed
assert T <= k_attn.KEEP_WEIGHTS_UP_TO and c_ker.weights is not None  # a short T: the forward kept its weights
out_loop = np.empty_like(out_ref)
for bb in range(B):
    for hh in range(H):
        out_loop[bb, hh], row_max, row_sum = kernel_iteration(q[bb, hh], k[bb, hh], v[bb, hh], mask[bb] != 0,
                                                              c_ker.keep[bb, hh], p_drop)
        close(row_max, c_ker.rowmax[bb, hh], "row max")
        close(row_sum, c_ker.rowsum[bb, hh], "row sum")
close(out_loop, out_ref, "attention: our loop vs reference")
close(out_ker, out_ref, "attention out")
close(c_ker.probs, c_ref.probs, "attention probs")
assert np.all(c_ker.probs[1][..., 25:] == 0)  # padded keys get exactly zero weight
dout = rng.standard_normal(q.shape).astype(np.float32)
for name, g_ker, g_ref in zip(("dq", "dk", "dv"), k_attn.attention_backward(dout, c_ker),
                              ref_attn.attention_backward(dout, c_ref)):
    close(g_ker, g_ref, f"attention {name}")
print(f"attention kernel: out, probs, dq, dk, dv agree with the reference (dropout {p_drop}, same mask); "
      f"{c_ker.keep.mean():.3f} of the weights kept")

# %% [markdown]
# ## 4. Threads that spin
#
# Numba's `prange` runs on an OpenMP thread pool (or TBB, or its own workqueue, whichever is installed). OpenMP's
# threads, by default, keep **spinning** for a while after a parallel loop ends, so the next loop starts without a
# wake-up. In a Transformer step the next thing is usually a matrix product, whose BLAS threads then compete with
# spinning threads for the same few cores: measured on two cores, a (4096, 128) @ (128, 512) product right after a
# tiny parallel kernel took 8.7 ms instead of 2.9 ms. `OMP_WAIT_POLICY=PASSIVE` makes the idle threads sleep at once
# (3.2 ms). The setting is read once, when Numba starts its threads (at the first parallel loop, or the first
# `numba.set_num_threads`), so `minielectra.kernels.numba_cpu` sets it on import and `backend.set_backend("numba")`
# imports it before anything else runs; a value you set yourself wins. Set too late, it is silently ignored: the training step's
# shard threads call `numba.set_num_threads` before any kernel is imported, and until the backend did this, the tiny
# preset's 2-core step ran with spinning threads, 126-131 ms instead of 118-120.

# %%
print("OMP_WAIT_POLICY =", os.environ.get("OMP_WAIT_POLICY"), "; Numba threading layer:", numba.threading_layer())

# %% [markdown]
# ## 5. How much faster?
#
# `minielectra.bench.bench_ops` times every op the kernels replace, reference and kernel side by side, on random
# inputs at the shapes of a training step (here the tiny preset at batch 8 x 128 tokens), forward and backward
# together, the median of a few calls. Under `backend.set_backend("numba")` the model's layers dispatch to these
# kernels; `minielectra bench --ops --backend numba` prints the same table. Times depend on your machine; compare
# the speed-ups of bias+GELU and layer norm with the ratios of section 1. On a machine busy with other work the
# times jump around (BLAS threads that must share cores slow down badly): rerun it when the machine is quiet.

# %%
backend.set_backend("numba")
model_config, train_config = config.preset("tiny")
t0 = time.perf_counter()
rows = bench.bench_ops(model_config, train_config, batch_size=8, seq_len=128, repeats=5)
print(bench.format_ops(rows))
print(f"({time.perf_counter() - t0:.1f} s)")
assert all(ker is not None for _, _, ker, _, _ in rows)  # every op has a Numba kernel
backend.set_backend("numpy")

fig, ax = plt.subplots(figsize=(7, 3.6))
names = [r[0] for r in rows]
speedups = [ref / ker for _, ref, ker, _, _ in rows]
ax.barh(names, speedups, color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
ax.axvline(1.0, color="k", lw=1)
ax.invert_yaxis()
ax.set_xlabel("speed-up of the Numba kernel over the reference (x)")
ax.set_title("tiny preset, batch 8 x 128 tokens, forward + backward")
fig.tight_layout()
path = FIG_DIR / "speedups.png"
fig.savefig(path, dpi=110)
plt.close(fig)
print("saved", path)

# %% [markdown]
# ## 6. Two cores, two shards: data parallelism
#
# Fusing made the small ops cheap, but a small model's ops are also too *small to split*: a (4096, 128) @ (128, 128)
# product or a layer norm over 128 channels leaves the second core waiting for its share more often than working.
# Splitting **the batch** instead gives each core a whole, independent piece of work: `minielectra/parallel.py`
# cuts every batch into shards, runs each shard's forward and backward on a thread of its own (BLAS and the kernels
# release Python's lock, so the threads really run at once, and they read the same params without copies), and adds
# up the gradients before the one AdamW update.
#
# The sum must be the whole batch's gradient, not an average of averages. ELECTRA's two losses are means over
# different things: the MLM loss over the N picked positions, the RTD loss over the R real tokens, and a shard
# holds its own N_i and R_i. So shard i's backward is weighted by its **share**, N_i / N for the MLM term and
# R_i / R for the RTD term, and the weighted shard losses add up to exactly the batch means. A gradient check proves
# it: the summed shard gradients are the gradient of the combined loss (tests/test_parallel.py does every parameter).

# %%
from minielectra import electra, gradcheck, parallel  # noqa: E402
from minielectra.config import ElectraConfig  # noqa: E402

small = ElectraConfig(vocab_size=23, embedding_size=6, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=12, generator_hidden_size=4, generator_num_attention_heads=1,
                      generator_intermediate_size=8, max_position_embeddings=16, mask_prob=0.3)
p64 = electra.init_model(small, np.random.default_rng(0), np.float64)
ids = np.random.default_rng(1).integers(5, 23, (6, 9))
ids[:, 0], ids[:, -1] = 2, 3
mask = np.ones_like(ids)
ids[5, 4:], mask[5, 4:] = 0, 0  # the last sequence is short: [CLS] w w w [PAD]..., so the last shard has fewer picks
ids[5, 3] = 3
batch6 = (ids, mask)
losses, _, grads, outs = parallel.loss_and_grads(electra, p64, batch6, small, np.random.default_rng(7), shards=3,
                                                 threads=2)
picks = [o.counts["mlm_loss"] for o in outs]
print("picked positions per shard", picks, "-> MLM shares", [round(n / sum(picks), 3) for n in picks])
samples = [o.samples for o in outs]  # replayed, so that a nudge of the weights cannot change a sampled word


def sharded_loss():
    return parallel.loss_and_grads(electra, p64, batch6, small, np.random.default_rng(7), shards=3,
                                   samples=samples)[0]["loss"]


word_rows = gradcheck.check_backward(sharded_loss, p64[electra.WORDS], grads[electra.WORDS], "word table")
print(f"shared word table: relative error {word_rows.rel_error:.1e} between the summed shard gradients and "
      "finite differences of the combined loss")
assert word_rows.rel_error < 1e-7

# %% [markdown]
# What it buys, on the tiny preset at batch 32 x 128 (measured on 2 cores with `minielectra bench --shards 1` and
# `--shards 2`): the Numba backend goes from 15,700 to 23,500 tokens/s, the NumPy reference from 11,000 to 16,800.
# Each shard runs with one BLAS thread, so the two threads never compete for a core. A run's numbers depend on its
# shard count (each shard draws its own masks and dropout), never on the number of threads; `pretrain` picks one
# shard per core and saves the count with the run, so a resumed run continues exactly. On a GPU a run keeps one
# shard: one stream already runs the whole batch.
#
# The threads share one thing the cores do not make faster: Python's lock. Between its BLAS calls and kernels each
# thread runs Python (the op wrappers, their checks, the reshapes), one thread at a time, and every kernel or BLAS call
# is a moment where a thread lets go of the lock and must win it back, maybe waiting for the other. Measured on the
# tiny preset, one 16 x 128 shard a step each, 2 cores: one shard alone 105-106 ms a step; two processes side by side
# 107-111 ms (they share the caches and the memory bandwidth); two threads of one process 113-114 ms. The NumPy
# reference, which runs far more Python a step: 189, 196-200 and 223-228 ms. So the Numba backend keeps Python out of
# the step where it can: one call per linear layer (`kernels/numba_cpu/linear.py`) and, with the params, gradients
# and Adam's moments laid out as views of one buffer each (`minielectra/flat.py`), one call each to add up the
# shards' gradients, to clip them and to update.

# %% [markdown]
# ## 7. Outside the kernels: the BLAS and the allocator
#
# Two things no kernel controls set much of a step's time.
#
# **Which GEMM code runs.** NumPy's OpenBLAS carries GEMM kernels for many CPU generations and picks one when it
# loads. On a CPU with AVX-512 its AVX-512 kernels do twice the multiply-adds per cycle of its AVX2 ones, and the
# environment variable `OPENBLAS_CORETYPE` can pin either. The GEMMs are about half of a step, so on 2 cores of a
# Zen 5 the tiny preset ran 17,300-17,800 tokens/s on numba with the AVX2 kernels and 22,100-24,800 with the AVX-512
# ones, while MFU went *down* (0.52 -> 0.36-0.40), measured against a GEMM rate that doubled: the kernels of this
# lesson save the same milliseconds, now a smaller share of the step. Every command's first line names the library
# and its kernels:

# %%
print("BLAS:", backend.blas_library())

# %% [markdown]
# **Where each array's memory comes from.** A step allocates and frees hundreds of arrays of 0.1 to 10 MB. glibc's
# malloc hands large freed blocks back to the system, and memory that comes back from the system arrives as zeroed
# pages, each 4 KB of it a page fault on first touch. So by default every step faults its temporaries in again. The
# CLI tells malloc to keep freed memory for the next arrays (`minielectra/allocator.py`); on the tiny preset the page
# faults of a benchmark fell from 1.18 M to 77 k for the NumPy reference and 420 k to 90 k for numba, and tokens/s rose
# by 25 % and 11 %. The setting cannot be undone in a process, so the probe runs in fresh ones: twenty 200 KB arrays,
# four rounds, page faults per round.

# %%
import platform  # noqa: E402
import subprocess  # noqa: E402

PROBE = ("import sys; from minielectra import allocator; keep = sys.argv[1] == 'keep'; "
         "assert not keep or allocator.keep_freed_memory(); print(*allocator.faults_per_round())")
if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
        print(f"{mode:>8}: page faults per round {out.stdout.split()}")
else:
    print("the allocator probe needs Linux with glibc")

# %% [markdown]
# ## 8. What keeps a loop scalar
#
# A kernel is fast when LLVM turns its inner loop into SIMD code: 8 or 16 float32 lanes per instruction. Two ordinary
# ways of writing a loop stop it, and neither shows in the results, only in the time.
#
# **A sum in order.** A running sum is a chain of additions, each waiting for the one before. Float addition is not
# associative, so LLVM keeps the order written, one lane at a time. Four partial sums written by hand let the CPU run
# four chains side by side (and a loop counting blocks, `for b in range(T // 4): j = 4 * b`, lets LLVM unroll it; a
# range stepped by four does not), but each is still one lane. Numba's `fastmath={"reassoc"}` allows reordering, and
# LLVM then keeps 16-lane partial sums in vector registers. The row reductions of every kernel (`_common.row_sum`,
# `row_dot`) are compiled this way: the order of their additions, and so the last bits of their results, is LLVM's,
# the same on every run of one machine. The max is exact in any order; `_common.row_max` uses LLVM's `maxnum`, which
# vectorises where Python's `max` (a compare and a branch) does not.
#
# **A division that may raise.** Numba's default `error_model="python"` checks every division for a zero divisor to
# raise ZeroDivisionError, and that branch keeps the loop scalar. `error_model="numpy"` returns inf or NaN as NumPy
# does (what the reference does anyway): a loop of (x - 1) / (x + 1) went from 1.03 to 0.16 ns per entry. The Gumbel
# sampler divides every logit by the temperature; it is compiled this way.

# %%
from numba import njit  # noqa: E402


def dot_in_order(x, y):
    s = np.float32(0)
    for j in range(x.size):
        s += x[j] * y[j]
    return s


@njit
def dot_four_chains(x, y):
    s0 = s1 = s2 = s3 = np.float32(0)
    for b in range(x.size // 4):
        j = 4 * b
        s0 += x[j] * y[j]
        s1 += x[j + 1] * y[j + 1]
        s2 += x[j + 2] * y[j + 2]
        s3 += x[j + 3] * y[j + 3]
    return (s0 + s1) + (s2 + s3)


dot_one_chain, dot_simd = njit(dot_in_order), njit(fastmath={"reassoc"})(dot_in_order)


def ratio(x, out):
    for i in range(x.size):
        out[i] = (x[i] - 1.0) / (x[i] + 1.0)


ratio_python, ratio_numpy = njit(ratio), njit(error_model="numpy")(ratio)

x8 = np.random.default_rng(3).standard_normal(1 << 16).astype(np.float32)  # 256 KB: in cache, as a kernel's rows
y8, out8 = x8[::-1].copy(), np.empty_like(x8)
exact = float(x8.astype(np.float64) @ y8.astype(np.float64))
for name, fn in (("dot, one chain", lambda: dot_one_chain(x8, y8)),
                 ("dot, four chains", lambda: dot_four_chains(x8, y8)),
                 ("dot, reassoc (SIMD)", lambda: dot_simd(x8, y8)),
                 ("divide, error_model python", lambda: ratio_python(x8, out8)),
                 ("divide, error_model numpy", lambda: ratio_numpy(x8, out8))):
    result = fn()  # compile
    t = time.perf_counter()
    for _ in range(200):
        fn()
    took = f"{(time.perf_counter() - t) / 200 / x8.size * 1e9:.3f} ns per entry"
    print(f"{name:<28} {took}" + (f"   relative error {abs(result - exact) / abs(exact):.1e}" if "dot" in name else ""))

# %% [markdown]
# ## The kernels' backward passes, checked against their own forwards
#
# Agreeing with the reference is one proof; the other is the one every reference op gets. The kernels compile for
# float64 as well, so the same centred finite differences apply: perturb an input, run the *kernel's* forward twice,
# and compare with the *kernel's* backward. Dropout stays on, with the mask redrawn from the same seed every call.

# %%
from minielectra.gradcheck import check_op, format_table  # noqa: E402

r = np.random.default_rng(0)
q64, k64, v64 = (r.standard_normal((2, 2, 5, 3)) for _ in range(3))  # (B, H, T, D)
pad = np.ones((2, 5))
pad[1, 3:] = 0  # the second sequence ends in two pads
rows_k = check_op(lambda q, k, v: k_attn.attention_forward(q, k, v, pad, 0.1, np.random.default_rng(1)),
                  k_attn.attention_backward, dict(q=q64, k=k64, v=v64), ["q", "k", "v"])
rows_k += check_op(lambda x, gamma, beta: k_ln.layernorm_forward(x, gamma, beta), k_ln.layernorm_backward,
                   dict(x=r.standard_normal((6, 7)), gamma=r.standard_normal(7), beta=r.standard_normal(7)),
                   ["x", "gamma", "beta"])
rows_k += check_op(lambda x, b: k_act.bias_gelu_forward(x, b), k_act.bias_gelu_backward,
                   dict(x=r.standard_normal((6, 9)), b=r.standard_normal(9)), ["x", "b"])
rows_k += check_op(lambda x, residual, gamma, beta: k_ln.dropout_add_layernorm_forward(
    x, residual, gamma, beta, 0.3, np.random.default_rng(2)), k_ln.dropout_add_layernorm_backward,
    dict(x=r.standard_normal((6, 7)), residual=r.standard_normal((6, 7)), gamma=r.standard_normal(7),
         beta=r.standard_normal(7)), ["x", "residual", "gamma", "beta"])
print(format_table(rows_k, title="Numba kernels, float64, against their own forwards"))
assert all(row.ok for row in rows_k)

# %% [markdown]
# ## Where next
#
# Lesson 12 moves attention to a GPU, where one kernel launch must keep thousands of threads busy: the online
# softmax, tile by tile, takes the place of this kernel's blocks of whole rows.
