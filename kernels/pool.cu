// 2-D max pooling (NCHW, square window k, stride s, implicit -inf padding p, floor output size).
//
// Indexing: forward uses one thread per output element o = ((n*C + c)*OH + oh)*OW + ow and scans
// its window kh outer, kw inner, keeping the FIRST maximum (strict >). The backward pass is a
// gather, not a scatter: one thread per input element finds every output window that contains it
// (oh, ow ascending), recomputes that window's first argmax and adds gy when it is this element.
// No atomics, so the result is deterministic even for overlapping windows (3x3 s2).
#include "common.cuh"

__device__ __forceinline__ int window_argmax(const float* xp, int H, int W, int k, int s, int p,
                                             int oh, int ow, float* best_out) {
    int best_idx = -1;
    float best = -INFINITY;
    for (int kh = 0; kh < k; ++kh) {
        const int ih = oh * s - p + kh;
        if (ih < 0 || ih >= H) continue;
        for (int kw = 0; kw < k; ++kw) {
            const int iw = ow * s - p + kw;
            if (iw < 0 || iw >= W) continue;
            const float v = xp[ih * W + iw];
            // First maximum wins; a NaN wins and ends the scan (PyTorch semantics).
            if (best_idx < 0 || v > best || isnan(v)) {
                best = v;
                best_idx = ih * W + iw;
                if (isnan(v)) {
                    *best_out = best;
                    return best_idx;
                }
            }
        }
    }
    *best_out = best;
    return best_idx;
}

extern "C" __global__ void mp_fwd(int total, int H, int W, int OH, int OW, int k, int s, int p,
                                  const float* x, float* y) {
    GRID_LOOP(o, total) {
        const int ow = o % OW, oh = (o / OW) % OH, plane = o / (OW * OH);
        float best;
        window_argmax(x + (size_t)plane * H * W, H, W, k, s, p, oh, ow, &best);
        y[o] = best;
    }
}

extern "C" __global__ void mp_bwd(int total, int H, int W, int OH, int OW, int k, int s, int p,
                                  const float* x, const float* gy, float* gx) {
    GRID_LOOP(i, total) {
        const int iw = i % W, ih = (i / W) % H, plane = i / (W * H);
        const float* xp = x + (size_t)plane * H * W;
        const float* gp = gy + (size_t)plane * OH * OW;
        // Windows containing ih: oh*s - p <= ih <= oh*s - p + k - 1.
        int oh0 = ih + p - k + 1;
        oh0 = oh0 <= 0 ? 0 : (oh0 + s - 1) / s;
        const int oh1 = min((ih + p) / s, OH - 1);
        int ow0 = iw + p - k + 1;
        ow0 = ow0 <= 0 ? 0 : (ow0 + s - 1) / s;
        const int ow1 = min((iw + p) / s, OW - 1);
        float acc = 0.f;
        for (int oh = oh0; oh <= oh1; ++oh)
            for (int ow = ow0; ow <= ow1; ++ow) {
                float best;
                if (window_argmax(xp, H, W, k, s, p, oh, ow, &best) == ih * W + iw)
                    acc += gp[oh * OW + ow];
            }
        gx[i] = acc;
    }
}
