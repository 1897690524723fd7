// Batch norm (NCHW, statistics per channel over N*H*W) and row-wise L2 normalisation.
//
// Indexing: the per-channel reductions (bn_stats, bn_bwd_reduce) use one block per channel c;
// thread t strides over the flattened j = n*HW + i of that channel, element x[(n*C + c)*HW + i],
// then a fixed block tree (deterministic). The elementwise passes use one thread per element of
// the flat NCHW buffer with channel c = (i / HW) % C. L2 normalise is "warp per row".
#include "common.cuh"

// Batch statistics: mean, invstd = 1/sqrt(var_biased + eps), var_unbiased = var_biased*M/(M-1)
// (M = N*HW; M == 1 gives var_unbiased = 0 rather than NaN). Two passes over the channel (mean
// first, then squared deviations) for accuracy. When rm_out is not null, also PyTorch's running
// statistics update rm_out = (1-m)*rm + m*mean, rv_out = (1-m)*rv + m*var_unbiased (saves the two
// elementwise launches per layer that would otherwise follow).
extern "C" __global__ void bn_stats(int N, int C, int HW, float eps, const float* x, float* mean,
                                    float* invstd, float* var_unbiased, float momentum,
                                    const float* rm, const float* rv, float* rm_out,
                                    float* rv_out) {
    const int c = blockIdx.x;
    const int M = N * HW;
    float s = 0.f;
    for (int j = threadIdx.x; j < M; j += blockDim.x) {
        const int nn = j / HW, i = j - nn * HW;
        s += x[((size_t)nn * C + c) * HW + i];
    }
    const float mu = block_sum(s) / (float)M;
    float q = 0.f;
    for (int j = threadIdx.x; j < M; j += blockDim.x) {
        const int nn = j / HW, i = j - nn * HW;
        const float d = x[((size_t)nn * C + c) * HW + i] - mu;
        q += d * d;
    }
    const float var = block_sum(q) / (float)M;
    if (threadIdx.x == 0) {
        mean[c] = mu;
        invstd[c] = 1.f / sqrtf(var + eps);
        const float vu = M > 1 ? var * (float)M / (float)(M - 1) : 0.f;
        var_unbiased[c] = vu;
        if (rm_out) {
            rm_out[c] = (1.f - momentum) * rm[c] + momentum * mu;
            rv_out[c] = (1.f - momentum) * rv[c] + momentum * vu;
        }
    }
}

// invstd[c] = 1/sqrt(running_var[c] + eps) (eval mode).
extern "C" __global__ void bn_eval_invstd(int C, float eps, const float* rv, float* invstd) {
    GRID_LOOP(c, C) invstd[c] = 1.f / sqrtf(rv[c] + eps);
}

// y = gamma * (x - mean) * invstd + beta, one thread per element, with an optional epilogue in
// the same pass: when res is not null, y += res[i] (a residual join); when relu != 0, y = max(y, 0)
// (as ew_relu_fwd / ew_add_relu, so the fused and unfused paths give the same bits).
extern "C" __global__ void bn_apply(int n, int C, int HW, const float* x, const float* mean,
                                    const float* invstd, const float* gamma, const float* beta,
                                    const float* res, int relu, float* y) {
    GRID_LOOP(i, n) {
        const int c = (i / HW) % C;
        float v = gamma[c] * ((x[i] - mean[c]) * invstd[c]) + beta[c];
        if (res) v = v + res[i];
        if (relu) v = v > 0.f ? v : 0.f;
        y[i] = v;
    }
}

// The output gradient a batch norm receives: gy, or, when the norm was followed by a ReLU with
// output ry (ry not null), gy * [ry > 0] (as ew_relu_bwd), so the ReLU backward needs no launch.
__device__ __forceinline__ float bn_gy(const float* gy, const float* ry, size_t k) {
    return (ry && !(ry[k] > 0.f)) ? 0.f : gy[k];
}

// Per channel: gbeta = sum(gy), ggamma = sum(gy * xhat), xhat = (x - mean) * invstd (gy masked
// by the following ReLU's output ry when ry is not null, see bn_gy). When gm is not null, the
// masked gradient is also written there (a residual join's other input needs it).
extern "C" __global__ void bn_bwd_reduce(int N, int C, int HW, const float* x, const float* gy,
                                         const float* ry, const float* mean, const float* invstd,
                                         float* ggamma, float* gbeta, float* gm) {
    const int c = blockIdx.x;
    const int M = N * HW;
    const float mu = mean[c], is = invstd[c];
    float sg = 0.f, sgx = 0.f;
    for (int j = threadIdx.x; j < M; j += blockDim.x) {
        const int nn = j / HW, i = j - nn * HW;
        const size_t k = ((size_t)nn * C + c) * HW + i;
        const float g = bn_gy(gy, ry, k);
        if (gm) gm[k] = g;
        sg += g;
        sgx += g * (x[k] - mu) * is;
    }
    sg = block_sum(sg);
    sgx = block_sum(sgx);
    if (threadIdx.x == 0) {
        gbeta[c] = sg;
        ggamma[c] = sgx;
    }
}

// Train-mode input gradient: gx = gamma*invstd * (gy - sum(gy)/M - xhat * sum(gy*xhat)/M) (gy
// masked by ry as in bn_bwd_reduce).
extern "C" __global__ void bn_train_dx(int n, int C, int HW, int M, const float* x,
                                       const float* gy, const float* ry, const float* mean,
                                       const float* invstd, const float* gamma,
                                       const float* ggamma, const float* gbeta, float* gx) {
    GRID_LOOP(i, n) {
        const int c = (i / HW) % C;
        const float xhat = (x[i] - mean[c]) * invstd[c];
        const float inv_m = 1.f / (float)M;
        gx[i] = gamma[c] * invstd[c] *
                (bn_gy(gy, ry, i) - gbeta[c] * inv_m - xhat * ggamma[c] * inv_m);
    }
}

// Eval-mode input gradient: gx = gy * gamma * invstd (statistics are constants).
extern "C" __global__ void bn_eval_dx(int n, int C, int HW, const float* gy, const float* gamma,
                                      const float* invstd, float* gx) {
    GRID_LOOP(i, n) {
        const int c = (i / HW) % C;
        gx[i] = gy[i] * gamma[c] * invstd[c];
    }
}

// y = x / max(||x||, 1e-12) per row (PyTorch F.normalize).
extern "C" __global__ void l2n_fwd(int rows, int n, const float* x, float* y) {
    const int r = WARP_ROW();
    if (r >= rows) return;
    const size_t o = (size_t)r * n;
    float s = 0.f;
    for (int j = LANE(); j < n; j += 32) s += x[o + j] * x[o + j];
    const float d = fmaxf(sqrtf(warp_sum(s)), 1e-12f);
    for (int j = LANE(); j < n; j += 32) y[o + j] = x[o + j] / d;
}

// Gradient of l2n_fwd: for ||x|| > 1e-12, gx = (gy - y (y.gy)) / ||x||; otherwise the clamp makes
// the denominator constant and gx = gy / 1e-12.
extern "C" __global__ void l2n_bwd(int rows, int n, const float* x, const float* gy, float* gx) {
    const int r = WARP_ROW();
    if (r >= rows) return;
    const size_t o = (size_t)r * n;
    float s = 0.f;
    for (int j = LANE(); j < n; j += 32) s += x[o + j] * x[o + j];
    const float nrm = sqrtf(warp_sum(s));
    if (nrm > 1e-12f) {
        float d = 0.f;
        for (int j = LANE(); j < n; j += 32) d += x[o + j] * gy[o + j];
        d = warp_sum(d) / nrm;  // y . gy
        for (int j = LANE(); j < n; j += 32)
            gx[o + j] = (gy[o + j] - (x[o + j] / nrm) * d) / nrm;
    } else {
        for (int j = LANE(); j < n; j += 32) gx[o + j] = gy[o + j] / 1e-12f;
    }
}
