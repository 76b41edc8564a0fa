"""Every kernels/cupy_gpu/*.cu compiles: with nvcc -ptx for sm_80 and sm_90 (when nvcc is on PATH), with NVRTC the way
the launchers compile it (when CuPy finds libnvrtc), and for the CPU emulator (when g++ is there)."""

import pathlib
import shutil
import subprocess

import pytest

from minielectra.kernels.cupy_gpu import _common

SOURCES = sorted(p.name for p in _common.HERE.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")


def test_every_launcher_has_its_source():
    assert {"attention.cu", "layernorm.cu", "activations.cu", "losses.cu", "embedding.cu", "optim.cu",
            "softmax.cu"} <= set(SOURCES)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH (install the CUDA toolkit to run this)")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_nvcc_compiles(source, arch, tmp_path):
    cmd = ["nvcc", "-ptx", f"-arch={arch}", *_common.NVRTC_OPTIONS, str(_common.HERE / source),
           "-o", str(tmp_path / (pathlib.Path(source).stem + ".ptx"))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"
    ptx = (tmp_path / (pathlib.Path(source).stem + ".ptx")).read_text()
    assert ".entry" in ptx  # extern "C" kernels were emitted


def _nvrtc_or_skip():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    from cupy.cuda import compiler

    try:
        compiler._NVRTCProgram("extern \"C\" __global__ void f() {}", "probe.cu", (), (), method="ptx").compile(
            ("-arch=compute_80",), None)
    except Exception as e:  # noqa: BLE001 - libnvrtc missing takes several exception types across CuPy versions
        pytest.skip(f"NVRTC is not usable here ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    return cupy, compiler


@pytest.mark.parametrize("source", SOURCES)
def test_nvrtc_compiles_with_the_launcher_options(source):
    """What cupy.RawModule does at run time: NVRTC, no host headers, the launchers' options."""
    _, compiler = _nvrtc_or_skip()
    prog = compiler._NVRTCProgram(_common.source(pathlib.Path(source).stem), source, (), (), method="ptx")
    prog.compile(_common.NVRTC_OPTIONS + ("-arch=compute_80", "--device-as-default-execution-space"), None)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed (the CPU emulator needs it)")
@pytest.mark.parametrize("source", SOURCES)
def test_emulator_builds(source):
    from minielectra.kernels.cupy_gpu import emulator

    assert emulator.library(pathlib.Path(source).stem) is not None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH (install the CUDA toolkit to run this)")
def test_layernorm_dx_rounds_dout_times_gamma_on_its_own(tmp_path):
    """dx = rstd (g - mean(g) - xhat mean(g xhat)) needs g = dout * gamma rounded before mean(g) is taken from it, as
    the reference does: fused into fma(dout, gamma, -mean(g)) it is not 0 where g is its own mean (C = 1), and the
    GPU gave dx ~3e-4 there. In the dx kernels' PTX that product is a mul.rn, which neither NVRTC nor ptxas fuses
    (a plain mul.f32 followed by a sub.f32 may still become one fma in the machine code)."""
    out = tmp_path / "layernorm.ptx"
    cmd = ["nvcc", "-ptx", "-arch=sm_90", *_common.NVRTC_OPTIONS, str(_common.HERE / "layernorm.cu"), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"
    entries = out.read_text().split(".entry ")
    dx = [e for e in entries if e.startswith("layernorm_backward_dx_")]
    assert len(dx) == 2  # f32 and f64
    for body in dx:
        assert "mul.rn." in body, body.split("(")[0]
