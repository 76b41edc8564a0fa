"""Shared launcher machinery of the CUDA kernels: sources compiled once per process, checked launches, and the runtime.

The runtime is what a launcher launches on. By default it is CuPy: `kernel(op, name)` returns a function of a
`cupy.RawModule` compiled from `<op>.cu` with NVRTC on first use and cached (functools.lru_cache) for the process.
Tests on machines without a GPU swap in the CPU emulator (kernels/cupy_gpu/emulator.py) with `using(...)`: the same
launchers then run the same .cu sources on NumPy arrays. Everything here except `CupyRuntime`'s methods is pure Python
and imports no CuPy, so argument checking works (and is tested) without a GPU.

Every launch goes through `launch`, which checks the grid, block and shared-memory sizes before launching (a bad
configuration is a ValueError naming the kernel, not a CUDA error later), and CuPy's RawKernel raises
CUDADriverError when the driver refuses a launch. Errors inside a running kernel surface at the next synchronising
call; set MINIELECTRA_CUDA_SYNC=1 to synchronise after every launch, so they surface at the launch that caused them.
"""

import contextlib
import functools
import math
import os
import pathlib

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
NVRTC_OPTIONS = ("--std=c++17",)
MAX_THREADS_PER_BLOCK = 1024
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_SHARED_BYTES = 48 * 1024  # dynamic shared memory available without opting in per kernel
MAX_GRID_STRIDE_BLOCKS = 8192  # grid-stride kernels launch at most this many blocks; each then loops
N_PARTIALS = 64  # row blocks of a column reduction (dgamma, dbeta, db): fixed, so the summation order is too


def source(op):
    """The CUDA source of kernels/cupy_gpu/<op>.cu."""
    return (HERE / f"{op}.cu").read_text()


@functools.lru_cache(maxsize=None)
def _raw_module(op):
    import cupy

    return cupy.RawModule(code=source(op), options=NVRTC_OPTIONS)


class CupyRuntime:
    """Launches on the current CUDA device through CuPy."""

    name = "cupy"

    @property
    def xp(self):
        import cupy

        return cupy

    def accepts(self, a):
        return type(a).__module__.startswith("cupy")

    def kernel(self, op, name):
        return _raw_module(op).get_function(name)

    def ptr(self, a):
        return a.data.ptr

    def after_launch(self):
        if os.environ.get("MINIELECTRA_CUDA_SYNC"):
            import cupy

            cupy.cuda.get_current_stream().synchronize()


_runtimes = [CupyRuntime()]


def runtime():
    """The runtime launches go to (CuPy unless a test has swapped in the emulator)."""
    return _runtimes[-1]


@contextlib.contextmanager
def using(rt):
    """Run the launchers on `rt` inside the with block."""
    _runtimes.append(rt)
    try:
        yield rt
    finally:
        _runtimes.remove(rt)


def _dims(name, dims, what):
    dims = tuple(int(d) for d in dims)
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"{name}: {what} must have 1 to 3 dimensions, got {dims}")
    return dims + (1,) * (3 - len(dims))


def check_launch(name, grid, block, shared_mem=0):
    """(grid, block) as 3-tuples, after checking them against the CUDA limits; ValueError naming the kernel if not."""
    grid, block = _dims(name, grid, "grid"), _dims(name, block, "block")
    if any(g < 1 or g > m for g, m in zip(grid, MAX_GRID)):
        raise ValueError(f"{name}: grid {grid} outside the CUDA limits 1..{MAX_GRID}")
    if min(block) < 1 or math.prod(block) > MAX_THREADS_PER_BLOCK:
        raise ValueError(f"{name}: block {block} must have 1..{MAX_THREADS_PER_BLOCK} threads")
    if not 0 <= shared_mem <= MAX_SHARED_BYTES:
        raise ValueError(f"{name}: {shared_mem} bytes of dynamic shared memory, more than {MAX_SHARED_BYTES}")
    return grid, block


def launch(op, name, grid, block, args, shared_mem=0):
    """Launch kernel `name` of <op>.cu with scalars already typed (np.int32, np.float32, ...); checked (see module doc)."""
    grid, block = check_launch(name, grid, block, shared_mem)
    for i, a in enumerate(args):
        if isinstance(a, (bool, int, float)) and not isinstance(a, np.generic):
            raise TypeError(f"{name}: argument {i} is a Python {type(a).__name__}; pass a sized NumPy scalar "
                            "(np.int32, np.int64, np.float32, ...) so the kernel gets the type it declares")
    rt = runtime()
    rt.kernel(op, name)(grid, block, tuple(args), shared_mem=int(shared_mem))
    rt.after_launch()


def blocks_for(n, threads, cap=MAX_GRID_STRIDE_BLOCKS):
    """Blocks of `threads` threads covering n items, at most `cap` (the kernels loop over the rest); at least 1."""
    return max(1, min(cap, -(-int(n) // threads)))


def n_partials(rows):
    """How many row blocks a deterministic column reduction over `rows` rows uses."""
    return max(1, min(int(rows), N_PARTIALS))


def float_dtype(*arrays):
    """The dtype the reference computes in (NumPy promotion of the inputs' dtypes), which must be float32 or float64."""
    dt = np.result_type(*(a.dtype for a in arrays))
    if dt not in (np.float32, np.float64):
        raise TypeError(f"expected float32 or float64 inputs, got {', '.join(str(a.dtype) for a in arrays)}")
    return np.dtype(dt)


def suffix(dtype):
    """The kernel-name suffix of a dtype: 'f32' or 'f64'."""
    return {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}[np.dtype(dtype)]


def require_device_arrays(fn, reference, **arrays):
    """Every named array must belong to the runtime (CuPy arrays on the GPU); a clear TypeError otherwise."""
    rt = runtime()
    for name, a in arrays.items():
        if a is not None and not rt.accepts(a):
            raise TypeError(f"minielectra.kernels.cupy_gpu {fn}: {name} is a "
                            f"{type(a).__module__}.{type(a).__name__}, but the CUDA kernels take CuPy arrays; call {reference} for NumPy arrays, or move the data to "
                            "the GPU with cupy.asarray")
