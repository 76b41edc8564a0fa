"""BLAS's matrix product called from inside a Numba kernel on matrices that need not be contiguous: `gemm`.

Why: numba's np.dot takes contiguous 2-D arrays only. Attention's heads are not: mha_forward projects x to q (B, T, C)
and views head h as the columns h * D .. h * D + D of every row, so one head's (T, D) matrix has its rows C entries
apart. np.dot would need each head copied out first (the attention kernel once did that, in NumPy, for q, k, v, dout
and the outputs, about 3 ms of the tiny preset's 2-core step). BLAS itself takes any row stride, its "leading
dimension", so `gemm` hands BLAS the head where it lies and writes the result straight into its place in the merged
(B, T, C) layout.

How: the kernels call NumPy's own BLAS when it can be found, and else SciPy's. NumPy's wheels bundle an OpenBLAS with
64-bit integers whose sgemm and dgemm are exported (as scipy_sgemm_64_ in NumPy 2, sgemm_64_ before); SciPy exports
its BLAS's through scipy.linalg.cython_blas (32-bit integers), the functions numba's np.dot calls. The two need not be
the same build: here NumPy's is OpenBLAS 0.3.31 and SciPy's 0.3.30, whose products with a transposed first factor
are slower (one core: x.T @ dout for (2048, 128) x (2048, 128), a linear layer's dW, 0.377 ms against 0.328 with
NumPy's; attention's 32 products P.T @ dO of (128, 128) x (128, 64), 0.452 against 0.362). Calling NumPy's also makes
the kernels' products the ones the reference's matmul computes. The chosen functions' addresses are registered with
LLVM under names of our own when this module is imported, one name per calling convention, and a kernel calls the
name, which LLVM resolves when it links the machine code. A cached kernel loaded in a new process links against that
process's addresses, which is why the call goes by name and not through a ctypes function pointer (numba refuses to
cache a kernel with a process's address baked in); `LIBRARY` names the choice, and the package drops its cached
kernels when it changes (kernels/numba_cpu/__init__.py).

Fortran BLAS is column-major, and passes every argument by pointer. A row-major matrix with rows ld apart, read
column-major, is its transpose with leading dimension ld; so row-major C = op(A) op(B) is column-major
C^T = op(B)^T op(A)^T: the call swaps A with B and m with n, and the transposition flags carry over unchanged.
"""

import ctypes

import scipy.linalg.cython_blas  # noqa: F401  (loads SciPy's BLAS, the fallback below)
from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.extending import get_cython_function_address, intrinsic


def _numpy_gemm():
    """{float type: address} of the sgemm and dgemm of NumPy's own BLAS when it exports them with 64-bit integers
    (the OpenBLAS of NumPy's wheels), else None (NumPy built against another BLAS)."""
    try:
        from numpy._core import _multiarray_umath as module  # NumPy 2
    except ImportError:
        from numpy.core import _multiarray_umath as module
    try:
        lib = ctypes.CDLL(module.__file__)  # already loaded: a handle whose lookups also search the BLAS it links
    except OSError:
        return None
    for prefix in ("scipy_", ""):
        try:
            return {kind: ctypes.cast(getattr(lib, f"{prefix}{c}gemm_64_"), ctypes.c_void_p).value
                    for kind, c in ((types.float32, "s"), (types.float64, "d"))}
        except AttributeError:
            continue
    return None


_addresses = _numpy_gemm()
if _addresses is not None:
    LIBRARY = "NumPy's BLAS, 64-bit integers"
    _INT = types.int64
    _SYMBOLS = {types.float32: "minielectra_sgemm_ilp64", types.float64: "minielectra_dgemm_ilp64"}
else:
    LIBRARY = "SciPy's BLAS, 32-bit integers"
    _INT = types.int32
    _SYMBOLS = {types.float32: "minielectra_sgemm", types.float64: "minielectra_dgemm"}
    _addresses = {kind: get_cython_function_address("scipy.linalg.cython_blas", f"{c}gemm")
                  for kind, c in ((types.float32, "s"), (types.float64, "d"))}
for _kind, _address in _addresses.items():
    binding.add_symbol(_SYMBOLS[_kind], _address)


@intrinsic
def gemm(typingctx, a, lda, trans_a, b, ldb, trans_b, c, ldc, m, n, k, accumulate):
    """c = op(a) @ op(b), or c += op(a) @ op(b) when accumulate, for row-major matrices: op(a) is (m, k), op(b) is
    (k, n) and c is (m, n); op(x) is x, or x.T when trans_x. Each array stands for its matrix's first entry, and its
    rows are ld entries apart (a, b and c share one float dtype; BLAS reads nothing outside the matrices). Sizes and
    leading dimensions must fit the BLAS's integers (32-bit ones for SciPy's), and the caller must keep ld >= the
    row's length."""
    arrays = (a, b, c)
    if not all(isinstance(x, types.Array) for x in arrays) or c.dtype not in _SYMBOLS:
        return None
    if a.dtype != c.dtype or b.dtype != c.dtype:
        return None
    name = _SYMBOLS[c.dtype]

    def codegen(context, builder, signature, args):
        a_, lda_, ta_, b_, ldb_, tb_, c_, ldc_, m_, n_, k_, acc_ = args
        tys = signature.args
        i8 = ir.IntType(8)
        fp = context.get_value_type(c.dtype)

        def data(value, ty):
            return builder.bitcast(context.make_array(ty)(context, builder, value).data, cgutils.voidptr_t)

        def by_pointer(value):  # Fortran takes every scalar by address: a stack slot holding it
            return builder.bitcast(cgutils.alloca_once_value(builder, value), cgutils.voidptr_t)

        def integer(value, ty):
            return by_pointer(context.cast(builder, value, ty, _INT) if ty != _INT else value)

        def flag(value, ty):  # 'T' or 'N'
            t = context.cast(builder, value, ty, types.boolean)
            return by_pointer(builder.select(t, ir.Constant(i8, ord("T")), ir.Constant(i8, ord("N"))))

        acc = context.cast(builder, acc_, tys[11], types.boolean)
        beta = builder.select(acc, ir.Constant(fp, 1.0), ir.Constant(fp, 0.0))
        fnty = ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t] * 13)
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        builder.call(fn, [flag(tb_, tys[5]), flag(ta_, tys[2]), integer(n_, tys[9]), integer(m_, tys[8]),
                          integer(k_, tys[10]), by_pointer(ir.Constant(fp, 1.0)), data(b_, tys[3]),
                          integer(ldb_, tys[4]), data(a_, tys[0]), integer(lda_, tys[1]), by_pointer(beta),
                          data(c_, tys[6]), integer(ldc_, tys[7])])
        return context.get_dummy_value()

    return types.none(a, lda, trans_a, b, ldb, trans_b, c, ldc, m, n, k, accumulate), codegen
