"""kernels/numba_cpu/__init__.py: cached kernels are dropped when any of the package's sources changes."""

from kernels.numba_cpu import STAMP, drop_stale_caches, sources


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
