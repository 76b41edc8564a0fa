"""Numba CPU kernels: drop-in replacements for the hot reference ops, same names and signatures (see backend.dispatch).

Numba runs `prange` loops on an OpenMP thread pool whose threads, by default, spin for a while after each parallel
region. On a laptop's few cores they then steal the CPU from the BLAS threads of the very next matrix product:
measured on 2 cores, a (4096, 128) @ (128, 512) GEMM right after a tiny parallel kernel took 8.7 ms instead of 2.9 ms.
A PASSIVE wait policy makes them sleep instead (3.2 ms). It must be set before the OpenMP runtime starts, that is
before the first parallel kernel runs, which importing this package precedes; a value the user set is kept.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
