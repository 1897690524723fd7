// Semi-supervised losses: DSR entropy weight and alignment, weighted consistency, PGC.
//
// Indexing: "warp per row" (common.cuh) over the row dimension of each op (samples for the
// logit-based ops, queries for PGC, unlabelled samples for the DSR alignment). Products such as
// q K^T and the DSR Gram matrices are computed by cuBLAS before these kernels. Per-row results are
// reduced to the scalar loss by red_sum_scaled (fixed order, no atomics); scalar upstream
// gradients are read from device memory (g[0]). Class labels are float vectors holding the class
// index (exact below 2^24); they are only compared, never used as an index, so a label out of
// range cannot make a kernel read or write outside its buffers.
#include "common.cuh"

// Pseudo-labels: out[r] = the first index of the largest element of row r of z [rows, n]
// (strictly greater replaces, so NaN never wins; 0 for a row of NaN or -inf), as a float.
// One thread per row (grid-stride): n is the class count, a handful of elements.
extern "C" __global__ void ssl_argmax_rows(int rows, int n, const float* z, float* out) {
    GRID_LOOP(r, rows) {
        const float* zr = z + (size_t)r * n;
        int best = 0;
        float bv = -INFINITY;
        for (int j = 0; j < n; ++j)
            if (zr[j] > bv) {
                bv = zr[j];
                best = j;
            }
        out[r] = (float)best;
    }
}

// c = 1 - H(softmax(z)) / ln(n) (1 when n == 1), H = -sum p log p with log p = z - lse.
extern "C" __global__ void ssl_entropy_weight(int rows, int n, const float* z, float* c) {
    const int r = WARP_ROW();
    if (r >= rows) return;
    const float* zr = z + (size_t)r * n;
    const float lse = warp_row_lse(zr, n);
    float h = 0.f;
    for (int j = LANE(); j < n; j += 32) {
        const float lp = zr[j] - lse;
        h -= expf(lp) * lp;
    }
    h = warp_sum(h);
    if (LANE() == 0) c[r] = n > 1 ? 1.f - h / logf((float)n) : 1.f;
}

// out[r] = w[r] * ||softmax(zs_r) - softmax(zt_r)||^2.
extern "C" __global__ void ssl_wcons_rows(int rows, int n, const float* zs, const float* zt,
                                          const float* w, float* out) {
    const int r = WARP_ROW();
    if (r >= rows) return;
    const float* a = zs + (size_t)r * n;
    const float* b = zt + (size_t)r * n;
    const float la = warp_row_lse(a, n), lb = warp_row_lse(b, n);
    float s = 0.f;
    for (int j = LANE(); j < n; j += 32) {
        const float d = expf(a[j] - la) - expf(b[j] - lb);
        s += d * d;
    }
    s = warp_sum(s);
    if (LANE() == 0) out[r] = w[r] * s;
}

// gzs = J_softmax^T gp with gp = g[0] * scale * 2 w_r (ps - pt), i.e.
// gzs_j = ps_j (gp_j - sum_k gp_k ps_k); scale = 1/B.
extern "C" __global__ void ssl_wcons_bwd(int rows, int n, const float* zs, const float* zt,
                                         const float* w, const float* g, float scale,
                                         float* gzs) {
    const int r = WARP_ROW();
    if (r >= rows) return;
    const float* a = zs + (size_t)r * n;
    const float* b = zt + (size_t)r * n;
    const float la = warp_row_lse(a, n), lb = warp_row_lse(b, n);
    const float k = g[0] * scale * 2.f * w[r];
    float d = 0.f;
    for (int j = LANE(); j < n; j += 32) {
        const float ps = expf(a[j] - la);
        d += k * (ps - expf(b[j] - lb)) * ps;
    }
    d = warp_sum(d);
    for (int j = LANE(); j < n; j += 32) {
        const float ps = expf(a[j] - la);
        gzs[(size_t)r * n + j] = ps * (k * (ps - expf(b[j] - lb)) - d);
    }
}

// PGC per-query term. L [Bq, Nk] holds q_i.K_a / tau. Positives P(i) = {a : klab[a] == qlab[i]},
// Wp = sum_{a in P} kw[a];
// out[i] = qw[i] * ( -sum_{a in P} (kw[a]/Wp) (L_ia - lse_i) ), or 0 when P(i) is empty or Wp == 0.
extern "C" __global__ void ssl_pgc_rows(int Bq, int Nk, const float* L, const float* qlab,
                                        const float* qw, const float* klab, const float* kw,
                                        float* out) {
    const int r = WARP_ROW();
    if (r >= Bq) return;
    const float* lr = L + (size_t)r * Nk;
    const float lse = warp_row_lse(lr, Nk);
    const float y = qlab[r];
    float wp = 0.f, acc = 0.f;
    for (int a = LANE(); a < Nk; a += 32)
        if (klab[a] == y) {
            wp += kw[a];
            acc += kw[a] * (lr[a] - lse);
        }
    wp = warp_sum(wp);
    acc = warp_sum(acc);
    if (LANE() == 0) out[r] = (wp > 0.f) ? qw[r] * (-acc / fmaxf(wp, 1e-12f)) : 0.f;
}

// dLoss/dL_ia = g[0] * scale * qw[i] * (softmax_a(L_i) - [a in P(i)] kw[a]/Wp), scale = 1/B; rows
// with no (weighted) positives get zeros. The caller multiplies by K/tau with cuBLAS.
extern "C" __global__ void ssl_pgc_grad_logits(int Bq, int Nk, const float* L, const float* qlab,
                                               const float* qw, const float* klab, const float* kw,
                                               const float* g, float scale, float* G) {
    const int r = WARP_ROW();
    if (r >= Bq) return;
    const float* lr = L + (size_t)r * Nk;
    float* gr = G + (size_t)r * Nk;
    const float y = qlab[r];
    float wp = 0.f;
    for (int a = LANE(); a < Nk; a += 32)
        if (klab[a] == y) wp += kw[a];
    wp = warp_sum(wp);
    if (!(wp > 0.f)) {
        for (int a = LANE(); a < Nk; a += 32) gr[a] = 0.f;
        return;
    }
    const float lse = warp_row_lse(lr, Nk);
    const float k = g[0] * scale * qw[r];
    for (int a = LANE(); a < Nk; a += 32) {
        const float pos = (klab[a] == y) ? kw[a] / fmaxf(wp, 1e-12f) : 0.f;
        gr[a] = k * (expf(lr[a] - lse) - pos);
    }
}

// out[r, :] = softmax(z_r) - onehot(label_r) (DSR: gradient of CE w.r.t. the logits).
extern "C" __global__ void ssl_prob_minus_onehot(int rows, int n, const float* z,
                                                 const float* labels, float* out) {
    const int r = WARP_ROW();
    if (r >= rows) return;
    const float* zr = z + (size_t)r * n;
    const float lse = warp_row_lse(zr, n);
    const float y = labels[r];
    for (int j = LANE(); j < n; j += 32)
        out[(size_t)r * n + j] = expf(zr[j] - lse) - ((float)j == y ? 1.f : 0.f);
}

// a_i = inv_bl * sum_j RS[i, j] * (FF[i, j] + 1), RS = S_u R_l^T and FF = F_u F_l^T, [Bu, Bl].
extern "C" __global__ void ssl_dsr_combine(int Bu, int Bl, const float* RS, const float* FF,
                                           float inv_bl, float* out) {
    const int r = WARP_ROW();
    if (r >= Bu) return;
    float s = 0.f;
    for (int j = LANE(); j < Bl; j += 32) {
        const size_t k = (size_t)r * Bl + j;
        s += RS[k] * (FF[k] + 1.f);
    }
    s = warp_sum(s);
    if (LANE() == 0) out[r] = inv_bl * s;
}

// DSR weights with the meta-weight update, one thread per unlabelled sample (grid-stride):
//   m'_i = clamp(m_i + beta * a_i, 0, 1),   w_i = (c_i * m'_i) * b_i.
// A null c, m or b counts as all ones (then m' is not written: m_out may be null); a null a
// leaves m unchanged (m' = m). Rounded operations (__fmul_rn/__fadd_rn, no contraction into an
// FMA) and a clamp that keeps NaN, so the result is bit-equal to the CPU backend's.
extern "C" __global__ void ssl_dsr_weights(int n, const float* c, const float* m, const float* a,
                                           float beta, const float* b, float* w, float* m_out) {
    GRID_LOOP(i, n) {
        float mi = m ? m[i] : 1.f;
        if (m && a) {
            const float x = __fadd_rn(mi, __fmul_rn(beta, a[i]));
            mi = x != x ? x : fminf(fmaxf(x, 0.f), 1.f);
        }
        if (m_out) m_out[i] = mi;
        float wi = __fmul_rn(c ? c[i] : 1.f, mi);
        if (b) wi = __fmul_rn(wi, b[i]);
        w[i] = wi;
    }
}

// ---- key queue on the device ----
// Indexing: one thread per output element (grid-stride), rows of e floats, row-major.

// y = [a; b[..rows]]: the first na elements come from a, the rest from the start of b.
extern "C" __global__ void q_concat_rows(int na, int total, const float* a, const float* b,
                                         float* y) {
    GRID_LOOP(i, total) y[i] = i < na ? a[i] : b[i - na];
}

// Enqueue: element i = r*e + c of src goes to row (start + r) mod k of the ring dst [k, e].
// The host guarantees at most k rows, so no two source rows share a slot.
extern "C" __global__ void q_ring_write(int n, int k, int e, int start, const float* src,
                                        float* dst) {
    GRID_LOOP(i, n) {
        const int r = i / e, c = i - r * e;
        dst[(size_t)((start + r) % k) * e + c] = src[i];
    }
}
