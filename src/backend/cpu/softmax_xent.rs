//! Row-wise softmax, log-softmax and cross-entropy over the last dimension.

use rayon::prelude::*;

/// Numerically stable softmax of one row into `out`.
pub fn softmax_row(x: &[f32], out: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut s = 0.0f32;
    for (o, v) in out.iter_mut().zip(x) {
        *o = (v - m).exp();
        s += *o;
    }
    out.iter_mut().for_each(|o| *o /= s);
}

/// `log Σ exp(x)` of one row.
pub fn logsumexp_row(x: &[f32]) -> f32 {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    m + x.iter().map(|v| (v - m).exp()).sum::<f32>().ln()
}

pub fn softmax_fwd(x: &[f32], d: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(o, r)| softmax_row(r, o));
    y
}

pub fn softmax_bwd(y: &[f32], gy: &[f32], d: usize) -> Vec<f32> {
    let mut gx = vec![0.0f32; y.len()];
    gx.par_chunks_mut(d)
        .zip(y.par_chunks(d).zip(gy.par_chunks(d)))
        .for_each(|(g, (yr, gr))| {
            let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for j in 0..d {
                g[j] = yr[j] * (gr[j] - dot);
            }
        });
    gx
}

pub fn log_softmax_fwd(x: &[f32], d: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, r)| {
        let lse = logsumexp_row(r);
        o.iter_mut().zip(r).for_each(|(o, v)| *o = v - lse);
    });
    y
}

pub fn log_softmax_bwd(y: &[f32], gy: &[f32], d: usize) -> Vec<f32> {
    let mut gx = vec![0.0f32; y.len()];
    gx.par_chunks_mut(d)
        .zip(y.par_chunks(d).zip(gy.par_chunks(d)))
        .for_each(|(g, (yr, gr))| {
            let s: f32 = gr.iter().sum();
            for j in 0..d {
                g[j] = gr[j] - yr[j].exp() * s;
            }
        });
    gx
}

/// Mean over rows of `−log softmax(x)[label]`.
pub fn cross_entropy_fwd(x: &[f32], labels: &[usize], d: usize) -> f32 {
    let b = labels.len();
    let s: f64 = x
        .chunks(d)
        .zip(labels)
        .map(|(r, &l)| (logsumexp_row(r) - r[l]) as f64)
        .sum();
    (s / b as f64) as f32
}

/// `g · (softmax(x) − onehot(label)) / B`.
pub fn cross_entropy_bwd(x: &[f32], labels: &[usize], d: usize, g: f32) -> Vec<f32> {
    let b = labels.len() as f32;
    let mut gx = softmax_fwd(x, d);
    for (r, &l) in gx.chunks_mut(d).zip(labels) {
        r[l] -= 1.0;
        r.iter_mut().for_each(|v| *v *= g / b);
    }
    gx
}
