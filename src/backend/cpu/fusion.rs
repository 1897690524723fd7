//! MedFuseNet similarity fusion, per image:
//! `P̂ [d,Np]`, `Q̂ [d,Nq]`, `A = P̂ᵀQ̂/√d [Np,Nq]`, `S = softmax over i (columns of A)`,
//! `y = Q̂ + P̂·S [d,Nq]`.

use rayon::prelude::*;

use super::gemm::sgemm;

/// Column softmax of `a [np, nq]` in place (each column `j` normalised over rows `i`).
fn column_softmax(a: &mut [f32], np: usize, nq: usize) {
    // Row sweeps (cache-friendly); each column still reduces over `i` in order.
    let mut m = vec![f32::NEG_INFINITY; nq];
    for row in a.chunks(nq).take(np) {
        m.iter_mut().zip(row).for_each(|(m, v)| *m = m.max(*v));
    }
    let mut s = vec![0.0f32; nq];
    for row in a.chunks_mut(nq).take(np) {
        for ((v, m), s) in row.iter_mut().zip(&m).zip(s.iter_mut()) {
            *v = (*v - m).exp();
            *s += *v;
        }
    }
    for row in a.chunks_mut(nq).take(np) {
        row.iter_mut().zip(&s).for_each(|(v, s)| *v /= s);
    }
}

/// `S` for one image.
fn similarity(p: &[f32], q: &[f32], d: usize, np: usize, nq: usize) -> Vec<f32> {
    let mut s = vec![0.0f32; np * nq];
    sgemm(np, nq, d, p, true, q, false, &mut s, false, false);
    let r = 1.0 / (d as f32).sqrt();
    s.iter_mut().for_each(|v| *v *= r);
    column_softmax(&mut s, np, nq);
    s
}

pub fn similarity_fusion_fwd(
    low: &[f32],
    high: &[f32],
    d: usize,
    np: usize,
    nq: usize,
) -> Vec<f32> {
    let mut y = high.to_vec();
    y.par_chunks_mut(d * nq).enumerate().for_each(|(n, yn)| {
        let p = &low[n * d * np..(n + 1) * d * np];
        let q = &high[n * d * nq..(n + 1) * d * nq];
        let s = similarity(p, q, d, np, nq);
        sgemm(d, nq, np, p, false, &s, false, yn, true, false);
    });
    y
}

/// `gQ̂ = gy + P̂·gA/√d`, `gP̂ = gy·Sᵀ + Q̂·gAᵀ/√d`, `gA = S ⊙ (gS − colsum(gS ⊙ S))`, `gS = P̂ᵀ·gy`.
pub fn similarity_fusion_bwd(
    low: &[f32],
    high: &[f32],
    gy: &[f32],
    d: usize,
    np: usize,
    nq: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut glow = vec![0.0f32; low.len()];
    let mut ghigh = gy.to_vec();
    let r = 1.0 / (d as f32).sqrt();
    glow.par_chunks_mut(d * np)
        .zip(ghigh.par_chunks_mut(d * nq))
        .enumerate()
        .for_each(|(n, (gp, gq))| {
            let p = &low[n * d * np..(n + 1) * d * np];
            let q = &high[n * d * nq..(n + 1) * d * nq];
            let g = &gy[n * d * nq..(n + 1) * d * nq];
            let s = similarity(p, q, d, np, nq);
            let mut gs = vec![0.0f32; np * nq];
            sgemm(np, nq, d, p, true, g, false, &mut gs, false, false);
            let mut dot = vec![0.0f32; nq];
            for (gr, sr) in gs.chunks(nq).zip(s.chunks(nq)) {
                for ((d, g), s) in dot.iter_mut().zip(gr).zip(sr) {
                    *d += g * s;
                }
            }
            for (gr, sr) in gs.chunks_mut(nq).zip(s.chunks(nq)) {
                for ((g, s), d) in gr.iter_mut().zip(sr).zip(&dot) {
                    *g = s * (*g - d) * r;
                }
            }
            // gs now holds gA/√d.
            sgemm(d, np, nq, g, false, &s, true, gp, false, false);
            sgemm(d, np, nq, q, false, &gs, true, gp, true, false);
            sgemm(d, nq, np, p, false, &gs, false, gq, true, false);
        });
    (glow, ghigh)
}
