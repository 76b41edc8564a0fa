// Embedding backward for kernels/cupy_gpu/embedding.py (reference: minielectra/ops/embedding.py), float and double.
//
// dtable[ids[n], e] += dout[n, e] with atomicAdd, one thread per (n, e). Rows looked up more than once are summed
// in whatever order the atomics land, so float results can differ in the last bits from run to run (and from the
// reference's add.at): NON-DETERMINISTIC summation order. An id outside [0, V) is skipped rather than written out of
// bounds (the forward has already rejected such ids).

#ifndef ME_EMULATE
#define ME_DEVICE __device__ __forceinline__
#endif

template <typename T>
ME_DEVICE void emb_backward(const T* __restrict__ dout, const long long* __restrict__ ids, T* __restrict__ dtable,
                            long long n, int E, long long V) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n * E; i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / E;
        const long long id = ids[row];
        if (id < 0 || id >= V) continue;
        atomicAdd(dtable + id * E + (i - row * E), dout[i]);
    }
}

extern "C" __global__ void embedding_backward_f32(const float* dout, const long long* ids, float* dtable, long long n,
                                                  int E, long long V) {
    emb_backward<float>(dout, ids, dtable, n, E, V);
}

extern "C" __global__ void embedding_backward_f64(const double* dout, const long long* ids, double* dtable,
                                                  long long n, int E, long long V) {
    emb_backward<double>(dout, ids, dtable, n, E, V);
}
