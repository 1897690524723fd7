// im2col / col2im for the convolution fallback used when cuDNN is not available (or
// MEDSSL_CUDA_CONV=im2col). The GEMMs around them run on cuBLAS.
//
// Indexing: col has shape [N, Cin*k*k, OH*OW], row r = (ci*k + kh)*k + kw, column q = oh*OW + ow.
// im2col: one thread per col element (zero where the tap falls in the padding). col2im is a
// gather: one thread per input element (n, ci, ih, iw) sums the col entries of every tap (kh, kw)
// that reads it (kh, kw ascending), so no atomics and a deterministic result.
#include "common.cuh"

extern "C" __global__ void cv_im2col(int total, int Cin, int H, int W, int k, int s, int p,
                                     int OH, int OW, const float* x, float* col) {
    GRID_LOOP(t, total) {
        const int q = t % (OH * OW);
        const int r = (t / (OH * OW)) % (Cin * k * k);
        const int n = t / (OH * OW * Cin * k * k);
        const int kw = r % k, kh = (r / k) % k, ci = r / (k * k);
        const int oh = q / OW, ow = q % OW;
        const int ih = oh * s - p + kh, iw = ow * s - p + kw;
        col[t] = (ih >= 0 && ih < H && iw >= 0 && iw < W)
                     ? x[(((size_t)n * Cin + ci) * H + ih) * W + iw]
                     : 0.f;
    }
}

extern "C" __global__ void cv_col2im(int total, int Cin, int H, int W, int k, int s, int p,
                                     int OH, int OW, const float* col, float* gx) {
    GRID_LOOP(t, total) {
        const int iw = t % W, ih = (t / W) % H, ci = (t / (W * H)) % Cin, n = t / (W * H * Cin);
        const size_t base = (size_t)n * Cin * k * k * OH * OW;
        float acc = 0.f;
        for (int kh = 0; kh < k; ++kh) {
            const int oh_s = ih + p - kh;  // = oh * s
            if (oh_s < 0 || oh_s % s != 0) continue;
            const int oh = oh_s / s;
            if (oh >= OH) continue;
            for (int kw = 0; kw < k; ++kw) {
                const int ow_s = iw + p - kw;
                if (ow_s < 0 || ow_s % s != 0) continue;
                const int ow = ow_s / s;
                if (ow >= OW) continue;
                const int r = (ci * k + kh) * k + kw;
                acc += col[base + (size_t)r * OH * OW + oh * OW + ow];
            }
        }
        gx[t] = acc;
    }
}
