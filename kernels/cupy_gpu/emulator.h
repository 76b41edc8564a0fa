// A CPU emulator for kernels/cupy_gpu/*.cu, used by the tests on machines without a GPU (see emulator.py).
//
// Force-included (g++ -include emulator.h -x c++ <op>.cu) in front of one kernel file, it maps the CUDA constructs
// the kernels use onto C++20: every CUDA thread of a block is a real OS thread (started by emulator.py, which calls
// emu_enter_thread / the kernel / emu_exit_thread on it), __syncthreads is a std::barrier over the block, warp
// shuffles exchange through a buffer between two per-warp barriers, __shared__ variables are statics (blocks run one
// at a time), dynamic shared memory is one buffer filled with NaN bytes before each block (so reading what no thread
// wrote shows up), and atomicAdd is std::atomic_ref. It checks the kernels' indexing, tiling, synchronisation and
// arithmetic; it says nothing about speed, occupancy, register spills or the GPU's memory model. NVRTC fuses a * b + c
// into one fma unless the kernel spells the product __fmul_rn / __dmul_rn, so a kernel that needs a product rounded on
// its own (an exact cancellation) must say so. The emulator is built both ways (emulator.py): every product rounded
// (g++ -ffp-contract=off), and contracted where g++ sees fit (-mfma -ffp-contract=fast), which is not where NVRTC
// does but fails the same tests when a kernel forgets to say it.
#pragma once
#define ME_EMULATE 1

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

struct emu_dim3 {
    unsigned x, y, z;
};

inline emu_dim3 gridDim{1, 1, 1}, blockDim{1, 1, 1}, blockIdx{0, 0, 0};
inline thread_local emu_dim3 threadIdx{0, 0, 0};
inline std::unique_ptr<std::barrier<>> emu_block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> emu_warp_barriers;
inline unsigned long long emu_shfl_buffer[1024];
alignas(16) inline unsigned char emu_dyn_smem[1 << 17];

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)
#define ME_DEVICE inline
#define ME_DYN_SHARED(T, name) T* name = reinterpret_cast<T*>(emu_dyn_smem)
#define ME_INF_F INFINITY

inline unsigned emu_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp_barriers[emu_tid() / 32]->arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
    static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffle of at most 8 bytes");
    const unsigned t = emu_tid();
    std::memcpy(&emu_shfl_buffer[t], &v, sizeof(T));
    __syncwarp();
    const unsigned src = (t & ~31u) | ((t & 31u) ^ (unsigned)lane_mask);
    T r;
    std::memcpy(&r, &emu_shfl_buffer[src], sizeof(T));
    __syncwarp();
    return r;
}

// The empty asm makes the compiler store the rounded product, so that it cannot fuse it into an fma.
inline float __fmul_rn(float a, float b) {
    float r = a * b;
    asm volatile("" : "+m"(r));
    return r;
}
inline double __dmul_rn(double a, double b) {
    double r = a * b;
    asm volatile("" : "+m"(r));
    return r;
}

template <typename T>
inline T atomicAdd(T* address, T value) {
    return std::atomic_ref<T>(*address).fetch_add(value);
}

extern "C" {
// Not inline: these must be emitted and exported from the shared library.
// Set up block (ix, iy, iz) of a grid (gx, gy, gz) of blocks (bx, by, bz); then start one thread per CUDA thread.
void emu_begin_block(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                            unsigned ix, unsigned iy, unsigned iz) {
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    blockIdx = {ix, iy, iz};
    const unsigned n = bx * by * bz;
    emu_block_barrier = std::make_unique<std::barrier<>>(n);
    emu_warp_barriers.clear();
    for (unsigned w = 0; w * 32 < n; ++w)
        emu_warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w)));
    std::memset(emu_dyn_smem, 0xff, sizeof emu_dyn_smem);  // NaN in every float: uninitialised reads show
}

void emu_enter_thread(unsigned tx, unsigned ty, unsigned tz) { threadIdx = {tx, ty, tz}; }

// A finished thread leaves the barriers, as an exited CUDA thread no longer holds up __syncthreads.
void emu_exit_thread() {
    const unsigned t = emu_tid();
    emu_warp_barriers[t / 32]->arrive_and_drop();
    emu_block_barrier->arrive_and_drop();
}

unsigned long long emu_dyn_smem_bytes() { return sizeof emu_dyn_smem; }
}
