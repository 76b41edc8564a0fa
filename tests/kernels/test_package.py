"""kernels/numba_cpu/__init__.py: cached kernels are dropped when any of the package's sources changes."""

from minielectra.kernels.numba_cpu import STAMP, drop_stale_caches, sources


def test_the_digest_covers_the_kernels_and_the_reference_ops():
    names = {(p.parent.name, p.name) for p in sources()}
    assert {("numba_cpu", "_common.py"), ("numba_cpu", "attention.py"), ("ops", "dropout.py")} <= names


def test_caches_are_kept_until_a_source_changes(tmp_path):
    (tmp_path / "_common.py").write_text("def exp(x): ...\n")
    (tmp_path / "attention.py").write_text("from _common import exp\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    compiled = [cache / "attention._forward-1.py311.nbi", cache / "attention._forward-1.py311.1.nbc"]

    def drop():  # what importing the package does
        drop_stale_caches(tmp_path, sorted(tmp_path.glob("*.py")))

    def compile_kernels():
        for f in compiled:
            f.write_bytes(b"compiled")

    # The first import: no digest yet, so nothing cached can be trusted.
    drop()
    compile_kernels()
    drop()  # the next process, sources unchanged: the caches stay
    assert all(f.exists() for f in compiled)
    (tmp_path / "_common.py").write_text("def exp(x): return 1\n")  # an edit in the shared helpers only
    drop()
    assert not any(f.exists() for f in compiled)
    assert (cache / STAMP).exists()
    compile_kernels()
    drop()
    assert all(f.exists() for f in compiled)


def test_caches_are_dropped_when_the_kernels_would_call_another_blas(tmp_path):
    """A cached kernel calls BLAS by a name whose calling convention (32- or 64-bit integers) depends on the BLAS
    found (_blas.LIBRARY): a process that finds another one must recompile, not link the old code."""
    (tmp_path / "attention.py").write_text("x = 1\n")
    cached = tmp_path / "__pycache__" / "attention._forward-1.py311.nbi"
    files = sorted(tmp_path.glob("*.py"))
    drop_stale_caches(tmp_path, files, blas="NumPy's BLAS, 64-bit integers")
    cached.write_bytes(b"compiled")
    drop_stale_caches(tmp_path, files, blas="NumPy's BLAS, 64-bit integers")
    assert cached.exists()
    drop_stale_caches(tmp_path, files, blas="SciPy's BLAS, 32-bit integers")
    assert not cached.exists()


def test_the_kernels_call_numpys_own_blas_where_it_exports_its_gemm():
    """NumPy's wheels bundle an OpenBLAS with 64-bit integers that exports sgemm and dgemm: the kernels then call it,
    the very products NumPy's matmul computes; elsewhere SciPy's."""
    import ctypes

    import numpy as np
    from minielectra.kernels.numba_cpu import _blas

    found = _blas._numpy_gemm()
    assert _blas.LIBRARY == ("NumPy's BLAS, 64-bit integers" if found else "SciPy's BLAS, 32-bit integers")
    if found:  # the address is a working sgemm with 64-bit integers: C = A B for 2 x 2 column-major matrices
        sgemm = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 13)(found[next(k for k in found if str(k) == "float32")])
        a = np.array([[1, 2], [3, 4]], np.float32, order="F")
        b = np.array([[5, 6], [7, 8]], np.float32, order="F")
        c = np.zeros((2, 2), np.float32, order="F")
        n, one, zero, flag = ctypes.c_int64(2), ctypes.c_float(1), ctypes.c_float(0), ctypes.c_char(b"N")
        ptr = ctypes.byref
        sgemm(ptr(flag), ptr(flag), ptr(n), ptr(n), ptr(n), ptr(one), a.ctypes.data, ptr(n), b.ctypes.data, ptr(n),
              ptr(zero), c.ctypes.data, ptr(n))
        np.testing.assert_array_equal(c, a @ b)
