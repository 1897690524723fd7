//! Batch norm (per channel over N·H·W) and row-wise L2 normalisation.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::elementwise::par_fill;

/// `(Σ g, Σ g·x̂)` with `x̂ = (x − mean)·invstd` (in f32, as the gradient pass computes it) over
/// the planes of one channel (`x`, `g` the whole `[n, c, hw]` tensors), in f64 over eight lanes
/// that run on across the planes: the last stages' planes hold only 16–49 elements, too few to
/// pay for a reduction of the lanes each.
#[inline(always)]
fn channel_sums(
    (xs, gs): (&[f32], &[f32]),
    (n, c, hw, ch): (usize, usize, usize, usize),
    (mean, invstd): (f32, f32),
) -> (f64, f64) {
    let (mut a, mut b) = ([0.0f64; 8], [0.0f64; 8]);
    let (mut ta, mut tb) = (0.0f64, 0.0f64);
    for i in 0..n {
        let o = (i * c + ch) * hw;
        let (mut xi, mut gi) = (xs[o..o + hw].chunks_exact(8), gs[o..o + hw].chunks_exact(8));
        // The two sums in separate loops over the plane (it is still in L1 for the second):
        // interleaved in one loop the compiler fell back to scalar operations and shuffles.
        for gc in &mut gi {
            for k in 0..8 {
                a[k] += gc[k] as f64;
            }
        }
        for (xc, gc) in (&mut xi).zip(gs[o..o + hw].chunks_exact(8)) {
            for k in 0..8 {
                b[k] += gc[k] as f64 * ((xc[k] - mean) * invstd) as f64;
            }
        }
        for (x, g) in xi.remainder().iter().zip(gi.remainder()) {
            ta += *g as f64;
            tb += *g as f64 * ((x - mean) * invstd) as f64;
        }
    }
    (a.iter().sum::<f64>() + ta, b.iter().sum::<f64>() + tb)
}

/// `Σ f(x)` over the planes of one channel, as [`channel_sums`].
#[inline(always)]
fn channel_sum(
    xs: &[f32],
    (n, c, hw, ch): (usize, usize, usize, usize),
    f: impl Fn(f32) -> f64,
) -> f64 {
    let mut a = [0.0f64; 8];
    let mut t = 0.0f64;
    for i in 0..n {
        let mut xi = xs[(i * c + ch) * hw..][..hw].chunks_exact(8);
        for xc in &mut xi {
            for k in 0..8 {
                a[k] += f(xc[k]);
            }
        }
        t += xi.remainder().iter().map(|v| f(*v)).sum::<f64>();
    }
    a.iter().sum::<f64>() + t
}

super::simd::widest_simd! {
    /// `(mean, biased var)` of channel `ch` of `x [n, c, hw]` into `out`, accumulated in f64 (two
    /// passes: the sum, then the squares about the mean).
    fn channel_stat(x: &[f32], n: usize, c: usize, hw: usize, ch: usize, out: &mut (f64, f64)) {
        let m = (n * hw) as f64;
        let mean = channel_sum(x, (n, c, hw, ch), |v| v as f64) / m;
        let q = channel_sum(x, (n, c, hw, ch), |v| (v as f64 - mean).powi(2));
        *out = (mean, q / m);
    }
}

/// Per-channel `(mean, biased var)` of `x [n, c, hw]` ([`channel_stat`]).
fn channel_stats(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<(f64, f64)> {
    let mut stats = vec![(0.0, 0.0); c];
    stats
        .par_iter_mut()
        .enumerate()
        .for_each(|(ch, out)| channel_stat(x, n, c, hw, ch, out));
    stats
}

/// A tensor of `len` floats in planes of `hw`, written plane by plane in parallel by
/// `fill(p, plane)` (plane `p`, i.e. elements `p·hw ..`); each parallel chunk takes whole planes,
/// at least about 4 096 elements (the last stages' planes hold 16–49, too few to be a chunk each).
///
/// # Safety
/// `fill` must initialise every element of every plane it is given.
unsafe fn fill_planes(
    len: usize,
    hw: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let ppc = (4096 / hw.max(1)).max(1);
    // SAFETY: every plane of every chunk goes to `fill`, which initialises it (the caller's
    // guarantee).
    unsafe {
        par_fill(len, ppc * hw, |k, chunk| {
            for (j, plane) in chunk.chunks_mut(hw.max(1)).enumerate() {
                fill(k * ppc + j, plane);
            }
        })
    }
}

super::simd::widest_simd! {
    /// `y = a·x + b` over one plane.
    fn affine_plane(x: &[f32], a: f32, b: f32, y: &mut [MaybeUninit<f32>]) {
        for (o, v) in y.iter_mut().zip(x) {
            o.write(a * v + b);
        }
    }
}

/// `y = a[c]·x + b[c]` per plane (the affine form both BN modes reduce to).
fn affine_planes(x: &[f32], c: usize, hw: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
    // SAFETY: plane `p` of the output is written element by element from plane `p` of `x`.
    unsafe {
        fill_planes(x.len(), hw, |p, yp| {
            let ch = p % c;
            affine_plane(&x[p * hw..][..hw], a[ch], b[ch], yp);
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

super::simd::widest_simd! {
    /// Channel `ch`'s `(Σ gy, Σ gy·x̂)` with `x̂ = (x − mean)·invstd`, into `out`; `geom` is
    /// `(n, c, hw, ch)`.
    fn grad_sum(
        x: &[f32],
        gy: &[f32],
        geom: (usize, usize, usize, usize),
        mean: f32,
        invstd: f32,
        out: &mut (f64, f64),
    ) {
        *out = channel_sums((x, gy), geom, (mean, invstd));
    }
}

/// Per-channel `(Σ gy, Σ gy·x̂)` ([`grad_sum`]).
fn grad_sums(
    x: &[f32],
    gy: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    mean: &[f32],
    invstd: &[f32],
) -> Vec<(f64, f64)> {
    let mut sums = vec![(0.0, 0.0); c];
    sums.par_iter_mut().enumerate().for_each(|(ch, out)| {
        grad_sum(x, gy, (n, c, hw, ch), mean[ch], invstd[ch], out);
    });
    sums
}

super::simd::widest_simd! {
    /// One plane of the train-mode input gradient, `gx = k·(gy − sg − x̂·sgx)` with
    /// `x̂ = (x − mean)·invstd`.
    fn dx_plane(
        xp: &[f32],
        gp: &[f32],
        k: f32,
        mean: f32,
        invstd: f32,
        sg: f32,
        sgx: f32,
        g: &mut [MaybeUninit<f32>],
    ) {
        for ((gv, xv), gyv) in g.iter_mut().zip(xp).zip(gp) {
            let xhat = (xv - mean) * invstd;
            gv.write(k * (gyv - sg - xhat * sgx));
        }
    }
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
        fill_planes(x.len(), hw, |p, g| {
            let ch = p % c;
            let (sg, sgx) = (sums[ch].0 as f32 / m, sums[ch].1 as f32 / m);
            let k = gamma[ch] * invstd[ch];
            let (xp, gp) = (&x[p * hw..][..hw], &gy[p * hw..][..hw]);
            dx_plane(xp, gp, k, mean[ch], invstd[ch], sg, sgx, g);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Training-mode forward and backward against a direct f64 computation, on shapes whose
    /// planes span several parallel chunks with a short last one (100 planes of 49, 83 to a
    /// chunk), single-element planes, planes with no 8-element block, and the first stage's size.
    #[test]
    fn train_matches_direct_f64() {
        for (n, c, hw) in [(20, 5, 49), (6, 3, 1), (4, 7, 5), (2, 3, 784)] {
            let len = n * c * hw;
            let val = |i: usize, s: usize| ((i * 7919 + s * 104_729) % 1999) as f32 / 999.0 - 1.0;
            let x: Vec<f32> = (0..len).map(|i| val(i, 1) * 3.0 + 0.5).collect();
            let gy: Vec<f32> = (0..len).map(|i| val(i, 2)).collect();
            let gamma: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.25).collect();
            let beta: Vec<f32> = (0..c).map(|i| i as f32 * 0.1 - 0.2).collect();
            let eps = 1e-5;
            let (y, mean, invstd, _) = batch_norm_train_fwd(&x, n, c, hw, &gamma, &beta, eps);
            let (gx, gg, gb) = batch_norm_train_bwd(&x, &gy, n, c, hw, &gamma, &mean, &invstd);
            let m = (n * hw) as f64;
            for ch in 0..c {
                let idx: Vec<usize> = (0..n)
                    .flat_map(|i| (0..hw).map(move |j| (i * c + ch) * hw + j))
                    .collect();
                let mu = idx.iter().map(|&i| x[i] as f64).sum::<f64>() / m;
                let var = idx.iter().map(|&i| (x[i] as f64 - mu).powi(2)).sum::<f64>() / m;
                let is = 1.0 / (var + eps as f64).sqrt();
                let xh = |i: usize| (x[i] as f64 - mu) * is;
                let sg: f64 = idx.iter().map(|&i| gy[i] as f64).sum();
                let sgx: f64 = idx.iter().map(|&i| gy[i] as f64 * xh(i)).sum();
                let close = |a: f32, e: f64, what: &str| {
                    assert!(
                        (a as f64 - e).abs() <= 2e-5 * e.abs().max(1.0),
                        "{what} of channel {ch} in [{n},{c},{hw}]: {a} against {e}"
                    );
                };
                close(gb[ch], sg, "gβ");
                close(gg[ch], sgx, "gγ");
                for &i in &idx {
                    close(y[i], gamma[ch] as f64 * xh(i) + beta[ch] as f64, "y");
                    let g = gamma[ch] as f64 * is / m * (m * gy[i] as f64 - sg - xh(i) * sgx);
                    close(gx[i], g, "gx");
                }
            }
        }
    }
    /// The statistics, the normalised output and every gradient have the same bits from the
    /// vector builds as from the baseline (on a CPU without wider vectors both runs take the
    /// baseline and this checks nothing more).
    #[test]
    fn vector_builds_match_the_baseline_bits() {
        use super::super::simd::BASELINE_ONLY;
        use std::sync::atomic::Ordering::Relaxed;
        for (n, c, hw) in [(20, 5, 49), (3, 4, 784), (5, 2, 13)] {
            let len = n * c * hw;
            let val = |i: usize, s: usize| ((i * 7919 + s * 104_729) % 1999) as f32 / 999.0 - 1.0;
            let x: Vec<f32> = (0..len).map(|i| val(i, 3) * 2.0 - 0.3).collect();
            let gy: Vec<f32> = (0..len).map(|i| val(i, 4)).collect();
            let gamma: Vec<f32> = (0..c).map(|i| 0.75 + i as f32 * 0.5).collect();
            let beta: Vec<f32> = (0..c).map(|i| 0.2 - i as f32 * 0.1).collect();
            let run = |baseline: bool| {
                BASELINE_ONLY.store(baseline, Relaxed);
                let (y, mean, invstd, var) =
                    batch_norm_train_fwd(&x, n, c, hw, &gamma, &beta, 1e-5);
                let (gx, gg, gb) = batch_norm_train_bwd(&x, &gy, n, c, hw, &gamma, &mean, &invstd);
                [y, mean, invstd, var, gx, gg, gb]
                    .map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
            };
            let wide = run(false);
            let base = run(true);
            BASELINE_ONLY.store(false, Relaxed);
            assert!(
                wide == base,
                "[{n},{c},{hw}]: the vector builds and the baseline differ"
            );
        }
    }
}
