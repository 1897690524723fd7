// Softmax, log-softmax and cross-entropy over the last dimension.
//
// Indexing: "warp per row" (see common.cuh): the tensor is viewed as [rows, n]; warp w of block b
// owns row b*8 + w, lanes stride over its n columns; max / sum are warp shuffles, so no shared
// memory and no atomics. Labels are int32 on the device; the scalar upstream gradient g is read
// from device memory (g[0]) so the backward pass needs no host sync.
#include "common.cuh"

extern "C" __global__ void sx_softmax_fwd(int rows, int n, const float* x, float* y) {
    const int r = WARP_ROW();
    if (r >= rows) return;
    const float* xr = x + (size_t)r * n;
    float* yr = y + (size_t)r * n;
    const float lse = warp_row_lse(xr, n);
    for (int j = LANE(); j < n; j += 32) yr[j] = expf(xr[j] - lse);
}

extern "C" __global__ void sx_log_softmax_fwd(int rows, int n, const float* x, float* y) {
    const int r = WARP_ROW();
    if (r >= rows) return;
    const float* xr = x + (size_t)r * n;
    float* yr = y + (size_t)r * n;
    const float lse = warp_row_lse(xr, n);
    for (int j = LANE(); j < n; j += 32) yr[j] = xr[j] - lse;
}

// gx = y * (gy - sum(gy * y)).
extern "C" __global__ void sx_softmax_bwd(int rows, int n, const float* y, const float* gy,
                                          float* gx) {
    const int r = WARP_ROW();
    if (r >= rows) return;
    const size_t o = (size_t)r * n;
    float d = 0.f;
    for (int j = LANE(); j < n; j += 32) d += gy[o + j] * y[o + j];
    d = warp_sum(d);
    for (int j = LANE(); j < n; j += 32) gx[o + j] = y[o + j] * (gy[o + j] - d);
}

// gx = gy - exp(y) * sum(gy), y the log-softmax output.
extern "C" __global__ void sx_log_softmax_bwd(int rows, int n, const float* y, const float* gy,
                                              float* gx) {
    const int r = WARP_ROW();
    if (r >= rows) return;
    const size_t o = (size_t)r * n;
    float s = 0.f;
    for (int j = LANE(); j < n; j += 32) s += gy[o + j];
    s = warp_sum(s);
    for (int j = LANE(); j < n; j += 32) gx[o + j] = gy[o + j] - expf(y[o + j]) * s;
}

// Per-row cross-entropy loss[r] = logsumexp(z_r) - z_r[label_r]; the mean is taken by
// red_sum_scaled so the reduction order is fixed.
extern "C" __global__ void sx_xent_rows(int rows, int n, const float* z, const int* labels,
                                        float* loss) {
    const int r = WARP_ROW();
    if (r >= rows) return;
    const float* zr = z + (size_t)r * n;
    const float lse = warp_row_lse(zr, n);
    if (LANE() == 0) loss[r] = lse - zr[labels[r]];
}

// gz = g[0] * scale * (softmax(z) - onehot(label)), scale = 1/B.
extern "C" __global__ void sx_xent_bwd(int rows, int n, const float* z, const int* labels,
                                       const float* g, float scale, float* gz) {
    const int r = WARP_ROW();
    if (r >= rows) return;
    const float* zr = z + (size_t)r * n;
    const float lse = warp_row_lse(zr, n);
    const float k = g[0] * scale;
    const int y = labels[r];
    for (int j = LANE(); j < n; j += 32)
        gz[(size_t)r * n + j] = k * (expf(zr[j] - lse) - (j == y ? 1.f : 0.f));
}
