// A kernel that holds the stream, for timing device work apart from the host's cost of issuing
// it (MEDSSL_CUDNN_ALGO=time, see time_call in src/backend/cuda/conv.rs).
//
// Indexing: one thread. It reads the device's global nanosecond timer (%globaltimer) and sleeps
// in 1 µs naps until `us` microseconds have passed. Work issued behind it on the same stream
// queues up meanwhile, so once the hold ends that work runs back to back, and two events around
// it measure the device's time alone, however slowly the host issued it. In the emulation the
// timer is the host's steady clock.
#include "common.cuh"

#ifdef MEDSSL_EMU
#include <chrono>
static inline unsigned long long global_ns() {
    return (unsigned long long)std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}
#else
__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
#endif

extern "C" __global__ void timing_hold(int us) {
    const unsigned long long start = global_ns();
    const unsigned long long ns = 1000ull * (unsigned long long)(us > 0 ? us : 0);
    while (global_ns() - start < ns) __nanosleep(1000);
}
