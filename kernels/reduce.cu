// Reductions. All are deterministic: fixed thread-to-element assignment and fixed reduction trees,
// no atomics, so repeated runs give bit-identical results.
#include "common.cuh"

// out[0] = scale * sum(x[0..n)). One block (blockDim.x = 1024): thread t sums elements t, t+1024,
// ... then a block tree reduction. Used for sum_all and for turning per-row losses into a mean.
extern "C" __global__ void red_sum_scaled(int n, const float* x, float scale, float* out) {
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    s = block_sum(s);
    if (threadIdx.x == 0) out[0] = scale * s;
}

// Column sums of x viewed as [rows, n] -> out[n]. Block (32, 8): threadIdx.x picks the column
// c = blockIdx.x*32 + tx (coalesced across a warp), threadIdx.y strides over rows by 8; the 8
// partial sums per column are then combined through shared memory in a fixed order.
extern "C" __global__ void red_sum_rows(int rows, int n, const float* x, float* out) {
    __shared__ float part[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float s = 0.f;
    if (c < n)
        for (int r = threadIdx.y; r < rows; r += 8) s += x[(size_t)r * n + c];
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < n) {
        float t = 0.f;
        for (int k = 0; k < 8; ++k) t += part[k][threadIdx.x];
        out[c] = t;
    }
}

// Per-channel sums of x viewed as [N, C, inner] -> out[C] (conv bias gradient). One block per
// channel c; thread t strides over the flattened (n, i) pairs j = n*inner + i of that channel.
extern "C" __global__ void red_channel_sum(int N, int C, int inner, const float* x, float* out) {
    const int c = blockIdx.x;
    const int m = N * inner;
    float s = 0.f;
    for (int j = threadIdx.x; j < m; j += blockDim.x) {
        const int nn = j / inner, i = j - nn * inner;
        s += x[((size_t)nn * C + c) * inner + i];
    }
    s = block_sum(s);
    if (threadIdx.x == 0) out[c] = s;
}

// Global average pool forward: x viewed as [rows = N*C, hw] -> y[rows]; warp per row.
extern "C" __global__ void red_gap_fwd(int rows, int hw, const float* x, float* y) {
    const int r = WARP_ROW();
    if (r >= rows) return;
    const float* xr = x + (size_t)r * hw;
    float s = 0.f;
    for (int j = LANE(); j < hw; j += 32) s += xr[j];
    s = warp_sum(s);
    if (LANE() == 0) y[r] = s / (float)hw;
}

// Global average pool backward: one thread per input element i, gx[i] = gy[i / hw] / hw.
extern "C" __global__ void red_gap_bwd(int n, int hw, const float* gy, float* gx) {
    GRID_LOOP(i, n) gx[i] = gy[i / hw] / (float)hw;
}

// Read-bandwidth probes (medssl-bench ops --op read_reference): x[0..n) read once, flat and in
// order, one partial sum per block in out[blockIdx.x] (so that no load can be dropped), four
// loads in flight per thread (EW4_LOOP: thread t of a grid of s threads reads t, t + s, t + 2s,
// t + 3s). probe_read_f32 loads one float at a time, as the batch-norm statistics do;
// probe_read_f32x4 one float4 (x seen as n/4 float4s: n a multiple of 4, x 16-byte aligned, which
// the host checks). Between them: what the memory gives a read-only pass, and what 16-byte
// accesses add to it.
__device__ __forceinline__ float probe_sum(float a) { return a; }
__device__ __forceinline__ float probe_sum(float4 a) { return (a.x + a.y) + (a.z + a.w); }
template <class T>
__device__ __forceinline__ void probe_read_body(int n, const T* x, float* out) {
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    EW4_LOOP(i, st, n) {
        const T a = x[i], b = x[i + st], c = x[i + 2 * st], d = x[i + 3 * st];
        s[0] += probe_sum(a);
        s[1] += probe_sum(b);
        s[2] += probe_sum(c);
        s[3] += probe_sum(d);
    }
    EW4_TAIL(i, st, n) s[0] += probe_sum(x[i]);
    const float t = block_sum((s[0] + s[1]) + (s[2] + s[3]));
    if (threadIdx.x == 0) out[blockIdx.x] = t;
}

extern "C" __global__ void probe_read_f32(int n, const float* x, float* out) {
    probe_read_body(n, x, out);
}

extern "C" __global__ void probe_read_f32x4(int n4, const float* x, float* out) {
    probe_read_body(n4, (const float4*)x, out);
}
