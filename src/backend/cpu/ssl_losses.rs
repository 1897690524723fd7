//! The semi-supervised terms of SPEC §1: entropy weight, weighted consistency, PGC, DSR alignment.

use rayon::prelude::*;

use super::gemm::sgemm;
use super::softmax_xent::{logsumexp_row, softmax_fwd, softmax_row};

/// `c_i = 1 − H(softmax(z_i)) / ln C`.
pub fn entropy_weight(z: &[f32], c: usize) -> Vec<f32> {
    let p = softmax_fwd(z, c);
    let lnc = (c as f32).ln();
    p.chunks(c)
        .map(|r| {
            let h: f32 = r
                .iter()
                .map(|&v| if v > 0.0 { -v * v.ln() } else { 0.0 })
                .sum();
            if c > 1 {
                1.0 - h / lnc
            } else {
                1.0
            }
        })
        .collect()
}

/// `(1/B) Σ_i w_i ‖softmax(zs_i) − softmax(zt_i)‖²`.
pub fn weighted_consistency_fwd(zs: &[f32], zt: &[f32], w: &[f32], c: usize) -> f32 {
    let (ps, pt) = (softmax_fwd(zs, c), softmax_fwd(zt, c));
    let s: f64 = ps
        .chunks(c)
        .zip(pt.chunks(c))
        .zip(w)
        .map(|((a, b), &wi)| {
            wi as f64
                * a.iter()
                    .zip(b)
                    .map(|(x, y)| ((x - y) as f64).powi(2))
                    .sum::<f64>()
        })
        .sum();
    (s / w.len() as f64) as f32
}

/// `gzs = softmax_bwd(ps, g·(2/B)·w_i·(ps − pt))`.
pub fn weighted_consistency_bwd(zs: &[f32], zt: &[f32], w: &[f32], c: usize, g: f32) -> Vec<f32> {
    let (ps, pt) = (softmax_fwd(zs, c), softmax_fwd(zt, c));
    let b = w.len() as f32;
    let mut gz = vec![0.0f32; zs.len()];
    for i in 0..w.len() {
        let (a, t) = (&ps[i * c..(i + 1) * c], &pt[i * c..(i + 1) * c]);
        let gp: Vec<f32> = (0..c).map(|j| g * 2.0 / b * w[i] * (a[j] - t[j])).collect();
        let dot: f32 = gp.iter().zip(a).map(|(x, y)| x * y).sum();
        for j in 0..c {
            gz[i * c + j] = a[j] * (gp[j] - dot);
        }
    }
    gz
}

/// The positive distribution of a query with pseudo-label `ql`:
/// `π_a = w_a [y_a = ŷ_i] / Σ_{p∈P(i)} w_p`, written into `pi`. `false` when `P(i)` is empty (the
/// query contributes nothing).
fn pgc_pi(ql: usize, k_labels: &[usize], k_w: &[f32], pi: &mut [f32]) -> bool {
    if !k_labels.contains(&ql) {
        return false;
    }
    let wsum: f32 = k_labels
        .iter()
        .zip(k_w)
        .filter(|(l, _)| **l == ql)
        .map(|(_, w)| *w)
        .sum::<f32>()
        .max(1e-12);
    for ((p, l), w) in pi.iter_mut().zip(k_labels).zip(k_w) {
        *p = if *l == ql { w / wsum } else { 0.0 };
    }
    true
}

/// All PGC logits `Q·Kᵀ/τ` as one `[B, Nk]` GEMM.
fn pgc_logits(q: &[f32], keys: &[f32], b: usize, nk: usize, e: usize, tau: f32) -> Vec<f32> {
    let mut logits = vec![0.0f32; b * nk];
    sgemm(b, nk, e, q, false, keys, true, &mut logits, false, true);
    let r = 1.0 / tau;
    logits
        .par_chunks_mut(super::elementwise::CHUNK)
        .for_each(|c| {
            c.iter_mut().for_each(|v| *v *= r);
        });
    logits
}

/// `L = (1/B) Σ_{i: P(i)≠∅} w_i ℓ_i`, `ℓ_i = −Σ_a π_a log softmax_a(q_i·K/τ)`.
#[allow(clippy::too_many_arguments)]
pub fn pgc_loss_fwd(
    q: &[f32],
    q_labels: &[usize],
    q_w: &[f32],
    keys: &[f32],
    k_labels: &[usize],
    k_w: &[f32],
    e: usize,
    tau: f32,
) -> f32 {
    let b = q_labels.len();
    let nk = k_labels.len();
    if b == 0 {
        return f32::NAN;
    }
    let logits = pgc_logits(q, keys, b, nk, e, tau);
    let terms: Vec<f64> = (0..b)
        .into_par_iter()
        .map(|i| {
            let mut pi = vec![0.0f32; nk];
            if !pgc_pi(q_labels[i], k_labels, k_w, &mut pi) {
                return 0.0;
            }
            let row = &logits[i * nk..(i + 1) * nk];
            let lse = logsumexp_row(row);
            let li: f64 = pi
                .iter()
                .zip(row)
                .filter(|(p, _)| **p != 0.0)
                .map(|(p, l)| -(*p as f64) * (l - lse) as f64)
                .sum();
            q_w[i] as f64 * li
        })
        .collect();
    (terms.iter().sum::<f64>() / b as f64) as f32
}

/// `gq_i = g·(w_i/B)·Σ_a (softmax_a·Σπ − π_a)·K_a / τ`, the sum over keys as one GEMM.
#[allow(clippy::too_many_arguments)]
pub fn pgc_loss_bwd(
    q: &[f32],
    q_labels: &[usize],
    q_w: &[f32],
    keys: &[f32],
    k_labels: &[usize],
    k_w: &[f32],
    e: usize,
    tau: f32,
    g: f32,
) -> Vec<f32> {
    let b = q_labels.len();
    let nk = k_labels.len();
    let mut gq = vec![0.0f32; q.len()];
    if b == 0 || nk == 0 {
        return gq;
    }
    // Coefficients dℓ_i/dlogit_a·scale_i, overwritten in place of the logits.
    let mut coef = pgc_logits(q, keys, b, nk, e, tau);
    coef.par_chunks_mut(nk).enumerate().for_each(|(i, row)| {
        let mut pi = vec![0.0f32; nk];
        if !pgc_pi(q_labels[i], k_labels, k_w, &mut pi) {
            row.fill(0.0);
            return;
        }
        let mut sm = vec![0.0f32; nk];
        softmax_row(row, &mut sm);
        let scale = g * q_w[i] / b as f32 / tau;
        // dℓ_i/dlogit_a = softmax_a·Σπ − π_a (Σπ is 1, or 0 when every positive weight is 0).
        let pisum: f32 = pi.iter().sum();
        for ((c, s), p) in row.iter_mut().zip(&sm).zip(&pi) {
            *c = (s * pisum - p) * scale;
        }
    });
    sgemm(b, e, nk, &coef, false, keys, false, &mut gq, false, true);
    gq
}

/// The first index of the largest element of each row of `z [rows, c]` (strictly greater
/// replaces, so NaN never wins; 0 for a row of NaN or −∞).
pub fn argmax_rows(z: &[f32], c: usize) -> Vec<usize> {
    z.chunks(c.max(1))
        .map(|r| {
            r.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
                    if x > bv {
                        (i, x)
                    } else {
                        (bi, bv)
                    }
                })
                .0
        })
        .collect()
}

/// DSR weights with the meta-weight update (see `Backend::dsr_weights`): returns `(w, m')`, `m'`
/// only with `m`. Absent factors count as ones.
pub fn dsr_weights(
    n: usize,
    c: Option<&[f32]>,
    m: Option<&[f32]>,
    align: Option<(&[f32], f32)>,
    b: Option<&[f32]>,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let m_new: Option<Vec<f32>> = m.map(|m| match align {
        Some((a, beta)) => m
            .iter()
            .zip(a)
            .map(|(&mi, &ai)| (mi + beta * ai).clamp(0.0, 1.0))
            .collect(),
        None => m.to_vec(),
    });
    let w = (0..n)
        .map(|i| {
            let ci = c.map_or(1.0, |c| c[i]);
            let mi = m_new.as_ref().map_or(1.0, |m| m[i]);
            let wi = ci * mi;
            b.map_or(wi, |b| wi * b[i])
        })
        .collect();
    (w, m_new)
}

/// `a_i = (1/B_l) Σ_j ((p_j − e_{y_j})·(p_i − e_{ŷ_i})) (f_j·f_i + 1)`, `p = softmax(W f + b)`.
#[allow(clippy::too_many_arguments)]
pub fn dsr_alignment(
    f_lab: &[f32],
    y_lab: &[usize],
    f_unl: &[f32],
    pseudo: &[usize],
    w: &[f32],
    bias: &[f32],
    d: usize,
    c: usize,
) -> Vec<f32> {
    let residual = |f: &[f32], labels: &[usize]| -> Vec<f32> {
        let mut out = vec![0.0f32; labels.len() * c];
        for (i, &l) in labels.iter().enumerate() {
            let fi = &f[i * d..(i + 1) * d];
            let z: Vec<f32> = (0..c)
                .map(|k| {
                    bias[k]
                        + w[k * d..(k + 1) * d]
                            .iter()
                            .zip(fi)
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                })
                .collect();
            softmax_row(&z, &mut out[i * c..(i + 1) * c]);
            out[i * c + l] -= 1.0;
        }
        out
    };
    let rl = residual(f_lab, y_lab);
    let ru = residual(f_unl, pseudo);
    let bl = y_lab.len();
    (0..pseudo.len())
        .map(|i| {
            let fi = &f_unl[i * d..(i + 1) * d];
            let ri = &ru[i * c..(i + 1) * c];
            let s: f32 = (0..bl)
                .map(|j| {
                    let rr: f32 = rl[j * c..(j + 1) * c]
                        .iter()
                        .zip(ri)
                        .map(|(a, b)| a * b)
                        .sum();
                    let ff: f32 = f_lab[j * d..(j + 1) * d]
                        .iter()
                        .zip(fi)
                        .map(|(a, b)| a * b)
                        .sum();
                    rr * (ff + 1.0)
                })
                .sum();
            s / bl as f32
        })
        .collect()
}
