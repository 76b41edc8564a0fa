// Gumbel-max sampling for kernels/cupy_gpu/softmax.py (reference: gumbel_sample in minielectra/ops/softmax.py).
//
// One block per row of (N, V) logits. Each thread walks its columns c = threadIdx.x + k * GS_THREADS, computing the
// reference's noise for entry (n, c) from the seed (the hashed uniform of minielectra/ops/dropout.py, then
// g = -log(-log(u + 1e-9) + 1e-9) in float) and keeping its best score and the first column that reached it; then a
// tree in shared memory keeps, of two candidates, the higher score, or on equal scores the lower column: the first
// index of the row's maximum, as argmax. No (N, V) noise array exists.

#ifndef ME_EMULATE
#define ME_DEVICE __device__ __forceinline__
#define ME_INF_F __int_as_float(0x7f800000)
#endif

#define GS_THREADS 256  // block size: a power of two (the tree halves it), at most 1024

// The top 24 bits of splitmix64(seed + (index + 1) * golden): minielectra.ops.dropout._hash_bits for one entry
// (the same function as attention.cu's attn_keep and kernels/numba_cpu/_common.hash_bits).
ME_DEVICE unsigned long long gs_hash_bits(unsigned long long seed, unsigned long long index) {
    unsigned long long z = seed + (index + 1ULL) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z = z ^ (z >> 31);
    return z >> 40;
}

// grid N, block GS_THREADS. out[n] = argmax_c (logits[n, c] / t + g(n, c)).
template <typename T>
ME_DEVICE void gs_gumbel_argmax(const T* __restrict__ logits, T t, unsigned long long seed, long long* __restrict__ out,
                                int V) {
    __shared__ T best_score[GS_THREADS];
    __shared__ int best_col[GS_THREADS];
    const long long n = blockIdx.x;
    const T* x = logits + n * V;
    T best = -T(ME_INF_F);
    int col = 0;
    for (int c = threadIdx.x; c < V; c += blockDim.x) {
        const float u = (float)gs_hash_bits(seed, (unsigned long long)(n * V + c)) * 5.9604644775390625e-08f;  // 2^-24
        const float a = logf(u + 1e-9f);  // the reference's float32 steps
        const float b = logf(-a + 1e-9f);
        const T score = x[c] / t - (T)b;
        if (score > best || c == (int)threadIdx.x) {  // a thread's columns rise: strictly greater keeps the first
            best = score;
            col = c;
        }
    }
    best_score[threadIdx.x] = best;
    best_col[threadIdx.x] = threadIdx.x < V ? col : V;  // a thread with no column never wins
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half >>= 1) {
        if ((int)threadIdx.x < half) {
            const T s = best_score[threadIdx.x + half];
            const int k = best_col[threadIdx.x + half];
            const T mine = best_score[threadIdx.x];
            if (s > mine || (s == mine && k < best_col[threadIdx.x])) {
                best_score[threadIdx.x] = s;
                best_col[threadIdx.x] = k;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[n] = best_col[0];
}

#define ME_GS_INSTANCES(T, SUFFIX)                                                                                 \
    extern "C" __global__ void __launch_bounds__(GS_THREADS)                                                      \
        gumbel_sample_##SUFFIX(const T* logits, T t, unsigned long long seed, long long* out, int V) {            \
        gs_gumbel_argmax<T>(logits, t, seed, out, V);                                                             \
    }

ME_GS_INSTANCES(float, f32)
ME_GS_INSTANCES(double, f64)
