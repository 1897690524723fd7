//! Batch norm (per channel over N·H·W) and row-wise L2 normalisation.

use rayon::prelude::*;

/// Per-channel `(mean, biased var)` of `x [n, c, hw]`, accumulated in f64.
fn channel_stats(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<(f64, f64)> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let m = (n * hw) as f64;
            let mut s = 0.0f64;
            for i in 0..n {
                s += x[(i * c + ch) * hw..][..hw]
                    .iter()
                    .map(|&v| v as f64)
                    .sum::<f64>();
            }
            let mean = s / m;
            let mut q = 0.0f64;
            for i in 0..n {
                q += x[(i * c + ch) * hw..][..hw]
                    .iter()
                    .map(|&v| (v as f64 - mean).powi(2))
                    .sum::<f64>();
            }
            (mean, q / m)
        })
        .collect()
}

/// `y = a[c]·x + b[c]` per plane (the affine form both BN modes reduce to).
fn affine_planes(x: &[f32], c: usize, hw: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .for_each(|(p, (yp, xp))| {
            let ch = p % c;
            for (o, v) in yp.iter_mut().zip(xp) {
                *o = a[ch] * v + b[ch];
            }
        });
    y
}

/// Returns `(y, mean, invstd, var_unbiased)`; errors when a channel has a single value.
#[allow(clippy::type_complexity)]
pub fn batch_norm_train_fwd(
    x: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let stats = channel_stats(x, n, c, hw);
    let m = (n * hw) as f64;
    let mean: Vec<f32> = stats.iter().map(|s| s.0 as f32).collect();
    let invstd: Vec<f32> = stats
        .iter()
        .map(|s| (1.0 / (s.1 + eps as f64).sqrt()) as f32)
        .collect();
    let var_unbiased: Vec<f32> = stats
        .iter()
        .map(|s| (s.1 * m / (m - 1.0).max(1.0)) as f32)
        .collect();
    let a: Vec<f32> = (0..c).map(|ch| gamma[ch] * invstd[ch]).collect();
    let b: Vec<f32> = (0..c).map(|ch| beta[ch] - mean[ch] * a[ch]).collect();
    (affine_planes(x, c, hw, &a, &b), mean, invstd, var_unbiased)
}

/// Per-channel `(Σ gy, Σ gy·x̂)` with `x̂ = (x − mean)·invstd`.
fn grad_sums(
    x: &[f32],
    gy: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    mean: &[f32],
    invstd: &[f32],
) -> Vec<(f64, f64)> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mut sg, mut sgx) = (0.0f64, 0.0f64);
            for i in 0..n {
                let o = (i * c + ch) * hw;
                for (xv, gv) in x[o..o + hw].iter().zip(&gy[o..o + hw]) {
                    sg += *gv as f64;
                    sgx += *gv as f64 * ((*xv - mean[ch]) * invstd[ch]) as f64;
                }
            }
            (sg, sgx)
        })
        .collect()
}

/// `gx = γ·invstd/M · (M·gy − Σgy − x̂·Σ(gy·x̂))`, `gγ = Σ gy·x̂`, `gβ = Σ gy`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_train_bwd(
    x: &[f32],
    gy: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    gamma: &[f32],
    mean: &[f32],
    invstd: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let sums = grad_sums(x, gy, n, c, hw, mean, invstd);
    let m = (n * hw) as f32;
    let mut gx = vec![0.0f32; x.len()];
    gx.par_chunks_mut(hw).enumerate().for_each(|(p, g)| {
        let ch = p % c;
        let o = p * hw;
        let (sg, sgx) = (sums[ch].0 as f32 / m, sums[ch].1 as f32 / m);
        let k = gamma[ch] * invstd[ch];
        for (j, gv) in g.iter_mut().enumerate() {
            let xhat = (x[o + j] - mean[ch]) * invstd[ch];
            *gv = k * (gy[o + j] - sg - xhat * sgx);
        }
    });
    let ggamma = sums.iter().map(|s| s.1 as f32).collect();
    let gbeta = sums.iter().map(|s| s.0 as f32).collect();
    (gx, ggamma, gbeta)
}

fn eval_invstd(rv: &[f32], eps: f32) -> Vec<f32> {
    rv.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()
}

#[allow(clippy::too_many_arguments)]
pub fn batch_norm_eval_fwd(
    x: &[f32],
    c: usize,
    hw: usize,
    gamma: &[f32],
    beta: &[f32],
    rm: &[f32],
    rv: &[f32],
    eps: f32,
) -> Vec<f32> {
    let inv = eval_invstd(rv, eps);
    let a: Vec<f32> = (0..c).map(|ch| gamma[ch] * inv[ch]).collect();
    let b: Vec<f32> = (0..c).map(|ch| beta[ch] - rm[ch] * a[ch]).collect();
    affine_planes(x, c, hw, &a, &b)
}

#[allow(clippy::too_many_arguments)]
pub fn batch_norm_eval_bwd(
    x: &[f32],
    gy: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    gamma: &[f32],
    rm: &[f32],
    rv: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let inv = eval_invstd(rv, eps);
    let sums = grad_sums(x, gy, n, c, hw, rm, &inv);
    let a: Vec<f32> = (0..c).map(|ch| gamma[ch] * inv[ch]).collect();
    let gx = affine_planes(gy, c, hw, &a, &vec![0.0; c]);
    let ggamma = sums.iter().map(|s| s.1 as f32).collect();
    let gbeta = sums.iter().map(|s| s.0 as f32).collect();
    (gx, ggamma, gbeta)
}

/// Norm floor used by PyTorch's `F.normalize`.
pub const L2_EPS: f32 = 1e-12;

pub fn l2_normalize_fwd(x: &[f32], d: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(yr, xr)| {
            let norm = xr.iter().map(|v| v * v).sum::<f32>().sqrt().max(L2_EPS);
            yr.iter_mut().zip(xr).for_each(|(o, v)| *o = v / norm);
        });
    y
}

/// Above the floor `gx = (gy − y·(y·gy)) / ‖x‖`; below it the map is `x / eps`, so `gx = gy/eps`.
pub fn l2_normalize_bwd(x: &[f32], gy: &[f32], d: usize) -> Vec<f32> {
    let mut gx = vec![0.0f32; x.len()];
    gx.par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(gy.par_chunks(d)))
        .for_each(|(g, (xr, gr))| {
            let norm = xr.iter().map(|v| v * v).sum::<f32>().sqrt();
            if norm > L2_EPS {
                let dot: f32 = xr.iter().zip(gr).map(|(a, b)| a * b).sum::<f32>() / norm;
                for j in 0..d {
                    g[j] = (gr[j] - xr[j] / norm * dot) / norm;
                }
            } else {
                g.iter_mut().zip(gr).for_each(|(o, v)| *o = v / L2_EPS);
            }
        });
    gx
}
