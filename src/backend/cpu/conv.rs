//! 2-D convolution by im2col + GEMM, one image per rayon task.
//!
//! `col` layout: `[Cin·k·k, Ho·Wo]`, row `(c·k + ki)·k + kj`, column `oh·Wo + ow`, holding
//! `x[c, oh·s − p + ki, ow·s − p + kj]` (0 outside the image). Then `y[n] = W[Cout, Cin·k·k]·col`.

use rayon::prelude::*;

use super::gemm::sgemm;

/// Static description of one convolution (validated by [`crate::backend::shapes::conv`]).
pub use crate::backend::shapes::ConvGeom as ConvShape;

impl ConvShape {
    fn kdim(&self) -> usize {
        self.cin * self.k * self.k
    }
    /// A 1×1, stride-1, unpadded conv reads the image directly as its `col` matrix.
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }
}

fn im2col(s: &ConvShape, x: &[f32], col: &mut [f32]) {
    let (ho, wo, k) = (s.ho(), s.wo(), s.k);
    for c in 0..s.cin {
        let plane = &x[c * s.h * s.w..(c + 1) * s.h * s.w];
        for ki in 0..k {
            for kj in 0..k {
                let row = &mut col[((c * k + ki) * k + kj) * ho * wo..][..ho * wo];
                for oh in 0..ho {
                    let ih = (oh * s.stride + ki) as isize - s.pad as isize;
                    let dst = &mut row[oh * wo..(oh + 1) * wo];
                    if ih < 0 || ih >= s.h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &plane[ih as usize * s.w..(ih as usize + 1) * s.w];
                    for (ow, d) in dst.iter_mut().enumerate() {
                        let iw = (ow * s.stride + kj) as isize - s.pad as isize;
                        *d = if iw < 0 || iw >= s.w as isize {
                            0.0
                        } else {
                            src[iw as usize]
                        };
                    }
                }
            }
        }
    }
}

/// Adjoint of `im2col`: scatter-adds `col` back into the image gradient `gx` (zeroed by caller).
fn col2im(s: &ConvShape, col: &[f32], gx: &mut [f32]) {
    let (ho, wo, k) = (s.ho(), s.wo(), s.k);
    for c in 0..s.cin {
        let plane = &mut gx[c * s.h * s.w..(c + 1) * s.h * s.w];
        for ki in 0..k {
            for kj in 0..k {
                let row = &col[((c * k + ki) * k + kj) * ho * wo..][..ho * wo];
                for oh in 0..ho {
                    let ih = (oh * s.stride + ki) as isize - s.pad as isize;
                    if ih < 0 || ih >= s.h as isize {
                        continue;
                    }
                    let dst = &mut plane[ih as usize * s.w..(ih as usize + 1) * s.w];
                    for ow in 0..wo {
                        let iw = (ow * s.stride + kj) as isize - s.pad as isize;
                        if iw >= 0 && iw < s.w as isize {
                            dst[iw as usize] += row[oh * wo + ow];
                        }
                    }
                }
            }
        }
    }
}

/// Whether to parallelise over images (true) or inside each GEMM (false).
fn outer_parallel(n: usize) -> bool {
    n >= rayon::current_num_threads()
}

pub fn conv2d_fwd(s: &ConvShape, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    let (howo, kd) = (s.ho() * s.wo(), s.kdim());
    let mut y = vec![0.0f32; s.n * s.cout * howo];
    let xs = s.cin * s.h * s.w;
    let outer = outer_parallel(s.n);
    let body = |(i, yi): (usize, &mut [f32])| {
        let xi = &x[i * xs..(i + 1) * xs];
        if s.is_pointwise() {
            sgemm(s.cout, howo, kd, w, false, xi, false, yi, false, !outer);
        } else {
            let mut col = vec![0.0f32; kd * howo];
            im2col(s, xi, &mut col);
            sgemm(s.cout, howo, kd, w, false, &col, false, yi, false, !outer);
        }
        if let Some(b) = b {
            for (co, row) in yi.chunks_mut(howo).enumerate() {
                row.iter_mut().for_each(|v| *v += b[co]);
            }
        }
    };
    if outer {
        y.par_chunks_mut(s.cout * howo).enumerate().for_each(body);
    } else {
        y.chunks_mut(s.cout * howo).enumerate().for_each(body);
    }
    y
}

/// Returns `(gx, gw, gb)`.
pub fn conv2d_bwd(
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    gy: &[f32],
    need_x: bool,
    has_bias: bool,
) -> (Option<Vec<f32>>, Vec<f32>, Option<Vec<f32>>) {
    let (howo, kd) = (s.ho() * s.wo(), s.kdim());
    let xs = s.cin * s.h * s.w;
    let ys = s.cout * howo;
    let outer = outer_parallel(s.n);
    // Weight gradient: images are split into a fixed number of contiguous groups, each summed
    // into its own buffer, and the buffers are added in order, so the result is deterministic
    // for a given thread count.
    let groups = if outer {
        rayon::current_num_threads().min(s.n).max(1)
    } else {
        1
    };
    let per = s.n.div_ceil(groups);
    let mut gx = if need_x {
        Some(vec![0.0f32; s.n * xs])
    } else {
        None
    };
    let gx_chunks: Vec<Option<&mut [f32]>> = match gx.as_mut() {
        Some(g) => g.chunks_mut(per * xs).map(Some).collect(),
        None => (0..groups).map(|_| None).collect(),
    };
    let partials: Vec<Vec<f32>> = gx_chunks
        .into_par_iter()
        .enumerate()
        .with_max_len(1)
        .map(|(gi, mut gxg)| {
            let mut gw = vec![0.0f32; s.cout * kd];
            let mut col = vec![0.0f32; if s.is_pointwise() { 0 } else { kd * howo }];
            let lo = gi * per;
            let hi = ((gi + 1) * per).min(s.n);
            for i in lo..hi {
                let xi = &x[i * xs..(i + 1) * xs];
                let gyi = &gy[i * ys..(i + 1) * ys];
                let c: &[f32] = if s.is_pointwise() {
                    xi
                } else {
                    im2col(s, xi, &mut col);
                    &col
                };
                sgemm(s.cout, kd, howo, gyi, false, c, true, &mut gw, true, !outer);
                if let Some(g) = gxg.as_deref_mut() {
                    let gxi = &mut g[(i - lo) * xs..(i - lo + 1) * xs];
                    if s.is_pointwise() {
                        sgemm(kd, howo, s.cout, w, true, gyi, false, gxi, false, !outer);
                    } else {
                        let mut gcol = vec![0.0f32; kd * howo];
                        sgemm(
                            kd, howo, s.cout, w, true, gyi, false, &mut gcol, false, !outer,
                        );
                        col2im(s, &gcol, gxi);
                    }
                }
            }
            gw
        })
        .collect();
    let mut gw = vec![0.0f32; s.cout * kd];
    for p in &partials {
        gw.iter_mut().zip(p).for_each(|(a, b)| *a += *b);
    }
    let gb = has_bias.then(|| {
        let mut gb = vec![0.0f64; s.cout];
        for i in 0..s.n {
            for (co, row) in gy[i * ys..(i + 1) * ys].chunks(howo).enumerate() {
                gb[co] += row.iter().map(|&v| v as f64).sum::<f64>();
            }
        }
        gb.into_iter().map(|v| v as f32).collect()
    });
    (gx, gw, gb)
}
