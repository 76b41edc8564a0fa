"""Every lesson runs top to bottom as a script, without a warning, and its own assertions hold.

Each lesson is run the way a reader runs it, `python lessons/NN_topic.py` from the repository root, in a fresh
interpreter with `-W error` (so a lesson that starts warning fails here, as the library's tests do under pytest's
`filterwarnings = error`). The lessons check themselves: each ends by asserting that its gradient checks pass and that
the library agrees with the inline version, so exit status 0 is the test.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py"))
QUICK = [p for p in LESSONS if p.name < "09"]
TIMEOUT_S = 300  # each quick lesson takes seconds; the margin is for a loaded machine


def run_lesson(path, **env):
    environment = {**os.environ, "MPLBACKEND": "Agg", **env}
    result = subprocess.run([sys.executable, "-W", "error", str(path.relative_to(ROOT))], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, (f"{path.name} exited with {result.returncode}\n--- stdout (end) ---\n"
                                    f"{result.stdout[-3000:]}\n--- stderr (end) ---\n{result.stderr[-3000:]}")
    return result


def test_the_lessons_are_all_here():
    names = [p.name[:2] for p in LESSONS]
    assert names[:14] == [f"{i:02d}" for i in range(14)], names


@pytest.mark.parametrize("path", QUICK, ids=[p.stem for p in QUICK])
def test_lesson_runs(path):
    result = run_lesson(path)
    assert "saved lessons/figures/" in result.stdout  # every lesson draws and says where


@pytest.mark.slow
def test_pretrain_lesson_runs(tmp_path):
    path = ROOT / "lessons" / "09_pretrain_on_a_laptop.py"
    result = run_lesson(path, LESSON_STEPS="5", LESSON_OUT=str(tmp_path / "run"),
                        MINIELECTRA_CACHE=str(tmp_path / "cache"))
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()
    assert "finished:" in result.stdout


@pytest.mark.slow
def test_finetune_lesson_runs(tmp_path):
    """Lesson 10 on its toy data for one epoch, from a random init (the test must not depend on a lesson-09 run)."""
    path = ROOT / "lessons" / "10_finetune_sentiment.py"
    result = run_lesson(path, LESSON_EPOCHS="1", LESSON_OUT=str(tmp_path / "run"), LESSON_INIT="none",
                        MINIELECTRA_CACHE=str(tmp_path / "cache"), MINIELECTRA_BACKEND="numpy")
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert "confusion matrix" in result.stdout and "saved lessons/figures/10_finetune_sentiment/" in result.stdout


@pytest.mark.numba
@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba is not installed")
def test_numba_lesson_runs():
    result = run_lesson(ROOT / "lessons" / "11_numba_kernels.py")
    assert "agree with the reference" in result.stdout and "saved lessons/figures/11_numba_kernels/" in result.stdout


def test_cuda_lesson_runs():
    """Lesson 12 runs everywhere: on a GPU it checks the kernel; without one it compiles (if nvcc is there) and
    emulates (if g++ is there), and otherwise explains."""
    result = run_lesson(ROOT / "lessons" / "12_cuda_kernels.py")
    assert "tiled online softmax == reference" in result.stdout
    assert "saved lessons/figures/12_cuda_kernels/" in result.stdout


def test_huggingface_lesson_runs(tmp_path):
    """Lesson 13 offline: its stand-in for a download is built with transformers when installed, else export_hf."""
    result = run_lesson(ROOT / "lessons" / "13_huggingface.py", LESSON_OUT=str(tmp_path), LESSON_EPOCHS="1",
                        MINIELECTRA_BACKEND="numpy")
    assert (tmp_path / "run" / "checkpoint.safetensors").exists() and (tmp_path / "sentiment-hf").exists()
    assert "saved lessons/figures/13_huggingface/" in result.stdout
