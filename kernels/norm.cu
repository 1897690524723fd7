// Batch norm (NCHW, statistics per channel over N*H*W) and row-wise L2 normalisation.
//
// Indexing: the per-channel reductions (bn_stats, bn_bwd_reduce, and the one-launch variants
// bn_train_fused, bn_bwd_fused that also write the channel's elements) use one block per channel c;
// thread t strides over the flattened j = n*HW + i of that channel, element x[(n*C + c)*HW + i]
// (BnWalk: no division per element), then a fixed block tree (deterministic). When there are too
// few channels to fill the device with one block each, the split reductions (bn_stats_split,
// bn_bwd_split) give each channel S blocks on a grid (S, C): block (s, c) owns the s-th chunk of
// that channel's j range, and the block that finishes last combines the S partial results in chunk
// order (deterministic too). The elementwise passes (bn_apply, bn_train_dx and the eval-mode
// kernels) take four elements of the flat NCHW buffer per thread (EW4_CH_LOOP in common.cuh:
// elements i, i + s, i + 2s, i + 3s for a grid of s threads, their loads issued together) and
// follow each element's channel c = (i / HW) % C with a ChWalk, which divides once per thread
// rather than twice per element; by default (MEDSSL_CUDA_BN_APPLY=chunks) the train-mode ones run
// instead on the grid (S, C) of the reduction before them (bn_apply_chunks, bn_dx_chunks: block
// (s, c) walks chunk s of channel c as the reduction's block did; =flat keeps the flat pass).
// With MEDSSL_CUDA_BN_FWD=resident (MEDSSL_CUDA_BN_BWD=resident) the two-launch forward
// (backward) is one cooperative launch on the same kind of grid (bn_fwd_resident, bn_bwd_resident:
// their blocks wait for the other blocks of their channel, then write the chunk they read, what
// they kept of it from shared memory). The split statistics and the resident forward come in
// variants that load more or fewer elements per thread at a time (MEDSSL_CUDA_BN_INFLIGHT:
// bn_stats_split_g2/_g4, bn_fwd_resident_g1/_g4; the same bits), and with l2 != 0
// (MEDSSL_CUDA_BN_L2=hint) the one-pass forwards mark their accesses with L2 eviction priorities
// (ld_l2/st_l2 in common.cuh: x evict-last while the statistics read it, evict-first when the
// normalising pass reads it for the last time, y evict-first). With MEDSSL_CUDA_BN_VEC=on the split
// and resident kernels run in float4 forms (the end of this file): the same walks over units of
// four consecutive elements of a plane, one 16-byte access each; with MEDSSL_CUDA_BN_PIPE=on as
// well, the float4 forward and backward above one launch per channel are pipelined (bn_fwd_pipe4,
// bn_bwd_pipe4: one wave of blocks on a flat grid takes the (channel, chunk) items in turn, each
// block copying its next item's chunk into shared memory with cp.async while it meets the other
// blocks of its current item's channel).
// L2 normalise is "warp per row".
#include "common.cuh"

// Count, mean and sum of squared deviations from the mean (M2) of a set of values.
struct Moments {
    int n;
    float mean, m2;
};

// a (+) b, the pairwise update of Chan et al.: n = na + nb, d = mean_b - mean_a,
// mean = mean_a + d*nb/n, M2 = M2_a + M2_b + d^2*na*nb/n (either side may be empty).
__device__ __forceinline__ Moments moments_merge(Moments a, Moments b) {
    if (b.n == 0) return a;
    if (a.n == 0) return b;
    const int n = a.n + b.n;
    const float d = b.mean - a.mean, wb = (float)b.n / (float)n;
    return Moments{n, fmaf(d, wb, a.mean), a.m2 + b.m2 + d * d * ((float)a.n * wb)};
}

// The moments of a whole warp, in lane 0 (a fixed butterfly: lane 0 merges lane 16, then lane 8,
// which holds lanes 8 and 24, and so on; the other lanes end with partial results).
__device__ __forceinline__ Moments warp_moments(Moments v) {
    for (int o = 16; o > 0; o >>= 1) {
        const Moments u{__shfl_xor_sync(FULL_MASK, v.n, o), __shfl_xor_sync(FULL_MASK, v.mean, o),
                        __shfl_xor_sync(FULL_MASK, v.m2, o)};
        v = moments_merge(v, u);
    }
    return v;
}

// The moments of the whole block (blockDim.x a multiple of 32), every thread gets them: warps
// first, then warp 0 merges the warps' results in the same fixed tree (deterministic). Safe to
// call repeatedly in one kernel, as block_sum.
__device__ __forceinline__ Moments block_moments(Moments v) {
    __shared__ int sn[32];
    __shared__ float smean[32], sm2[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_moments(v);
    __syncthreads();
    if (lane == 0) {
        sn[warp] = v.n;
        smean[warp] = v.mean;
        sm2[warp] = v.m2;
    }
    __syncthreads();
    if (warp == 0) {
        Moments r = lane < nwarps ? Moments{sn[lane], smean[lane], sm2[lane]}
                                  : Moments{0, 0.f, 0.f};
        r = warp_moments(r);
        if (lane == 0) {
            sn[0] = r.n;
            smean[0] = r.mean;
            sm2[0] = r.m2;
        }
    }
    __syncthreads();
    return Moments{sn[0], smean[0], sm2[0]};
}

// Where a walk over channel c's elements stands: element j = n*HW + i at offset
// k = (n*C + c)*HW + i, and one stride (blockDim.x elements) as its own quotient and remainder
// (dk, di; a further plane, wrap, when i passes HW), so that a walk divides once, not once per
// element: two divisions per element cost about as much as the memory traffic itself at the
// bandwidth-bound sizes.
struct BnPos {
    int j, step, i, HW, di;
    size_t k, dk, wrap;
};
__device__ __forceinline__ BnPos bn_pos(int C, int HW, int c, int j) {
    BnPos p;
    p.j = j;
    p.step = (int)blockDim.x;
    p.HW = HW;
    const int n = j / HW, dn = p.step / HW;
    p.i = j - n * HW;
    p.di = p.step - dn * HW;
    p.k = ((size_t)n * C + c) * HW + p.i;
    p.dk = (size_t)dn * C * HW + p.di;
    p.wrap = (size_t)(C - 1) * HW;
    return p;
}

// Thread t's walk over channel c's elements j in [lo, hi): j = lo + t, lo + t + blockDim.x, ...
struct BnWalk {
    BnPos p;
    int hi;
};
__device__ __forceinline__ BnWalk bn_walk(int C, int HW, int c, int lo, int hi) {
    return BnWalk{bn_pos(C, HW, c, lo + (int)threadIdx.x), hi};
}
// Whether the element `ahead` strides on is still in the range.
__device__ __forceinline__ bool bn_has(const BnWalk& w, int ahead) {
    return w.p.j + ahead * w.p.step < w.hi;
}
// The current offset, then a stride on.
__device__ __forceinline__ size_t bn_next(BnWalk& w) {
    BnPos& p = w.p;
    const size_t r = p.k;
    p.j += p.step;
    p.i += p.di;
    p.k += p.dk;
    if (p.i >= p.HW) {
        p.i -= p.HW;
        p.k += p.wrap;
    }
    return r;
}

// The same walk backwards: thread t's elements of [lo, hi) (the j = lo + t + m*blockDim.x that
// bn_walk visits) from its last one down to its first, the offset stepped back by the same
// quotient and remainder (borrowing a plane when i drops below 0). A second pass over data just
// read this way starts with what the first pass read last, which is what the cache still holds.
struct BnRev {
    BnPos p;
    int lo;
};
__device__ __forceinline__ BnRev bn_walk_rev(int C, int HW, int c, int lo, int hi) {
    const int first = lo + (int)threadIdx.x, step = (int)blockDim.x;
    const bool any = first < hi;
    // At the thread's last element; with none, j = lo - 1, before the range.
    BnRev w{bn_pos(C, HW, c, any ? first + (hi - 1 - first) / step * step : lo), lo};
    if (!any) w.p.j = lo - 1;
    return w;
}
// Whether the element `ahead` strides back is still in the range.
__device__ __forceinline__ bool bn_rhas(const BnRev& w, int ahead) {
    return w.p.j - ahead * w.p.step >= w.lo;
}
// The current offset, then a stride back.
__device__ __forceinline__ size_t bn_prev(BnRev& w) {
    BnPos& p = w.p;
    const size_t r = p.k;
    p.j -= p.step;
    p.i -= p.di;
    p.k -= p.dk;
    if (p.i < 0) {
        p.i += p.HW;
        p.k -= p.wrap;
    }
    return r;
}

// Either walk, for code written once for both directions.
__device__ __forceinline__ bool walk_has(const BnWalk& w, int ahead) { return bn_has(w, ahead); }
__device__ __forceinline__ bool walk_has(const BnRev& w, int ahead) { return bn_rhas(w, ahead); }
__device__ __forceinline__ size_t walk_step(BnWalk& w) { return bn_next(w); }
__device__ __forceinline__ size_t walk_step(BnRev& w) { return bn_prev(w); }

// The moments of four values, exactly as two passes would give them: their mean, then the sum of
// squared deviations from it (merged into a thread's running moments with one division per four
// values, where Welford's update takes one per value).
__device__ __forceinline__ Moments moments4(const float* v) {
    const float m = ((v[0] + v[1]) + (v[2] + v[3])) * 0.25f;
    const float d0 = v[0] - m, d1 = v[1] - m, d2 = v[2] - m, d3 = v[3] - m;
    return Moments{4, m, fmaf(d0, d0, fmaf(d1, d1, fmaf(d2, d2, d3 * d3)))};
}

// Welford's update of v by one more value xv.
__device__ __forceinline__ void welford_add(Moments& v, float xv) {
    v.n += 1;
    const float d = xv - v.mean;
    v.mean = fmaf(d, 1.f / (float)v.n, v.mean);
    v.m2 = fmaf(d, xv - v.mean, v.m2);
}

// How the one-pass statistics read an element: load(a, p) reads the element at address a, the
// p-th of the range in walk order (p = j - lo), keep(p, v) is told its value after the group's
// loads. BnLoad reads plainly and keeps nothing; BnStage (the resident forward) also keeps the
// first `cap` elements of the range in shared memory. (BnLoadT<float4>: the same for the float4
// kernels at the end of this file, whose "elements" are units of four.)
template <class T>
struct BnLoadT {
    DEVICE_MEMBER T load(const T* a, int p) const {
        (void)p;
        return *a;
    }
    DEVICE_MEMBER void keep(int p, T v) const {
        (void)p;
        (void)v;
    }
};
typedef BnLoadT<float> BnLoad;

// BnLoad through an L2 policy (MEDSSL_CUDA_BN_L2=hint: evict-last, so that the normalising pass
// after the statistics finds as much of x as L2 holds).
struct BnLoadL2 {
    L2Policy pol;
    DEVICE_MEMBER float load(const float* a, int p) const {
        (void)p;
        return ld_l2(a, pol);
    }
    DEVICE_MEMBER void keep(int p, float v) const {
        (void)p;
        (void)v;
    }
};

// A group's values merged into the running moments v: those of each four (moments4) in order,
// or for a single element Welford's update; for float4 units (the float4 kernels at the end of
// this file) each unit's four values as one moments4, in order.
template <int NQ>
__device__ __forceinline__ void bn_moments_add(Moments& v, const float (&xv)[NQ]) {
    if (NQ == 1)
        welford_add(v, xv[0]);
    else
        for (int g = 0; g < NQ / 4; ++g) v = moments_merge(v, moments4(xv + 4 * g));
}
template <int NQ>
__device__ __forceinline__ void bn_moments_add(Moments& v, const float4 (&xv)[NQ]) {
    for (int q = 0; q < NQ; ++q) {
        const float u[4] = {xv[q].x, xv[q].y, xv[q].z, xv[q].w};
        v = moments_merge(v, moments4(u));
    }
}

// One group of NQ strides of bn_range_moments: every load, then the kept values, then the
// moments (bn_moments_add). T = float4: NQ units of the float4 kernels.
template <int NQ, class T, class Ld>
__device__ __forceinline__ void bn_moments_group(BnWalk& w, int lo, const T* x, const Ld& ld,
                                                 Moments& v) {
    size_t k[NQ];
    int p[NQ];
    T xv[NQ];
    for (int q = 0; q < NQ; ++q) {
        p[q] = w.p.j - lo;
        k[q] = bn_next(w);
    }
    for (int q = 0; q < NQ; ++q) xv[q] = ld.load(x + k[q], p[q]);
    for (int q = 0; q < NQ; ++q) ld.keep(p[q], xv[q]);
    bn_moments_add<NQ>(v, xv);
}

// The one-pass moments of channel c's elements j in [lo, hi) by one block (every thread gets
// them; see bn_range_stats), each element read through `ld` (BnLoad, BnStage). Each thread loads
// G groups of four strides at a time (G*4 loads in flight), then merges the groups' moments in
// order: the same arithmetic, so the same bits, for any G; a larger G keeps more bytes in flight
// where fewer threads share a multiprocessor (the resident forward runs 1024 per multiprocessor).
template <int G, class Ld>
__device__ __forceinline__ Moments bn_range_moments(int C, int HW, int c, int lo, int hi,
                                                    const float* x, const Ld& ld) {
    Moments v{0, 0.f, 0.f};
    for (BnWalk w = bn_walk(C, HW, c, lo, hi); bn_has(w, 0);) {
        // Groups of G*4 while there are that many, then of 4, then single elements.
        if (bn_has(w, 4 * G - 1))
            bn_moments_group<4 * G>(w, lo, x, ld, v);
        else if (G > 1 && bn_has(w, 3))
            bn_moments_group<4>(w, lo, x, ld, v);
        else
            bn_moments_group<1>(w, lo, x, ld, v);
    }
    return block_moments(v);
}

// Mean and sum of squared deviations from it (M2) of channel c's elements j in [lo, hi), by one
// block (every thread gets them; lo < hi). Two passes over the elements (the mean, then the squared
// deviations from it, walking backwards: bn_walk_rev), or with welford != 0 one: each thread keeps
// the running moments of its own elements, adding four at a time (their own mean and M2, moments4,
// merged in by Chan et al.'s update) and any last ones by Welford's update (mean += d/k, M2 +=
// d*(x - mean) with d = x - old mean, at its k-th element); the threads' results are merged by
// block_moments. One pass reads x once from memory instead of twice, at about the same accuracy
// (both avoid the cancellation of the sum-of-squares formula). Either way each thread loads its
// elements four strides at a time (the four loads in flight together: one load at a time per thread
// leaves the memory system idle); two-pass sums them into four accumulators, combined in a fixed
// order at the end.
template <int G = 1>
__device__ __forceinline__ void bn_range_stats(int C, int HW, int c, int lo, int hi, int welford,
                                               const float* x, float* mu_out, float* m2_out,
                                               int l2 = 0) {
    if (welford) {
        const Moments r = l2 ? bn_range_moments<G>(C, HW, c, lo, hi, x, BnLoadL2{l2_evict_last()})
                             : bn_range_moments<G>(C, HW, c, lo, hi, x, BnLoad());
        *mu_out = r.mean;
        *m2_out = r.m2;
        return;
    }
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    for (BnWalk w = bn_walk(C, HW, c, lo, hi); bn_has(w, 0);) {
        if (bn_has(w, 3)) {
            const size_t k0 = bn_next(w), k1 = bn_next(w), k2 = bn_next(w), k3 = bn_next(w);
            const float a = x[k0], b = x[k1], e = x[k2], f = x[k3];
            s[0] += a;
            s[1] += b;
            s[2] += e;
            s[3] += f;
        } else {
            s[0] += x[bn_next(w)];
        }
    }
    const float mu = block_sum((s[0] + s[1]) + (s[2] + s[3])) / (float)(hi - lo);
    // The squared deviations walk backwards (bn_walk_rev): when the range is larger than the
    // cache, its start is long evicted by the end of the first pass, but the end is still there.
    float q[4] = {0.f, 0.f, 0.f, 0.f};
    for (BnRev w = bn_walk_rev(C, HW, c, lo, hi); bn_rhas(w, 0);) {
        if (bn_rhas(w, 3)) {
            const size_t k0 = bn_prev(w), k1 = bn_prev(w), k2 = bn_prev(w), k3 = bn_prev(w);
            const float a = x[k0] - mu, b = x[k1] - mu, e = x[k2] - mu, f = x[k3] - mu;
            q[0] = fmaf(a, a, q[0]);
            q[1] = fmaf(b, b, q[1]);
            q[2] = fmaf(e, e, q[2]);
            q[3] = fmaf(f, f, q[3]);
        } else {
            const float d = x[bn_prev(w)] - mu;
            q[0] = fmaf(d, d, q[0]);
        }
    }
    *mu_out = mu;
    *m2_out = block_sum((q[0] + q[1]) + (q[2] + q[3]));
}

// Statistics of channel c over its M = N*HW elements, by one block (every thread gets them): the
// mean and the biased variance M2 / M (see bn_range_stats for welford).
__device__ __forceinline__ void bn_channel_stats(int N, int C, int HW, int c, int welford,
                                                 const float* x, float* mu_out, float* var_out) {
    const int M = N * HW;
    float m2;
    bn_range_stats(C, HW, c, 0, M, welford, x, mu_out, &m2);
    *var_out = m2 / (float)M;
}

// Thread 0 stores channel c's statistics: mean, invstd = 1/sqrt(var_biased + eps), var_unbiased =
// var_biased*M/(M-1) (M == 1 gives var_unbiased = 0 rather than NaN) and, when rm_out is not
// null, PyTorch's running statistics update rm_out = (1-m)*rm + m*mean, rv_out = (1-m)*rv +
// m*var_unbiased (saves the two elementwise launches per layer that would otherwise follow).
__device__ __forceinline__ void bn_store_stats(int M, int c, float eps, float mu, float var,
                                               float* mean, float* invstd, float* var_unbiased,
                                               float momentum, const float* rm, const float* rv,
                                               float* rm_out, float* rv_out) {
    if (threadIdx.x != 0) return;
    mean[c] = mu;
    invstd[c] = 1.f / sqrtf(var + eps);
    const float vu = M > 1 ? var * (float)M / (float)(M - 1) : 0.f;
    var_unbiased[c] = vu;
    if (rm_out) {
        rm_out[c] = fmaf(momentum, mu, (1.f - momentum) * rm[c]);
        rv_out[c] = fmaf(momentum, vu, (1.f - momentum) * rv[c]);
    }
}

// One output element: gamma * (x - mean) * invstd + beta, with an optional epilogue: when res is
// not null, + res[k] (a residual join); when relu != 0, max(., 0) (as ew_relu_fwd / ew_add_relu,
// so the fused and unfused paths give the same bits).
//
// The norm's kernels spell out every fused multiply-add (fmaf) so that the compiler's
// contraction choices, which may differ between a loop and a hoisted loop invariant, cannot make
// the one-launch and two-launch paths round differently.
__device__ __forceinline__ float bn_out_v(float xv, float mu, float is, float g, float b,
                                          int has_res, float rv, int relu) {
    float v = fmaf(g, (xv - mu) * is, b);
    if (has_res) v = v + rv;
    if (relu) v = v > 0.f ? v : 0.f;
    return v;
}
// bn_out_v on each of a float4 unit's four elements (the float4 kernels at the end of this file).
__device__ __forceinline__ float4 bn_out_v(float4 xv, float mu, float is, float g, float b,
                                           int has_res, float4 rv, int relu) {
    return make_float4(bn_out_v(xv.x, mu, is, g, b, has_res, rv.x, relu),
                       bn_out_v(xv.y, mu, is, g, b, has_res, rv.y, relu),
                       bn_out_v(xv.z, mu, is, g, b, has_res, rv.z, relu),
                       bn_out_v(xv.w, mu, is, g, b, has_res, rv.w, relu));
}
// The residual at offset k where there is one (has_res), else zero.
__device__ __forceinline__ float bn_res(int has_res, const float* res, size_t k) {
    return has_res ? res[k] : 0.f;
}
__device__ __forceinline__ float4 bn_res(int has_res, const float4* res, size_t k) {
    return has_res ? res[k] : make_float4(0.f, 0.f, 0.f, 0.f);
}
// bn_out_v with the residual (if any) read from res[k].
__device__ __forceinline__ float bn_out(float xv, float mu, float is, float g, float b,
                                        const float* res, int relu, size_t k) {
    return bn_out_v(xv, mu, is, g, b, res != 0, res ? res[k] : 0.f, relu);
}

// Writes y = bn_out(x) for the elements a walk visits, with one channel's statistics and
// parameters: NQ strides at a time (four; the float4 kernels take two units), every load before
// the stores (as bn_range_stats), then one at a time. The element of x at offset o (the walk's j)
// is src(o, j): BnFromX reads x[o] (bn_apply_walk), BnFromKept the resident forward's shared
// memory where it kept the element. y[o] = v is dst(o, v): BnToY a plain store, BnToYL2 one
// marked evict-first in L2. T = float4: the float4 kernels' units.
template <int NQ = 4, class Walk, class Src, class T, class Dst>
__device__ __forceinline__ void bn_apply_walk_to(Walk w, float mu, float is, float g, float b,
                                                 const Src& src, const T* res, int relu,
                                                 const Dst& dst) {
    const int has_res = res != 0;
    while (walk_has(w, 0)) {
        if (walk_has(w, NQ - 1)) {
            size_t o[NQ];
            int j[NQ];
            T xv[NQ], rv[NQ];
            for (int q = 0; q < NQ; ++q) {
                j[q] = w.p.j;
                o[q] = walk_step(w);
            }
            for (int q = 0; q < NQ; ++q) {
                xv[q] = src(o[q], j[q]);
                rv[q] = bn_res(has_res, res, o[q]);
            }
            for (int q = 0; q < NQ; ++q)
                dst(o[q], bn_out_v(xv[q], mu, is, g, b, has_res, rv[q], relu));
        } else {
            const int j = w.p.j;
            const size_t o = walk_step(w);
            dst(o, bn_out_v(src(o, j), mu, is, g, b, res != 0, bn_res(res != 0, res, o), relu));
        }
    }
}

// Plain stores of y (or of the float4 kernels' units).
template <class T>
struct BnToYT {
    T* y;
    DEVICE_MEMBER void operator()(size_t o, T v) const { y[o] = v; }
};
typedef BnToYT<float> BnToY;

// bn_apply_walk_to storing y plainly.
template <class Walk, class Src>
__device__ __forceinline__ void bn_apply_walk_from(Walk w, float mu, float is, float g, float b,
                                                   const Src& src, const float* res, int relu,
                                                   float* y) {
    bn_apply_walk_to(w, mu, is, g, b, src, res, relu, BnToY{y});
}

// x's elements (or the float4 kernels' units) read from memory.
template <class T>
struct BnFromXT {
    const T* x;
    DEVICE_MEMBER T operator()(size_t o, int j) const {
        (void)j;
        return x[o];
    }
};
typedef BnFromXT<float> BnFromX;

// x's elements read from memory, marked evict-first in L2 (the normalising pass's reads are
// their last use: under MEDSSL_CUDA_BN_L2=hint, L2 then replaces the lines already read before
// the ones still to come, which the statistics pass marked evict-last).
struct BnFromXL2 {
    const float* x;
    L2Policy pol;
    DEVICE_MEMBER float operator()(size_t o, int j) const {
        (void)j;
        return ld_l2(x + o, pol);
    }
};

// Stores of y marked evict-first in L2 (MEDSSL_CUDA_BN_L2=hint): y's lines give way before x's.
struct BnToYL2 {
    float* y;
    L2Policy pol;
    DEVICE_MEMBER void operator()(size_t o, float v) const { st_l2(y + o, v, pol); }
};

// bn_apply_walk_from with x read from memory.
template <class Walk>
__device__ __forceinline__ void bn_apply_walk(Walk w, float mu, float is, float g, float b,
                                              const float* x, const float* res, int relu,
                                              float* y) {
    bn_apply_walk_from(w, mu, is, g, b, BnFromX{x}, res, relu, y);
}

// Batch statistics of every channel (one block per channel), see bn_store_stats.
extern "C" __global__ void bn_stats(int N, int C, int HW, float eps, int welford, const float* x,
                                    float* mean, float* invstd, float* var_unbiased,
                                    float momentum, const float* rm, const float* rv,
                                    float* rm_out, float* rv_out) {
    const int c = blockIdx.x;
    float mu, var;
    bn_channel_stats(N, C, HW, c, welford, x, &mu, &var);
    bn_store_stats(N * HW, c, eps, mu, var, mean, invstd, var_unbiased, momentum, rm, rv, rm_out,
                   rv_out);
}

// bn_stats and bn_apply in one launch, for channels small enough that one block per channel
// normalises its own elements faster than a second launch would (the host picks it by M = N*HW):
// the block of channel c computes and stores the statistics as bn_stats does, then writes the
// channel's outputs as bn_apply does (same arithmetic, same bits), starting where the statistics
// ended (the start of the channel after two passes, the second backwards; its end after one).
extern "C" __global__ void bn_train_fused(int N, int C, int HW, float eps, int welford,
                                          const float* x, float* mean, float* invstd,
                                          float* var_unbiased, float momentum, const float* rm,
                                          const float* rv, float* rm_out, float* rv_out,
                                          const float* gamma, const float* beta, const float* res,
                                          int relu, float* y) {
    const int c = blockIdx.x;
    const int M = N * HW;
    float mu, var;
    bn_channel_stats(N, C, HW, c, welford, x, &mu, &var);
    bn_store_stats(M, c, eps, mu, var, mean, invstd, var_unbiased, momentum, rm, rv, rm_out,
                   rv_out);
    const float is = 1.f / sqrtf(var + eps), g = gamma[c], b = beta[c];
    if (welford)
        bn_apply_walk(bn_walk_rev(C, HW, c, 0, M), mu, is, g, b, x, res, relu, y);
    else
        bn_apply_walk(bn_walk(C, HW, c, 0, M), mu, is, g, b, x, res, relu, y);
}

// invstd[c] = 1/sqrt(running_var[c] + eps) (eval mode).
__device__ __forceinline__ float bn_eval_is(const float* rv, float eps, int c) {
    return 1.f / sqrtf(rv[c] + eps);
}

extern "C" __global__ void bn_eval_invstd(int C, float eps, const float* rv, float* invstd) {
    GRID_LOOP(c, C) invstd[c] = bn_eval_is(rv, eps, c);
}

// y = gamma * (x - mean) * invstd + beta with bn_out's optional epilogue, four elements per
// thread (EW4_CH_LOOP): every load of the four (x, the residual, the channel's parameters) before
// any store, so the loads are in flight together. With `eval` != 0 (the eval-mode kernel) `mean`
// is the running mean and invstd is formed per element from the running variance in `var` and
// `eps` (as bn_eval_invstd does, so the result has the bits of bn_eval_invstd + bn_apply + ReLU /
// residual join).
__device__ __forceinline__ void bn_apply_body(int n, int C, int HW, int eval, float eps,
                                              const float* x, const float* mean,
                                              const float* var, const float* gamma,
                                              const float* beta, const float* res, int relu,
                                              float* y) {
    const int has_res = res != 0;
    EW4_CH_LOOP(i, s, n, w, C, HW) {
        float xv[4], rv[4], mu[4], is[4], g[4], b[4];
        for (int q = 0; q < 4; ++q) {
            const int c = ch_next(w);
            xv[q] = x[i + q * s];
            rv[q] = has_res ? res[i + q * s] : 0.f;
            mu[q] = mean[c];
            is[q] = var[c];
            g[q] = gamma[c];
            b[q] = beta[c];
        }
        for (int q = 0; q < 4; ++q) {
            if (eval) is[q] = bn_eval_is(is + q, eps, 0);
            y[i + q * s] = bn_out_v(xv[q], mu[q], is[q], g[q], b[q], has_res, rv[q], relu);
        }
    }
    EW4_TAIL(i, s, n) {
        const int c = ch_next(w);
        const float is = eval ? bn_eval_is(var, eps, c) : var[c];
        y[i] = bn_out(x[i], mean[c], is, gamma[c], beta[c], res, relu, i);
    }
}

// Eval-mode forward in one launch: y = gamma * (x - rm) * invstd + beta with bn_out's optional
// epilogue, invstd formed per element from the running variance rv (see bn_apply_body).
extern "C" __global__ void bn_eval_apply(int n, int C, int HW, float eps, const float* x,
                                         const float* rm, const float* rv, const float* gamma,
                                         const float* beta, const float* res, int relu,
                                         float* y) {
    bn_apply_body(n, C, HW, 1, eps, x, rm, rv, gamma, beta, res, relu, y);
}

// y = gamma * (x - mean) * invstd + beta with bn_out's optional epilogue (see bn_apply_body).
extern "C" __global__ void bn_apply(int n, int C, int HW, const float* x, const float* mean,
                                    const float* invstd, const float* gamma, const float* beta,
                                    const float* res, int relu, float* y) {
    bn_apply_body(n, C, HW, 0, 0.f, x, mean, invstd, gamma, beta, res, relu, y);
}

// The output gradient a batch norm receives: gy, or, when the norm was followed by a ReLU with
// output ry (ry not null), gy * [ry > 0] (as ew_relu_bwd), so the ReLU backward needs no launch.
__device__ __forceinline__ float bn_gy(const float* gy, const float* ry, size_t k) {
    return (ry && !(ry[k] > 0.f)) ? 0.f : gy[k];
}
// The same loaded evict-first (the resident backward's kept elements: read once).
__device__ __forceinline__ float bn_gy_cs(const float* gy, const float* ry, size_t k) {
    return (ry && !(__ldcs(ry + k) > 0.f)) ? 0.f : __ldcs(gy + k);
}
// Both for a unit of four elements (the float4 kernels at the end of this file).
__device__ __forceinline__ float4 bn_mask4(float4 g, float4 r) {
    return make_float4(r.x > 0.f ? g.x : 0.f, r.y > 0.f ? g.y : 0.f, r.z > 0.f ? g.z : 0.f,
                       r.w > 0.f ? g.w : 0.f);
}
__device__ __forceinline__ float4 bn_gy(const float4* gy, const float4* ry, size_t k) {
    return ry ? bn_mask4(gy[k], ry[k]) : gy[k];
}
__device__ __forceinline__ float4 bn_gy_cs(const float4* gy, const float4* ry, size_t k) {
    return ry ? bn_mask4(__ldcs(gy + k), __ldcs(ry + k)) : __ldcs(gy + k);
}

// How the gradient sums read an element at offset k, the p-th of the range in walk order: its
// masked output gradient g(k, p) (bn_gy) and input x(k, p); keep(p, g, x) is told both after the
// group's loads. BnGradLoad reads plainly and keeps nothing; BnGradStage (the resident
// backward) also keeps the range's first `cap` pairs in shared memory. (T = float4: the float4
// kernels' units.)
template <class T>
struct BnGradLoadT {
    const T *x, *gy, *ry;
    DEVICE_MEMBER T g(size_t k, int p) const {
        (void)p;
        return bn_gy(gy, ry, k);
    }
    DEVICE_MEMBER T xv(size_t k, int p) const {
        (void)p;
        return x[k];
    }
    DEVICE_MEMBER void keep(int p, T g, T v) const {
        (void)p;
        (void)g;
        (void)v;
    }
};
typedef BnGradLoadT<float> BnGradLoad;

// BnGradLoad through an L2 policy (MEDSSL_CUDA_BN_L2=hint): evict-last while the gradient sums
// read x, gy (and ry), so that the input-gradient pass finds as much of them as L2 holds;
// evict-first in that pass, their last use.
struct BnGradLoadL2 {
    const float *x, *gy, *ry;
    L2Policy pol;
    DEVICE_MEMBER float g(size_t k, int p) const {
        (void)p;
        return (ry && !(ld_l2(ry + k, pol) > 0.f)) ? 0.f : ld_l2(gy + k, pol);
    }
    DEVICE_MEMBER float xv(size_t k, int p) const {
        (void)p;
        return ld_l2(x + k, pol);
    }
    DEVICE_MEMBER void keep(int p, float g, float v) const {
        (void)p;
        (void)g;
        (void)v;
    }
};

// The gradient sums of channel c's elements j in [lo, hi) by one block (every thread gets them):
// sg = sum(gy) and sgx = sum(gy * xhat), xhat = (x - mean) * invstd, with gy masked by the
// following ReLU's output ry when ry is not null (see bn_gy), each element read through `ld`
// (BnGradLoad, BnGradStage). When gm is not null, the masked gradient is also written there (a
// residual join's other input needs it). G groups of four strides at a time, their sums added
// group after group into the same four accumulators: the same bits for any G (as
// bn_range_moments).
// Element q of a group added to the four accumulators of the gradient sums: into accumulator
// q mod 4; a float4 unit's component e into accumulator e.
__device__ __forceinline__ void bn_grad_add(int q, float g, float xv, float mu, float is,
                                            float* sg, float* sgx) {
    sg[q & 3] += g;
    sgx[q & 3] = fmaf(g * (xv - mu), is, sgx[q & 3]);
}
__device__ __forceinline__ void bn_grad_add(int q, float4 g, float4 xv, float mu, float is,
                                            float* sg, float* sgx) {
    (void)q;
    bn_grad_add(0, g.x, xv.x, mu, is, sg, sgx);
    bn_grad_add(1, g.y, xv.y, mu, is, sg, sgx);
    bn_grad_add(2, g.z, xv.z, mu, is, sg, sgx);
    bn_grad_add(3, g.w, xv.w, mu, is, sg, sgx);
}

// One group of NQ strides of bn_range_grad_sums_g: every load, then the stores to gm (a buffer of
// its own, never one of the inputs) and the sums (bn_grad_add). T = float4: NQ units of the
// float4 kernels.
template <int NQ, class T, class Ld>
__device__ __forceinline__ void bn_grad_group(BnWalk& w, int lo, float mu, float is, T* gm,
                                              const Ld& ld, float* sg, float* sgx) {
    size_t k[NQ];
    int p[NQ];
    T g[NQ], xv[NQ];
    for (int q = 0; q < NQ; ++q) {
        p[q] = w.p.j - lo;
        k[q] = bn_next(w);
    }
    for (int q = 0; q < NQ; ++q) {
        g[q] = ld.g(k[q], p[q]);
        xv[q] = ld.xv(k[q], p[q]);
    }
    for (int q = 0; q < NQ; ++q) ld.keep(p[q], g[q], xv[q]);
    for (int q = 0; q < NQ; ++q) {
        if (gm) gm[k[q]] = g[q];
        bn_grad_add(q, g[q], xv[q], mu, is, sg, sgx);
    }
}

template <int G, class Ld>
__device__ __forceinline__ void bn_range_grad_sums_g(int C, int HW, int c, int lo, int hi,
                                                     float mu, float is, float* gm, const Ld& ld,
                                                     float* sg_out, float* sgx_out) {
    float sg[4] = {0.f, 0.f, 0.f, 0.f}, sgx[4] = {0.f, 0.f, 0.f, 0.f};
    for (BnWalk w = bn_walk(C, HW, c, lo, hi); bn_has(w, 0);) {
        // Groups of G*4 while there are that many, then of 4, then single elements.
        if (bn_has(w, 4 * G - 1))
            bn_grad_group<4 * G>(w, lo, mu, is, gm, ld, sg, sgx);
        else if (G > 1 && bn_has(w, 3))
            bn_grad_group<4>(w, lo, mu, is, gm, ld, sg, sgx);
        else
            bn_grad_group<1>(w, lo, mu, is, gm, ld, sg, sgx);
    }
    *sg_out = block_sum((sg[0] + sg[1]) + (sg[2] + sg[3]));
    *sgx_out = block_sum((sgx[0] + sgx[1]) + (sgx[2] + sgx[3]));
}

// bn_range_grad_sums_g reading plainly, four strides at a time.
__device__ __forceinline__ void bn_range_grad_sums(int C, int HW, int c, int lo, int hi,
                                                   const float* x, const float* gy,
                                                   const float* ry, float mu, float is, float* gm,
                                                   float* sg_out, float* sgx_out) {
    bn_range_grad_sums_g<1>(C, HW, c, lo, hi, mu, is, gm, BnGradLoad{x, gy, ry}, sg_out,
                            sgx_out);
}

// The same over the whole channel (M = N*HW elements).
__device__ __forceinline__ void bn_grad_sums(int N, int C, int HW, int c, const float* x,
                                             const float* gy, const float* ry, float mu, float is,
                                             float* gm, float* sg_out, float* sgx_out) {
    bn_range_grad_sums(C, HW, c, 0, N * HW, x, gy, ry, mu, is, gm, sg_out, sgx_out);
}

// One train-mode input-gradient element: gamma*invstd * (g - sum(gy)/M - xhat * sum(gy*xhat)/M).
__device__ __forceinline__ float bn_dx(float g, float xv, float mu, float is, float gam,
                                       float sg, float sgx, int M) {
    const float xhat = (xv - mu) * is;
    const float inv_m = 1.f / (float)M;
    const float t = fmaf(-(xhat * sgx), inv_m, fmaf(-sg, inv_m, g));
    return (gam * is) * t;
}
// bn_dx on each of a float4 unit's four elements (the float4 kernels at the end of this file).
__device__ __forceinline__ float4 bn_dx(float4 g, float4 xv, float mu, float is, float gam,
                                        float sg, float sgx, int M) {
    return make_float4(bn_dx(g.x, xv.x, mu, is, gam, sg, sgx, M),
                       bn_dx(g.y, xv.y, mu, is, gam, sg, sgx, M),
                       bn_dx(g.z, xv.z, mu, is, gam, sg, sgx, M),
                       bn_dx(g.w, xv.w, mu, is, gam, sg, sgx, M));
}

// Writes the train-mode input gradient gx = bn_dx(...) for the elements a walk visits, with one
// channel's statistics, gamma and gradient sums: NQ strides at a time (four; the float4 kernels
// take two units), every load before the stores, then one at a time. The masked output gradient
// and the input at offset o (the walk's j) come from src.g(o, j) and src.xv(o, j): BnGradLoad
// reads memory (bn_dx_walk), BnDxFromKept the resident backward's shared memory where it kept
// them; each gradient is stored by dst(o, v) (BnToY: plainly, BnToYL2: evict-first). Elements
// of src's type: float, or float4 units.
template <int NQ = 4, class Walk, class Src, class Dst>
__device__ __forceinline__ void bn_dx_walk_to(Walk w, int M, float mu, float is, float gam,
                                              float sg, float sgx, const Src& src, const Dst& dst) {
    typedef decltype(src.g(size_t(0), 0)) T;
    while (walk_has(w, 0)) {
        if (walk_has(w, NQ - 1)) {
            size_t o[NQ];
            int j[NQ];
            T g[NQ], xv[NQ];
            for (int q = 0; q < NQ; ++q) {
                j[q] = w.p.j;
                o[q] = walk_step(w);
            }
            for (int q = 0; q < NQ; ++q) {
                g[q] = src.g(o[q], j[q]);
                xv[q] = src.xv(o[q], j[q]);
            }
            for (int q = 0; q < NQ; ++q)
                dst(o[q], bn_dx(g[q], xv[q], mu, is, gam, sg, sgx, M));
        } else {
            const int j = w.p.j;
            const size_t o = walk_step(w);
            dst(o, bn_dx(src.g(o, j), src.xv(o, j), mu, is, gam, sg, sgx, M));
        }
    }
}

// bn_dx_walk_to storing gx plainly.
template <class Walk, class Src>
__device__ __forceinline__ void bn_dx_walk_from(Walk w, int M, float mu, float is, float gam,
                                                float sg, float sgx, const Src& src, float* gx) {
    bn_dx_walk_to(w, M, mu, is, gam, sg, sgx, src, BnToY{gx});
}

// bn_dx_walk_from reading memory.
template <class Walk>
__device__ __forceinline__ void bn_dx_walk(Walk w, int M, float mu, float is, float gam,
                                           float sg, float sgx, const float* x, const float* gy,
                                           const float* ry, float* gx) {
    bn_dx_walk_from(w, M, mu, is, gam, sg, sgx, BnGradLoad{x, gy, ry}, gx);
}

// Per channel (one block each): gbeta = sum(gy), ggamma = sum(gy * xhat) (see bn_grad_sums).
extern "C" __global__ void bn_bwd_reduce(int N, int C, int HW, const float* x, const float* gy,
                                         const float* ry, const float* mean, const float* invstd,
                                         float* ggamma, float* gbeta, float* gm) {
    const int c = blockIdx.x;
    float sg, sgx;
    bn_grad_sums(N, C, HW, c, x, gy, ry, mean[c], invstd[c], gm, &sg, &sgx);
    if (threadIdx.x == 0) {
        gbeta[c] = sg;
        ggamma[c] = sgx;
    }
}

// Train-mode input gradient (gy masked by ry as in bn_bwd_reduce), four elements per thread
// with all their loads before the stores (EW4_CH_LOOP, as bn_apply_body).
extern "C" __global__ void bn_train_dx(int n, int C, int HW, int M, const float* x,
                                       const float* gy, const float* ry, const float* mean,
                                       const float* invstd, const float* gamma,
                                       const float* ggamma, const float* gbeta, float* gx) {
    EW4_CH_LOOP(i, s, n, w, C, HW) {
        float g[4], xv[4], mu[4], is[4], gam[4], sg[4], sgx[4];
        for (int q = 0; q < 4; ++q) {
            const int c = ch_next(w);
            g[q] = bn_gy(gy, ry, i + q * s);
            xv[q] = x[i + q * s];
            mu[q] = mean[c];
            is[q] = invstd[c];
            gam[q] = gamma[c];
            sg[q] = gbeta[c];
            sgx[q] = ggamma[c];
        }
        for (int q = 0; q < 4; ++q)
            gx[i + q * s] = bn_dx(g[q], xv[q], mu[q], is[q], gam[q], sg[q], sgx[q], M);
    }
    EW4_TAIL(i, s, n) {
        const int c = ch_next(w);
        gx[i] = bn_dx(bn_gy(gy, ry, i), x[i], mean[c], invstd[c], gamma[c], gbeta[c], ggamma[c],
                      M);
    }
}

// bn_bwd_reduce and bn_train_dx in one launch for small channels (picked by the host as
// bn_train_fused): the block of channel c forms its sums, stores gbeta/ggamma, then writes the
// channel's input gradient (same arithmetic, same bits as the two-launch path), one element per
// thread and step, forwards. (Written four at a time backwards from where the sums ended, as
// bn_dx_chunks does, this kernel took 7-8 % longer on an H100: bench/results/2026-11-27-h100.md,
// run 4.)
extern "C" __global__ void bn_bwd_fused(int N, int C, int HW, const float* x, const float* gy,
                                        const float* ry, const float* mean, const float* invstd,
                                        const float* gamma, float* ggamma, float* gbeta,
                                        float* gm, float* gx) {
    const int c = blockIdx.x;
    const int M = N * HW;
    const float mu = mean[c], is = invstd[c], gam = gamma[c];
    float sg, sgx;
    bn_grad_sums(N, C, HW, c, x, gy, ry, mu, is, gm, &sg, &sgx);
    if (threadIdx.x == 0) {
        gbeta[c] = sg;
        ggamma[c] = sgx;
    }
    for (BnWalk w = bn_walk(C, HW, c, 0, M); bn_has(w, 0);) {
        const size_t k = bn_next(w);
        gx[k] = bn_dx(bn_gy(gy, ry, k), x[k], mu, is, gam, sg, sgx, M);
    }
}

// ---- split reductions: S blocks per channel (grid (S, C)) ----
//
// Chunk s of a channel's M elements is j in [s*chunk, min(M, (s+1)*chunk)) with chunk =
// ceil(M / S) (the host picks S so that no chunk is empty). Each block stores its partial result
// in part[(c*S + s)*2 ..], then thread 0 makes it visible device-wide (__threadfence) and counts
// the block in count[c] (one unsigned per channel, zero before the launch); the block that sees
// S - 1 there is the last of its channel, combines the S partials in chunk order (in double, so
// the combination adds no rounding of its own beyond the final store) and resets count[c] to 0
// for the next launch. Which block comes last varies from run to run; the combination does not.

// Chunk s of the M elements of a channel cut in S chunks: j in [lo, hi).
struct BnChunk {
    int lo, hi;
};
__device__ __forceinline__ BnChunk bn_chunk(int M, int S, int s) {
    const int chunk = (M + S - 1) / S, lo = s * chunk;
    return BnChunk{lo, min(M, lo + chunk)};
}

// Publishes this block's partial pair (a, b) of channel c as part[(c*S + s)*2 ..] and counts
// the block in. True for thread 0 of the channel's last block only, after the fence that makes
// the other blocks' partials visible to it.
__device__ __forceinline__ bool bn_split_publish(float* part, unsigned* count, int c, int S,
                                                 int s, float a, float b) {
    __shared__ int last;
    if (threadIdx.x == 0) {
        part[((size_t)c * S + s) * 2] = a;
        part[((size_t)c * S + s) * 2 + 1] = b;
        __threadfence();
        last = atomicAdd(&count[c], 1u) == (unsigned)(S - 1);
    }
    __syncthreads();
    if (!last || threadIdx.x != 0) return false;
    __threadfence();
    return true;
}

// Channel c's mean and biased variance from the partial moments (mean, M2) of its S chunks in
// part[(c*S + t)*2 ..], combined in chunk order in double (see bn_stats_split). The chunks were
// cut in units of `unit` elements (4 for the float4 kernels at the end of this file; M a multiple).
__device__ __forceinline__ void bn_split_combine(const float* part, int M, int c, int S,
                                                 float* mu_out, float* var_out, int unit = 1) {
    const volatile float* p = part + (size_t)c * S * 2;
    double n = 0.0, mu = 0.0, m2 = 0.0;
    for (int t = 0; t < S; ++t) {
        const BnChunk kt = bn_chunk(M / unit, S, t);
        if (kt.lo >= kt.hi) continue;
        const double nb = (double)(kt.hi - kt.lo) * unit, d = (double)p[2 * t] - mu;
        const double nn = n + nb;
        mu += d * (nb / nn);
        m2 += (double)p[2 * t + 1] + d * d * (n * nb / nn);
        n = nn;
    }
    *mu_out = (float)mu;
    *var_out = (float)(m2 / (double)M);
}

// The end of a block of the split statistics: publishes the chunk's partial moments (mu_s, m2_s);
// the channel's last block combines the S partials (chunks cut in units of `unit` elements),
// sets the channel's counter back to 0 and stores the statistics (see bn_stats_split).
__device__ __forceinline__ void bn_stats_split_end(float* part, unsigned* count, int M, int c,
                                                   int S, int s, int unit, float mu_s, float m2_s,
                                                   float eps, float* mean, float* invstd,
                                                   float* var_unbiased, float momentum,
                                                   const float* rm, const float* rv,
                                                   float* rm_out, float* rv_out) {
    if (!bn_split_publish(part, count, c, S, s, mu_s, m2_s)) return;
    float mu, var;
    bn_split_combine(part, M, c, S, &mu, &var, unit);
    count[c] = 0u;
    bn_store_stats(M, c, eps, mu, var, mean, invstd, var_unbiased, momentum, rm, rv, rm_out,
                   rv_out);
}

// Batch statistics with S blocks per channel: partials (mean, M2) of each chunk (bn_range_stats),
// combined by the channel's last block with the pairwise update of Chan et al. (n = na + nb,
// d = mean_b - mean_a, mean = mean_a + d*nb/n, M2 = M2_a + M2_b + d^2*na*nb/n), then stored as
// bn_stats does (running statistics included).
//
// The one-pass statistics load G groups of four strides per thread at a time (bn_range_moments:
// the same bits for any G): bn_stats_split G = 1 (four loads in flight per thread),
// bn_stats_split_g2 and _g4 (eight, sixteen; MEDSSL_CUDA_BN_INFLIGHT), for activations whose
// reduction is short of bytes in flight rather than of bandwidth.
template <int G>
__device__ __forceinline__ void bn_stats_split_body(int N, int C, int HW, int S, float eps,
                                                    int welford, const float* x, float* part,
                                                    unsigned* count, float* mean, float* invstd,
                                                    float* var_unbiased, float momentum,
                                                    const float* rm, const float* rv,
                                                    float* rm_out, float* rv_out, int l2) {
    const int s = blockIdx.x, c = blockIdx.y, M = N * HW;
    const BnChunk k = bn_chunk(M, S, s);
    float mu_s = 0.f, m2_s = 0.f;
    if (k.lo < k.hi) bn_range_stats<G>(C, HW, c, k.lo, k.hi, welford, x, &mu_s, &m2_s, l2);
    bn_stats_split_end(part, count, M, c, S, s, 1, mu_s, m2_s, eps, mean, invstd, var_unbiased,
                       momentum, rm, rv, rm_out, rv_out);
}

// The three entry points' parameters (one kernel each, so that each has its own register count
// and its name in a profile).
#define BN_STATS_SPLIT_PARAMS                                                                     \
    int N, int C, int HW, int S, float eps, int welford, const float *x, float *part,           \
        unsigned *count, float *mean, float *invstd, float *var_unbiased, float momentum,        \
        const float *rm, const float *rv, float *rm_out, float *rv_out, int l2
// (Each body names its device function itself: build.rs reads the bodies to find the kernels
// that synchronise, which the emulation runs on fibers.)
extern "C" __global__ void bn_stats_split(BN_STATS_SPLIT_PARAMS) {
    bn_stats_split_body<1>(N, C, HW, S, eps, welford, x, part, count, mean, invstd, var_unbiased,
                           momentum, rm, rv, rm_out, rv_out, l2);
}
extern "C" __global__ void bn_stats_split_g2(BN_STATS_SPLIT_PARAMS) {
    bn_stats_split_body<2>(N, C, HW, S, eps, welford, x, part, count, mean, invstd, var_unbiased,
                           momentum, rm, rv, rm_out, rv_out, l2);
}
extern "C" __global__ void bn_stats_split_g4(BN_STATS_SPLIT_PARAMS) {
    bn_stats_split_body<4>(N, C, HW, S, eps, welford, x, part, count, mean, invstd, var_unbiased,
                           momentum, rm, rv, rm_out, rv_out, l2);
}

// Channel c's gradient sums from the partial sums of its S chunks in part[(c*S + t)*2 ..], added
// in chunk order in double.
__device__ __forceinline__ void bn_split_sums(const float* part, int c, int S, float* sg_out,
                                              float* sgx_out) {
    const volatile float* p = part + (size_t)c * S * 2;
    double sg = 0.0, sgx = 0.0;
    for (int t = 0; t < S; ++t) {
        sg += (double)p[2 * t];
        sgx += (double)p[2 * t + 1];
    }
    *sg_out = (float)sg;
    *sgx_out = (float)sgx;
}

// The end of a block of the split gradient sums: publishes the chunk's partial sums (sg_s,
// sgx_s); the channel's last block adds the S partials in chunk order (bn_split_sums), sets the
// channel's counter back to 0 and stores gbeta and ggamma (see bn_bwd_split).
__device__ __forceinline__ void bn_bwd_split_end(float* part, unsigned* count, int c, int S,
                                                 int s, float sg_s, float sgx_s, float* ggamma,
                                                 float* gbeta) {
    if (!bn_split_publish(part, count, c, S, s, sg_s, sgx_s)) return;
    float sg, sgx;
    bn_split_sums(part, c, S, &sg, &sgx);
    count[c] = 0u;
    gbeta[c] = sg;
    ggamma[c] = sgx;
}

// gbeta = sum(gy), ggamma = sum(gy * xhat) with S blocks per channel: partial sums of each chunk
// (bn_range_grad_sums, gm written as bn_bwd_reduce does), added by the channel's last block.
// With l2 != 0 (MEDSSL_CUDA_BN_L2=hint) the inputs are loaded evict-last (see BnGradLoadL2).
extern "C" __global__ void bn_bwd_split(int N, int C, int HW, int S, const float* x,
                                        const float* gy, const float* ry, const float* mean,
                                        const float* invstd, float* part, unsigned* count,
                                        float* ggamma, float* gbeta, float* gm, int l2) {
    const int s = blockIdx.x, c = blockIdx.y, M = N * HW;
    const BnChunk k = bn_chunk(M, S, s);
    float sg_s = 0.f, sgx_s = 0.f;
    if (k.lo < k.hi && l2)
        bn_range_grad_sums_g<1>(C, HW, c, k.lo, k.hi, mean[c], invstd[c], gm,
                                BnGradLoadL2{x, gy, ry, l2_evict_last()}, &sg_s, &sgx_s);
    else if (k.lo < k.hi)
        bn_range_grad_sums(C, HW, c, k.lo, k.hi, x, gy, ry, mean[c], invstd[c], gm, &sg_s,
                           &sgx_s);
    bn_bwd_split_end(part, count, c, S, s, sg_s, sgx_s, ggamma, gbeta);
}

// ---- the elementwise pass of the two-launch path on the reduction's grid ----
//
// Where the statistics (or the gradient sums) took a launch of their own, the elementwise pass
// that follows runs on the same grid (S, C) (S = 1 after bn_stats / bn_bwd_reduce): block (s, c)
// writes chunk s of channel c (bn_chunk) with the channel's statistics and parameters loaded
// once, walking the chunk in the direction that starts with what the reduction's block read
// last: forwards after two-pass statistics (their second pass walked backwards), backwards after
// one-pass statistics (`rev`) and after the gradient sums. Where the tensor is larger than the
// cache, the part of each chunk still there is read from it. Same arithmetic as bn_apply and
// bn_train_dx, same bits.

// With l2 != 0 (MEDSSL_CUDA_BN_L2=hint) x is read and y written evict-first (see BnFromXL2).
extern "C" __global__ void bn_apply_chunks(int N, int C, int HW, int S, int rev, const float* x,
                                           const float* mean, const float* invstd,
                                           const float* gamma, const float* beta,
                                           const float* res, int relu, float* y, int l2) {
    const int c = blockIdx.y;
    const BnChunk k = bn_chunk(N * HW, S, blockIdx.x);
    const float mu = mean[c], is = invstd[c], g = gamma[c], b = beta[c];
    if (l2) {
        const L2Policy first = l2_evict_first();
        bn_apply_walk_to(bn_walk_rev(C, HW, c, k.lo, k.hi), mu, is, g, b, BnFromXL2{x, first}, res,
                         relu, BnToYL2{y, first});
    } else if (rev)
        bn_apply_walk(bn_walk_rev(C, HW, c, k.lo, k.hi), mu, is, g, b, x, res, relu, y);
    else
        bn_apply_walk(bn_walk(C, HW, c, k.lo, k.hi), mu, is, g, b, x, res, relu, y);
}

extern "C" __global__ void bn_dx_chunks(int N, int C, int HW, int S, const float* x,
                                        const float* gy, const float* ry, const float* mean,
                                        const float* invstd, const float* gamma,
                                        const float* ggamma, const float* gbeta, float* gx) {
    const int c = blockIdx.y, M = N * HW;
    const BnChunk k = bn_chunk(M, S, blockIdx.x);
    bn_dx_walk(bn_walk_rev(C, HW, c, k.lo, k.hi), M, mean[c], invstd[c], gamma[c], gbeta[c],
               ggamma[c], x, gy, ry, gx);
}

// bn_dx_chunks under MEDSSL_CUDA_BN_L2=hint (a kernel of its own: the policies cost registers):
// the inputs are read and gx written evict-first.
extern "C" __global__ void bn_dx_chunks_l2(int N, int C, int HW, int S, const float* x,
                                           const float* gy, const float* ry, const float* mean,
                                           const float* invstd, const float* gamma,
                                           const float* ggamma, const float* gbeta, float* gx) {
    const int c = blockIdx.y, M = N * HW;
    const BnChunk k = bn_chunk(M, S, blockIdx.x);
    const L2Policy first = l2_evict_first();
    bn_dx_walk_to(bn_walk_rev(C, HW, c, k.lo, k.hi), M, mean[c], invstd[c], gamma[c], gbeta[c],
                  ggamma[c], BnGradLoadL2{x, gy, ry, first}, BnToYL2{gx, first});
}

// ---- the one-launch forward for activations larger than the cache (MEDSSL_CUDA_BN_FWD=resident) ----
//
// The two-launch forward (bn_stats_split, bn_apply_chunks) reads x from memory twice when x does
// not fit in L2, so at best it moves three tensors' worth for x and y. This kernel reads x once:
// its grid (S, C) is one wave of blocks, all resident together (a cooperative launch; the host
// sizes the grid and `cap` by the device's occupancy), and block (s, c) owns chunk s of channel c
// as in bn_stats_split. While computing the chunk's moments it keeps the chunk's first `cap`
// elements in walk order (p = j - lo < cap, at shared[p]: consecutive threads, consecutive
// banks) in shared memory, loading them evict-first so that L2 keeps the rest. Thread 0 then
// publishes the partial moments in part[(c*S + s)*2 ..], counts the block in count[c] and waits
// until all S blocks of the channel have arrived. Every block of the channel combines the S
// partials in chunk order (bn_split_combine, as bn_stats_split's last block: the same statistics
// bit for bit), block 0 stores them (running statistics included), and each block writes its chunk
// walking backwards (bn_walk_rev): first the elements it did not keep, read last and so the ones
// still in L2, then the kept ones from shared memory. Same arithmetic as bn_apply_chunks, same
// bits. count[C + c] counts the blocks past the wait; the last one sets both counters back to 0.

// Thread 0 of block s of channel c in a resident kernel: publishes the block's partial pair (a, b)
// in part[(c*S + s)*2 ..], counts the block in count[c] and waits until all S blocks of the
// channel have arrived (they are all resident: a cooperative launch), after which every partial
// of the channel is visible to it.
__device__ __forceinline__ void bn_channel_arrive(float* part, unsigned* count, int c, int S,
                                                  int s, float a, float b) {
    part[((size_t)c * S + s) * 2] = a;
    part[((size_t)c * S + s) * 2 + 1] = b;
    __threadfence();
    atomicAdd(&count[c], 1u);
    while (atomicAdd(&count[c], 0u) < (unsigned)S) __nanosleep(64);
    __threadfence();
}

// ... and once it has read the partials: counts the block out in count[C + c]; the last block
// out (every block is past its wait by then) sets both counters back to 0 for the next launch.
__device__ __forceinline__ void bn_channel_depart(unsigned* count, int C, int c, int S) {
    if (atomicAdd(&count[C + c], 1u) == (unsigned)(S - 1)) {
        count[c] = 0u;
        count[C + c] = 0u;
    }
}

// The meeting of channel c's blocks in the resident forward: thread 0 publishes the block's
// partial moments r, waits for the channel's other blocks, combines the S partials in chunk order
// (bn_split_combine; chunks cut in units of `unit` elements) and counts the block out; block 0 of
// the channel stores the statistics (running statistics included); then every thread of the
// block has the mean and invstd in stat[0], stat[1] (shared memory).
__device__ __forceinline__ void bn_fwd_meet(float* part, unsigned* count, int M, int C, int c,
                                            int S, int s, int unit, Moments r, float eps,
                                            float* mean, float* invstd, float* var_unbiased,
                                            float momentum, const float* rm, const float* rv,
                                            float* rm_out, float* rv_out, float* stat) {
    if (threadIdx.x == 0) {
        bn_channel_arrive(part, count, c, S, s, r.mean, r.m2);
        float mu, var;
        bn_split_combine(part, M, c, S, &mu, &var, unit);
        bn_channel_depart(count, C, c, S);
        if (s == 0)
            bn_store_stats(M, c, eps, mu, var, mean, invstd, var_unbiased, momentum, rm, rv,
                           rm_out, rv_out);
        stat[0] = mu;
        stat[1] = 1.f / sqrtf(var + eps);
    }
    __syncthreads();
}

// The same in the resident backward: the partial gradient sums (sg_s, sgx_s) added in chunk order
// (bn_split_sums) into sums[0], sums[1] (shared memory); block 0 stores gbeta and ggamma.
__device__ __forceinline__ void bn_bwd_meet(float* part, unsigned* count, int C, int c, int S,
                                            int s, float sg_s, float sgx_s, float* sums,
                                            float* ggamma, float* gbeta) {
    if (threadIdx.x == 0) {
        bn_channel_arrive(part, count, c, S, s, sg_s, sgx_s);
        bn_split_sums(part, c, S, &sums[0], &sums[1]);
        bn_channel_depart(count, C, c, S);
        if (s == 0) {
            gbeta[c] = sums[0];
            ggamma[c] = sums[1];
        }
    }
    __syncthreads();
}

// BnLoad that also keeps the range's first `cap` elements in shared memory `sh`.
struct BnStage {
    float* sh;
    int cap;
    // MEDSSL_CUDA_BN_L2=hint: the elements not kept are loaded evict-last.
    int l2;
    L2Policy last;
    DEVICE_MEMBER float load(const float* a, int p) const {
        return p < cap ? __ldcs(a) : l2 ? ld_l2(a, last) : *a;
    }
    DEVICE_MEMBER void keep(int p, float v) const {
        if (p < cap) sh[p] = v;
    }
};

// x's element from shared memory where the block kept it (walk position p = j - lo < cap), else
// from memory (evict-first under MEDSSL_CUDA_BN_L2=hint: its last use).
struct BnFromKept {
    const float* x;
    const float* sh;
    int lo, cap;
    int l2;
    L2Policy first;
    DEVICE_MEMBER float operator()(size_t o, int j) const {
        const int p = j - lo;
        return p < cap ? sh[p] : l2 ? ld_l2(x + o, first) : x[o];
    }
};

// bn_fwd_resident loads G = 2 groups of four strides per thread at a time, bn_fwd_resident_g1 and
// _g4 one and four (MEDSSL_CUDA_BN_INFLIGHT; the same bits).
template <int G>
__device__ __forceinline__ void bn_fwd_resident_body(
    int N, int C, int HW, int S, int cap, float eps, const float* x, float* part, unsigned* count,
    float* mean, float* invstd, float* var_unbiased, float momentum, const float* rm,
    const float* rv, float* rm_out, float* rv_out, const float* gamma, const float* beta,
    const float* res, int relu, float* y, int l2) {
    const int s = blockIdx.x, c = blockIdx.y, M = N * HW;
    const BnChunk k = bn_chunk(M, S, s);
    float* sh = dyn_shared_f32();
    Moments r{0, 0.f, 0.f};
    if (k.lo < k.hi)
        r = bn_range_moments<G>(C, HW, c, k.lo, k.hi, x, BnStage{sh, cap, l2, l2_evict_last()});
    __shared__ float stat[2];
    bn_fwd_meet(part, count, M, C, c, S, s, 1, r, eps, mean, invstd, var_unbiased, momentum, rm,
                rv, rm_out, rv_out, stat);
    if (k.lo >= k.hi) return;
    const L2Policy first = l2_evict_first();
    const BnFromKept src{x, sh, k.lo, cap, l2, first};
    if (l2)
        bn_apply_walk_to(bn_walk_rev(C, HW, c, k.lo, k.hi), stat[0], stat[1], gamma[c], beta[c], src,
                         res, relu, BnToYL2{y, first});
    else
        bn_apply_walk_from(bn_walk_rev(C, HW, c, k.lo, k.hi), stat[0], stat[1], gamma[c], beta[c],
                           src, res, relu, y);
}

#define BN_FWD_RESIDENT_PARAMS                                                                    \
    int N, int C, int HW, int S, int cap, float eps, const float *x, float *part,               \
        unsigned *count, float *mean, float *invstd, float *var_unbiased, float momentum,        \
        const float *rm, const float *rv, float *rm_out, float *rv_out, const float *gamma,      \
        const float *beta, const float *res, int relu, float *y, int l2
extern "C" __launch_bounds__(512, 2) __global__ void bn_fwd_resident(BN_FWD_RESIDENT_PARAMS) {
    bn_fwd_resident_body<2>(N, C, HW, S, cap, eps, x, part, count, mean, invstd, var_unbiased,
                            momentum, rm, rv, rm_out, rv_out, gamma, beta, res, relu, y, l2);
}
extern "C" __launch_bounds__(512, 2) __global__ void bn_fwd_resident_g1(BN_FWD_RESIDENT_PARAMS) {
    bn_fwd_resident_body<1>(N, C, HW, S, cap, eps, x, part, count, mean, invstd, var_unbiased,
                            momentum, rm, rv, rm_out, rv_out, gamma, beta, res, relu, y, l2);
}
extern "C" __launch_bounds__(512, 2) __global__ void bn_fwd_resident_g4(BN_FWD_RESIDENT_PARAMS) {
    bn_fwd_resident_body<4>(N, C, HW, S, cap, eps, x, part, count, mean, invstd, var_unbiased,
                            momentum, rm, rv, rm_out, rv_out, gamma, beta, res, relu, y, l2);
}

// ---- the one-launch backward for activations larger than the cache (MEDSSL_CUDA_BN_BWD=resident) ----
//
// The two-launch backward (bn_bwd_split, bn_dx_chunks) reads x and gy (and the ReLU output ry
// where the norm's ReLU is fused) twice. This kernel is bn_fwd_resident's counterpart: one wave of
// blocks on the grid (S, C), block (s, c) owning chunk s of channel c; while it sums the chunk's
// gradient terms (bn_range_grad_sums_g, eight loads in flight per thread) it keeps the chunk's
// first `cap` masked gradients and inputs in shared memory (the gradients at shared[p], the
// inputs at shared[cap + p]), loaded evict-first; thread 0 publishes the partial sums, counts the
// block in and waits for the channel's other blocks; every block adds the S partials in chunk
// order in double, as bn_bwd_split's last block does (the same sums bit for bit), block 0 stores
// gbeta and ggamma, and each block writes its chunk's input gradient walking backwards, what it
// did not keep first (read last, so still in L2), then what it kept. Same arithmetic as
// bn_dx_chunks, same bits. Counters as in bn_fwd_resident.

// BnGradLoad that also keeps the range's first `cap` masked gradients and inputs in `shg`, `shx`
// (loading them evict-first: read once). T = float4: the float4 kernels' units.
template <class T>
struct BnGradStageT {
    const T *x, *gy, *ry;
    T *shg, *shx;
    int cap;
    DEVICE_MEMBER T g(size_t k, int p) const {
        if (p >= cap) return bn_gy(gy, ry, k);
        return bn_gy_cs(gy, ry, k);
    }
    DEVICE_MEMBER T xv(size_t k, int p) const { return p < cap ? __ldcs(x + k) : x[k]; }
    DEVICE_MEMBER void keep(int p, T g, T v) const {
        if (p < cap) {
            shg[p] = g;
            shx[p] = v;
        }
    }
};
typedef BnGradStageT<float> BnGradStage;

// The masked output gradient and the input from shared memory where the block kept them (walk
// position p = j - lo < cap), else from memory. T = float4: the float4 kernels' units.
template <class T>
struct BnDxFromKeptT {
    const T *x, *gy, *ry, *shg, *shx;
    int lo, cap;
    DEVICE_MEMBER T g(size_t o, int j) const {
        const int p = j - lo;
        return p < cap ? shg[p] : bn_gy(gy, ry, o);
    }
    DEVICE_MEMBER T xv(size_t o, int j) const {
        const int p = j - lo;
        return p < cap ? shx[p] : x[o];
    }
};
typedef BnDxFromKeptT<float> BnDxFromKept;

// At most 64 registers per thread (72 unbounded, which would leave one block per multiprocessor;
// none spill): two blocks of 512 threads per multiprocessor keep twice the loads in flight.
extern "C" __launch_bounds__(512, 2) __global__ void bn_bwd_resident(int N, int C, int HW, int S, int cap, const float* x,
                                           const float* gy, const float* ry, const float* mean,
                                           const float* invstd, const float* gamma, float* part,
                                           unsigned* count, float* ggamma, float* gbeta,
                                           float* gm, float* gx) {
    const int s = blockIdx.x, c = blockIdx.y, M = N * HW;
    const BnChunk k = bn_chunk(M, S, s);
    float* shg = dyn_shared_f32();
    float* shx = shg + cap;
    const float mu = mean[c], is = invstd[c];
    float sg_s = 0.f, sgx_s = 0.f;
    if (k.lo < k.hi)
        bn_range_grad_sums_g<2>(C, HW, c, k.lo, k.hi, mu, is, gm,
                                BnGradStage{x, gy, ry, shg, shx, cap}, &sg_s, &sgx_s);
    __shared__ float sums[2];
    bn_bwd_meet(part, count, C, c, S, s, sg_s, sgx_s, sums, ggamma, gbeta);
    if (k.lo < k.hi)
        bn_dx_walk_from(bn_walk_rev(C, HW, c, k.lo, k.hi), M, mu, is, gamma[c], sums[0], sums[1],
                        BnDxFromKept{x, gy, ry, shg, shx, k.lo, cap}, gx);
}

// The resident backward under MEDSSL_CUDA_BN_L2=hint (bn_bwd_resident_l2, a kernel of its own for
// its own register allocation): the elements it does not keep are loaded evict-last by the sums
// (the input-gradient pass reads them again) and evict-first by that pass (their last use), and
// gx is stored evict-first. BnGradStageL2 and BnDxFromKeptL2 are BnGradStage and BnDxFromKept
// with those loads through an L2 policy. The kernel's body repeats bn_bwd_resident's on purpose:
// with one template body for both, ptxas allocated bn_bwd_resident's 64 registers differently
// and spilled 8 bytes (none either way now).
struct BnGradStageL2 {
    const float *x, *gy, *ry;
    float *shg, *shx;
    int cap;
    L2Policy pol;
    DEVICE_MEMBER float g(size_t k, int p) const {
        if (p >= cap) return (ry && !(ld_l2(ry + k, pol) > 0.f)) ? 0.f : ld_l2(gy + k, pol);
        return bn_gy_cs(gy, ry, k);
    }
    DEVICE_MEMBER float xv(size_t k, int p) const {
        return p < cap ? __ldcs(x + k) : ld_l2(x + k, pol);
    }
    DEVICE_MEMBER void keep(int p, float g, float v) const {
        if (p < cap) {
            shg[p] = g;
            shx[p] = v;
        }
    }
};

struct BnDxFromKeptL2 {
    const float *x, *gy, *ry, *shg, *shx;
    int lo, cap;
    L2Policy pol;
    DEVICE_MEMBER float g(size_t o, int j) const {
        const int p = j - lo;
        return p < cap ? shg[p] : (ry && !(ld_l2(ry + o, pol) > 0.f)) ? 0.f : ld_l2(gy + o, pol);
    }
    DEVICE_MEMBER float xv(size_t o, int j) const {
        const int p = j - lo;
        return p < cap ? shx[p] : ld_l2(x + o, pol);
    }
};

extern "C" __launch_bounds__(512, 2) __global__ void bn_bwd_resident_l2(int N, int C, int HW, int S, int cap, const float* x,
                                              const float* gy, const float* ry, const float* mean,
                                              const float* invstd, const float* gamma, float* part,
                                              unsigned* count, float* ggamma, float* gbeta,
                                              float* gm, float* gx) {
    const int s = blockIdx.x, c = blockIdx.y, M = N * HW;
    const BnChunk k = bn_chunk(M, S, s);
    float* shg = dyn_shared_f32();
    float* shx = shg + cap;
    const float mu = mean[c], is = invstd[c];
    float sg_s = 0.f, sgx_s = 0.f;
    if (k.lo < k.hi)
        bn_range_grad_sums_g<2>(C, HW, c, k.lo, k.hi, mu, is, gm,
                                BnGradStageL2{x, gy, ry, shg, shx, cap, l2_evict_last()}, &sg_s,
                                &sgx_s);
    __shared__ float sums[2];
    bn_bwd_meet(part, count, C, c, S, s, sg_s, sgx_s, sums, ggamma, gbeta);
    if (k.lo < k.hi) {
        const L2Policy first = l2_evict_first();
        bn_dx_walk_to(bn_walk_rev(C, HW, c, k.lo, k.hi), M, mu, is, gamma[c], sums[0], sums[1],
                      BnDxFromKeptL2{x, gy, ry, shg, shx, k.lo, cap, first}, BnToYL2{gx, first});
    }
}

// Eval-mode input gradient: gx = gy * gamma * invstd (statistics are constants), four elements
// per thread (EW4_CH_LOOP).
extern "C" __global__ void bn_eval_dx(int n, int C, int HW, const float* gy, const float* gamma,
                                      const float* invstd, float* gx) {
    EW4_CH_LOOP(i, s, n, w, C, HW) {
        float g[4], gam[4], is[4];
        for (int q = 0; q < 4; ++q) {
            const int c = ch_next(w);
            g[q] = gy[i + q * s];
            gam[q] = gamma[c];
            is[q] = invstd[c];
        }
        for (int q = 0; q < 4; ++q) gx[i + q * s] = g[q] * gam[q] * is[q];
    }
    EW4_TAIL(i, s, n) {
        const int c = ch_next(w);
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

// ---- four elements per access: the float4 kernels (MEDSSL_CUDA_BN_VEC=on) ----
//
// Where a plane's HW elements are a multiple of four (and every tensor is 16-byte aligned, which
// the host checks), channel c's elements come in units of four consecutive elements of one plane:
// unit u = n*HW4 + i4 (HW4 = HW/4) is the float4 at offset (n*C + c)*HW4 + i4 of the tensor seen
// as float4s. The walks above (BnWalk, BnRev) with HW4 for HW visit units instead of elements, so
// every access is one 16-byte load or store: a quarter of the load and store instructions and of
// the address arithmetic of the one-element kernels, for the same bytes. Chunks are cut in units
// (bn_chunk(M/4, S, s)); the split and resident kernels below mirror bn_stats_split +
// bn_apply_chunks, bn_bwd_split + bn_dx_chunks, bn_fwd_resident and bn_bwd_resident. The one-pass
// moments take each unit's four values as one moments4, merged in walk order (the same bits for
// any number of units in flight); the gradient sums add component e of every unit into
// accumulator e. The bits differ from the one-element kernels' (other groupings of the same
// values) but not between the float4 split and resident paths, which compute the same statistics
// and sums, then the same elementwise arithmetic.

// How the float4 moments read a unit keeping the range's first `cap` units in shared memory
// (loaded evict-first; as BnStage, p = the unit's place in the walk; BnLoadT<float4> keeps none).
struct BnStage4 {
    float4* sh;
    int cap;
    DEVICE_MEMBER float4 load(const float4* a, int p) const { return p < cap ? __ldcs(a) : *a; }
    DEVICE_MEMBER void keep(int p, float4 v) const {
        if (p < cap) sh[p] = v;
    }
};

// The one-pass moments of channel c's units [lo, hi) by one block (every thread gets them), G
// units per thread at a time (4*G elements in flight), then one at a time.
template <int G, class Ld>
__device__ __forceinline__ Moments bn_range_moments4(int C, int HW4, int c, int lo, int hi,
                                                     const float4* x, const Ld& ld) {
    Moments v{0, 0.f, 0.f};
    for (BnWalk w = bn_walk(C, HW4, c, lo, hi); bn_has(w, 0);) {
        if (G > 1 && bn_has(w, G - 1))
            bn_moments_group<G>(w, lo, x, ld, v);
        else
            bn_moments_group<1>(w, lo, x, ld, v);
    }
    return block_moments(v);
}

// bn_stats_split in units: G = 1, 2, 4 units per thread at a time (bn_stats_split4_g1/_g2/_g4:
// 4, 8, 16 elements in flight, as MEDSSL_CUDA_BN_INFLIGHT asks).
template <int G>
__device__ __forceinline__ void bn_stats_split4_body(int N, int C, int HW, int S, float eps,
                                                     const float* x, float* part,
                                                     unsigned* count, float* mean, float* invstd,
                                                     float* var_unbiased, float momentum,
                                                     const float* rm, const float* rv,
                                                     float* rm_out, float* rv_out) {
    const int s = blockIdx.x, c = blockIdx.y, M = N * HW;
    const BnChunk k = bn_chunk(M / 4, S, s);
    Moments r{0, 0.f, 0.f};
    if (k.lo < k.hi)
        r = bn_range_moments4<G>(C, HW / 4, c, k.lo, k.hi, (const float4*)x, BnLoadT<float4>());
    bn_stats_split_end(part, count, M, c, S, s, 4, r.mean, r.m2, eps, mean, invstd, var_unbiased,
                       momentum, rm, rv, rm_out, rv_out);
}
#define BN_STATS_SPLIT4_PARAMS                                                                    \
    int N, int C, int HW, int S, float eps, const float *x, float *part, unsigned *count,       \
        float *mean, float *invstd, float *var_unbiased, float momentum, const float *rm,        \
        const float *rv, float *rm_out, float *rv_out
extern "C" __global__ void bn_stats_split4_g1(BN_STATS_SPLIT4_PARAMS) {
    bn_stats_split4_body<1>(N, C, HW, S, eps, x, part, count, mean, invstd, var_unbiased,
                            momentum, rm, rv, rm_out, rv_out);
}
extern "C" __global__ void bn_stats_split4_g2(BN_STATS_SPLIT4_PARAMS) {
    bn_stats_split4_body<2>(N, C, HW, S, eps, x, part, count, mean, invstd, var_unbiased,
                            momentum, rm, rv, rm_out, rv_out);
}
extern "C" __global__ void bn_stats_split4_g4(BN_STATS_SPLIT4_PARAMS) {
    bn_stats_split4_body<4>(N, C, HW, S, eps, x, part, count, mean, invstd, var_unbiased,
                            momentum, rm, rv, rm_out, rv_out);
}


// A unit of x from shared memory where the resident forward kept it (unit place p = j - lo <
// cap), else from memory (BnFromXT<float4>: from memory only).
struct BnFromKept4 {
    const float4* x;
    const float4* sh;
    int lo, cap;
    DEVICE_MEMBER float4 operator()(size_t o, int j) const {
        const int p = j - lo;
        return p < cap ? sh[p] : x[o];
    }
};


// bn_apply_chunks in units after bn_stats_split4 (walking backwards, as after one-pass
// statistics).
extern "C" __global__ void bn_apply_chunks4(int N, int C, int HW, int S, const float* x,
                                            const float* mean, const float* invstd,
                                            const float* gamma, const float* beta,
                                            const float* res, int relu, float* y) {
    const int c = blockIdx.y;
    const BnChunk k = bn_chunk(N * HW / 4, S, blockIdx.x);
    bn_apply_walk_to<2>(bn_walk_rev(C, HW / 4, c, k.lo, k.hi), mean[c], invstd[c], gamma[c],
                        beta[c], BnFromXT<float4>{(const float4*)x}, (const float4*)res, relu,
                        BnToYT<float4>{(float4*)y});
}

// bn_fwd_resident in units: `cap` units kept per block; G = 1, 2, 4 units per thread at a time
// (bn_fwd_resident4_g1/_g2/_g4).
template <int G>
__device__ __forceinline__ void bn_fwd_resident4_body(
    int N, int C, int HW, int S, int cap, float eps, const float* x, float* part, unsigned* count,
    float* mean, float* invstd, float* var_unbiased, float momentum, const float* rm,
    const float* rv, float* rm_out, float* rv_out, const float* gamma, const float* beta,
    const float* res, int relu, float* y) {
    const int s = blockIdx.x, c = blockIdx.y, M = N * HW, HW4 = HW / 4;
    const BnChunk k = bn_chunk(M / 4, S, s);
    float4* sh = (float4*)dyn_shared_f32();
    const float4* x4 = (const float4*)x;
    Moments r{0, 0.f, 0.f};
    if (k.lo < k.hi) r = bn_range_moments4<G>(C, HW4, c, k.lo, k.hi, x4, BnStage4{sh, cap});
    __shared__ float stat[2];
    bn_fwd_meet(part, count, M, C, c, S, s, 4, r, eps, mean, invstd, var_unbiased, momentum, rm,
                rv, rm_out, rv_out, stat);
    if (k.lo >= k.hi) return;
    bn_apply_walk_to<2>(bn_walk_rev(C, HW4, c, k.lo, k.hi), stat[0], stat[1], gamma[c], beta[c],
                        BnFromKept4{x4, sh, k.lo, cap}, (const float4*)res, relu,
                        BnToYT<float4>{(float4*)y});
}
#define BN_FWD_RESIDENT4_PARAMS                                                                   \
    int N, int C, int HW, int S, int cap, float eps, const float *x, float *part,               \
        unsigned *count, float *mean, float *invstd, float *var_unbiased, float momentum,        \
        const float *rm, const float *rv, float *rm_out, float *rv_out, const float *gamma,      \
        const float *beta, const float *res, int relu, float *y
extern "C" __launch_bounds__(512, 2) __global__ void bn_fwd_resident4_g1(BN_FWD_RESIDENT4_PARAMS) {
    bn_fwd_resident4_body<1>(N, C, HW, S, cap, eps, x, part, count, mean, invstd, var_unbiased,
                             momentum, rm, rv, rm_out, rv_out, gamma, beta, res, relu, y);
}
extern "C" __launch_bounds__(512, 2) __global__ void bn_fwd_resident4_g2(BN_FWD_RESIDENT4_PARAMS) {
    bn_fwd_resident4_body<2>(N, C, HW, S, cap, eps, x, part, count, mean, invstd, var_unbiased,
                             momentum, rm, rv, rm_out, rv_out, gamma, beta, res, relu, y);
}
extern "C" __launch_bounds__(512, 2) __global__ void bn_fwd_resident4_g4(BN_FWD_RESIDENT4_PARAMS) {
    bn_fwd_resident4_body<4>(N, C, HW, S, cap, eps, x, part, count, mean, invstd, var_unbiased,
                             momentum, rm, rv, rm_out, rv_out, gamma, beta, res, relu, y);
}


// The gradient sums of channel c's units [lo, hi) by one block (every thread gets them), two
// units per thread at a time, then one (the same bits either way).
template <class Ld>
__device__ __forceinline__ void bn_range_grad_sums4(int C, int HW4, int c, int lo, int hi,
                                                    float mu, float is, float4* gm, const Ld& ld,
                                                    float* sg_out, float* sgx_out) {
    float sg[4] = {0.f, 0.f, 0.f, 0.f}, sgx[4] = {0.f, 0.f, 0.f, 0.f};
    for (BnWalk w = bn_walk(C, HW4, c, lo, hi); bn_has(w, 0);) {
        if (bn_has(w, 1))
            bn_grad_group<2>(w, lo, mu, is, gm, ld, sg, sgx);
        else
            bn_grad_group<1>(w, lo, mu, is, gm, ld, sg, sgx);
    }
    *sg_out = block_sum((sg[0] + sg[1]) + (sg[2] + sg[3]));
    *sgx_out = block_sum((sgx[0] + sgx[1]) + (sgx[2] + sgx[3]));
}

// bn_bwd_split in units.
extern "C" __global__ void bn_bwd_split4(int N, int C, int HW, int S, const float* x,
                                         const float* gy, const float* ry, const float* mean,
                                         const float* invstd, float* part, unsigned* count,
                                         float* ggamma, float* gbeta, float* gm) {
    const int s = blockIdx.x, c = blockIdx.y, M = N * HW;
    const BnChunk k = bn_chunk(M / 4, S, s);
    float sg_s = 0.f, sgx_s = 0.f;
    if (k.lo < k.hi)
        bn_range_grad_sums4(C, HW / 4, c, k.lo, k.hi, mean[c], invstd[c], (float4*)gm,
                            BnGradLoadT<float4>{(const float4*)x, (const float4*)gy, (const float4*)ry},
                            &sg_s, &sgx_s);
    bn_bwd_split_end(part, count, c, S, s, sg_s, sgx_s, ggamma, gbeta);
}



// bn_dx_chunks in units after bn_bwd_split4.
extern "C" __global__ void bn_dx_chunks4(int N, int C, int HW, int S, const float* x,
                                         const float* gy, const float* ry, const float* mean,
                                         const float* invstd, const float* gamma,
                                         const float* ggamma, const float* gbeta, float* gx) {
    const int c = blockIdx.y, M = N * HW;
    const BnChunk k = bn_chunk(M / 4, S, blockIdx.x);
    bn_dx_walk_to<2>(bn_walk_rev(C, HW / 4, c, k.lo, k.hi), M, mean[c], invstd[c], gamma[c],
                     gbeta[c], ggamma[c],
                     BnGradLoadT<float4>{(const float4*)x, (const float4*)gy, (const float4*)ry},
                     BnToYT<float4>{(float4*)gx});
}

// bn_bwd_resident in units: `cap` units of the masked gradient (shared[p]) and of x
// (shared[cap + p]) kept per block.
extern "C" __launch_bounds__(512, 2) __global__ void bn_bwd_resident4(
    int N, int C, int HW, int S, int cap, const float* x, const float* gy, const float* ry,
    const float* mean, const float* invstd, const float* gamma, float* part, unsigned* count,
    float* ggamma, float* gbeta, float* gm, float* gx) {
    const int s = blockIdx.x, c = blockIdx.y, M = N * HW, HW4 = HW / 4;
    const BnChunk k = bn_chunk(M / 4, S, s);
    float4* shg = (float4*)dyn_shared_f32();
    float4* shx = shg + cap;
    const float4 *x4 = (const float4*)x, *gy4 = (const float4*)gy, *ry4 = (const float4*)ry;
    const float mu = mean[c], is = invstd[c];
    float sg_s = 0.f, sgx_s = 0.f;
    if (k.lo < k.hi)
        bn_range_grad_sums4(C, HW4, c, k.lo, k.hi, mu, is, (float4*)gm,
                            BnGradStageT<float4>{x4, gy4, ry4, shg, shx, cap}, &sg_s, &sgx_s);
    __shared__ float sums[2];
    bn_bwd_meet(part, count, C, c, S, s, sg_s, sgx_s, sums, ggamma, gbeta);
    if (k.lo < k.hi)
        bn_dx_walk_to<2>(bn_walk_rev(C, HW4, c, k.lo, k.hi), M, mu, is, gamma[c], sums[0],
                         sums[1], BnDxFromKeptT<float4>{x4, gy4, ry4, shg, shx, k.lo, cap},
                         BnToYT<float4>{(float4*)gx});
}

// ---- the pipelined float4 batch norms (MEDSSL_CUDA_BN_PIPE=on) ----
//
// The resident kernels above hold every channel at once: all blocks read, all meet, all write,
// so the memory is busy with reads only, then idle while the blocks meet, then busy with
// writes, and what shared memory cannot keep is read twice from a working set larger than L2.
// The pipelined kernels take the channels a few at a time instead, with the blocks' copies of
// the next chunk in flight while they meet over the current one. Work item i (of C*S) is chunk
// s = i % S (of S, cut in float4 units as bn_chunk(M/4, S, s)) of channel c = i / S; block b of
// the grid (one cooperative wave of B blocks) takes items b, b + B, b + 2B, ... and, for each:
//   1. issues the asynchronous copies (cp_async16) of the *next* item's units into the other of
//      its two shared-memory stages (one group per item),
//   2. waits for its own copies of this item (cp_async_wait<1>: all but the newest group),
//   3. computes the chunk's partial moments (forward) or gradient sums (backward) from shared
//      memory, meets the channel's other S blocks as the resident kernels do (bn_fwd_meet,
//      bn_bwd_meet), and
//   4. writes y (or the input gradient) from shared memory: x is read from memory once.
// Thread t copies, reads and writes only the units at walk places p = t, t + blockDim.x, ... of
// each chunk (p = j - lo, the same walk in every phase), so its own copies need no barrier, and a
// stage is refilled only after the same thread's last read of it (two items back). Items of a
// channel are consecutive and S <= B, so every item a block takes before one of channel c belongs
// to an earlier channel: by induction over the channels, all S blocks of every channel reach its
// meeting (all resident): no deadlock. The host cuts no empty chunk, so every block of an item
// passes the barriers of its sums before its thread 0 rewrites the shared statistics of the item
// before. The statistics, sums and elementwise arithmetic are the float4 split kernels' with the
// same S: the same bits.

// A unit of the current stage: for the moments (load) at walk place p, for the normalising walk
// (operator()) at element j, place j - lo; whatever the address the walk computed.
struct BnBuf4 {
    const float4* sh;
    int lo;
    DEVICE_MEMBER float4 load(const float4* a, int p) const {
        (void)a;
        return sh[p];
    }
    DEVICE_MEMBER void keep(int p, float4 v) const {
        (void)p;
        (void)v;
    }
    DEVICE_MEMBER float4 operator()(size_t o, int j) const {
        (void)o;
        return sh[j - lo];
    }
};

// Thread t's asynchronous copies of item `item`'s chunk (chunk item % S, of M4 units, of channel
// item / S) of each of `n` tensors src[a] into the stage at `stage`, tensor a at stage + a*cap,
// at their walk places p = j - lo (one copy per unit and tensor).
template <int NA>
__device__ __forceinline__ void bn_pipe_fetch(int C, int HW4, int M4, int S, int item,
                                              const float4* const (&src)[NA], float4* stage,
                                              int cap, int n) {
    const BnChunk k = bn_chunk(M4, S, item % S);
    for (BnWalk w = bn_walk(C, HW4, item / S, k.lo, k.hi); bn_has(w, 0);) {
        const int p = w.p.j - k.lo;
        const size_t o = bn_next(w);
        for (int a = 0; a < NA; ++a)
            if (a < n) cp_async16(stage + a * cap + p, src[a] + o);
    }
}

// bn_fwd_resident4's work as a pipeline: items of `cap` units at most per stage; shared memory
// holds the two stages (2*cap float4s).
extern "C" __launch_bounds__(512, 2) __global__ void bn_fwd_pipe4(
    int N, int C, int HW, int S, int cap, float eps, const float* x, float* part, unsigned* count,
    float* mean, float* invstd, float* var_unbiased, float momentum, const float* rm,
    const float* rv, float* rm_out, float* rv_out, const float* gamma, const float* beta,
    const float* res, int relu, float* y) {
    const int M = N * HW, M4 = M / 4, HW4 = HW / 4, items = C * S;
    float4* stage0 = (float4*)dyn_shared_f32();
    const float4* const src[1] = {(const float4*)x};
    int item = blockIdx.x;
    if (item < items) bn_pipe_fetch<1>(C, HW4, M4, S, item, src, stage0, cap, 1);
    cp_async_commit();
    __shared__ float stat[2];
    for (int r = 0; item < items; ++r, item += gridDim.x) {
        const int next = item + gridDim.x;
        if (next < items)
            bn_pipe_fetch<1>(C, HW4, M4, S, next, src, stage0 + ((r + 1) & 1) * cap, cap, 1);
        cp_async_commit();
        cp_async_wait<1>();
        const int c = item / S, s = item % S;
        const BnChunk k = bn_chunk(M4, S, s);
        const float4* cur = stage0 + (r & 1) * cap;
        Moments m{0, 0.f, 0.f};
        if (k.lo < k.hi) m = bn_range_moments4<2>(C, HW4, c, k.lo, k.hi, src[0], BnBuf4{cur, 0});
        bn_fwd_meet(part, count, M, C, c, S, s, 4, m, eps, mean, invstd, var_unbiased, momentum,
                    rm, rv, rm_out, rv_out, stat);
        if (k.lo < k.hi)
            bn_apply_walk_to<2>(bn_walk(C, HW4, c, k.lo, k.hi), stat[0], stat[1], gamma[c],
                                beta[c], BnBuf4{cur, k.lo}, (const float4*)res, relu,
                                BnToYT<float4>{(float4*)y});
    }
    cp_async_wait<0>();
}

// The masked output gradient and the input of the current stage (its copies of gy, x and, with a
// fused ReLU, ry) at walk place p - lo: for the gradient sums lo = 0 (their p is the place), for
// the input-gradient walk lo = the chunk's start (its p is the element j); whatever the address
// the walk computed.
struct BnGradBuf4 {
    const float4 *shg, *shx, *shr;
    int lo;
    DEVICE_MEMBER float4 g(size_t k, int p) const {
        (void)k;
        return shr ? bn_mask4(shg[p - lo], shr[p - lo]) : shg[p - lo];
    }
    DEVICE_MEMBER float4 xv(size_t k, int p) const {
        (void)k;
        return shx[p - lo];
    }
    DEVICE_MEMBER void keep(int p, float4 g, float4 v) const {
        (void)p;
        (void)g;
        (void)v;
    }
};

// bn_bwd_resident4's work as a pipeline: each stage holds `cap` units of gy, x and (where ry is
// not null) ry; shared memory holds the two stages (2 * cap * (ry ? 3 : 2) float4s).
extern "C" __launch_bounds__(512, 2) __global__ void bn_bwd_pipe4(
    int N, int C, int HW, int S, int cap, const float* x, const float* gy, const float* ry,
    const float* mean, const float* invstd, const float* gamma, float* part, unsigned* count,
    float* ggamma, float* gbeta, float* gm, float* gx) {
    const int M = N * HW, M4 = M / 4, HW4 = HW / 4, items = C * S;
    const int na = ry ? 3 : 2, stage = na * cap;
    float4* stage0 = (float4*)dyn_shared_f32();
    const float4* const src[3] = {(const float4*)gy, (const float4*)x, (const float4*)ry};
    int item = blockIdx.x;
    if (item < items) bn_pipe_fetch<3>(C, HW4, M4, S, item, src, stage0, cap, na);
    cp_async_commit();
    __shared__ float sums[2];
    for (int r = 0; item < items; ++r, item += gridDim.x) {
        const int next = item + gridDim.x;
        if (next < items)
            bn_pipe_fetch<3>(C, HW4, M4, S, next, src, stage0 + ((r + 1) & 1) * stage, cap, na);
        cp_async_commit();
        cp_async_wait<1>();
        const int c = item / S, s = item % S;
        const BnChunk k = bn_chunk(M4, S, s);
        const float4* b = stage0 + (r & 1) * stage;
        const float4* br = ry ? b + 2 * cap : 0;
        const float mu = mean[c], is = invstd[c];
        float sg_s = 0.f, sgx_s = 0.f;
        if (k.lo < k.hi)
            bn_range_grad_sums4(C, HW4, c, k.lo, k.hi, mu, is, (float4*)gm,
                                BnGradBuf4{b, b + cap, br, 0}, &sg_s, &sgx_s);
        bn_bwd_meet(part, count, C, c, S, s, sg_s, sgx_s, sums, ggamma, gbeta);
        if (k.lo < k.hi)
            bn_dx_walk_to<2>(bn_walk(C, HW4, c, k.lo, k.hi), M, mu, is, gamma[c], sums[0],
                             sums[1], BnGradBuf4{b, b + cap, br, k.lo},
                             BnToYT<float4>{(float4*)gx});
    }
    cp_async_wait<0>();
}
