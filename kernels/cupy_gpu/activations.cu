// Bias + GELU for kernels/cupy_gpu/activations.py (reference: minielectra/ops/activations.py), float and double.
//
// Forward: elementwise h = x + b, s = Phi(h) (exact, erf) or tanh(...) (approximate), out = h * Phi(h) or
// 0.5 h (1 + s); h and s are written for the backward, as the reference's GeluCache keeps them.
// Backward: dx = dout * gelu'(h) and, in the same pass, per-block partial sums of dx over a fixed strided set of rows
// (a (P, F) array the launcher sums into db): deterministic, no atomics.

#ifndef ME_EMULATE
#define ME_DEVICE __device__ __forceinline__
#endif

ME_DEVICE float ga_erf(float x) { return erff(x); }
ME_DEVICE double ga_erf(double x) { return erf(x); }
ME_DEVICE float ga_exp(float x) { return expf(x); }
ME_DEVICE double ga_exp(double x) { return exp(x); }
ME_DEVICE float ga_tanh(float x) { return tanhf(x); }
ME_DEVICE double ga_tanh(double x) { return tanh(x); }

#define GA_INV_SQRT_2 0.70710678118654752440
#define GA_INV_SQRT_2PI 0.39894228040143267794
#define GA_TANH_C 0.79788456080286535588  // sqrt(2 / pi)

template <typename T>
ME_DEVICE void ga_forward(const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ out, T* __restrict__ h,
                          T* __restrict__ s, long long n, int F, int approximate) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const T hi = x[i] + b[i % F];
        T si, oi;
        if (approximate) {
            si = ga_tanh(T(GA_TANH_C) * (hi + T(0.044715) * (hi * hi * hi)));
            oi = T(0.5) * hi * (T(1) + si);
        } else {
            si = T(0.5) * (T(1) + ga_erf(hi * T(GA_INV_SQRT_2)));
            oi = hi * si;
        }
        h[i] = hi;
        s[i] = si;
        out[i] = oi;
    }
}

// grid (P, ceil(F / blockDim.x)); rows n = blockIdx.x, blockIdx.x + P, ...
template <typename T>
ME_DEVICE void ga_backward(const T* __restrict__ dout, const T* __restrict__ h, const T* __restrict__ s,
                           T* __restrict__ dx, T* __restrict__ partial, long long N, int F, int approximate) {
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= F) return;
    T acc = 0;
    for (long long n = blockIdx.x; n < N; n += gridDim.x) {
        const long long i = n * F + c;
        const T hi = h[i], si = s[i];
        T grad;
        if (approximate) {
            const T dinner = T(GA_TANH_C) * (T(1) + T(3 * 0.044715) * (hi * hi));
            grad = T(0.5) * (T(1) + si) + T(0.5) * hi * (T(1) - si * si) * dinner;
        } else {
            grad = si + hi * T(GA_INV_SQRT_2PI) * ga_exp(T(-0.5) * hi * hi);
        }
        const T d = dout[i] * grad;
        dx[i] = d;
        acc += d;
    }
    partial[(long long)blockIdx.x * F + c] = acc;
}

#define ME_GA_INSTANCES(T, SUFFIX)                                                                                 \
    extern "C" __global__ void bias_gelu_forward_##SUFFIX(const T* x, const T* b, T* out, T* h, T* s, long long n, \
                                                          int F, int approximate) {                               \
        ga_forward<T>(x, b, out, h, s, n, F, approximate);                                                        \
    }                                                                                                             \
    extern "C" __global__ void bias_gelu_backward_##SUFFIX(const T* dout, const T* h, const T* s, T* dx,          \
                                                           T* partial, long long N, int F, int approximate) {     \
        ga_backward<T>(dout, h, s, dx, partial, N, F, approximate);                                               \
    }

ME_GA_INSTANCES(float, f32)
ME_GA_INSTANCES(double, f64)
