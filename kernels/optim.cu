// Optimiser updates and EMA, in place. Indexing: one thread per parameter element (grid-stride).
#include "common.cuh"

// The per-element updates, shared by the single-tensor and the multi-tensor kernels so both do
// the same arithmetic.
__device__ __forceinline__ float ema_of(float alpha, float t, float s) {
    return alpha * t + (1.f - alpha) * s;
}
__device__ __forceinline__ void ema_el(float alpha, float* t, const float* s, int i) {
    t[i] = ema_of(alpha, t[i], s[i]);
}

__device__ __forceinline__ void sgd_el(float lr, float mu, float wd, int first, float* p,
                                       const float* g, float* buf, int i) {
    const float d = g[i] + wd * p[i];
    const float b = (first || mu == 0.f) ? d : mu * buf[i] + d;
    buf[i] = b;
    p[i] -= lr * b;
}

__device__ __forceinline__ void adam_el(float step_size, float b1, float b2, float eps, float wd,
                                        float bc2_sqrt, float* p, const float* g, float* m,
                                        float* v, int i) {
    const float gi = g[i] + wd * p[i];
    const float mi = b1 * m[i] + (1.f - b1) * gi;
    const float vi = b2 * v[i] + (1.f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
}

// teacher = alpha * teacher + (1 - alpha) * student.
extern "C" __global__ void op_ema(int n, float alpha, float* t, const float* s) {
    GRID_LOOP(i, n) ema_el(alpha, t, s, i);
}

// PyTorch SGD: d = g + wd*p; buf = first ? d : mu*buf + d; p -= lr*buf.
extern "C" __global__ void op_sgd(int n, float lr, float mu, float wd, int first, float* p,
                                  const float* g, float* buf) {
    GRID_LOOP(i, n) sgd_el(lr, mu, wd, first, p, g, buf, i);
}

// PyTorch Adam (L2 decay): g += wd*p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= step_size * m / (sqrt(v) / bc2_sqrt + eps), step_size = lr / (1 - b1^t),
// bc2_sqrt = sqrt(1 - b2^t) (PyTorch's evaluation order; both computed on the host).
extern "C" __global__ void op_adam(int n, float step_size, float b1, float b2, float eps,
                                   float wd, float bc2_sqrt, float* p, const float* g, float* m,
                                   float* v) {
    GRID_LOOP(i, n) adam_el(step_size, b1, b2, eps, wd, bc2_sqrt, p, g, m, v, i);
}

// ---- multi-tensor forms: up to MT_MAX tensors per launch ----
//
// Indexing: each tensor's elements are cut into tiles of MT_TILE elements; block b works on one
// tile of tensor k, where k is the last tensor whose first block first[k] <= b (binary search
// over the table; first[count] is the grid size). The block's threads stride over the tile.
// Every element goes through the same *_el function as in the single-tensor kernel above, so
// the results are identical. The table travels as a by-value kernel parameter (1928 bytes,
// under the 4 KiB parameter limit); its layout is mirrored by `MtTable` in
// src/backend/cuda/optim.rs.
#define MT_MAX 48
#define MT_TILE 2048

struct MtTable {
    int count;              // tensors in this launch (>= 1)
    int first[MT_MAX + 1];  // first block of each tensor; first[count] = number of blocks
    int n[MT_MAX];          // elements of each tensor (> 0)
    float* a[MT_MAX];       // parameter (EMA: teacher)
    const float* b[MT_MAX]; // gradient (EMA: student)
    float* c[MT_MAX];       // Adam m / SGD momentum buffer (EMA: unused)
    float* d[MT_MAX];       // Adam v (otherwise unused)
};

__device__ __forceinline__ int mt_tensor(const MtTable& t) {
    int lo = 0, hi = t.count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (t.first[mid] <= (int)blockIdx.x) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// This block's tensor k and its tile [start, end) of that tensor's elements.
#define MT_BOUNDS(t, k, start, end)                                         \
    const int k = mt_tensor(t);                                             \
    const int start = ((int)blockIdx.x - t.first[k]) * MT_TILE;            \
    const int end = min(start + MT_TILE, t.n[k])

#define MT_RANGE(t, k, i)                                                   \
    MT_BOUNDS(t, k, mt_start_, mt_end_);                                    \
    for (int i = mt_start_ + (int)threadIdx.x; i < mt_end_; i += blockDim.x)

// acc += x (gradient accumulation), the arithmetic of ew_add_assign.
extern "C" __global__ void op_add_mt(const MtTable t) {
    MT_RANGE(t, k, i) t.a[k][i] += t.b[k][i];
}

// dst = src (packing several tensors into one buffer: a is the destination, b the source).
extern "C" __global__ void op_copy_mt(const MtTable t) {
    MT_RANGE(t, k, i) t.a[k][i] = t.b[k][i];
}

// Four elements per thread per round (loads first, as EW4_LOOP in common.cuh: the EMA streams
// two parameter sets and has too little arithmetic to hide one load at a time), then the tile's
// last elements one at a time; same arithmetic as ema_el.
extern "C" __global__ void op_ema_mt(float alpha, const MtTable t) {
    MT_BOUNDS(t, k, start, end);
    const int s = blockDim.x;
    float* te = t.a[k];
    const float* st = t.b[k];
    int i = start + (int)threadIdx.x;
    for (; i < end - 3 * s; i += 4 * s) {
        float a[4], b[4];
        for (int q = 0; q < 4; ++q) {
            a[q] = te[i + q * s];
            b[q] = st[i + q * s];
        }
        for (int q = 0; q < 4; ++q) te[i + q * s] = ema_of(alpha, a[q], b[q]);
    }
    for (; i < end; i += s) ema_el(alpha, te, st, i);
}

extern "C" __global__ void op_sgd_mt(float lr, float mu, float wd, int first, const MtTable t) {
    MT_RANGE(t, k, i) sgd_el(lr, mu, wd, first, t.a[k], t.b[k], t.c[k], i);
}

extern "C" __global__ void op_adam_mt(float step_size, float b1, float b2, float eps, float wd,
                                      float bc2_sqrt, const MtTable t) {
    MT_RANGE(t, k, i) adam_el(step_size, b1, b2, eps, wd, bc2_sqrt, t.a[k], t.b[k], t.c[k], t.d[k], i);
}
