// Multi-tensor AdamW and the sum of squares of clip_scale for kernels/cupy_gpu/optim.py (references:
// minielectra.optim.adamw_step and clip_scale), float and double.
//
// One launch updates every parameter of a dtype: the launcher passes device arrays of the tensors' pointers (p, g, m,
// v), sizes and weight decays, and a table mapping each block to (tensor, first element) of a CHUNK-sized slice. Each
// element is read once and m, v, p are written once, with the clipping scale folded into g. The arithmetic follows
// the reference line by line (no bias correction, decoupled decay only where wd != 0); 1 - beta is formed in double on
// the host and rounded once, as the reference's Python scalars are.

#ifndef ME_EMULATE
#define ME_DEVICE __device__ __forceinline__
#endif

ME_DEVICE float ad_sqrt(float x) { return sqrtf(x); }
ME_DEVICE double ad_sqrt(double x) { return sqrt(x); }

template <typename T>
ME_DEVICE void ad_step(const unsigned long long* __restrict__ p_ptrs, const unsigned long long* __restrict__ g_ptrs,
                       const unsigned long long* __restrict__ m_ptrs, const unsigned long long* __restrict__ v_ptrs,
                       const long long* __restrict__ sizes, const T* __restrict__ wds,
                       const int* __restrict__ block_tensor, const long long* __restrict__ block_start, long long chunk,
                       T lr, const T* __restrict__ grad_scale_ptr, T b1, T c1, T b2, T c2, T eps) {
    const T grad_scale = *grad_scale_ptr;  // read on the device: clipping's scale never crosses to the host
    const int t = block_tensor[blockIdx.x];
    const long long start = block_start[blockIdx.x];
    const long long n = sizes[t];
    const long long end = start + chunk < n ? start + chunk : n;
    T* p = reinterpret_cast<T*>(p_ptrs[t]);
    const T* g = reinterpret_cast<const T*>(g_ptrs[t]);
    T* m = reinterpret_cast<T*>(m_ptrs[t]);
    T* v = reinterpret_cast<T*>(v_ptrs[t]);
    const T wd = wds[t];
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const T gi = g[i] * grad_scale;
        const T mi = b1 * m[i] + c1 * gi;
        const T vi = b2 * v[i] + c2 * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        T update = mi / (ad_sqrt(vi) + eps);
        if (wd != T(0)) update += wd * p[i];
        p[i] = p[i] - lr * update;
    }
}

#define ME_AD_INSTANCES(T, SUFFIX)                                                                                 \
    extern "C" __global__ void adamw_step_##SUFFIX(                                                                \
        const unsigned long long* p_ptrs, const unsigned long long* g_ptrs, const unsigned long long* m_ptrs,     \
        const unsigned long long* v_ptrs, const long long* sizes, const T* wds, const int* block_tensor,          \
        const long long* block_start, long long chunk, T lr, const T* grad_scale, T b1, T c1, T b2, T c2, T eps) { \
        ad_step<T>(p_ptrs, g_ptrs, m_ptrs, v_ptrs, sizes, wds, block_tensor, block_start, chunk, lr, grad_scale, b1, \
                   c1, b2, c2, eps);                                                                              \
    }

ME_AD_INSTANCES(float, f32)
ME_AD_INSTANCES(double, f64)

// The sum of squares of every gradient of a dtype, for clip_scale: the same tensor and block tables as the update.
// Each block adds the squares of its CHUNK-sized slice in double and writes one partial sum, in a fixed order: each
// thread's strided elements, then a tree over the block's ME_SQ_THREADS sums. The launcher adds the partial sums.
#define ME_SQ_THREADS 256  // the launch's block size: optim.py's THREADS

template <typename T>
ME_DEVICE void sq_partial(const unsigned long long* __restrict__ g_ptrs, const long long* __restrict__ sizes,
                          const int* __restrict__ block_tensor, const long long* __restrict__ block_start,
                          long long chunk, double* __restrict__ partial) {
    __shared__ double sums[ME_SQ_THREADS];
    const int t = block_tensor[blockIdx.x];
    const long long start = block_start[blockIdx.x];
    const long long n = sizes[t];
    const long long end = start + chunk < n ? start + chunk : n;
    const T* g = reinterpret_cast<const T*>(g_ptrs[t]);
    double s = 0.0;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const double x = g[i];
        s += x * x;
    }
    sums[threadIdx.x] = s;
    __syncthreads();
    for (int half = ME_SQ_THREADS / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) sums[threadIdx.x] += sums[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = sums[0];
}

#define ME_SQ_INSTANCES(T, SUFFIX)                                                                                 \
    extern "C" __global__ void sum_squares_##SUFFIX(const unsigned long long* g_ptrs, const long long* sizes,     \
                                                    const int* block_tensor, const long long* block_start,        \
                                                    long long chunk, double* partial) {                           \
        sq_partial<T>(g_ptrs, sizes, block_tensor, block_start, chunk, partial);                                  \
    }

ME_SQ_INSTANCES(float, f32)
ME_SQ_INSTANCES(double, f64)
