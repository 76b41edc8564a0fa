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
