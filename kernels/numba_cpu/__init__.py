"""Numba CPU kernels: drop-in replacements for the hot reference ops, same names and signatures (see backend.dispatch).

Numba runs `prange` loops on an OpenMP thread pool whose threads, by default, spin for a while after each parallel
region. On a laptop's few cores they then steal the CPU from the BLAS threads of the very next matrix product:
measured on 2 cores, a (4096, 128) @ (128, 512) GEMM right after a tiny parallel kernel took 8.7 ms instead of 2.9 ms.
A PASSIVE wait policy makes them sleep instead (3.2 ms). It must be set before the OpenMP runtime starts, that is
before Numba starts its threads (the first parallel kernel, or numba.set_num_threads, which parallel.py calls before
any kernel runs): backend.set_backend("numba") imports this package first. A value the user set is kept.

Compiled kernels are cached (`cache=True`) in __pycache__, and Numba reuses a kernel's cache while the kernel's own file
is unchanged. Every kernel compiles in helpers from _common.py (exp, the row sums) and constants from the reference
ops (the dropout hash's), so an edit there alone would leave the cached kernels running the old code.
`drop_stale_caches` keeps a digest of those sources beside the caches and drops every cached kernel when it changes.
"""

import hashlib
import os
from pathlib import Path

# Whether the policy below is this package's choice rather than the user's: PyTorch's own OpenMP runtime, loaded later
# in the same process by bench --vs-torch, is then given its default (minielectra/bench_torch.py).
WAIT_POLICY_SET_HERE = "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

STAMP = "kernel-sources.sha256"


def sources(package=Path(__file__).parent):
    """The files the kernels compile from: this package's and the reference ops' (minielectra/ops)."""
    import minielectra.ops

    ops = Path(minielectra.ops.__file__).parent
    return sorted(package.glob("*.py")) + sorted(ops.glob("*.py"))


def drop_stale_caches(package=Path(__file__).parent, files=None, blas=None):
    """Delete the Numba caches (*.nbi, *.nbc) in package/__pycache__ unless they were compiled from the current
    `files` (default: sources()) against the same BLAS (default: _blas.LIBRARY, which sets how the kernels call it),
    and record their digest. Does nothing where __pycache__ cannot be written (Numba then caches elsewhere or not at
    all)."""
    files = sources(package) if files is None else files
    if blas is None:
        try:
            from minielectra.kernels.numba_cpu._blas import LIBRARY as blas
        except ImportError:  # no numba: nothing is compiled, nothing cached is used
            return
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files) + blas.encode()).hexdigest()
    cache = package / "__pycache__"
    stamp = cache / STAMP
    try:
        if stamp.read_text() == digest:
            return
    except OSError:
        pass
    try:
        cache.mkdir(exist_ok=True)
        for f in [*cache.glob("*.nbi"), *cache.glob("*.nbc")]:
            f.unlink(missing_ok=True)
        stamp.write_text(digest)
    except OSError:
        return


drop_stale_caches()
