// Losses for kernels/cupy_gpu/losses.py (reference: minielectra/ops/losses.py), float and double.
//
// softmax cross-entropy: one block per row of (N, V) logits: block max, block sum of exp(x - max), then the row's
// dlogits = (softmax - onehot) * w / denom in one more pass; the row's weighted log-probability of its target goes to
// an (N,) array the launcher sums. Sigmoid cross-entropy: elementwise, in the reference's overflow-free form.

#ifndef ME_EMULATE
#define ME_DEVICE __device__ __forceinline__
#define ME_INF_F __int_as_float(0x7f800000)
#endif

#define LS_THREADS 256  // block size of the softmax kernel: a multiple of 32, at most 1024

ME_DEVICE float ls_exp(float x) { return expf(x); }
ME_DEVICE double ls_exp(double x) { return exp(x); }
ME_DEVICE float ls_log(float x) { return logf(x); }
ME_DEVICE double ls_log(double x) { return log(x); }
ME_DEVICE float ls_log1p(float x) { return log1pf(x); }
ME_DEVICE double ls_log1p(double x) { return log1p(x); }
ME_DEVICE float ls_max(float a, float b) { return fmaxf(a, b); }
ME_DEVICE double ls_max(double a, double b) { return fmax(a, b); }

// Block-wide sum or max over LS_THREADS threads; every thread gets the result. `red` holds 32 values.
template <typename T, bool MAX>
ME_DEVICE T ls_block_reduce(T x, T* red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const T y = __shfl_xor_sync(0xffffffffu, x, o);
        x = MAX ? ls_max(x, y) : x + y;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, warps = blockDim.x / 32;
    __syncthreads();  // red may still be read from a previous call
    if (lane == 0) red[warp] = x;
    __syncthreads();
    x = red[0];
    for (int w = 1; w < warps; ++w) x = MAX ? ls_max(x, red[w]) : x + red[w];  // the same order in every thread
    return x;
}

// grid N, block LS_THREADS. rowloss[n] = w_n * log softmax(x_n)[t_n]; dlogits = (softmax - onehot) * (w_n / *denom).
template <typename T>
ME_DEVICE void ls_softmax_ce(const T* __restrict__ logits, const long long* __restrict__ targets,
                             const T* __restrict__ weights, const T* __restrict__ denom_ptr, T* __restrict__ dlogits,
                             T* __restrict__ rowloss, int V) {
    __shared__ T red[32];
    const T denom = *denom_ptr;  // sum(w) stays on the device: no transfer before the launch
    const long long n = blockIdx.x;
    const T* x = logits + n * V;
    T m = -T(ME_INF_F);
    for (int c = threadIdx.x; c < V; c += blockDim.x) m = ls_max(m, x[c]);
    m = ls_block_reduce<T, true>(m, red);
    T s = 0;
    for (int c = threadIdx.x; c < V; c += blockDim.x) s += ls_exp(x[c] - m);
    s = ls_block_reduce<T, false>(s, red);
    const long long t = targets[n];
    const T w = weights[n];
    const T logsum = ls_log(s);
    if (threadIdx.x == 0) rowloss[n] = w * (x[t] - m - logsum);
    const T coef = w / denom;
    for (int c = threadIdx.x; c < V; c += blockDim.x) {
        T p = ls_exp(x[c] - m) / s;
        if (c == t) p -= T(1);
        dlogits[n * V + c] = p * coef;
    }
}

// Elementwise over n entries: wloss = w * (max(z, 0) - z y + log1p(exp(-|z|))), dlogits = (sigmoid(z) - y) w / denom.
template <typename T>
ME_DEVICE void ls_sigmoid_ce(const T* __restrict__ z, const T* __restrict__ y, const T* __restrict__ w,
                             const T* __restrict__ denom_ptr, T* __restrict__ dlogits, T* __restrict__ wloss,
                             long long n) {
    const T denom = *denom_ptr;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const T zi = z[i], yi = y[i], wi = w[i];
        const T e = ls_exp(zi < T(0) ? zi : -zi);  // exp(-|z|) in (0, 1]
        const T per = (zi > T(0) ? zi : T(0)) - zi * yi + ls_log1p(e);
        const T sig = zi >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
        wloss[i] = wi * per;
        dlogits[i] = (sig - yi) * wi / denom;
    }
}

#define ME_LS_INSTANCES(T, SUFFIX)                                                                                 \
    extern "C" __global__ void __launch_bounds__(LS_THREADS) softmax_cross_entropy_##SUFFIX(                       \
        const T* logits, const long long* targets, const T* weights, const T* denom, T* dlogits, T* rowloss,       \
        int V) {                                                                                                  \
        ls_softmax_ce<T>(logits, targets, weights, denom, dlogits, rowloss, V);                                   \
    }                                                                                                             \
    extern "C" __global__ void sigmoid_cross_entropy_##SUFFIX(const T* z, const T* y, const T* w, const T* denom, \
                                                              T* dlogits, T* wloss, long long n) {                \
        ls_sigmoid_ce<T>(z, y, w, denom, dlogits, wloss, n);                                                      \
    }

ME_LS_INSTANCES(float, f32)
ME_LS_INSTANCES(double, f64)
