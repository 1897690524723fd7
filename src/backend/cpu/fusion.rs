//! MedFuseNet similarity fusion, per image:
//! `P̂ [d,Np]`, `Q̂ [d,Nq]`, `A = P̂ᵀQ̂/√d [Np,Nq]`, `S = softmax over i (columns of A)`,
//! `y = Q̂ + P̂·S [d,Nq]`.
//!
//! Everything is computed on the transposes `Aᵀ`, `Sᵀ [Nq,Np]`, whose rows are the softmax's
//! columns: each softmax is then a contiguous row, and the products that take `P̂` keep its
//! `Np` pixels as the long side, which the `gemm` crate tiles with its widest kernel (the
//! `[Np,Nq]` orientation ran through a 16-row edge kernel for most of the op's time).

use rayon::prelude::*;

use super::conv::{bias_grad, partial_buffers, split, sum_partials, MAX_PARTS};
use super::gemm::{sgemm, sgemm_uninit};
use super::softmax_xent::softmax_scaled_in_place;

/// `Σ a_i·b_i` over eight independent f64 lanes.
fn dot8(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = (ac.remainder().iter().zip(bc.remainder()))
        .map(|(x, y)| *x as f64 * *y as f64)
        .sum();
    for (x, y) in ac.zip(bc) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += *x as f64 * *y as f64;
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// `Sᵀ [nq, np]` for one image, in `st`: the softmax of each row of `r·qᵀ·p` (`q [k, nq]`,
/// `p [k, np]`).
fn similarity_t(p: &[f32], q: &[f32], k: usize, (np, nq): (usize, usize), r: f32, st: &mut [f32]) {
    sgemm(nq, np, k, q, true, p, false, st, false, false);
    st.chunks_mut(np)
        .for_each(|row| softmax_scaled_in_place(row, r));
}

/// The softmax backward of each row of `Sᵀ` (`st`, rows of `np`), scaled by `r`: `gat` holds
/// `gSᵀ` and becomes `r·Sᵀ ⊙ (gSᵀ − rowsum(gSᵀ ⊙ Sᵀ))`.
fn softmax_rows_bwd(gat: &mut [f32], st: &[f32], np: usize, r: f32) {
    for (gr, sr) in gat.chunks_mut(np).zip(st.chunks(np)) {
        let dot = dot8(gr, sr) as f32;
        gr.iter_mut()
            .zip(sr)
            .for_each(|(g, s)| *g = s * (*g - dot) * r);
    }
}

/// `dst [rows, 2n] = [a | b]` for `a`, `b` `[rows, n]`: the left operand of a product whose
/// inner dimension is doubled to add two products in one.
fn side_by_side(dst: &mut [f32], a: &[f32], b: &[f32], n: usize) {
    for ((row, ar), br) in dst.chunks_mut(2 * n).zip(a.chunks(n)).zip(b.chunks(n)) {
        row[..n].copy_from_slice(ar);
        row[n..].copy_from_slice(br);
    }
}

/// `(y, Sᵀ)`: the fused maps `[B, d, Nq]` and the similarity `Sᵀ [B, Nq, Np]` the backward
/// takes (zeros when `d` is 0: no similarity is used).
pub fn similarity_fusion_fwd(
    low: &[f32],
    high: &[f32],
    (b, d, np, nq): (usize, usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let mut y = high.to_vec();
    let mut st_all = vec![0.0f32; b * nq * np];
    if d == 0 || np == 0 || nq == 0 {
        return (y, st_all);
    }
    y.par_chunks_mut(d * nq)
        .zip(st_all.par_chunks_mut(nq * np))
        .enumerate()
        .for_each(|(n, (yn, st))| {
            let p = &low[n * d * np..(n + 1) * d * np];
            let q = &high[n * d * nq..(n + 1) * d * nq];
            similarity_t(p, q, d, (np, nq), 1.0 / (d as f32).sqrt(), st);
            sgemm(d, nq, np, p, false, st, true, yn, true, false);
        });
    (y, st_all)
}

/// `gQ̂ = gy + P̂·gA/√d`, `gP̂ = gy·Sᵀ + Q̂·gAᵀ/√d`, `gA = S ⊙ (gS − colsum(gS ⊙ S))`, `gS = P̂ᵀ·gy`
/// (all on the transposes: `gSᵀ = gyᵀ·P̂`, row sums), with `Sᵀ` `st_all` from the forward.
pub fn similarity_fusion_bwd(
    low: &[f32],
    high: &[f32],
    st_all: &[f32],
    gy: &[f32],
    d: usize,
    np: usize,
    nq: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut ghigh = gy.to_vec();
    if d == 0 || np == 0 || nq == 0 {
        return (vec![0.0f32; low.len()], ghigh);
    }
    // gP̂ is written whole by one product per image, so it is not zeroed first.
    let mut glow: Vec<f32> = Vec::with_capacity(low.len());
    let r = 1.0 / (d as f32).sqrt();
    glow.spare_capacity_mut()[..low.len()]
        .par_chunks_mut(d * np)
        .zip(ghigh.par_chunks_mut(d * nq))
        .enumerate()
        .for_each(|(n, (gp, gq))| {
            let p = &low[n * d * np..(n + 1) * d * np];
            let q = &high[n * d * nq..(n + 1) * d * nq];
            let g = &gy[n * d * nq..(n + 1) * d * nq];
            // [Sᵀ; gAᵀ/√d] stacked [2Nq, Np]: the right operand of gP̂'s product.
            let mut b2 = vec![0.0f32; 2 * nq * np];
            let (st, gat) = b2.split_at_mut(nq * np);
            st.copy_from_slice(&st_all[n * nq * np..(n + 1) * nq * np]);
            sgemm(nq, np, d, g, true, p, false, gat, false, false);
            softmax_rows_bwd(gat, st, np, r);
            // gat now holds gAᵀ/√d. gP̂ = gy·Sᵀ + Q̂·gAᵀ/√d is one product with the inner
            // dimension doubled, [gy | Q̂] [d, 2Nq] · [Sᵀ; gAᵀ/√d], so gP̂ is written once.
            let mut a2 = vec![0.0f32; d * 2 * nq];
            side_by_side(&mut a2, g, q, nq);
            sgemm_uninit(d, np, 2 * nq, &a2, false, &b2, false, gp, false);
            sgemm(d, nq, np, p, false, &b2[nq * np..], true, gq, true, false);
        });
    // SAFETY: the first `low.len()` elements were written, image by image, by `sgemm_uninit`.
    unsafe { glow.set_len(low.len()) };
    (glow, ghigh)
}

/// Dimensions of a projected fusion: `b` images, `c` channels of the low-level map `X`, `d`
/// fusion channels, `np` low and `nq` high positions.
#[derive(Clone, Copy, Debug)]
pub struct ProjectedDims {
    pub b: usize,
    pub c: usize,
    pub d: usize,
    pub np: usize,
    pub nq: usize,
}

/// What the projected fusion's forward keeps for its backward, per image: `Sᵀ [Nq, Np]`,
/// `M = Wᵀ·Q̂ [c, Nq]` and `Z = X·S [c, Nq]` (all `[B, …]`).
pub struct ProjectedSaved {
    pub st: Vec<f32>,
    pub m: Vec<f32>,
    pub z: Vec<f32>,
}

/// The similarity fusion of `P̂ = W·X + b·1ᵀ` (the 1×1 projection of the low-level map `X [c, Np]`,
/// `W [d, c]`) with `Q̂ [d, Nq]`, without `P̂`: `P̂ᵀQ̂ = Xᵀ(WᵀQ̂) + 1·(bᵀQ̂)`, whose second term
/// is the same for every low position and so leaves each column's softmax unchanged, gives
/// `S = softmax_i(Xᵀ·M/√d)` with `M = WᵀQ̂`; and since each column of `S` sums to 1,
/// `y = Q̂ + P̂·S = Q̂ + W·(X·S) + b·1ᵀ`. Every product then has `c` (the low map's channels)
/// where the unfused one has `d`: at width 16, 16 against 128, 8× fewer multiply-adds, and the
/// `[B, d, Np]` map `P̂` and its gradient are never formed.
pub fn projected_fusion_fwd(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    high: &[f32],
    ProjectedDims { b, c, d, np, nq }: ProjectedDims,
) -> (Vec<f32>, ProjectedSaved) {
    let mut y = high.to_vec();
    let mut st_all = vec![0.0f32; b * nq * np];
    let mut m_all = vec![0.0f32; b * c * nq];
    let mut z_all = vec![0.0f32; b * c * nq];
    if b * d * nq * np > 0 && c == 0 {
        // No low-level channels: P̂ = b·1ᵀ, every column of S uniform, y = Q̂ + b.
        st_all.fill(1.0 / np as f32);
        if let Some(bias) = bias {
            for (k, row) in y.chunks_mut(nq).enumerate() {
                row.iter_mut().for_each(|v| *v += bias[k % d]);
            }
        }
    } else if b * d * nq * np > 0 {
        let r = 1.0 / (d as f32).sqrt();
        y.par_chunks_mut(d * nq)
            .zip(st_all.par_chunks_mut(nq * np))
            .zip(m_all.par_chunks_mut(c * nq))
            .zip(z_all.par_chunks_mut(c * nq))
            .enumerate()
            .for_each(|(n, (((yn, st), m), z))| {
                let xi = &x[n * c * np..(n + 1) * c * np];
                let q = &high[n * d * nq..(n + 1) * d * nq];
                // M [c, Nq] = Wᵀ [c, d] · Q̂ [d, Nq]; Sᵀ [Nq, Np] = softmax rows of Mᵀ·X/√d.
                sgemm(c, nq, d, w, true, q, false, m, false, false);
                similarity_t(xi, m, c, (np, nq), r, st);
                // Z [c, Nq] = X [c, Np] · S [Np, Nq], S read as (Sᵀ)ᵀ; y += W·Z.
                sgemm(c, nq, np, xi, false, st, true, z, false, false);
                sgemm(d, nq, c, w, false, z, false, yn, true, false);
                if let Some(bias) = bias {
                    for (row, bv) in yn.chunks_mut(nq).zip(bias) {
                        row.iter_mut().for_each(|v| *v += bv);
                    }
                }
            });
    }
    let saved = ProjectedSaved {
        st: st_all,
        m: m_all,
        z: z_all,
    };
    (y, saved)
}

/// Gradients `(gX, gW [d, c], gb [d], gQ̂)` of [`projected_fusion_fwd`] for upstream `gy [B, d,
/// Nq]`. Per image, with `gZ = Wᵀ·gy`: `gSᵀ = gZᵀ·X`, `gAᵀ = Sᵀ ⊙ (gSᵀ − rowsum(gSᵀ ⊙ Sᵀ))/√d`,
/// `gX = gZ·Sᵀ + M·gAᵀ` (one product, `[gZ | M] · [Sᵀ; gAᵀ]`), `gM = X·gA`, `gQ̂ = gy + W·gM`,
/// and `gW = Σ gy·Zᵀ + Q̂·gMᵀ` (one product per image, `[gy | Q̂] · [Z | gM]ᵀ`), `gb = Σ rowsum(gy)`
/// (as a convolution's bias gradient). The weight gradient is summed over parts of the batch
/// fixed by its size and then in part order (the same bits on any thread count).
pub fn projected_fusion_bwd(
    x: &[f32],
    w: &[f32],
    high: &[f32],
    (st_all, m_all, z_all): (&[f32], &[f32], &[f32]),
    gy: &[f32],
    ProjectedDims { b, c, d, np, nq }: ProjectedDims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut gq_all = gy.to_vec();
    let mut gx_all = vec![0.0f32; b * c * np];
    let len = d * c;
    // With no low positions y is Q̂ alone (S has no rows, so b·1ᵀS is 0).
    let gb = if np > 0 {
        bias_grad(gy, b, d, nq)
    } else {
        vec![0.0f32; d]
    };
    if b * len * np * nq == 0 {
        // No similarity reaches the output (or nothing is there): gy goes to Q̂ and the bias.
        return (gx_all, vec![0.0f32; len], gb, gq_all);
    }
    let r = 1.0 / (d as f32).sqrt();
    let parts = split(b, MAX_PARTS);
    let (nparts, per) = (parts.len(), parts[0].len());
    let mut partials = partial_buffers(nparts, len);
    partials[..nparts * len].fill(0.0);
    partials[..nparts * len]
        .par_chunks_mut(len)
        .zip(gx_all.par_chunks_mut(per * c * np))
        .zip(gq_all.par_chunks_mut(per * d * nq))
        .zip(parts)
        .with_max_len(1)
        .for_each(|(((gw, gxp), gqp), range)| {
            // Per-part work buffers, every element written before it is read for each image:
            // [gZ | M] [c, 2Nq], [Sᵀ; gAᵀ] [2Nq, Np], gZ and gM [c, Nq], [gy | Q̂] [d, 2Nq],
            // [Z | gM] [c, 2Nq].
            let mut a2 = vec![0.0f32; c * 2 * nq];
            let mut b2 = vec![0.0f32; 2 * nq * np];
            let mut gz = vec![0.0f32; c * nq];
            let mut gm = vec![0.0f32; c * nq];
            let mut l2 = vec![0.0f32; d * 2 * nq];
            let mut r2 = vec![0.0f32; c * 2 * nq];
            for n in range.clone() {
                let k = n - range.start;
                let g = &gy[n * d * nq..(n + 1) * d * nq];
                let xi = &x[n * c * np..(n + 1) * c * np];
                let q = &high[n * d * nq..(n + 1) * d * nq];
                let st = &st_all[n * nq * np..(n + 1) * nq * np];
                let m = &m_all[n * c * nq..(n + 1) * c * nq];
                let z = &z_all[n * c * nq..(n + 1) * c * nq];
                // [gZ | M] [c, 2Nq] and [Sᵀ; gAᵀ] [2Nq, Np].
                sgemm(c, nq, d, w, true, g, false, &mut gz, false, false);
                side_by_side(&mut a2, &gz, m, nq);
                let (sb, gat) = b2.split_at_mut(nq * np);
                sb.copy_from_slice(st);
                sgemm(nq, np, c, &gz, true, xi, false, gat, false, false);
                softmax_rows_bwd(gat, st, np, r);
                let gxi = &mut gxp[k * c * np..(k + 1) * c * np];
                sgemm(c, np, 2 * nq, &a2, false, &b2, false, gxi, false, false);
                // gM [c, Nq] = X [c, Np] · gA [Np, Nq], gA read as (gAᵀ)ᵀ.
                sgemm(
                    c,
                    nq,
                    np,
                    xi,
                    false,
                    &b2[nq * np..],
                    true,
                    &mut gm,
                    false,
                    false,
                );
                // gQ̂ += W [d, c] · gM.
                let gq = &mut gqp[k * d * nq..(k + 1) * d * nq];
                sgemm(d, nq, c, w, false, &gm, false, gq, true, false);
                // gW += [gy | Q̂] [d, 2Nq] · [Z | gM]ᵀ.
                side_by_side(&mut l2, g, q, nq);
                side_by_side(&mut r2, z, &gm, nq);
                sgemm(d, c, 2 * nq, &l2, false, &r2, true, gw, true, false);
            }
        });
    let gw = sum_partials(partials, nparts, len);
    (gx_all, gw, gb, gq_all)
}
