"""A CPU emulator for the CUDA kernels in kernels/cupy_gpu/*.cu, for tests on machines without a GPU.

`EmulatorRuntime()` compiles each .cu file with g++ (C++20) with emulator.h force-included (see that header for what is
emulated, and what is not) into a shared library, and launches its kernels with ctypes: blocks run one after the other,
and the threads of a block run as real OS threads (ctypes releases the GIL), meeting at the barriers that stand in for
__syncthreads and the warp shuffles. It runs the launchers of kernels/cupy_gpu unchanged on NumPy arrays:

    with _common.using(EmulatorRuntime()):
        out, cache = minielectra.kernels.cupy_gpu.attention.attention_forward(q, k, v, mask)   # NumPy arrays in and out

`EmulatorRuntime(fused=True)` builds the kernels with multiply-adds fused into fma instructions (needs a CPU with
them), as NVRTC builds them for the GPU: the tests run on both, so a kernel whose result hangs on a product rounded on
its own fails on the CPU too (layer norm's dx at C = 1 gave the same -2.9e-4 here as on an H200).

Slow (a thread per CUDA thread), so for small shapes only. Needs g++ with C++20 (<barrier>, std::atomic_ref).
"""

import atexit
import ctypes
import functools
import itertools
import shutil
import subprocess
import tempfile
import threading

import numpy as np

from minielectra.kernels.cupy_gpu import _common

DEADLOCK_SECONDS = 60.0

_CTYPES = {
    np.dtype(np.int32): ctypes.c_int32, np.dtype(np.uint32): ctypes.c_uint32,
    np.dtype(np.int64): ctypes.c_int64, np.dtype(np.uint64): ctypes.c_uint64,
    np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double,
}


def compiler():
    """The C++ compiler the emulator uses, or None."""
    return shutil.which("g++")


@functools.lru_cache(maxsize=None)
def _build_dir():
    path = tempfile.mkdtemp(prefix="minielectra-cuda-emulator-")
    atexit.register(shutil.rmtree, path, True)
    return path


def fma_usable():
    """True when this CPU has fused multiply-add instructions, which EmulatorRuntime(fused=True) compiles to."""
    try:
        with open("/proc/cpuinfo") as f:
            return " fma " in f" {f.read().replace(chr(10), ' ')} "
    except OSError:
        return False


@functools.lru_cache(maxsize=None)
def library(op, fused=False):
    """<op>.cu compiled for the CPU emulator, loaded with ctypes. fused: a * b + c contracted into fma instructions
    wherever the compiler sees fit, as NVRTC does on the GPU (not at the same places: a compiler's own choice); else
    every product rounded on its own, as NumPy's arithmetic."""
    out = f"{_build_dir()}/{op}{'-fused' if fused else ''}.so"
    # g++ forms fmas from -O2 on (its widening_mul pass)
    flags = ["-O2", "-mfma", "-ffp-contract=fast"] if fused else ["-O1", "-ffp-contract=off"]
    cmd = [compiler() or "g++", "-std=c++20", *flags, "-g", "-shared", "-fPIC", "-pthread",
           "-include", str(_common.HERE / "emulator.h"), "-x", "c++", str(_common.HERE / f"{op}.cu"), "-o", out]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"emulator build of {op}.cu failed:\n{' '.join(cmd)}\n{done.stderr}")
    lib = ctypes.CDLL(out)
    lib.emu_begin_block.argtypes = [ctypes.c_uint] * 9
    lib.emu_enter_thread.argtypes = [ctypes.c_uint] * 3
    lib.emu_dyn_smem_bytes.restype = ctypes.c_ulonglong
    return lib


class EmulatedKernel:
    def __init__(self, lib, name):
        self.lib, self.name = lib, name
        self.fn = getattr(lib, name)
        self.fn.restype = None

    def _arg(self, i, a):
        if isinstance(a, np.ndarray):
            if not a.flags.c_contiguous:
                raise ValueError(f"{self.name}: argument {i} is not C-contiguous")
            return ctypes.c_void_p, ctypes.c_void_p(a.ctypes.data)
        if isinstance(a, np.generic) and a.dtype in _CTYPES:
            t = _CTYPES[a.dtype]
            return t, t(a.item())
        raise TypeError(f"{self.name}: argument {i} of type {type(a).__name__} is not a launchable argument")

    def __call__(self, grid, block, args, shared_mem=0):
        types, values = zip(*(self._arg(i, a) for i, a in enumerate(args))) if args else ((), ())
        if shared_mem > self.lib.emu_dyn_smem_bytes():
            raise ValueError(f"{self.name}: {shared_mem} bytes of shared memory exceed the emulator's buffer")
        self.fn.argtypes = list(types)
        lib, fn = self.lib, self.fn
        errors = []

        def thread(tx, ty, tz):
            try:
                lib.emu_enter_thread(tx, ty, tz)
                fn(*values)
            except BaseException as e:  # noqa: BLE001 - reported by the launching thread
                errors.append(e)
            finally:
                lib.emu_exit_thread()

        for bz, by, bx in itertools.product(*(range(g) for g in reversed(grid))):
            lib.emu_begin_block(*grid, *block, bx, by, bz)
            threads = [threading.Thread(target=thread, args=(tx, ty, tz), daemon=True)
                       for tz, ty, tx in itertools.product(*(range(b) for b in reversed(block)))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(DEADLOCK_SECONDS)
                if t.is_alive():
                    raise RuntimeError(f"{self.name}: block {(bx, by, bz)} did not finish in {DEADLOCK_SECONDS} s; "
                                       "a thread is stuck at a barrier (a __syncthreads or shuffle not reached by "
                                       "every thread?)")
            if errors:
                raise errors[0]


class EmulatorRuntime:
    """Runs the kernels on the CPU on NumPy arrays (see the module docstring); fused: with multiply-adds contracted,
    as on the GPU (library)."""

    xp = np

    def __init__(self, fused=False):
        self.fused = fused
        self.name = "emulator-fma" if fused else "emulator"

    def accepts(self, a):
        return isinstance(a, np.ndarray)

    def kernel(self, op, name):
        return EmulatedKernel(library(op, self.fused), name)

    def ptr(self, a):
        return a.ctypes.data

    def after_launch(self):
        pass
