// CPU emulation of the CUDA subset used by kernels/*.cu, so that the very same kernel source can
// be compiled by a host C++ compiler and run against the CPU reference where no GPU exists
// (MEDSSL_CUDA_EMULATE=1; see src/backend/cuda/emu.rs).
//
// Model: the blocks of a launch run one after another on the calling OS thread. Within a block,
// every CUDA thread is a fiber (its own stack; see runtime.cpp) that runs until it reaches
// a barrier: `__syncthreads()` waits for every live thread of the block, and a warp shuffle waits
// for the 32 lanes of its warp, so reductions behave as on the device. Kernels that use neither
// run thread after thread without fibers (the build script marks them). `__shared__` variables
// are `static thread_local`: one copy per OS thread, which is one copy per running block.
//
// What it checks beyond the arithmetic: a barrier reached by only part of a block (deadlock), a
// full-mask shuffle in a warp with fewer than 32 live lanes, and a barrier in a kernel the build
// script classified as barrier-free are errors reported to the launch, never silent.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <vector>

#define __global__
#define __device__ static
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static thread_local
#define __restrict__ __restrict
#define __launch_bounds__(...)

struct uint3 {
    unsigned x, y, z;
};
typedef uint3 dim3;

namespace emu {

// A 16-byte asynchronous copy from global to shared memory (cp_async16) not yet waited for:
// its destination, source and the number of the commit group it belongs to.
struct AsyncCopy {
    void* dst;
    const void* src;
    unsigned group;
};

// The state of the CUDA thread that is running now (fiber or direct): its index, and its
// asynchronous copies still in flight with the number of commit groups it has closed.
struct Thread {
    uint3 tid;
    std::vector<AsyncCopy> copies;
    unsigned committed = 0;
};

extern thread_local Thread* cur_thread;
extern thread_local uint3 cur_block_idx;
extern thread_local uint3 cur_block_dim;
extern thread_local uint3 cur_grid_dim;

void syncthreads();
// Exchanges 4 bytes with the lane `lane ^ lane_mask` of the same warp.
uint32_t shfl_xor_bits(unsigned mask, uint32_t bits, int lane_mask);

}  // namespace emu

#define threadIdx (::emu::cur_thread->tid)
#define blockIdx (::emu::cur_block_idx)
#define blockDim (::emu::cur_block_dim)
#define gridDim (::emu::cur_grid_dim)

static inline void __syncthreads() { ::emu::syncthreads(); }

static inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
    (void)width;
    uint32_t b;
    memcpy(&b, &v, 4);
    b = ::emu::shfl_xor_bits(mask, b, lane_mask);
    float r;
    memcpy(&r, &b, 4);
    return r;
}

static inline int __shfl_xor_sync(unsigned mask, int v, int lane_mask, int width = 32) {
    (void)width;
    return (int)::emu::shfl_xor_bits(mask, (uint32_t)v, lane_mask);
}

static inline unsigned __shfl_xor_sync(unsigned mask, unsigned v, int lane_mask, int width = 32) {
    (void)width;
    return ::emu::shfl_xor_bits(mask, v, lane_mask);
}

// Memory fence and atomics. The blocks of an ordinary launch run one after another on one OS
// thread; those of a cooperative launch (medssl_emu_launch's `cooperative`) run at once, one OS
// thread each, as the device keeps them resident together, so fences and atomics are real ones.
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline unsigned atomicAdd(unsigned* p, unsigned v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}

// The 16-byte vector the float4 kernels load and store in one access (aligned as on the device).
struct alignas(16) float4 {
    float x, y, z, w;
};
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// A load that the device marks evict-first in its caches (the emulation has none).
static inline float __ldcs(const float* p) { return *p; }
static inline float4 __ldcs(const float4* p) { return *p; }

namespace emu {
// One round of a wait for other blocks (yields the OS thread); a block that has waited more than
// 20 s in all is a fault (blocks waiting for one that never comes: a grid-wide wait in an
// ordinary launch, or a block that failed).
void spin_pause();
// The launch's dynamic shared memory (LaunchConfig::shared_mem_bytes) of the running block,
// filled with NaN at the block's start (the device leaves it undefined).
float* dyn_shared();

// The asynchronous global-to-shared copies (common.cuh's cp_async16, cp_async_commit,
// cp_async_wait): a copy is only recorded when issued and lands when its thread waits for its
// group, as late as the device may land it, so that a kernel reading shared memory before its
// wait reads the NaN the block's shared memory starts with and fails its parity test.
void async_copy(void* dst, const void* src);
void async_commit();
// Lands every copy of the thread's committed groups except the newest `pending` ones.
void async_wait(unsigned pending);
}  // namespace emu

static inline void __nanosleep(unsigned ns) {
    (void)ns;
    ::emu::spin_pause();
}

// Marks the emulated build for the few helpers that differ (dynamic shared memory).
#define MEDSSL_EMU 1

// The integer and float min/max overloads that device code gets from the CUDA headers.
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }

static inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
// Round-to-nearest intrinsics: one IEEE operation each, never contracted with another.
static inline float __fadd_rn(float a, float b) {
    volatile float r = a + b;
    return r;
}
static inline float __fmul_rn(float a, float b) {
    volatile float r = a * b;
    return r;
}
static inline float __fdividef(float a, float b) { return a / b; }
