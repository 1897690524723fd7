// Optimiser updates and EMA, in place. Indexing: one thread per parameter element (grid-stride).
#include "common.cuh"

// teacher = alpha * teacher + (1 - alpha) * student.
extern "C" __global__ void op_ema(int n, float alpha, float* t, const float* s) {
    GRID_LOOP(i, n) t[i] = alpha * t[i] + (1.f - alpha) * s[i];
}

// PyTorch SGD: d = g + wd*p; buf = first ? d : mu*buf + d; p -= lr*buf.
extern "C" __global__ void op_sgd(int n, float lr, float mu, float wd, int first, float* p,
                                  const float* g, float* buf) {
    GRID_LOOP(i, n) {
        const float d = g[i] + wd * p[i];
        const float b = (first || mu == 0.f) ? d : mu * buf[i] + d;
        buf[i] = b;
        p[i] -= lr * b;
    }
}

// PyTorch Adam (L2 decay): g += wd*p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= step_size * m / (sqrt(v) / bc2_sqrt + eps), step_size = lr / (1 - b1^t),
// bc2_sqrt = sqrt(1 - b2^t) (PyTorch's evaluation order; both computed on the host).
extern "C" __global__ void op_adam(int n, float step_size, float b1, float b2, float eps,
                                   float wd, float bc2_sqrt, float* p, const float* g, float* m,
                                   float* v) {
    GRID_LOOP(i, n) {
        const float gi = g[i] + wd * p[i];
        const float mi = b1 * m[i] + (1.f - b1) * gi;
        const float vi = b2 * v[i] + (1.f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}
