// Shared device helpers for the medssl kernels (included by every kernels/*.cu).
//
// Conventions used throughout: tensors are contiguous row-major f32; sizes are `int` (the Rust
// side checks that every tensor has fewer than 2^31 elements); "warp per row" kernels are launched
// with blockDim.x = 256 (8 warps) and grid.x = ceil(rows / 8), warp w of block b owning row
// b*8 + w and striding over that row's columns by 32 lanes.
#pragma once
#include <math.h>

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. Safe to call repeatedly in one kernel (guards its shared scratch with barriers).
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = (threadIdx.x < nwarps) ? scratch[threadIdx.x] : 0.f;
    if (warp == 0) {
        r = warp_sum(r);
        if (lane == 0) scratch[0] = r;
    }
    __syncthreads();
    r = scratch[0];
    return r;
}

// Member functions of device-side structs (in the emulation `__device__` means `static`, which a
// member function cannot be).
#ifdef MEDSSL_EMU
#define DEVICE_MEMBER inline
#else
#define DEVICE_MEMBER __device__ __forceinline__
#endif

// The launch's dynamic shared memory (LaunchConfig::shared_mem_bytes) as floats.
#ifdef MEDSSL_EMU
__device__ __forceinline__ float* dyn_shared_f32() { return ::emu::dyn_shared(); }
#else
__device__ __forceinline__ float* dyn_shared_f32() {
    // 16-byte aligned: the float4 batch-norm kernels keep float4s there.
    extern __shared__ __align__(16) float medssl_dyn_shared[];
    return medssl_dyn_shared;
}
#endif

// Loads and stores with an L2 eviction priority (MEDSSL_CUDA_BN_L2=hint): a policy from
// `createpolicy` (sm_80 and later) applied through the `.L2::cache_hint` qualifier. evict_last
// lines are replaced after every other line, evict_first lines before them. In the emulation,
// which has no caches, the policy is nothing and the accesses are plain.
#ifdef MEDSSL_EMU
typedef unsigned long long L2Policy;
__device__ __forceinline__ L2Policy l2_evict_last() { return 0; }
__device__ __forceinline__ L2Policy l2_evict_first() { return 0; }
__device__ __forceinline__ float ld_l2(const float* a, L2Policy pol) {
    (void)pol;
    return *a;
}
__device__ __forceinline__ void st_l2(float* a, float v, L2Policy pol) {
    (void)pol;
    *a = v;
}
#else
typedef unsigned long long L2Policy;
__device__ __forceinline__ L2Policy l2_evict_last() {
    L2Policy p;
    asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(p));
    return p;
}
__device__ __forceinline__ L2Policy l2_evict_first() {
    L2Policy p;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
    return p;
}
__device__ __forceinline__ float ld_l2(const float* a, L2Policy pol) {
    float v;
    asm("ld.global.L2::cache_hint.f32 %0, [%1], %2;" : "=f"(v) : "l"(a), "l"(pol));
    return v;
}
__device__ __forceinline__ void st_l2(float* a, float v, L2Policy pol) {
    asm volatile("st.global.L2::cache_hint.f32 [%0], %1, %2;" ::"l"(a), "f"(v), "l"(pol)
                 : "memory");
}
#endif

// Asynchronous 16-byte copies from global to shared memory (`cp.async`, sm_80 and later): the
// copy runs while the thread goes on; cp_async_commit closes the thread's current group of
// copies, cp_async_wait<N> waits until at most the N newest groups are still in flight. A thread
// may read what its own completed copies wrote without a barrier (other threads' copies need
// __syncthreads after their wait). `.cg` caches the source in L2 only. The emulation lands each
// copy at its thread's wait (see cuda_emu.h).
#ifdef MEDSSL_EMU
__device__ __forceinline__ void cp_async16(void* sh, const void* g) { ::emu::async_copy(sh, g); }
__device__ __forceinline__ void cp_async_commit() { ::emu::async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    ::emu::async_wait(N);
}
#else
__device__ __forceinline__ void cp_async16(void* sh, const void* g) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(sh);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(a), "l"(g) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
#endif

// Global index of the row owned by this warp in a "warp per row" launch, and the lane.
#define WARP_ROW() ((int)(blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)))
#define LANE() ((int)(threadIdx.x & 31))

// Grid-stride loop over [0, n).
#define GRID_LOOP(i, n) \
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)

// Four elements per thread per round, for the streaming elementwise kernels: thread t of a grid
// of s threads takes elements i = t, t + s, t + 2s, t + 3s (each of the four accesses coalesced
// across the warp), then i + 4s, and so on. The body loads the inputs of its four elements into
// registers before it stores any output, so each thread has four loads in flight: at one element
// per thread even a full multiprocessor keeps too few bytes in flight to stream at the memory's
// rate. EW4_TAIL then takes this thread's last (fewer than four) elements one at a time. The host
// launches ceil(n / 4) threads (cfg_lin4). `s` and `i` are declared by EW4_LOOP.
#define EW4_LOOP(i, s, n)                                        \
    const int s = blockDim.x * gridDim.x;                        \
    int i = blockIdx.x * blockDim.x + threadIdx.x;               \
    for (; i < (n) - 3 * s; i += 4 * s)
#define EW4_TAIL(i, s, n) for (; i < (n); i += s)

// The channel c = (i / inner) % C of element i of a flat [outer, C, inner] buffer, followed
// through an EW4 loop without a division per element: the walk keeps i's remainder r = i % inner
// and its channel, and a stride of s elements adds s's own quotient and remainder (dq = s / inner,
// dr = s % inner, dc = dq % C), plus one channel when r passes inner, wrapping at C (c + dc + 1
// < 2C, so one subtraction does). Four divisions per thread, once.
struct ChWalk {
    int r, c, dr, dc, inner, C;
};
__device__ __forceinline__ ChWalk ch_walk(int i, int s, int C, int inner) {
    ChWalk w;
    const int q = i / inner, dq = s / inner;
    w.r = i - q * inner;
    w.c = q % C;
    w.dr = s - dq * inner;
    w.dc = dq % C;
    w.inner = inner;
    w.C = C;
    return w;
}
// The current element's channel, then a stride on.
__device__ __forceinline__ int ch_next(ChWalk& w) {
    const int c = w.c;
    w.r += w.dr;
    int carry = 0;
    if (w.r >= w.inner) {
        w.r -= w.inner;
        carry = 1;
    }
    w.c += w.dc + carry;
    if (w.c >= w.C) w.c -= w.C;
    return c;
}

// EW4_LOOP with a channel walk `w` (ChWalk) started at the thread's first element: the body
// calls ch_next(w) once per element, in element order (i, i + s, i + 2s, i + 3s), and so does
// the tail.
#define EW4_CH_LOOP(i, s, n, w, C, inner)                        \
    const int s = blockDim.x * gridDim.x;                        \
    int i = blockIdx.x * blockDim.x + threadIdx.x;               \
    ChWalk w = ch_walk(i, s, C, inner);                          \
    for (; i < (n) - 3 * s; i += 4 * s)

// Row maximum and log-sum-exp of x[0..n) computed by one warp (all lanes get the result).
__device__ __forceinline__ float warp_row_lse(const float* x, int n) {
    const int lane = LANE();
    float m = -INFINITY;
    for (int j = lane; j < n; j += 32) m = fmaxf(m, x[j]);
    m = warp_max(m);
    float s = 0.f;
    for (int j = lane; j < n; j += 32) s += expf(x[j] - m);
    s = warp_sum(s);
    return m + logf(s);
}
