# %% [markdown]
# # 12 · CUDA kernels: attention without the T × T matrix
#
# On a GPU the matrix products are fast enough that attention's real cost is **memory**: the reference keeps the
# weights `probs` (B, H, T, T) of every layer for the backward, and with dropout a mask of the same size. That grows
# with the square of the sequence length. The CUDA attention kernel (`kernels/cupy_gpu/attention.cu`) computes exactly
# the same outputs and gradients while storing, per query row, **one number**: the log-sum-exp of its scores. This is
# the idea of FlashAttention (Dao et al. 2022), and the heart of it is a softmax computed in one pass, tile by tile.
#
# **You will learn**
# - the online softmax: a running max `m`, a running sum `l` and a rescaled accumulator, and why it is exact;
# - how the kernel walks the keys in tiles through shared memory while each thread keeps its query row in registers;
# - why saving `lse = m + log l` is all the backward needs: it recomputes every probability as `exp(s - lse)`;
# - how much memory that saves (a plot), and how dropout works without storing a mask;
# - on a machine with a GPU, the kernel checked against the reference; without one, the kernel compiled with `nvcc`
#   and run on the CPU emulator that the tests use.
#
# Run it: `python lessons/12_cuda_kernels.py` (a GPU is optional; without one, about half a minute, most of it
# compiling `attention.cu`).

# %%
import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from minielectra.kernels.cupy_gpu import _common
from minielectra.kernels.cupy_gpu import attention as k_attn
from minielectra import backend
from minielectra.ops import attention as ref_attn
from minielectra.ops.dropout import drop_threshold, hashed_keep_mask

FIG_DIR = Path("lessons/figures/12_cuda_kernels")
FIG_DIR.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The online softmax
#
# Take one query row with scores `s_1 .. s_T` (scaled by 1/sqrt(D); a padded key's score is -inf). Its output is
#
# ```
# out = sum_j exp(s_j - M) v_j  /  sum_j exp(s_j - M)        M = max_j s_j   (the max trick of lesson 02)
# ```
#
# which seems to need every score before the first exponential, for M. It does not. Walk the keys in tiles, keeping
# three things: `m`, the largest score seen so far; `l`, the sum of `exp(s_j - m)` over the keys seen; and `acc`, the
# sum of `exp(s_j - m) v_j`. When a tile J arrives:
#
# ```
# m'   = max(m, max_J s_j)
# l'   = l   * exp(m - m') + sum_J exp(s_j - m')
# acc' = acc * exp(m - m') + sum_J exp(s_j - m') v_j
# ```
#
# Multiplying by `exp(m - m')` re-expresses everything summed so far against the new max, so after the last tile `l`
# and `acc` are exactly the sums above with m = M, and `out = acc / l`. Nothing is approximated; only the order of the
# additions changes. And one more number falls out for free: `lse = m + log l = log sum_j exp(s_j)`, the log of the
# softmax's denominator, so that `p_j = exp(s_j - lse)`.
#
# ## 2. Tile by tile, as the kernel does it
#
# The kernel's grid has one block per (batch·head, group of BR = 64 query rows), one thread per query row:
#
# - each thread loads **its query row into registers** (`float qr[MAXD]`, and its accumulator `o[MAXD]`), once;
# - the block walks the keys in tiles of BC = 32: all threads together copy the tile's K and V rows into **shared
#   memory** (`__syncthreads()` before and after), then every thread computes its 32 scores against them and updates
#   its own `m`, `l`, `o`. Each K and V row is read from global memory once per block, not once per query;
# - at the end each thread writes `out = o / l` and `lse = m + log l`; a row with no real key writes zeros and
#   `lse = +inf`, so that `exp(s - lse)` is 0 for all of it later.
#
# Inside a tile the kernel goes one key at a time and rescales only when a key raises the max; the NumPy version below
# does a whole tile per step, for all the rows of a block at once. Same formulas, same result. We check it on float64
# inputs against the reference `attention_forward`, with T = 100 (so the last tiles are partial), one padded
# sequence, and one sequence that is all padding.

# %%
BR, BC = k_attn.BR, k_attn.BC  # 64 query rows per block, 32 keys per shared-memory tile


def flash_forward(q, k, v, mask):
    """q, k, v (B, H, T, D), mask (B, T) -> out (B, H, T, D), lse (B, H, T); never more than a (BR, BC) score tile."""
    B, H, T, D = q.shape
    scale = 1 / math.sqrt(D)
    keys = mask != 0  # (B, T)
    out = np.zeros_like(q)
    lse = np.full((B, H, T), np.inf)
    for b in range(B):
        for h in range(H):  # blockIdx.x: one (b, h)
            for i0 in range(0, T, BR):  # blockIdx.y: BR query rows, one thread each
                qi = q[b, h, i0:i0 + BR]  # (br, D): each thread's row, in registers
                m = np.full(len(qi), -np.inf)  # (br,) running max
                l = np.zeros(len(qi))  # (br,) running sum
                acc = np.zeros((len(qi), D))  # (br, D) running sum of weights times v
                for j0 in range(0, T, BC):  # the K and V tiles, staged in shared memory
                    kj, vj = k[b, h, j0:j0 + BC], v[b, h, j0:j0 + BC]  # (bc, D)
                    s = np.where(keys[b, j0:j0 + BC], qi @ kj.T * scale, -np.inf)  # (br, bc)
                    m_new = np.maximum(m, s.max(axis=1))
                    shift = np.where(np.isfinite(m_new), m_new, 0.0)  # no real key seen yet: nothing to rescale
                    corr = np.exp(m - shift)  # (br,) exp(m - m'); 0 while m was -inf
                    p = np.exp(s - shift[:, None])  # (br, bc), 0 at padded keys
                    l = l * corr + p.sum(axis=1)
                    acc = acc * corr[:, None] + p @ vj
                    m = m_new
                seen = l > 0  # rows with at least one real key
                out[b, h, i0:i0 + BR][seen] = acc[seen] / l[seen, None]
                lse[b, h, i0:i0 + BR][seen] = m[seen] + np.log(l[seen])
    return out, lse


B, H, T, D = 3, 2, 100, 16
q, k, v = (rng.standard_normal((B, H, T, D)) for _ in range(3))
mask = np.ones((B, T), np.int64)
mask[1, 70:] = 0  # 70 real tokens, 30 pads
mask[2, :] = 0  # an empty sequence: every key is padding
out, lse = flash_forward(q, k, v, mask)
out_ref, c_ref = ref_attn.attention_forward(q, k, v, mask)
np.testing.assert_allclose(out, out_ref, rtol=1e-12, atol=1e-14)
assert np.all(out[2] == 0) and np.all(np.isinf(lse[2]))
print("tiled online softmax == reference attention_forward; out", out.shape, "lse", lse.shape)

# %% [markdown]
# ## 3. The backward recomputes the weights
#
# The reference backward reads `probs` from its cache. The kernel's backward rebuilds each one from q, k and the saved
# lse, `p_ij = exp(s_ij - lse_i)`, in the same tiles, right where it is needed. The rest is the backward of lesson 05,
# with one shortcut: the softmax backward's row term `sum_j p_ij dp_ij` equals `dout_i · out_i` (because
# `out_i = sum_j p_ij v_j` and `dp_ij = dout_i · v_j`), a (B, H, T) vector computed once before the kernels run:
#
# ```
# p  = exp(q kᵀ · scale - lse)        recomputed, tile by tile
# dp = dout vᵀ;   delta = rowsum(dout * out)
# ds = p * (dp - delta)
# dq = ds k · scale     dk = dsᵀ q · scale     dv = pᵀ dout
# ```
#
# `dq` sums over keys and `dk`, `dv` over queries, so the kernel splits the backward in two: one kernel with a thread
# per **query** row walking the K, V tiles (dq), one with a thread per **key** row walking the Q, dout tiles (dk and
# dv). Every thread owns the row it writes: no atomics, and the sums run in a fixed order. Below, dense for brevity.

# %%
scale = 1 / math.sqrt(D)
s = np.where((mask != 0)[:, None, None, :], q @ k.swapaxes(-1, -2) * scale, -np.inf)  # (B, H, T, T)
p = np.exp(s - lse[..., None])  # 0 at padded keys, and in the empty sequence (lse = +inf)
np.testing.assert_allclose(p, c_ref.probs, rtol=1e-12, atol=1e-15)
dout = rng.standard_normal(q.shape)
delta = (dout * out).sum(axis=-1, keepdims=True)  # (B, H, T, 1)
ds = p * (dout @ v.swapaxes(-1, -2) - delta)
grads = (ds @ k * scale, ds.swapaxes(-1, -2) @ q * scale, p.swapaxes(-1, -2) @ dout)
for name, g, g_ref in zip(("dq", "dk", "dv"), grads, ref_attn.attention_backward(dout, c_ref)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-12, err_msg=name)
print("probabilities from lse == reference probs; dq, dk, dv from them == reference attention_backward")

# %% [markdown]
# Agreeing with the reference is one proof; the other is the one every op in this project gets: the lse-based
# backward against finite differences of its *own* tiled forward, in float64, with a padded sequence.

# %%
from minielectra.gradcheck import check_op, format_table  # noqa: E402

small_mask = np.ones((2, 7), np.int64)
small_mask[1, 4:] = 0  # three pads


def flash_op_forward(q, k, v):
    out, lse = flash_forward(q, k, v, small_mask)
    return out, (q, k, v, out, lse)


def flash_op_backward(dout, cache):
    q, k, v, out, lse = cache
    sc = 1 / math.sqrt(q.shape[-1])
    s = np.where((small_mask != 0)[:, None, None, :], q @ k.swapaxes(-1, -2) * sc, -np.inf)
    p = np.exp(s - lse[..., None])  # recomputed from lse, never stored
    ds = p * (dout @ v.swapaxes(-1, -2) - (dout * out).sum(axis=-1, keepdims=True))
    return ds @ k * sc, ds.swapaxes(-1, -2) @ q * sc, p.swapaxes(-1, -2) @ dout


qs, ks, vs = (rng.standard_normal((2, 2, 7, 3)) for _ in range(3))  # T = 7: not a multiple of the tiles
rows = check_op(flash_op_forward, flash_op_backward, dict(q=qs, k=ks, v=vs), ["q", "k", "v"])
print(format_table(rows, title="tiled forward + lse-recompute backward, float64"))
assert all(row.ok for row in rows)

# %% [markdown]
# ## 4. Memory
#
# Per (batch, head), the reference's attention core keeps q, k, v, out (4·T·D numbers) and `probs` (T²), plus, with
# dropout on, the dropout scale (another T²). The kernel keeps q, k, v, out and lse (T). For ELECTRA-Small's
# pre-training shape (batch 128, 4 heads, T = 128, 12 layers) and for a long-document shape:

# %%
def attention_bytes(B, H, T, D, layers, flash, dropout=True):
    """float32 bytes the attention cores keep for the backward."""
    per_head = 4 * T * D + (T if flash else (2 if dropout else 1) * T * T)
    return 4 * B * H * per_head * layers


for B_, T_ in ((128, 128), (8, 4096)):
    ref_b, flash_b = (attention_bytes(B_, 4, T_, 64, 12, f) for f in (False, True))
    square = 4 * B_ * 4 * 2 * T_ * T_ * 12  # probs and dropout scale
    print(f"batch {B_:>3}, T {T_:>4}: reference {ref_b / 2**30:6.2f} GiB, kernel {flash_b / 2**30:6.2f} GiB "
          f"(the T x T part: {square / 2**30:.2f} GiB; lse: {4 * B_ * 4 * T_ * 12 / 2**20:.2f} MiB)")

Ts = 2 ** np.arange(6, 15)
fig, ax = plt.subplots(figsize=(7, 4.2))
ax.loglog(Ts, [4 * 2 * t * t for t in Ts], "o-", label="reference: probs + dropout scale (2 T² floats)")
ax.loglog(Ts, [4 * t for t in Ts], "s-", label="kernel: lse (T floats)")
ax.loglog(Ts, [4 * 4 * t * 64 for t in Ts], "k:", label="both: q, k, v, out (4 T D floats, D = 64)")
ax.set_xlabel("sequence length T")
ax.set_ylabel("bytes kept per (batch, head)")
ax.set_title("what attention keeps for its backward")
ax.legend(fontsize=8)
fig.tight_layout()
path = FIG_DIR / "attention_memory.png"
fig.savefig(path, dpi=110)
plt.close(fig)
print("saved", path)

# %% [markdown]
# ## 5. Dropout without a mask
#
# The reference keeps its (B, H, T, T) dropout scale for the backward. The kernel cannot: storing it would undo
# section 4. What makes that possible is how the mask is drawn: **one** 64-bit seed from the Generator, and each
# keep(b, h, i, j) a counter-based hash (splitmix64) of the seed and the flat index, kept when the hash's top 24 bits
# are at least `ceil(p · 2²⁴)`. Any entry can be recomputed from the seed alone, so the forward and both backward
# kernels compute the same bits, the gradient is exact for the mask used, and no mask is stored. The reference and the
# Numba kernel draw the mask the same way (`minielectra.ops.dropout.hashed_keep_mask`), so the same Generator state
# drops the same weights on every backend; on the host:

# %%
p_drop = 0.1
threshold = drop_threshold(p_drop)
keep = hashed_keep_mask(np, 12345, (2, 2, 64, 64), threshold)  # (B, H, T, T) bool
assert np.array_equal(keep, hashed_keep_mask(np, 12345, (2, 2, 64, 64), threshold))  # a pure function of the seed
print(f"threshold {threshold} of 2^24; kept {keep.mean():.4f} of {keep.size} weights (expected {1 - p_drop})")
assert abs(keep.mean() - (1 - p_drop)) < 0.01

# %% [markdown]
# ## 6. The real kernel
#
# With a GPU (CuPy installed and a device visible) we run `kernels/cupy_gpu/attention.py`, which compiles
# `attention.cu` with NVRTC on first use, and compare it with the reference in float32. Without one we do the next
# best things: compile the source with `nvcc` to PTX (the GPU's assembly), and run the very same source and launcher
# on the CPU **emulator** the tests use (`kernels/cupy_gpu/emulator.py`: g++ builds it, and each CUDA thread becomes an
# OS thread, so only small shapes). PTX is as far as `nvcc -ptx` goes: the register and shared-memory report of
# `-Xptxas -v` comes from ptxas, which runs only when compiling on to machine code (`nvcc -cubin -Xptxas -v`).

# %%
def compare_kernel(to_device, to_host, B, H, T, D, lengths):
    """The CUDA attention (forward and backward) on float32 inputs against the float32 reference, and its lse
    against the float64 NumPy version of section 2."""
    r = np.random.default_rng(1)
    q32, k32, v32, g32 = (r.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(4))
    m = (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(np.int64)  # (B, T)
    out_k, cache = k_attn.attention_forward(*(to_device(a) for a in (q32, k32, v32, m)))
    grads_k = k_attn.attention_backward(to_device(g32), cache)
    out_r, c_r = ref_attn.attention_forward(q32, k32, v32, m)
    grads_r = ref_attn.attention_backward(g32, c_r)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out_k, *grads_k), (out_r, *grads_r)):
        got = to_host(got)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=name)
    _, lse64 = flash_forward(*(a.astype(np.float64) for a in (q32, k32, v32)), m)
    np.testing.assert_allclose(to_host(cache.lse), lse64, rtol=1e-5, atol=1e-5)
    print(f"  (B, H, T, D) = {(B, H, T, D)}, lengths {lengths}: out, dq, dk, dv match the reference (float32); "
          f"the cache holds lse {tuple(cache.lse.shape)}, {cache.lse.nbytes} bytes, instead of probs "
          f"({B}, {H}, {T}, {T}), {4 * B * H * T * T} bytes")


if backend.gpu_usable():
    import cupy

    print("GPU:", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())
    t0 = time.perf_counter()
    compare_kernel(cupy.asarray, cupy.asnumpy, 4, 4, 300, 64, [300, 257, 64, 1])
    compare_kernel(cupy.asarray, cupy.asnumpy, 2, 2, 1000, 32, [1000, 999])
    print(f"CUDA attention kernel checked on the GPU ({time.perf_counter() - t0:.1f} s, NVRTC compile included)")
else:
    print("no usable GPU here (CuPy missing, or no CUDA device): compiling and emulating instead")
    source = _common.HERE / "attention.cu"
    if shutil.which("nvcc"):
        with tempfile.TemporaryDirectory() as tmp:
            ptx_path = Path(tmp) / "attention.ptx"
            cmd = ["nvcc", "-ptx", "-arch=sm_80", *_common.NVRTC_OPTIONS, str(source), "-o", str(ptx_path)]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            print("$", " ".join(cmd[:-2]), "-o attention.ptx", f"({time.perf_counter() - t0:.1f} s)")
            assert done.returncode == 0, done.stderr
            ptx = ptx_path.read_text()
        header = [line for line in ptx.splitlines() if line.startswith((".version", ".target", ".address_size"))]
        entries = [line.split()[-1].rstrip("(") for line in ptx.splitlines() if ".entry" in line]
        print("\n".join(header))
        print(f"{len(entries)} kernels (.entry), one per head-size instance MAXD = 32, 64, 128:")
        for e in entries:
            print("  ", e)
        assert {"attention_forward_d64", "attention_backward_dq_d64", "attention_backward_dkdv_d64"} <= set(entries)
    else:
        print("nvcc is not on PATH (it comes with the CUDA toolkit): skipping the PTX compile")
    if shutil.which("g++"):
        from minielectra.kernels.cupy_gpu.emulator import EmulatorRuntime

        t0 = time.perf_counter()
        with _common.using(EmulatorRuntime()):
            compare_kernel(lambda a: a, lambda a: a, 2, 1, 70, 8, [70, 33])  # 2 row blocks, 3 key tiles
        print(f"attention.cu on the CPU emulator ({time.perf_counter() - t0:.1f} s, g++ build included)")
    else:
        print("g++ is not installed: skipping the CPU emulator")

# %% [markdown]
# ## Where next
#
# The other CUDA kernels (`layernorm.cu`, `activations.cu`, `losses.cu`, `embedding.cu`, `optim.cu`) fuse the same ops
# as lesson 11's Numba kernels, one thread per element or one block per row. `MINIELECTRA_BACKEND=cupy` (or
# `--backend cupy`) runs training on them; `minielectra bench --ops --backend cupy` times them against the CuPy
# reference.
