// Elementwise ops and broadcasts.
//
// Indexing: one thread per element of a flat contiguous buffer of n elements (grid-stride loop, so
// any grid size is valid); ew_mul and the ReLU kernels, which stream the large activations, take
// four elements per thread (EW4_LOOP, see common.cuh). The bias broadcast recovers the broadcast
// coordinate from the flat index: for a tensor viewed as [outer, C, inner] the channel of element
// i is (i / inner) % C, followed incrementally by a ChWalk (EW4_CH_LOOP).
#include "common.cuh"

extern "C" __global__ void ew_fill(int n, float v, float* out) {
    GRID_LOOP(i, n) out[i] = v;
}

extern "C" __global__ void ew_axpby(int n, float a, const float* x, float b, const float* y,
                                    float* out) {
    GRID_LOOP(i, n) out[i] = a * x[i] + b * y[i];
}

extern "C" __global__ void ew_scale(int n, float s, const float* x, float* out) {
    GRID_LOOP(i, n) out[i] = s * x[i];
}

extern "C" __global__ void ew_mul(int n, const float* x, const float* y, float* out) {
    EW4_LOOP(i, s, n) {
        float a[4], b[4];
        for (int q = 0; q < 4; ++q) {
            a[q] = x[i + q * s];
            b[q] = y[i + q * s];
        }
        for (int q = 0; q < 4; ++q) out[i + q * s] = a[q] * b[q];
    }
    EW4_TAIL(i, s, n) out[i] = x[i] * y[i];
}

// max(v, 0); NaN maps to 0 like Rust's f32::max.
__device__ __forceinline__ float relu_of(float v) { return v > 0.f ? v : 0.f; }

// y = relu(a + b): the residual join of a ResNet block in one pass (same arithmetic as ew_axpby
// with a = b = 1 followed by ew_relu_fwd).
extern "C" __global__ void ew_add_relu(int n, const float* a, const float* b, float* y) {
    EW4_LOOP(i, s, n) {
        float u[4], v[4];
        for (int q = 0; q < 4; ++q) {
            u[q] = a[i + q * s];
            v[q] = b[i + q * s];
        }
        for (int q = 0; q < 4; ++q) y[i + q * s] = relu_of(u[q] + v[q]);
    }
    EW4_TAIL(i, s, n) y[i] = relu_of(a[i] + b[i]);
}

// y = max(x, 0).
extern "C" __global__ void ew_relu_fwd(int n, const float* x, float* y) {
    EW4_LOOP(i, s, n) {
        float v[4];
        for (int q = 0; q < 4; ++q) v[q] = x[i + q * s];
        for (int q = 0; q < 4; ++q) y[i + q * s] = relu_of(v[q]);
    }
    EW4_TAIL(i, s, n) y[i] = relu_of(x[i]);
}

// gx = gy * [y > 0], using the forward output.
extern "C" __global__ void ew_relu_bwd(int n, const float* y, const float* gy, float* gx) {
    EW4_LOOP(i, s, n) {
        float v[4], g[4];
        for (int q = 0; q < 4; ++q) {
            v[q] = y[i + q * s];
            g[q] = gy[i + q * s];
        }
        for (int q = 0; q < 4; ++q) gx[i + q * s] = v[q] > 0.f ? g[q] : 0.f;
    }
    EW4_TAIL(i, s, n) gx[i] = y[i] > 0.f ? gy[i] : 0.f;
}

// acc += x (in place).
extern "C" __global__ void ew_add_assign(int n, float* acc, const float* x) {
    GRID_LOOP(i, n) acc[i] += x[i];
}

// y[i] += bias[(i / inner) % C]: conv bias (inner = H*W) and linear bias (inner = 1), four
// elements per thread with the channel followed by a ChWalk (EW4_CH_LOOP, no division per
// element).
extern "C" __global__ void ew_add_bias(int n, int C, int inner, const float* bias, float* y) {
    EW4_CH_LOOP(i, s, n, w, C, inner) {
        float v[4], b[4];
        for (int q = 0; q < 4; ++q) {
            b[q] = bias[ch_next(w)];
            v[q] = y[i + q * s];
        }
        for (int q = 0; q < 4; ++q) y[i + q * s] = v[q] + b[q];
    }
    EW4_TAIL(i, s, n) y[i] += bias[ch_next(w)];
}
