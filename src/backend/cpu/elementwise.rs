//! Elementwise ops. Large arrays are split into fixed chunks so results do not depend on timing.

use rayon::prelude::*;

/// Chunk length for parallel elementwise loops.
pub const CHUNK: usize = 1 << 15;

/// `out[i] = f(i)` over `n` elements, in parallel chunks.
pub fn map_indexed(n: usize, f: impl Fn(usize) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0.0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, ch)| {
        let base = c * CHUNK;
        for (j, o) in ch.iter_mut().enumerate() {
            *o = f(base + j);
        }
    });
    out
}

pub fn axpby(a: f32, x: &[f32], b: f32, y: &[f32]) -> Vec<f32> {
    map_indexed(x.len(), |i| a * x[i] + b * y[i])
}

pub fn scale(x: &[f32], s: f32) -> Vec<f32> {
    map_indexed(x.len(), |i| s * x[i])
}

pub fn mul(x: &[f32], y: &[f32]) -> Vec<f32> {
    map_indexed(x.len(), |i| x[i] * y[i])
}

pub fn relu_fwd(x: &[f32]) -> Vec<f32> {
    map_indexed(x.len(), |i| x[i].max(0.0))
}

pub fn relu_bwd(y: &[f32], gy: &[f32]) -> Vec<f32> {
    map_indexed(y.len(), |i| if y[i] > 0.0 { gy[i] } else { 0.0 })
}

pub fn add_assign(acc: &mut [f32], x: &[f32]) {
    acc.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += *b));
}

/// Sum in f64 so the reference is more accurate than any device reduction it is compared with.
pub fn sum_all(x: &[f32]) -> f32 {
    x.iter().map(|&v| v as f64).sum::<f64>() as f32
}
