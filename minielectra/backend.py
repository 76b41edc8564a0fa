"""Which array library and which kernels run an op.

The reference ops in `minielectra.ops` are written against `xp`, the array module of their inputs, so the same code
runs on NumPy and CuPy arrays. `dispatch(name)` picks, per call, the fastest implementation of a named op for the
active backend: a Numba kernel for NumPy arrays under the `numba` backend, a CUDA kernel for CuPy arrays, otherwise
the reference. Kernels are imported lazily so that numba and cupy stay optional extras.
"""

import functools
import importlib
import os
from typing import NamedTuple

import numpy as np

BACKENDS = ("numpy", "numba", "cupy", "auto")
_EXTRA = {"numba": "numba", "cupy": "cuda12' or '.[cuda13"}
_active = None


# The kernel package of each backend that has one. kernels/ sits at the top of the repository and is imported under
# minielectra's name (setup.cfg says how).
KERNEL_PACKAGES = {"numba": "minielectra.kernels.numba_cpu", "cupy": "minielectra.kernels.cupy_gpu"}

# Device array types other than CuPy's, {type: DeviceModule}: the tests register a fake device (tests/fake_device.py)
# here, so that the code paths CuPy arrays take run, and are checked for host transfers, on a machine without a GPU.
_registered = {}


class DeviceModule(NamedTuple):
    """How the code reaches a device array library: its NumPy-like module, its scipy.special-like module (erf), and
    the kernel package dispatch uses for its arrays (None: the reference ops)."""
    xp: object
    special: object
    kernels: object = KERNEL_PACKAGES["cupy"]


def register_device(array_type, module: DeviceModule):
    """Treat arrays of `array_type` as device arrays owned by `module.xp` (get_xp, dispatch, erf)."""
    _registered[array_type] = module


def unregister_device(array_type):
    _registered.pop(array_type, None)


@functools.lru_cache(maxsize=None)
def _cupy_module():
    import cupy
    import cupyx.scipy.special

    return DeviceModule(cupy, cupyx.scipy.special)


def device_module(*arrays):
    """The DeviceModule of the first device array among `arrays`, or None when they all live on the host."""
    for a in arrays:
        t = type(a)
        if t is np.ndarray:  # the usual answer, found first: the ops' checks ask about 5,000 times a training step
            continue
        if t in _registered:
            return _registered[t]
        if t.__module__.startswith("cupy"):
            return _cupy_module()
    return None


def get_xp(*arrays):
    """The array module (numpy, cupy or a registered device module) that owns `arrays`; numpy when none is a device
    array."""
    m = device_module(*arrays)
    return np if m is None else m.xp


def on_device(*arrays):
    """True when any of `arrays` lives on a device (a CuPy array): reading its values costs a transfer and a sync."""
    return device_module(*arrays) is not None


def special(xp):
    """scipy.special for numpy, cupyx.scipy.special for cupy (or the registered device module's)."""
    if xp is np:
        import scipy.special

        return scipy.special
    for m in _registered.values():
        if m.xp is xp:
            return m.special
    return _cupy_module().special


def asnumpy(a):
    """`a` as a NumPy array: an explicit device-to-host copy for a device array, `a` itself on the host."""
    return a if not on_device(a) else get_xp(a).asnumpy(a)


def host_values(values):
    """A dict of scalars with its 0-d device arrays replaced by Python floats; they cross to the host in one transfer
    (stacked first), not one synchronising float() each. Host values are kept as they are."""
    out = dict(values)
    dev = [k for k, v in values.items() if on_device(v)]
    if dev:
        xp = get_xp(values[dev[0]])
        stacked = asnumpy(xp.stack([xp.asarray(values[k], dtype=xp.float64) for k in dev]))
        out.update(zip(dev, stacked.tolist()))
    return out


def set_tf32(on):
    """TF32 tensor-core GEMMs for float32 on the GPU (cupy.matmul through cuBLAS), on or off; cupy backend only.

    CuPy reads CUPY_TF32 once, at the process's first float32 GEMM, and keeps that compute type, so this must run
    before any (the CLI calls it right after choosing the backend). TF32 rounds the GEMM inputs to 10 mantissa bits:
    faster on Ampere and newer GPUs, about 1e-3 relative error per product. NumPy and Numba GEMMs are always full
    float32, so asking for TF32 there is an error rather than a silent no-op.
    """
    if on and active_backend() != "cupy":
        raise ValueError(f"TF32 is a GPU tensor-core mode for the cupy backend, not {active_backend()}: NumPy and "
                         "Numba GEMMs are always full float32")
    os.environ["CUPY_TF32"] = "1" if on else "0"


def tf32_enabled():
    """True when float32 GEMMs run in TF32: the cupy backend with CUPY_TF32 set (by set_tf32 or the environment)."""
    return active_backend() == "cupy" and os.environ.get("CUPY_TF32", "0").strip() not in ("", "0")


def describe():
    """The backend line runs print first: the backend, its kernels, and what runs the GEMMs: on the host NumPy's BLAS
    and its kernels (blas_library), on the GPU whether cuBLAS uses TF32."""
    name = active_backend()
    line = f"backend: {name}" + (f" (kernels: {', '.join(kernel_names())})" if name != "numpy" else "")
    if name == "cupy":
        return line + f"; TF32 GEMMs {'on' if tf32_enabled() else 'off'}"
    blas = blas_library()
    return line + (f"; BLAS: {blas}" if blas else "")


def numpy_blas():
    """threadpoolctl's record of the BLAS NumPy's matmul calls, or None when it sees none. Of the BLAS libraries
    loaded (SciPy and torch bring their own), NumPy's is the one under a "numpy" path."""
    from threadpoolctl import threadpool_info

    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    ours = [i for i in blas if "numpy" in i.get("filepath", "")] or blas
    return ours[0] if ours else None


def blas_library():
    """'OpenBLAS 0.3.31, SkylakeX kernels': NumPy's BLAS and the kernels it chose for this CPU (its GEMM rate depends
    on them: AVX-512 kernels run about twice as fast as AVX2 ones where the CPU has both, and OPENBLAS_CORETYPE in the
    environment overrides the choice), or '' when there is none to see."""
    info = numpy_blas()
    if info is None:
        return ""
    name = {"openblas": "OpenBLAS", "mkl": "MKL", "blis": "BLIS"}.get(info["internal_api"], info["internal_api"])
    arch = info.get("architecture")
    return f"{name} {info['version']}" + (f", {arch} kernels" if arch else "")


def synchronize(xp):
    """Wait for the work queued on xp's device (timing a GPU step needs it); a no-op for numpy."""
    cuda = getattr(xp, "cuda", None)
    if cuda is not None:
        cuda.get_current_stream().synchronize()


def array_module():
    """The array module a run keeps its params, optimizer state and batches in: cupy under the cupy backend."""
    if active_backend() == "cupy":
        return _cupy_module().xp
    return np


def _importable(module):
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def gpu_usable():
    """True when CuPy imports and sees at least one CUDA device."""
    if not _importable("cupy"):
        return False
    import cupy

    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except cupy.cuda.runtime.CUDARuntimeError:
        return False


def set_backend(name=None):
    """Select the backend by name, or from $MINIELECTRA_BACKEND, defaulting to numpy; returns the resolved name."""
    global _active
    name = (name or os.environ.get("MINIELECTRA_BACKEND") or "numpy").lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = "cupy" if gpu_usable() else "numba" if _importable("numba") else "numpy"
    elif name in ("numba", "cupy") and not _importable(name):
        raise ImportError(
            f"the {name} backend needs the {name} package: pip install -e '.[{_EXTRA[name]}]'"
        )
    if name == "numba":
        # Its package sets OpenMP's wait policy (see kernels/numba_cpu/__init__.py), which counts only if set before
        # Numba starts its threads: parallel._run sets their number before any kernel has been imported.
        importlib.import_module(KERNEL_PACKAGES["numba"])
    _active = name
    _kernel_cache.clear()
    return name


def active_backend():
    """The resolved backend name ('numpy', 'numba' or 'cupy'), selecting the default on first use."""
    return _active if _active is not None else set_backend()


# The ops a kernel may replace, by the reference module that defines them; a kernel module carries the reference
# module's file name (kernels/numba_cpu/attention.py replaces minielectra/ops/attention.py).
_OP_MODULES = {
    "matmul_forward": "minielectra.ops.linear",
    "matmul_backward": "minielectra.ops.linear",
    "linear_forward": "minielectra.ops.linear",
    "linear_backward": "minielectra.ops.linear",
    "project": "minielectra.ops.linear",
    "attention_forward": "minielectra.ops.attention",
    "attention_backward": "minielectra.ops.attention",
    "layernorm_forward": "minielectra.ops.layernorm",
    "layernorm_backward": "minielectra.ops.layernorm",
    "dropout_add_layernorm_forward": "minielectra.ops.layernorm",
    "dropout_add_layernorm_backward": "minielectra.ops.layernorm",
    "layernorm_dropout_forward": "minielectra.ops.layernorm",
    "layernorm_dropout_backward": "minielectra.ops.layernorm",
    "bias_gelu_forward": "minielectra.ops.activations",
    "bias_gelu_backward": "minielectra.ops.activations",
    "gumbel_sample": "minielectra.ops.softmax",
    "softmax_cross_entropy": "minielectra.ops.losses",
    "sigmoid_cross_entropy": "minielectra.ops.losses",
    "embedding_backward": "minielectra.ops.embedding",
    "clip_scale": "minielectra.optim",
    "adamw_step": "minielectra.optim",
}


def _kernel_module(package, reference):
    """The kernel module in `package` mirroring the reference module, or None when there is none."""
    name = f"{package}.{reference.rsplit('.', 1)[1]}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        return None
_kernel_cache = {}


def kernel_names():
    """The ops the active backend replaces with kernels (those whose kernel module exists and defines them)."""
    package = KERNEL_PACKAGES.get(active_backend())
    if package is None:
        return []
    return [op for op, ref in _OP_MODULES.items() if hasattr(_kernel_module(package, ref), op)]


def dispatch(op_name, *arrays):
    """The implementation of `op_name` to call on `arrays`: a kernel where the active backend has one, else the reference."""
    reference = _OP_MODULES[op_name]
    device = device_module(*arrays)
    if device is not None:
        package = device.kernels
    elif active_backend() == "numba":
        package = KERNEL_PACKAGES["numba"]
    else:
        package = None
    key = (package, op_name)
    if key not in _kernel_cache:
        fn = getattr(_kernel_module(package, reference), op_name, None) if package else None
        _kernel_cache[key] = fn or getattr(importlib.import_module(reference), op_name)
    return _kernel_cache[key]
