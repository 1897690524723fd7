//! Batch norm (per channel over N·H·W) and row-wise L2 normalisation.

use rayon::prelude::*;

use super::elementwise::{par_fill, sum8};

/// `(Σ g, Σ g·h(x))` over paired slices, like [`sum8`].
#[inline(always)]
fn sum8_pair(xs: &[f32], gs: &[f32], h: impl Fn(f32) -> f32) -> (f64, f64) {
    let (mut a, mut b) = ([0.0f64; 8], [0.0f64; 8]);
    let (mut xi, mut gi) = (xs.chunks_exact(8), gs.chunks_exact(8));
    for (xc, gc) in (&mut xi).zip(&mut gi) {
        for k in 0..8 {
            a[k] += gc[k] as f64;
            b[k] += gc[k] as f64 * h(xc[k]) as f64;
        }
    }
    let (mut ta, mut tb) = (0.0f64, 0.0f64);
    for (x, g) in xi.remainder().iter().zip(gi.remainder()) {
        ta += *g as f64;
        tb += *g as f64 * h(*x) as f64;
    }
    (a.iter().sum::<f64>() + ta, b.iter().sum::<f64>() + tb)
}

/// Per-channel `(mean, biased var)` of `x [n, c, hw]`, accumulated in f64.
fn channel_stats(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<(f64, f64)> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let m = (n * hw) as f64;
            let mut s = 0.0f64;
            for i in 0..n {
                s += sum8(&x[(i * c + ch) * hw..][..hw], |v| v as f64);
            }
            let mean = s / m;
            let mut q = 0.0f64;
            for i in 0..n {
                q += sum8(&x[(i * c + ch) * hw..][..hw], |v| (v as f64 - mean).powi(2));
            }
            (mean, q / m)
        })
        .collect()
}

/// `y = a[c]·x + b[c]` per plane (the affine form both BN modes reduce to).
fn affine_planes(x: &[f32], c: usize, hw: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
    // SAFETY: plane `p` of the output is written element by element from plane `p` of `x`.
    unsafe {
        par_fill(x.len(), hw, |p, yp| {
            let ch = p % c;
            for (o, v) in yp.iter_mut().zip(&x[p * hw..][..hw]) {
                o.write(a[ch] * v + b[ch]);
            }
        })
    }
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
                let (a, b) = sum8_pair(&x[o..o + hw], &gy[o..o + hw], |xv| {
                    (xv - mean[ch]) * invstd[ch]
                });
                sg += a;
                sgx += b;
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
    // SAFETY: every element of plane `p` is written.
    let gx = unsafe {
        par_fill(x.len(), hw, |p, g| {
            let ch = p % c;
            let (sg, sgx) = (sums[ch].0 as f32 / m, sums[ch].1 as f32 / m);
            let k = gamma[ch] * invstd[ch];
            let (xp, gp) = (&x[p * hw..][..hw], &gy[p * hw..][..hw]);
            for ((gv, xv), gyv) in g.iter_mut().zip(xp).zip(gp) {
                let xhat = (xv - mean[ch]) * invstd[ch];
                gv.write(k * (gyv - sg - xhat * sgx));
            }
        })
    };
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
