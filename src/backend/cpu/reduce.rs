//! Reductions: column sums and global average pooling.

use rayon::prelude::*;

/// Column sums of `x` viewed as `[rows, n]`.
pub fn sum_rows(x: &[f32], n: usize) -> Vec<f32> {
    let rows = x.len() / n;
    let mut out = vec![0.0f64; n];
    for r in 0..rows {
        for (o, v) in out.iter_mut().zip(&x[r * n..(r + 1) * n]) {
            *o += *v as f64;
        }
    }
    out.into_iter().map(|v| v as f32).collect()
}

/// `[planes, hw]` → `[planes]` means.
pub fn global_avg_pool_fwd(x: &[f32], hw: usize) -> Vec<f32> {
    x.par_chunks(hw)
        .map(|p| (p.iter().map(|&v| v as f64).sum::<f64>() / hw as f64) as f32)
        .collect()
}

pub fn global_avg_pool_bwd(gy: &[f32], hw: usize) -> Vec<f32> {
    let mut gx = vec![0.0f32; gy.len() * hw];
    gx.par_chunks_mut(hw).zip(gy.par_iter()).for_each(|(p, g)| {
        p.fill(g / hw as f32);
    });
    gx
}
