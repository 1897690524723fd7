//! Row-wise softmax, log-softmax and cross-entropy over the last dimension.

use rayon::prelude::*;

use super::elementwise::sum8;

/// `e^x` in f32, written so that a loop over it vectorises on any instruction set (the libm
/// call does not, and was a tenth of the fusion layer's time): plain multiplies and adds, no
/// fused multiply-add, no conversion instruction, so every build gives the same bits.
///
/// `x = n·ln 2 + r` with `n = round(x/ln 2)` (by the 1.5·2²³ addition, which rounds to nearest
/// even) and `r` in `[−ln 2/2, ln 2/2]` (Cody–Waite: `ln 2` in two parts, the first with 9
/// significant bits so that `n·C1` is exact); `e^r` by its degree-7 polynomial in Cephes'
/// coefficients; `2^n` applied as two powers of two (`n` from −150 to 128: both halves stay
/// normal, so a result that underflows rounds once, into a subnormal). Within one unit in the
/// last place of the exact value for finite results (0.96 at worst over every 101st f32 of the
/// range, tested against f64; libm's `expf` is correctly rounded, within 0.5);
/// `e^x` overflows to +∞ above about 88.72 and is 0 below about −103.97; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to an integer.
    const SHIFTER: f32 = 12_582_912.0;
    // Clamped so that n stays in [−150, 128] (`clamp` keeps a NaN).
    let x = x.clamp(-104.0, 89.0);
    let t = x * LOG2E + SHIFTER;
    let n = t - SHIFTER;
    // n as an integer: the low mantissa bits of t (the shifter's bits subtracted).
    let ni = (t.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    let r = (x - n * C1) - n * C2;
    let r2 = r * r;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r2 + r + 1.0;
    let n1 = ni >> 1;
    let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    e * pow2(n1) * pow2(ni - n1)
}

/// Numerically stable softmax of one row into `out` (as long as `x`).
pub fn softmax_row(x: &[f32], out: &mut [f32]) {
    out.copy_from_slice(x);
    softmax_scaled_in_place(out, 1.0);
}

super::simd::widest_simd! {
    /// Softmax of `row` scaled by `r > 0` (`exp(r·(x − max)) / Σ`) in place: the maximum over
    /// independent lanes (`row_max`), the exponentials by [`exp`], the sum in f64 over eight
    /// ([`sum8`]).
    pub fn softmax_scaled_in_place(row: &mut [f32], r: f32) {
        let m = row_max(row);
        for v in row.iter_mut() {
            *v = exp((*v - m) * r);
        }
        let s = sum8(row, |v| v as f64) as f32;
        row.iter_mut().for_each(|v| *v /= s);
    }
}

super::simd::widest_simd! {
    /// `log Σ exp(x)` of one row (the exponentials by [`exp`], the sum in f64 over independent
    /// lanes).
    pub fn logsumexp_row(x: &[f32]) -> f32 {
        let m = row_max(x);
        m + (sum8(x, |v| exp(v - m) as f64) as f32).ln()
    }
}

/// The largest element of a row, over 16 independent lanes: a single running maximum makes a
/// long row (the PGC loss's 4 144 keys, the fusion's 784 pixels) one chain of dependent
/// operations. NaN elements are skipped as by `f32::max` (they still reach the row's
/// exponentials and so its result).
#[inline(always)]
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

    /// The distance from `got` to the exact `want` in units in the last place of `want`'s f32
    /// neighbourhood (2⁻¹⁴⁹ for subnormal results).
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        let ulp = if w.abs() < f32::MIN_POSITIVE {
            f32::from_bits(1) as f64
        } else {
            (f32::from_bits(w.abs().to_bits() + 1) - w.abs()) as f64
        };
        (got as f64 - want).abs() / ulp
    }

    /// [`exp`] within one unit in the last place of the exact value over every 101st f32 from
    /// −105 to 89 (subnormal results included) and around the ends of its range; +∞ above
    /// ln(f32::MAX), 0 and ±∞ and NaN where they belong; the vector build and the baseline
    /// give the same bits.
    #[test]
    fn exp_is_within_one_ulp() {
        let (lo, hi) = (-105.0f32, 89.0f32);
        let mut xs: Vec<f32> = Vec::new();
        // Negative values run from -0 up to lo in bit order, positive ones from +0 up to hi.
        xs.extend(
            (0..lo.to_bits() - (-0.0f32).to_bits())
                .step_by(101)
                .map(|k| f32::from_bits((-0.0f32).to_bits() + k)),
        );
        xs.extend((0..hi.to_bits()).step_by(101).map(f32::from_bits));
        for e in [88.0f32, 88.72, 88.7228, -87.3, -103.0, -103.97, -104.0] {
            let b = e.to_bits();
            xs.extend((b - 2000..b + 2000).map(f32::from_bits));
        }
        let mut worst = 0.0f64;
        for &x in &xs {
            let want = (x as f64).exp();
            let got = exp(x);
            if want > f32::MAX as f64 {
                assert_eq!(got, f32::INFINITY, "exp({x})");
                continue;
            }
            let u = ulps(got, want);
            worst = worst.max(u);
            assert!(u < 1.0, "exp({x}) = {got}, exactly {want}: {u} ulps");
        }
        assert!(worst > 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(1000.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        use super::super::simd::BASELINE_ONLY;
        use std::sync::atomic::Ordering::Relaxed;
        let run = |baseline: bool| {
            BASELINE_ONLY.store(baseline, Relaxed);
            let mut v = xs.clone();
            softmax_scaled_in_place(&mut v, 0.5);
            let lse = logsumexp_row(&xs);
            (
                v.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
                lse.to_bits(),
            )
        };
        let (wide, base) = (run(false), run(true));
        BASELINE_ONLY.store(false, Relaxed);
        assert!(wide == base, "the vector build and the baseline differ");
    }

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
