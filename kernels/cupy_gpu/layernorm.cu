// Layer norm for kernels/cupy_gpu/layernorm.py (reference: minielectra/ops/layernorm.py), float and double.
//
// Forward and dx: one warp per row (blockDim.x / 32 rows per block), warp-shuffle sums; two passes over the row
// (mean, then the centred variance) as the reference computes them. dgamma and dbeta: each block of the partials
// kernel sums a fixed, strided set of rows for its columns into one row of a (P, C) array, which the launcher sums:
// no atomics, so the result is deterministic.

#ifndef ME_EMULATE
#define ME_DEVICE __device__ __forceinline__
#endif

template <typename T>
ME_DEVICE T ln_warp_sum(T x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

ME_DEVICE float ln_sqrt(float x) { return sqrtf(x); }
ME_DEVICE double ln_sqrt(double x) { return sqrt(x); }

// A product rounded on its own, as the reference rounds it. The CUDA compilers fuse a * b + c into one fma by default;
// in dx that would turn g - mean(g) into fma(dout, gamma, -mean(g)), the exact product minus the rounded one, which
// is not 0 where it must be (C = 1: dx was rstd * ulp(g), ~3e-4, instead of 0). __fmul_rn and __dmul_rn are never
// fused.
ME_DEVICE float ln_mul(float a, float b) { return __fmul_rn(a, b); }
ME_DEVICE double ln_mul(double a, double b) { return __dmul_rn(a, b); }

template <typename T>
ME_DEVICE void ln_forward(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                          T* __restrict__ y, T* __restrict__ xhat, T* __restrict__ rstd, long long N, int C, T eps) {
    const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (row >= N) return;  // the whole warp leaves together
    const T* xr = x + row * C;
    T s = 0;
    for (int c = lane; c < C; c += 32) s += xr[c];
    const T mean = ln_warp_sum(s) / T(C);
    T ss = 0;
    for (int c = lane; c < C; c += 32) {
        const T xc = xr[c] - mean;
        ss += xc * xc;
    }
    const T var = ln_warp_sum(ss) / T(C);
    const T r = T(1) / ln_sqrt(var + eps);
    for (int c = lane; c < C; c += 32) {
        const T xh = (xr[c] - mean) * r;
        xhat[row * C + c] = xh;
        y[row * C + c] = xh * gamma[c] + beta[c];
    }
    if (lane == 0) rstd[row] = r;
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * gamma
template <typename T>
ME_DEVICE void ln_backward_dx(const T* __restrict__ dout, const T* __restrict__ xhat, const T* __restrict__ rstd,
                              const T* __restrict__ gamma, T* __restrict__ dx, long long N, int C) {
    const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (row >= N) return;
    const T* gr = dout + row * C;
    const T* hr = xhat + row * C;
    T sg = 0, sgh = 0;
    for (int c = lane; c < C; c += 32) {
        const T g = ln_mul(gr[c], gamma[c]);
        sg += g;
        sgh += g * hr[c];
    }
    const T mg = ln_warp_sum(sg) / T(C);
    const T mgh = ln_warp_sum(sgh) / T(C);
    const T r = rstd[row];
    for (int c = lane; c < C; c += 32) dx[row * C + c] = r * (ln_mul(gr[c], gamma[c]) - mg - hr[c] * mgh);
}

// grid (P, ceil(C / blockDim.x)): partial_dgamma[p, c] = sum over rows n = p, p + P, ... of dout * xhat.
template <typename T>
ME_DEVICE void ln_backward_partials(const T* __restrict__ dout, const T* __restrict__ xhat, T* __restrict__ pg,
                                    T* __restrict__ pb, long long N, int C) {
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    T sg = 0, sb = 0;
    for (long long n = blockIdx.x; n < N; n += gridDim.x) {
        const T g = dout[n * C + c];
        sg += g * xhat[n * C + c];
        sb += g;
    }
    pg[(long long)blockIdx.x * C + c] = sg;
    pb[(long long)blockIdx.x * C + c] = sb;
}

#define ME_LN_INSTANCES(T, SUFFIX)                                                                                 \
    extern "C" __global__ void layernorm_forward_##SUFFIX(const T* x, const T* gamma, const T* beta, T* y,         \
                                                          T* xhat, T* rstd, long long N, int C, T eps) {          \
        ln_forward<T>(x, gamma, beta, y, xhat, rstd, N, C, eps);                                                  \
    }                                                                                                             \
    extern "C" __global__ void layernorm_backward_dx_##SUFFIX(const T* dout, const T* xhat, const T* rstd,        \
                                                              const T* gamma, T* dx, long long N, int C) {        \
        ln_backward_dx<T>(dout, xhat, rstd, gamma, dx, N, C);                                                     \
    }                                                                                                             \
    extern "C" __global__ void layernorm_backward_partials_##SUFFIX(const T* dout, const T* xhat, T* pg, T* pb,   \
                                                                    long long N, int C) {                         \
        ln_backward_partials<T>(dout, xhat, pg, pb, N, C);                                                        \
    }

ME_LN_INSTANCES(float, f32)
ME_LN_INSTANCES(double, f64)
