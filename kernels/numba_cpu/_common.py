"""Helpers shared by the Numba CPU kernels: dtype resolution, the fixed chunking of race-free reductions, exp, row
reductions and the counter-based dropout hash."""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from minielectra.ops import dropout as _dropout

# Reductions over rows (dgamma, dbeta, db, loss sums) are split into at most this many chunks, each written by one
# prange iteration into its own row of a (chunks, C) partial array and summed afterwards. A fixed count (not the thread
# count) keeps the summation order, and so the result, the same on every machine.
N_CHUNKS = 32

# Lets LLVM fuse a multiply and the add that follows into one FMA instruction, which rounds once where the pair rounds
# twice. The polynomials of exp, log and GELU's Phi run up to twice as fast with it (measured below); their accuracy is
# measured on code compiled this way (tests/kernels/test_common.py). It is never given to code that mirrors the
# reference's float32 arithmetic, whose rounding the kernels reproduce.
CONTRACT = {"contract"}


def float_dtype(*arrays):
    """The dtype the reference would compute in: NumPy's promotion of the float inputs (float32 or float64)."""
    return np.result_type(*arrays)


def as_2d(x, dtype):
    """x (..., C) as a C-contiguous (N, C) array of `dtype` (a view when it already is one)."""
    x = np.ascontiguousarray(x, dtype=dtype)
    C = x.shape[-1] if x.ndim else 1
    return x.reshape(-1, C)


def n_chunks(n):
    return max(1, min(n, N_CHUNKS))


def exp(x):
    """e**x for a float32 or float64 scalar inside a kernel; see the overload below."""
    return math.exp(x)


# exp(x) = 2^k e^r with k = round(x / ln 2) and |r| <= ln 2 / 2: a polynomial in r, and 2^k made by writing k into a
# float's exponent bits, all plain arithmetic, which LLVM turns into SIMD code. The C library's expf, which math.exp
# calls, is a function call per element, so a loop around it runs one element at a time. Measured on 2 cores (tiny
# preset, batch 32 x 128, `bench_ops`), math.exp -> plain arithmetic: attention forward + backward 9.0 -> 7.8 ms,
# bias + GELU 17.6 -> 14.2 ms, softmax cross-entropy 8.9 -> 5.7 ms. A loop that also calls another C function (log1p in
# the sigmoid loss) stays one element at a time, and there math.exp is the faster of the two.
# exp_float32 works in float32 arithmetic (sixteen lanes of a 512-bit register, where float64 has eight), for the
# float32 kernels' exps (attention's weights, the MLM softmax, GELU's Phi): within one ulp (0.99 measured over 2 M
# inputs, tests/kernels/test_common.py; NumPy's float32 exp, the reference's, is within 2.4). One core, a row loop of
# exp(s * scale - m) over float32: 0.47 ns per entry with the same method in float64, 0.18 in float32.
# It is compiled on its own with CONTRACT, not inlined by numba (which would compile it with the caller's flags);
# LLVM still inlines it into the calling loop and vectorises it there. A loop of exp over 2 M float32 on one core:
# 2.1 ms when 2^k was nine conditional squarings, 1.2 ms with the exponent bits, 0.7 ms with CONTRACT too.
_EXP_LO, _EXP_HI = -110.0, 89.0  # beyond these e**x is 0 or inf in float32
_LN2 = math.log(2.0)
_INV_LN2 = 1.0 / _LN2


# A float and the integer of its width that share one bit pattern.
_SAME_BITS = {types.float32: types.int32, types.int32: types.float32,
              types.float64: types.int64, types.int64: types.float64}


@intrinsic
def _reinterpret(typingctx, x):
    """The value whose bit pattern is x's, in the other type of its width: float32 <-> int32, float64 <-> int64. A
    reinterpretation (C's memcpy idiom, LLVM's bitcast), which numba has no scalar spelling for."""
    if x not in _SAME_BITS:
        return None
    kind = _SAME_BITS[x]

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(kind))

    return kind(x), codegen


# Adding 1.5 * 2^23 to a float32 of magnitude below 2^22 rounds it to an integer, which then sits in the sum's low
# mantissa bits: k as a float32 (subtract it again) and as an int (subtract the sum's bits), with no float-to-int
# conversion, which would run at half the SIMD width.
_ROUNDER = np.float32(1.5 * 2**23)
_ROUNDER_BITS = 0x4B400000  # the bit pattern of _ROUNDER
# ln 2 = _LN2_HI + _LN2_LO (Cody and Waite): _LN2_HI has so few mantissa bits that k * _LN2_HI is exact for |k| < 2^9.
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
_EXP32_P = tuple(np.float32(c) for c in (5.0000001201e-1, 1.6666665459e-1, 4.1665795894e-2, 8.3334519073e-3,
                                         1.3981999507e-3, 1.9875691500e-4))  # Cephes' expf: e^r - 1 - r = r^2 P(r)
_EXP32_LO, _EXP32_HI = np.float32(_EXP_LO), np.float32(_EXP_HI)
_INV_LN2_32, _ONE32 = np.float32(_INV_LN2), np.float32(1.0)


@njit(cache=True, inline="always")
def horner(coefs, x):
    """coefs[0] + coefs[1] x + ... + coefs[-1] x^(n-1), by Horner's rule."""
    acc = coefs[-1]
    for c in coefs[-2::-1]:
        acc = acc * x + c
    return acc


@njit(cache=True, inline="always")
def _pow2_float32(k):
    """2^k as a float32 for an integer k in [-126, 127]: k + 127 in the exponent field."""
    return _reinterpret(np.int32((k + 127) << 23))


@njit(cache=True, inline="always")
def _exp32_scaled(t, r):
    """e^r 2^k in float32, for k held in t = k + 1.5 * 2^23 (its low mantissa bits) and the reduced |r| <= ln 2 / 2."""
    e = _ONE32 + (r + r * r * horner(_EXP32_P, r))
    # 2^k in two normal factors: e 2^k1 is exact, and the second product rounds once, to a subnormal if it must.
    ki = _reinterpret(t) - _ROUNDER_BITS
    k1 = ki >> 1
    return (e * _pow2_float32(k1)) * _pow2_float32(ki - k1)


@njit(cache=True, fastmath=CONTRACT, error_model="numpy")
def exp_float32(x):
    """e**x of a float32 x in float32 arithmetic, within one ulp (subnormal results included): inf above 88.73, 0 below
    -103.98, as float32's e**x."""
    v = min(max(x, _EXP32_LO), _EXP32_HI)
    t = v * _INV_LN2_32 + _ROUNDER
    k = t - _ROUNDER  # round(v / ln 2), in [-159, 128]
    return _exp32_scaled(t, (v - k * _LN2_HI) - k * _LN2_LO)


@njit(cache=True, fastmath=CONTRACT, error_model="numpy")
def exp_float32_sum(hi, lo):
    """e**(hi + lo) in float32 arithmetic for float32 hi <= 0 and |lo| far below |hi|, without rounding hi + lo: lo
    joins the reduced argument r, after the exact steps of the reduction. For e^(-h^2 / 2) with h^2 / 2 split into an
    exact hi and a small lo: rounding h^2 / 2 to float32 first would err by up to 2^-24 h^2 / 2 in the exponent, 64 ulps
    of the result at h = 14.5 (GELU's Phi, activations.py). Within 1.2 ulps (test_common.py)."""
    v = max(hi, _EXP32_LO)
    t = v * _INV_LN2_32 + _ROUNDER
    k = t - _ROUNDER
    return _exp32_scaled(t, ((v - k * _LN2_HI) - k * _LN2_LO) + lo)


# ln x = e ln 2 + ln m for x = m 2^e with m in [sqrt(1/2), sqrt 2), by Cephes' logf: ln(1 + f) = f - f^2 / 2 +
# f^3 P(f) for f = m - 1, P of degree 8, and e ln 2 in two parts (_LN2_HI, _LN2_LO) so that e * _LN2_HI is exact. Plain
# float32 arithmetic on the exponent and mantissa bits, no division: it inlines and vectorises as exp_float32 does,
# where the C library's logf is a call per element. The Gumbel sampler (softmax.py) takes two logs per vocabulary entry:
# 304 x 8192 of them (the tiny preset's picks for 16 sequences) on one core, 3.8 ms with the same method in float64
# (rounded to float32), 2.2 ms with this.
_LOG32_P = tuple(np.float32(c) for c in (3.3333331174e-1, -2.4999993993e-1, 2.0000714765e-1, -1.6668057665e-1,
                                         1.4249322787e-1, -1.2420140846e-1, 1.1676998740e-1, -1.1514610310e-1,
                                         7.0376836292e-2))
_SQRT_HALF32, _HALF32 = np.float32(math.sqrt(0.5)), np.float32(0.5)
_MANTISSA32, _HALF_BITS32 = np.int32((1 << 23) - 1), np.int32(0x3F000000)  # 0.5's bits: exponent -1, mantissa 0


@njit(cache=True, fastmath=CONTRACT, error_model="numpy")
def log_float32(x):
    """ln x of a positive normal float32 x in float32 arithmetic, within one ulp (0.81 measured, test_common.py; NumPy's
    float32 log is within 3.6). Zero, negative, subnormal, inf and NaN inputs are not handled."""
    bits = _reinterpret(x)
    e = np.float32((bits >> 23) - 126)
    m = _reinterpret(np.int32((bits & _MANTISSA32) | _HALF_BITS32))  # x = m 2^e, m in [1/2, 1)
    if m < _SQRT_HALF32:
        e -= _ONE32
        f = m + m - _ONE32
    else:
        f = m - _ONE32
    z = f * f
    y = f * z * horner(_LOG32_P, f) + e * _LN2_LO - _HALF32 * z
    return (f + y) + e * _LN2_HI


@overload(exp, inline="always", jit_options={"cache": True})
def _exp_overload(x):
    if x == types.float64:
        return lambda x: math.exp(x)
    if x != types.float32:
        return None
    return lambda x: exp_float32(x)


# Row reductions in SIMD. A running sum is a chain of additions, each waiting for the one before, and since float
# addition is not associative LLVM keeps the order written: one add at a time, however the loop is unrolled (four
# chains written by hand run the adds side by side, but still one lane each). Given fastmath "reassoc" it keeps 16-lane
# partial sums in vector registers and adds them up at the end: on one core, rows of 512 float32 in cache, a sum takes
# 0.015 ns per entry where four chains took 0.13, a dot product 0.04 where they took 0.24. The order of the additions is
# then LLVM's, set by the CPU's vector width: the same bits on every run on one machine, last-bit differences between an
# AVX2 and an AVX-512 machine. (clip_scale's global norm, in optim.py, keeps an order fixed by its code instead.) Each
# function is compiled on its own, not inlined by numba, so the flag stays on its additions and off the caller's
# arithmetic; LLVM still inlines it into the calling loop. Products are still rounded before they are added (no
# CONTRACT), as in the reference.
REDUCE = {"reassoc"}


@intrinsic
def _maxnum(typingctx, a, b):
    """max(a, b) by LLVM's maxnum intrinsic, which LLVM vectorises in a reduction; numba's max (a compare and a branch)
    stays scalar. A float32 and a float64 give a float64, as numba's max."""
    floats = (types.float32, types.float64)
    if a not in floats or b not in floats:
        return None
    kind = types.float64 if types.float64 in (a, b) else types.float32

    def codegen(context, builder, signature, args):
        x, y = (context.cast(builder, v, t, kind) for v, t in zip(args, signature.args))
        fnty = ir.FunctionType(x.type, [x.type, x.type])
        name = f"llvm.maxnum.f{32 if kind == types.float32 else 64}"
        return builder.call(builder.module.declare_intrinsic(name, fnty=fnty), [x, y])

    return kind(a, b), codegen


@njit(cache=True, fastmath={"nnan", "nsz"})
def row_max(x, neg_inf):
    """max(neg_inf, max(x)). A max is exact in any order, so this one is the same on every machine. With nnan LLVM
    may ignore a NaN entry here; every caller then takes exp(x - max) of the same row, which carries the NaN on."""
    m = neg_inf
    for j in range(x.shape[0]):
        m = _maxnum(m, x[j])
    return m


@njit(cache=True, fastmath=REDUCE)
def row_sum(x, zero):
    """sum(x) in SIMD partial sums (above). The sum has zero's type: a float64 zero sums a float32 row in float64."""
    s = zero
    for j in range(x.shape[0]):
        s += x[j]
    return s


@njit(cache=True, fastmath=REDUCE)
def row_dot(x, y, zero):
    """sum(x * y) in SIMD partial sums, as row_sum."""
    s = zero
    for j in range(x.shape[0]):
        s += x[j] * y[j]
    return s


# The dropout hash (minielectra.ops.dropout.hashed_keep_mask) for one entry at a time, so a kernel decides dropout
# inside its own loops and recomputes the same mask in its backward from the seed alone. Its constants as uint64
# scalars: numba freezes them as uint64, and uint64 op uint64 stays uint64 (mixing in an int64 would promote to
# float64 and lose the low bits).
_GOLDEN, _MIX1, _MIX2 = (np.uint64(c) for c in (_dropout.HASH_GOLDEN, _dropout.HASH_MIX1, _dropout.HASH_MIX2))
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_S_TOP = np.uint64(64 - _dropout.HASH_KEEP_BITS)
ONE_U64 = np.uint64(1)  # a counter's step: uint64 + uint64 stays uint64


@njit(cache=True, inline="always")
def hash_bits(seed, counter):
    """The top 24 bits of the hash of one entry (uint64): counter = flat index + 1, seed uint64."""
    z = seed + counter * _GOLDEN
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    z = z ^ (z >> _S31)
    return z >> _S_TOP


@njit(cache=True, inline="always")
def keep(seed, counter, threshold):
    """hashed_keep_mask for one entry: counter = flat index + 1 (uint64), seed and threshold uint64."""
    return hash_bits(seed, counter) >= threshold


@njit(cache=True, inline="always")
def keep_row(kept, seed, counter, threshold):
    """kept[j] = the keep bit of flat index counter + j. A loop of its own: LLVM vectorises the integer hash here, where
    beside an exp call it would run one entry at a time."""
    for j in range(kept.shape[0]):
        counter += ONE_U64  # the hash counts from flat index + 1
        kept[j] = keep(seed, counter, threshold)
