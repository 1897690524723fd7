//! Row-wise softmax, log-softmax and cross-entropy over the last dimension.

use rayon::prelude::*;

use super::elementwise::sum8;

/// Numerically stable softmax of one row into `out` (as long as `x`).
pub fn softmax_row(x: &[f32], out: &mut [f32]) {
    out.copy_from_slice(x);
    softmax_scaled_in_place(out, 1.0);
}

/// Softmax of `row` scaled by `r > 0` (`exp(r·(x − max)) / Σ`) in place: the maximum over
/// independent lanes (`row_max`), the sum in f64 over eight ([`sum8`]).
pub fn softmax_scaled_in_place(row: &mut [f32], r: f32) {
    let m = row_max(row);
    row.iter_mut().for_each(|v| *v = ((*v - m) * r).exp());
    let s = sum8(row, |v| v as f64) as f32;
    row.iter_mut().for_each(|v| *v /= s);
}

/// `log Σ exp(x)` of one row (the sum in f64 over independent lanes).
pub fn logsumexp_row(x: &[f32]) -> f32 {
    let m = row_max(x);
    m + (sum8(x, |v| (v - m).exp() as f64) as f32).ln()
}

/// The largest element of a row, over 16 independent lanes: a single running maximum makes a
/// long row (the PGC loss's 4 144 keys, the fusion's 784 pixels) one chain of dependent
/// operations. NaN elements are skipped as by `f32::max` (they still reach the row's
/// exponentials and so its result).
#[inline]
fn row_max(x: &[f32]) -> f32 {
    if x.len() < 32 {
        return x.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    }
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut it = x.chunks_exact(16);
    for c in &mut it {
        lanes.iter_mut().zip(c).for_each(|(m, v)| *m = m.max(*v));
    }
    (lanes.iter().chain(it.remainder())).fold(f32::NEG_INFINITY, |m, v| m.max(*v))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The lane-parallel maximum and sums against plain sequential ones in f64, for row lengths
    /// on both sides of the short-row path and of the 16-lane blocks, maxima in the tail too.
    #[test]
    fn long_rows_match_sequential_reductions() {
        for len in [1, 7, 31, 32, 33, 47, 100, 4144] {
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 7919 % 1013) as f32 / 50.0 - 10.0).sin() * 8.0)
                .collect();
            let mut y = x.clone();
            y[len - 1] = 9.5; // the largest, in the last (tail) element
            for row in [&x, &y] {
                let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                assert_eq!(row_max(row), m, "max of {len}");
                let s: f64 = row.iter().map(|&v| ((v - m) as f64).exp()).sum();
                let lse = m as f64 + s.ln();
                assert!((logsumexp_row(row) as f64 - lse).abs() <= 1e-5 * lse.abs().max(1.0));
                let mut out = vec![0.0; len];
                softmax_row(row, &mut out);
                for (o, v) in out.iter().zip(row.iter()) {
                    let want = ((v - m) as f64).exp() / s;
                    assert!((*o as f64 - want).abs() <= 1e-6 * want.max(1e-30) + 1e-12);
                }
            }
        }
        let mut nan = vec![0.5f32; 40];
        nan[20] = f32::NAN;
        let mut out = vec![0.0; 40];
        softmax_row(&nan, &mut out);
        assert!(
            out.iter().all(|v| v.is_nan()),
            "a NaN input reaches every output"
        );
    }
}
