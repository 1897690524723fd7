// Kernels that exercise the CPU emulation itself (compiled into the emulation only, never by
// nvcc): the unit tests in src/backend/cuda/emu.rs launch them to check that barriers, warp
// shuffles and the emulation's error reports behave as documented in cuda_emu.h.
#include "common.cuh"

// y[t] = x[n - 1 - t] through shared memory: correct only if __syncthreads() really waits for
// every thread's write (one block of n <= 1024 threads).
extern "C" __global__ void emu_selftest_reverse(int n, const float* x, float* y) {
    __shared__ float s[1024];
    const int t = threadIdx.x;
    if (t < n) s[t] = x[t];
    __syncthreads();
    if (t < n) y[t] = s[n - 1 - t];
}

// y[t] = the value of lane (t ^ m) of t's warp, and z[t] = the sum over t's warp (warp_sum).
extern "C" __global__ void emu_selftest_shuffle(int m, float* y, float* z) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    y[t] = __shfl_xor_sync(FULL_MASK, (float)t, m);
    z[t] = warp_sum((float)t);
}

// Lanes below 16 wait at a block barrier while the others wait at a full-mask shuffle: a
// deadlock the emulation must report rather than hang on.
extern "C" __global__ void emu_selftest_deadlock(float* y) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        y[threadIdx.x] = __shfl_xor_sync(FULL_MASK, 1.f, 1);
    }
}

// Writes y[0 .. n) (the tests pass an n larger than the buffer to check the guard zones).
extern "C" __global__ void emu_selftest_fill(int n, float* y) {
    GRID_LOOP(i, n) y[i] = 1.f;
}
