//! The semi-supervised terms of SPEC §1: entropy weight, weighted consistency, PGC, DSR alignment.

use rayon::prelude::*;

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

/// One PGC query row, shared by forward and backward: the logits `q_i·K_a/τ` over all keys and
/// the positive distribution `π_a = w_a [y_a = ŷ_i] / Σ_{p∈P(i)} w_p`. `None` when `P(i)` is
/// empty (the query contributes nothing).
fn pgc_row(
    q: &[f32],
    ql: usize,
    keys: &[f32],
    k_labels: &[usize],
    k_w: &[f32],
    e: usize,
    tau: f32,
) -> Option<(Vec<f32>, Vec<f32>)> {
    if !k_labels.contains(&ql) {
        return None;
    }
    let logits: Vec<f32> = keys
        .chunks(e)
        .map(|k| k.iter().zip(q).map(|(a, b)| a * b).sum::<f32>() / tau)
        .collect();
    let wsum: f32 = k_labels
        .iter()
        .zip(k_w)
        .filter(|(l, _)| **l == ql)
        .map(|(_, w)| *w)
        .sum::<f32>()
        .max(1e-12);
    let pi: Vec<f32> = k_labels
        .iter()
        .zip(k_w)
        .map(|(l, w)| if *l == ql { w / wsum } else { 0.0 })
        .collect();
    Some((logits, pi))
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
    let terms: Vec<f64> = (0..b)
        .into_par_iter()
        .map(|i| {
            let qi = &q[i * e..(i + 1) * e];
            let Some((logits, pi)) = pgc_row(qi, q_labels[i], keys, k_labels, k_w, e, tau) else {
                return 0.0;
            };
            let lse = logsumexp_row(&logits);
            let li: f64 = pi
                .iter()
                .zip(&logits)
                .filter(|(p, _)| **p != 0.0)
                .map(|(p, l)| -(*p as f64) * (l - lse) as f64)
                .sum();
            q_w[i] as f64 * li
        })
        .collect();
    (terms.iter().sum::<f64>() / b as f64) as f32
}

/// `gq_i = g·(w_i/B)·Σ_a (softmax_a·Σπ − π_a)·K_a / τ`.
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
    let mut gq = vec![0.0f32; q.len()];
    gq.par_chunks_mut(e).enumerate().for_each(|(i, gi)| {
        let qi = &q[i * e..(i + 1) * e];
        if let Some((logits, pi)) = pgc_row(qi, q_labels[i], keys, k_labels, k_w, e, tau) {
            let mut sm = vec![0.0f32; logits.len()];
            softmax_row(&logits, &mut sm);
            let scale = g * q_w[i] / b as f32 / tau;
            // dℓ_i/dlogit_a = softmax_a·Σπ − π_a (Σπ is 1, or 0 when every positive weight is 0).
            let pisum: f32 = pi.iter().sum();
            for (a, k) in keys.chunks(e).enumerate() {
                let c = (sm[a] * pisum - pi[a]) * scale;
                if c != 0.0 {
                    gi.iter_mut().zip(k).for_each(|(o, kv)| *o += c * kv);
                }
            }
        }
    });
    gq
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
