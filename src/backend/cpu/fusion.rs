//! MedFuseNet similarity fusion, per image:
//! `P̂ [d,Np]`, `Q̂ [d,Nq]`, `A = P̂ᵀQ̂/√d [Np,Nq]`, `S = softmax over i (columns of A)`,
//! `y = Q̂ + P̂·S [d,Nq]`.
//!
//! Everything is computed on the transposes `Aᵀ`, `Sᵀ [Nq,Np]`, whose rows are the softmax's
//! columns: each softmax is then a contiguous row, and the products that take `P̂` keep its
//! `Np` pixels as the long side, which the `gemm` crate tiles with its widest kernel (the
//! `[Np,Nq]` orientation ran through a 16-row edge kernel for most of the op's time).

use rayon::prelude::*;

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

/// `Sᵀ [nq, np]` for one image, in `st`.
fn similarity_t(p: &[f32], q: &[f32], d: usize, np: usize, nq: usize, st: &mut [f32]) {
    sgemm(nq, np, d, q, true, p, false, st, false, false);
    let r = 1.0 / (d as f32).sqrt();
    st.chunks_mut(np)
        .for_each(|row| softmax_scaled_in_place(row, r));
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
            similarity_t(p, q, d, np, nq, st);
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
            for (gr, sr) in gat.chunks_mut(np).zip(st.chunks(np)) {
                let dot = dot8(gr, sr) as f32;
                gr.iter_mut()
                    .zip(sr)
                    .for_each(|(g, s)| *g = s * (*g - dot) * r);
            }
            // gat now holds gAᵀ/√d. gP̂ = gy·Sᵀ + Q̂·gAᵀ/√d is one product with the inner
            // dimension doubled, [gy | Q̂] [d, 2Nq] · [Sᵀ; gAᵀ/√d], so gP̂ is written once.
            let mut a2 = vec![0.0f32; d * 2 * nq];
            for ((row, gr), qr) in a2.chunks_mut(2 * nq).zip(g.chunks(nq)).zip(q.chunks(nq)) {
                row[..nq].copy_from_slice(gr);
                row[nq..].copy_from_slice(qr);
            }
            sgemm_uninit(d, np, 2 * nq, &a2, false, &b2, false, gp, false);
            sgemm(d, nq, np, p, false, &b2[nq * np..], true, gq, true, false);
        });
    // SAFETY: the first `low.len()` elements were written, image by image, by `sgemm_uninit`.
    unsafe { glow.set_len(low.len()) };
    (glow, ghigh)
}
