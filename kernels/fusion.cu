// MedFuseNet similarity fusion: the products P^T Q, P S, ... run on cuBLAS; these kernels are the
// softmax over the LOW-level positions i, i.e. over the rows of each column of A [B, Np, Nq].
//
// Indexing: one thread per column (b, j), t = b*Nq + j; it walks the column's Np entries at stride
// Nq (A[(b*Np + i)*Nq + j]). Adjacent threads touch adjacent j, so each step is coalesced.
#include "common.cuh"

// S[:, j] = softmax_i(A[:, j]).
extern "C" __global__ void fu_col_softmax(int B, int Np, int Nq, const float* A, float* S) {
    GRID_LOOP(t, B * Nq) {
        const int b = t / Nq, j = t - b * Nq;
        const float* a = A + (size_t)b * Np * Nq + j;
        float* sc = S + (size_t)b * Np * Nq + j;
        float m = -INFINITY;
        for (int i = 0; i < Np; ++i) m = fmaxf(m, a[(size_t)i * Nq]);
        float z = 0.f;
        for (int i = 0; i < Np; ++i) z += expf(a[(size_t)i * Nq] - m);
        const float inv = 1.f / z;
        for (int i = 0; i < Np; ++i) sc[(size_t)i * Nq] = expf(a[(size_t)i * Nq] - m) * inv;
    }
}

// Column-softmax backward: gA[:, j] = S[:, j] * (gS[:, j] - sum_i gS[i, j] S[i, j]).
extern "C" __global__ void fu_col_softmax_bwd(int B, int Np, int Nq, const float* S,
                                              const float* gS, float* gA) {
    GRID_LOOP(t, B * Nq) {
        const int b = t / Nq, j = t - b * Nq;
        const size_t base = (size_t)b * Np * Nq + j;
        float d = 0.f;
        for (int i = 0; i < Np; ++i) d += gS[base + (size_t)i * Nq] * S[base + (size_t)i * Nq];
        for (int i = 0; i < Np; ++i) {
            const size_t k = base + (size_t)i * Nq;
            gA[k] = S[k] * (gS[k] - d);
        }
    }
}
