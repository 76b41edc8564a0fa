"""Backend selection and dispatch."""

import numpy as np
import pytest

from minielectra import backend
from minielectra.ops import attention


@pytest.fixture(autouse=True)
def restore_backend():
    yield
    backend.set_backend("numpy")


def test_default_is_numpy_and_dispatches_the_reference(monkeypatch):
    monkeypatch.delenv("MINIELECTRA_BACKEND", raising=False)
    assert backend.set_backend() == "numpy"
    assert backend.dispatch("attention_forward", np.zeros(1)) is attention.attention_forward
    assert backend.kernel_names() == []


def test_environment_variable_selects(monkeypatch):
    monkeypatch.setenv("MINIELECTRA_BACKEND", "numpy")
    assert backend.set_backend() == "numpy"
    monkeypatch.setenv("MINIELECTRA_BACKEND", "tpu")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        backend.set_backend()


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(backend, "_importable", lambda module: False)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[numba\]'"):
        backend.set_backend("numba")
    assert backend.set_backend("auto") == "numpy"  # nothing optional installed: auto falls back to the reference


def test_get_xp_is_numpy_for_numpy_arrays():
    assert backend.get_xp(np.zeros(2), 3.0) is np


def test_blas_library_names_numpys_blas_and_its_kernels(monkeypatch):
    import threadpoolctl

    loaded = [
        {"user_api": "blas", "internal_api": "mkl", "version": "2024.2", "filepath": "/x/torch/lib/libmkl.so"},
        {"user_api": "blas", "internal_api": "openblas", "version": "0.3.31", "architecture": "SkylakeX",
         "filepath": "/x/numpy.libs/libscipy_openblas64_.so"},
        {"user_api": "openmp", "internal_api": "openmp", "version": None, "filepath": "/x/libgomp.so"},
    ]
    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: loaded)
    assert backend.blas_library() == "OpenBLAS 0.3.31, SkylakeX kernels"
    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: loaded[2:])
    assert backend.blas_library() == ""


def test_numba_backend_sets_the_openmp_wait_policy_before_numba_starts_its_threads():
    """OpenMP reads OMP_WAIT_POLICY once, when Numba first starts its threads; parallel._run starts them (through
    numba.set_num_threads) before any kernel module is imported, so selecting the backend must set it. Left at the
    default, idle threads spin and took cores from the next step's shards: the tiny preset's 2-core step took
    126-131 ms instead of 118-120. A fresh interpreter, as the variable counts only before the threads start."""
    pytest.importorskip("numba")
    import os
    import subprocess
    import sys

    code = ("import os; from minielectra import backend; backend.set_backend('numba'); "
            "import numba.np.ufunc.parallel as p; print(os.environ.get('OMP_WAIT_POLICY'), p._is_initialized)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.split() == ["PASSIVE", "False"]
