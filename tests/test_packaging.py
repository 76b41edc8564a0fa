"""What minielectra installs: one top-level import name, `minielectra`, with the repository's kernels/ folder under it
as `minielectra.kernels`. Hugging Face ships a top-level `kernels` package that transformers imports; ours must never
stand in for it, from the repository root (where Python puts the current folder first on sys.path) or elsewhere."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter so that the current folder decides what `kernels` means, as it does for a user's script.
SIDE_BY_SIDE = """
import numpy as np
import transformers
transformers.ElectraForPreTraining, transformers.ElectraForMaskedLM  # the lazy imports reach transformers' kernel hub
import kernels
print("kernels:", kernels.__file__)
from minielectra import backend
backend.set_backend("numba")
x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
gelu = backend.dispatch("bias_gelu_forward", x)
out, _ = gelu(x, np.zeros(4, np.float32))
print("op:", gelu.__module__, np.isfinite(out).all())
print(backend.describe())
"""


def test_the_only_top_level_name_installed_is_minielectra():
    top_level = importlib.metadata.distribution("minielectra").read_text("top_level.txt")
    assert top_level.split() == ["minielectra"]
    assert not (ROOT / "kernels" / "__init__.py").exists(), "a regular package there shadows Hugging Face's `kernels`"


def test_kernels_are_imported_under_minielectra():
    from minielectra.kernels import cupy_gpu, numba_cpu

    assert Path(numba_cpu.__file__).resolve() == ROOT / "kernels" / "numba_cpu" / "__init__.py"
    assert sorted(p.name for p in Path(cupy_gpu.__file__).parent.glob("*.cu"))  # the CUDA sources ship beside it


@pytest.mark.slow
@pytest.mark.parametrize("where", ["repository root", "another folder"])
def test_transformers_and_the_numba_kernels_load_side_by_side(where, tmp_path):
    for distribution in ("transformers", "kernels", "numba"):  # distributions: the repository's kernels/ is none
        try:
            importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{distribution} is not installed (the interop and numba extras install it)")
    cwd = ROOT if where == "repository root" else tmp_path
    result = subprocess.run([sys.executable, "-c", SIDE_BY_SIDE], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    hub_kernels = Path(lines["kernels"]).resolve()
    assert not hub_kernels.is_relative_to(ROOT), f"`import kernels` found {hub_kernels}, not Hugging Face's package"
    assert lines["op"] == "minielectra.kernels.numba_cpu.activations True"
    assert "bias_gelu_forward" in lines["backend"].split("(kernels: ", 1)[1]
