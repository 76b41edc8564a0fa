// Fused attention for kernels/cupy_gpu/attention.py (reference: minielectra/ops/attention.py), float32.
//
// FlashAttention-style: a block owns BR query rows of one (batch, head), one thread per row, and walks the keys in
// tiles of BC rows of K and V staged in shared memory, with an online softmax (running max m and sum l), so nothing of
// size (T, T) is ever stored. The forward saves lse = m + log(l) per row; the backward recomputes each probability as
// exp(s - lse). A fully masked row (no real key) gives zeros and lse = +inf, so every recomputed probability is 0.
//
// Dropout on the probabilities: keep(i, j) = splitmix64(seed + (index + 1) * golden) >> 40 >= threshold, with
// index = ((bh * T) + i) * T + j and threshold = ceil(p * 2^24): the same pure function of (seed, bh, i, j) in the
// forward and both backward kernels, so the gradient is exact for the mask used, and no mask is stored.
//
// Per-thread vectors have compile-time size MAXD (32, 64 or 128 >= D) so they live in registers; the loops over a
// tile's rows stay rolled (#pragma unroll 1), which keeps NVRTC compile times in seconds.

#ifndef ME_EMULATE
#define ME_DEVICE __device__ __forceinline__
#define ME_DYN_SHARED(T, name) \
    extern __shared__ __align__(16) unsigned char name##_bytes[]; T* name = reinterpret_cast<T*>(name##_bytes)
#define ME_INF_F __int_as_float(0x7f800000)
#endif

#define BR 64  // query (or key) rows per block, one thread each
#define BC 32  // rows per shared-memory tile

ME_DEVICE bool attn_keep(unsigned long long seed, unsigned long long index, unsigned int threshold) {
    unsigned long long z = seed + (index + 1ULL) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z = z ^ (z >> 31);
    return (unsigned int)(z >> 40) >= threshold;
}

// Stage rows [r0, r0 + BC) of a (T, D) matrix into sm (BC, D), zeros past T.
ME_DEVICE void attn_stage(float* sm, const float* src, int r0, int T, int D) {
    for (int idx = threadIdx.x; idx < BC * D; idx += blockDim.x) {
        int rr = idx / D;
        int r = r0 + rr;
        sm[idx] = r < T ? src[(long long)r * D + (idx - rr * D)] : 0.0f;
    }
}

// Stage the key/value tile starting at key j0 and flag its real keys (in range and not padding). Forward and the
// dq backward walk the same K, V tiles, so they share this.
ME_DEVICE void attn_stage_kv(float* ks, float* vs, unsigned char* valid, const float* k, const float* v,
                             const unsigned char* keys, int b, int j0, int T, int D) {
    attn_stage(ks, k, j0, T, D);
    attn_stage(vs, v, j0, T, D);
    for (int jj = threadIdx.x; jj < BC; jj += blockDim.x)
        valid[jj] = (j0 + jj < T) && keys[(long long)b * T + j0 + jj] != 0;
}

// grid (B*H, ceil(T / BR)), block BR, dynamic shared 2 * BC * D floats.
template <int MAXD>
ME_DEVICE void attn_forward(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                            const unsigned char* __restrict__ keys, float* __restrict__ out, float* __restrict__ lse,
                            int H, int T, int D, float scale, unsigned int threshold, float drop_scale,
                            unsigned long long seed) {
    ME_DYN_SHARED(float, sm);
    float* ks = sm;           // (BC, D)
    float* vs = sm + BC * D;  // (BC, D)
    __shared__ unsigned char valid[BC];
    const int bh = blockIdx.x, b = bh / H;
    const int i = blockIdx.y * BR + threadIdx.x;
    const bool row = i < T;
    const long long base = (long long)bh * T * D;
    float qr[MAXD], o[MAXD];
#pragma unroll
    for (int d = 0; d < MAXD; ++d) {
        qr[d] = (row && d < D) ? q[base + (long long)i * D + d] : 0.0f;
        o[d] = 0.0f;
    }
    float m = -ME_INF_F, l = 0.0f;
    for (int j0 = 0; j0 < T; j0 += BC) {
        __syncthreads();  // the previous tile has been used by every thread
        attn_stage_kv(ks, vs, valid, k + base, v + base, keys, b, j0, T, D);
        __syncthreads();
        if (!row) continue;
#pragma unroll 1
        for (int jj = 0; jj < BC; ++jj) {
            if (!valid[jj]) continue;
            float dot = 0.0f;
#pragma unroll
            for (int d = 0; d < MAXD; ++d)
                if (d < D) dot += qr[d] * ks[jj * D + d];
            const float s = dot * scale;
            if (s > m) {  // a new running max: rescale what was summed against the old one (0 while m was -inf)
                const float corr = expf(m - s);
                l *= corr;
#pragma unroll
                for (int d = 0; d < MAXD; ++d) o[d] *= corr;
                m = s;
            }
            const float p = expf(s - m);
            l += p;
            float w = p;
            if (threshold) {
                const unsigned long long index = ((unsigned long long)bh * T + i) * T + (j0 + jj);
                w = attn_keep(seed, index, threshold) ? p * drop_scale : 0.0f;
            }
#pragma unroll
            for (int d = 0; d < MAXD; ++d)
                if (d < D) o[d] += w * vs[jj * D + d];
        }
    }
    if (!row) return;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int d = 0; d < MAXD; ++d)
        if (d < D) out[base + (long long)i * D + d] = o[d] * inv;
    lse[(long long)bh * T + i] = l > 0.0f ? m + logf(l) : ME_INF_F;
}

// dq: one thread per query row, walking K and V tiles. grid (B*H, ceil(T / BR)), dynamic shared 2 * BC * D floats.
// delta[i] = dout_i . out_i = sum_j P_ij dP_ij (also with dropout), the softmax backward's row term.
template <int MAXD>
ME_DEVICE void attn_backward_dq(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                                const unsigned char* __restrict__ keys, const float* __restrict__ dout,
                                const float* __restrict__ lse, const float* __restrict__ delta, float* __restrict__ dq,
                                int H, int T, int D, float scale, unsigned int threshold, float drop_scale,
                                unsigned long long seed) {
    ME_DYN_SHARED(float, sm);
    float* ks = sm;
    float* vs = sm + BC * D;
    __shared__ unsigned char valid[BC];
    const int bh = blockIdx.x, b = bh / H;
    const int i = blockIdx.y * BR + threadIdx.x;
    const long long base = (long long)bh * T * D;
    const float L = i < T ? lse[(long long)bh * T + i] : ME_INF_F;
    const bool row = i < T && L != ME_INF_F;  // a fully masked row has every probability 0: dq = 0
    const float Di = i < T ? delta[(long long)bh * T + i] : 0.0f;
    float qr[MAXD], gr[MAXD], acc[MAXD];
#pragma unroll
    for (int d = 0; d < MAXD; ++d) {
        qr[d] = (row && d < D) ? q[base + (long long)i * D + d] : 0.0f;
        gr[d] = (row && d < D) ? dout[base + (long long)i * D + d] : 0.0f;
        acc[d] = 0.0f;
    }
    for (int j0 = 0; j0 < T; j0 += BC) {
        __syncthreads();
        attn_stage_kv(ks, vs, valid, k + base, v + base, keys, b, j0, T, D);
        __syncthreads();
        if (!row) continue;
#pragma unroll 1
        for (int jj = 0; jj < BC; ++jj) {
            if (!valid[jj]) continue;
            float s = 0.0f, dp = 0.0f;
#pragma unroll
            for (int d = 0; d < MAXD; ++d)
                if (d < D) {
                    s += qr[d] * ks[jj * D + d];
                    dp += gr[d] * vs[jj * D + d];
                }
            const float p = expf(s * scale - L);
            if (threshold) {
                const unsigned long long index = ((unsigned long long)bh * T + i) * T + (j0 + jj);
                dp = attn_keep(seed, index, threshold) ? dp * drop_scale : 0.0f;
            }
            const float ds = p * (dp - Di);
#pragma unroll
            for (int d = 0; d < MAXD; ++d)
                if (d < D) acc[d] += ds * ks[jj * D + d];
        }
    }
    if (i >= T) return;
#pragma unroll
    for (int d = 0; d < MAXD; ++d)
        if (d < D) dq[base + (long long)i * D + d] = acc[d] * scale;
}

// dk, dv: one thread per key row, walking tiles of Q, dout, lse and delta. grid (B*H, ceil(T / BR)),
// dynamic shared 2 * BC * D + 2 * BC floats.
template <int MAXD>
ME_DEVICE void attn_backward_dkdv(const float* __restrict__ q, const float* __restrict__ k,
                                  const float* __restrict__ v, const unsigned char* __restrict__ keys,
                                  const float* __restrict__ dout, const float* __restrict__ lse,
                                  const float* __restrict__ delta, float* __restrict__ dk, float* __restrict__ dv,
                                  int H, int T, int D, float scale, unsigned int threshold, float drop_scale,
                                  unsigned long long seed) {
    ME_DYN_SHARED(float, sm);
    float* qs = sm;                  // (BC, D)
    float* gs = sm + BC * D;         // (BC, D) dout rows
    float* ls = sm + 2 * BC * D;     // (BC,) lse
    float* ds_ = sm + 2 * BC * D + BC;  // (BC,) delta
    const int bh = blockIdx.x, b = bh / H;
    const int j = blockIdx.y * BR + threadIdx.x;
    const long long base = (long long)bh * T * D;
    const bool col = j < T && keys[(long long)b * T + j] != 0;  // a padded key gets no gradient
    float kr[MAXD], vr[MAXD], dka[MAXD], dva[MAXD];
#pragma unroll
    for (int d = 0; d < MAXD; ++d) {
        kr[d] = (col && d < D) ? k[base + (long long)j * D + d] : 0.0f;
        vr[d] = (col && d < D) ? v[base + (long long)j * D + d] : 0.0f;
        dka[d] = 0.0f;
        dva[d] = 0.0f;
    }
    for (int i0 = 0; i0 < T; i0 += BC) {
        __syncthreads();
        attn_stage(qs, q + base, i0, T, D);
        attn_stage(gs, dout + base, i0, T, D);
        for (int ii = threadIdx.x; ii < BC; ii += blockDim.x) {
            const bool in = i0 + ii < T;
            ls[ii] = in ? lse[(long long)bh * T + i0 + ii] : ME_INF_F;
            ds_[ii] = in ? delta[(long long)bh * T + i0 + ii] : 0.0f;
        }
        __syncthreads();
        if (!col) continue;
#pragma unroll 1
        for (int ii = 0; ii < BC; ++ii) {
            const float L = ls[ii];
            if (L == ME_INF_F) continue;  // past T, or a fully masked query row
            float s = 0.0f, dp = 0.0f;
#pragma unroll
            for (int d = 0; d < MAXD; ++d)
                if (d < D) {
                    s += qs[ii * D + d] * kr[d];
                    dp += gs[ii * D + d] * vr[d];
                }
            const float p = expf(s * scale - L);
            float pd = p;  // the dropped weight that multiplied v_j
            if (threshold) {
                const unsigned long long index = ((unsigned long long)bh * T + (i0 + ii)) * T + j;
                const bool keep = attn_keep(seed, index, threshold);
                pd = keep ? p * drop_scale : 0.0f;
                dp = keep ? dp * drop_scale : 0.0f;
            }
            const float ds = p * (dp - ds_[ii]);
#pragma unroll
            for (int d = 0; d < MAXD; ++d)
                if (d < D) {
                    dva[d] += pd * gs[ii * D + d];
                    dka[d] += ds * qs[ii * D + d];
                }
        }
    }
    if (j >= T) return;
#pragma unroll
    for (int d = 0; d < MAXD; ++d)
        if (d < D) {
            dk[base + (long long)j * D + d] = dka[d] * scale;
            dv[base + (long long)j * D + d] = dva[d];
        }
}

#define ME_ATTN_INSTANCES(MAXD)                                                                                     \
    extern "C" __global__ void __launch_bounds__(BR) attention_forward_d##MAXD(                                      \
        const float* q, const float* k, const float* v, const unsigned char* keys, float* out, float* lse, int H,   \
        int T, int D, float scale, unsigned int threshold, float drop_scale, unsigned long long seed) {             \
        attn_forward<MAXD>(q, k, v, keys, out, lse, H, T, D, scale, threshold, drop_scale, seed);                  \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(BR) attention_backward_dq_d##MAXD(                                  \
        const float* q, const float* k, const float* v, const unsigned char* keys, const float* dout,               \
        const float* lse, const float* delta, float* dq, int H, int T, int D, float scale, unsigned int threshold,  \
        float drop_scale, unsigned long long seed) {                                                                \
        attn_backward_dq<MAXD>(q, k, v, keys, dout, lse, delta, dq, H, T, D, scale, threshold, drop_scale, seed);  \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(BR) attention_backward_dkdv_d##MAXD(                                \
        const float* q, const float* k, const float* v, const unsigned char* keys, const float* dout,               \
        const float* lse, const float* delta, float* dk, float* dv, int H, int T, int D, float scale,               \
        unsigned int threshold, float drop_scale, unsigned long long seed) {                                        \
        attn_backward_dkdv<MAXD>(q, k, v, keys, dout, lse, delta, dk, dv, H, T, D, scale, threshold, drop_scale,   \
                                 seed);                                                                             \
    }

ME_ATTN_INSTANCES(32)
ME_ATTN_INSTANCES(64)
ME_ATTN_INSTANCES(128)
