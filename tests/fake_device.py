"""A fake GPU for tests on machines without one: `DeviceArray` and the CuPy-like module `fakecupy` that owns it.

A DeviceArray wraps a NumPy array but is not one, and behaves as a CuPy array does where the difference matters:
- mixing it with a plain NumPy array in an operation, an index or an assignment is a TypeError (CuPy refuses these);
- `numpy.asarray(device_array)` is a TypeError (CuPy refuses implicit conversion; the copy must be explicit);
- reductions give 0-d DeviceArrays, not NumPy scalars, so a loss or a count stays on the device;
- reading values on the host (`fakecupy.asnumpy`, `.get()`, `.item()`, `.tolist()`, `float()`, `int()`, `bool()`,
  `operator.index`, printing) works, as in CuPy, but each is a device-to-host transfer that synchronises a real GPU,
  and is counted in `fakecupy.counts.syncs`; host-to-device copies (`fakecupy.asarray` of NumPy data) are counted in
  `counts.uploads`.
`register(kernels=...)` makes minielectra.backend treat DeviceArrays as device arrays; with kernels=None dispatch keeps
the reference ops, with "minielectra.kernels.cupy_gpu" (inside `_common.using(DeviceEmulatorRuntime())`) the CUDA
launchers run the .cu kernels on the CPU emulator.
"""

import contextlib
import dataclasses
import types

import numpy as np
import scipy.special
from numpy.lib.mixins import NDArrayOperatorsMixin

from minielectra import backend


@dataclasses.dataclass
class Counts:
    syncs: int = 0  # device-to-host reads
    uploads: int = 0  # host-to-device copies
    largest_upload: int = 0  # bytes of the largest of them
    log: list = dataclasses.field(default_factory=list)  # what each sync was, for the failure message

    def sync(self, what):
        self.syncs += 1
        self.log.append(what)


counts = Counts()


class ImplicitTransferError(RuntimeError):
    """numpy.asarray(device_array): CuPy refuses implicit conversion to a NumPy array."""


def _unwrap(x, where):
    """The NumPy data behind x (recursing into tuples, lists and dicts); a plain NumPy array is a TypeError."""
    if isinstance(x, DeviceArray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"{where}: a numpy.ndarray mixed with device arrays (CuPy raises here; copy it to the device "
                        "with xp.asarray first)")
    if isinstance(x, tuple):
        return tuple(_unwrap(v, where) for v in x)
    if isinstance(x, list):
        return [_unwrap(v, where) for v in x]
    if isinstance(x, dict):
        return {k: _unwrap(v, where) for k, v in x.items()}
    return x


def _wrap(x):
    """NumPy results back onto the device; scalars (of reductions) become 0-d device arrays, as CuPy's are."""
    if isinstance(x, np.ndarray):
        return DeviceArray(x)
    if isinstance(x, np.generic):
        return DeviceArray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


class DeviceArray(NDArrayOperatorsMixin):
    """An array 'on the device' (see the module docstring)."""

    __slots__ = ("_a",)

    def __init__(self, a):
        self._a = a

    # ---- NumPy protocols: operations stay on the device, host arrays are refused ---------------------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        where = f"{ufunc.__name__}.{method}"
        out = getattr(ufunc, method)(*_unwrap(inputs, where), **_unwrap(kwargs, where))
        if "out" in kwargs:  # in place: hand back the caller's device arrays
            outs = kwargs["out"]
            return outs[0] if len(outs) == 1 else outs
        return _wrap(out)

    def __array_function__(self, func, types_, args, kwargs):
        where = func.__name__
        return _wrap(func(*_unwrap(args, where), **_unwrap(kwargs, where)))

    def __array__(self, dtype=None, copy=None):
        # Not a TypeError, which NumPy would swallow before falling back to reading the array element by element.
        raise ImplicitTransferError("Implicit conversion of a device array to a NumPy array is not allowed: use "
                        "fakecupy.asnumpy(a) or a.get() (as CuPy)")

    # ---- host reads: allowed, counted ------------------------------------------------------------------------------
    def get(self):
        counts.sync("get()")
        return self._a.copy()

    def item(self, *args):
        counts.sync("item()")
        return self._a.item(*args)

    def tolist(self):
        counts.sync("tolist()")
        return self._a.tolist()

    def __float__(self):
        counts.sync("float()")
        return float(self._a)

    def __int__(self):
        counts.sync("int()")
        return int(self._a)

    def __bool__(self):
        counts.sync("bool()")
        return bool(self._a)

    def __index__(self):
        counts.sync("index")
        return self._a.__index__()

    def __repr__(self):
        counts.sync("repr")
        return f"DeviceArray({self._a!r})"

    __str__ = __repr__

    def __format__(self, spec):
        counts.sync("format")
        return format(self._a, spec) if self._a.ndim else str(self)

    # ---- the ndarray surface ---------------------------------------------------------------------------------------
    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index):
        return _wrap(self._a[_unwrap(index, "indexing")])

    def __setitem__(self, index, value):
        self._a[_unwrap(index, "indexing")] = _unwrap(value, "assignment")

    def __getattr__(self, name):
        if name.startswith("__"):  # __array_interface__ and the like would hand NumPy the host buffer
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if callable(attr):
            def method(*args, **kwargs):
                return _wrap(attr(*_unwrap(args, name), **_unwrap(kwargs, name)))
            return method
        return _wrap(attr) if isinstance(attr, np.ndarray) else attr  # .T a device array; shape, dtype, flags as is

    @property
    def __array_priority__(self):
        return 100


class _Ufunc:
    """A NumPy ufunc whose calls and methods (.at, .reduce) take and give device arrays."""

    def __init__(self, uf):
        self._uf = uf

    def __call__(self, *args, **kwargs):
        return _wrap(self._uf(*_unwrap(args, self._uf.__name__), **_unwrap(kwargs, self._uf.__name__)))

    def __getattr__(self, method):
        fn = getattr(self._uf, method)
        return lambda *args, **kwargs: _wrap(fn(*_unwrap(args, method), **_unwrap(kwargs, method)))


def asarray(a, dtype=None, order=None):
    """Onto the device: a host array (or Python data) is copied up, a device array is converted in place."""
    if isinstance(a, DeviceArray):
        return DeviceArray(np.asarray(a._a, dtype=dtype, order=order))
    out = np.array(a, dtype=dtype, order=order, copy=True)
    if isinstance(a, (np.ndarray, list, tuple)):
        counts.uploads += 1
        counts.largest_upload = max(counts.largest_upload, out.nbytes)
    return DeviceArray(out)


def array(a, dtype=None, copy=True, order="K"):
    if isinstance(a, DeviceArray):
        return DeviceArray(np.array(a._a, dtype=dtype, copy=copy, order=order))
    return asarray(a, dtype=dtype)


def ascontiguousarray(a, dtype=None):
    return asarray(np.ascontiguousarray(a._a, dtype=dtype)) if isinstance(a, DeviceArray) else \
        ascontiguousarray(asarray(a, dtype=dtype))


def asnumpy(a):
    """The explicit device-to-host copy (counted)."""
    if isinstance(a, DeviceArray):
        return a.get()
    return np.asarray(a)


class _Generator:
    """cupy.random.Generator stand-in: draws on the device. It uses NumPy's PCG64 with the same seed, so a fake-device
    run draws exactly what a NumPy run seeded alike draws (CuPy's own generators give other, equally valid, draws)."""

    def __init__(self, seed):
        self._g = np.random.default_rng(seed)

    def random(self, size=None, dtype=np.float64):
        return DeviceArray(self._g.random(size, dtype=dtype))


random = types.SimpleNamespace(default_rng=_Generator)
special = types.SimpleNamespace(erf=_Ufunc(scipy.special.erf))


class _Module(types.ModuleType):
    """fakecupy: the functions above, and every other NumPy name taking and giving device arrays."""

    def __getattr__(self, name):
        obj = getattr(np, name)
        if isinstance(obj, np.ufunc):
            return _Ufunc(obj)
        if callable(obj) and not isinstance(obj, type):
            def fn(*args, **kwargs):
                return _wrap(obj(*_unwrap(args, name), **_unwrap(kwargs, name)))
            fn.__name__ = name
            return fn
        return obj  # dtypes, constants (inf, newaxis, float32 ...)


fakecupy = _Module("fakecupy")
for _name in ("asarray", "array", "ascontiguousarray", "asnumpy", "random", "counts", "DeviceArray"):
    setattr(fakecupy, _name, globals()[_name])


def _creation(name):
    np_fn = getattr(np, name)

    def fn(*args, **kwargs):
        if name.endswith("_like"):
            return _wrap(np_fn(*_unwrap(args, name), **_unwrap(kwargs, name)))
        return DeviceArray(np_fn(*args, **kwargs))  # built on the device: no upload
    fn.__name__ = name
    return fn


for _name in ("zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like", "full_like"):
    setattr(fakecupy, _name, _creation(_name))


@contextlib.contextmanager
def register(kernels=None):
    """DeviceArrays count as device arrays inside the block (dispatch to `kernels`, None: the reference ops)."""
    backend.register_device(DeviceArray, backend.DeviceModule(fakecupy, special, kernels))
    backend._kernel_cache.clear()
    try:
        yield fakecupy
    finally:
        backend.unregister_device(DeviceArray)
        backend._kernel_cache.clear()


@contextlib.contextmanager
def no_syncs(what):
    """Fails when anything inside the block reads device values on the host."""
    before = counts.syncs, len(counts.log)
    yield
    n = counts.syncs - before[0]
    assert n == 0, f"{what}: {n} device-to-host transfer(s): {counts.log[before[1]:]}"


def to_device(tree):
    """Params dicts, AdamW states, tuples of arrays: every NumPy array copied to the device."""
    if isinstance(tree, np.ndarray):
        return asarray(tree)
    if isinstance(tree, dict):
        return {k: to_device(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(to_device(v) for v in tree)
    return tree


def is_device(a):
    return isinstance(a, DeviceArray)


class DeviceEmulatorRuntime:
    """kernels/cupy_gpu's CPU emulator on DeviceArrays: launchers allocate with fakecupy and the .cu kernels run on the
    arrays' NumPy buffers, so a launcher that reads a value on the host is caught as it would stall a real GPU."""

    name = "fake-device emulator"
    xp = fakecupy

    def __init__(self):
        from minielectra.kernels.cupy_gpu.emulator import EmulatorRuntime

        self._emulator = EmulatorRuntime()

    def accepts(self, a):
        return isinstance(a, DeviceArray)

    def kernel(self, op, name):
        fn = self._emulator.kernel(op, name)
        return lambda grid, block, args, shared_mem=0: fn(grid, block, _unwrap(tuple(args), name), shared_mem)

    def ptr(self, a):
        return a._a.ctypes.data

    def after_launch(self):
        pass
