//! 2-D convolution by im2col + GEMM over groups of images.
//!
//! The batch is split into a fixed number of contiguous groups (one per rayon thread); each group
//! is processed in chunks of `nb` images whose `col` matrices sit side by side in one
//! `[Cin·k·k, nb·Ho·Wo]` matrix: row `(c·k + ki)·k + kj`, column `j·Ho·Wo + oh·Wo + ow` holding
//! `x[j, c, oh·s − p + ki, ow·s − p + kj]` (0 outside the image). One GEMM per chunk then computes
//! `Y' [Cout, nb·Ho·Wo] = W·col`, which is copied back to NCHW. The group split depends only on the
//! thread count, so results are deterministic for a given thread count.

use rayon::prelude::*;

use super::elementwise::{par_fill, sum8};
use super::gemm::{sgemm, sgemm_uninit};
use super::scratch;

/// Static description of one convolution (validated by [`crate::backend::shapes::conv`]).
pub use crate::backend::shapes::ConvGeom as ConvShape;

/// Upper bound (in floats) on one chunk's `col` matrix per 16 output channels: 256 KiB for a
/// 16-channel layer, so that the block written by im2col is still in the core's L2 cache when a
/// GEMM with few rows (each packed `col` element is used only `Cout` times) reads it; layers with
/// more output channels reuse each element more and get proportionally larger chunks, which keeps
/// the GEMM from becoming skinny on deep layers with few pixels per image (layer4 at 28 px has 16).
/// Measured on the DSRPGC step: 2 Mi-float chunks for every layer made width 16 about 30 % slower,
/// a flat 128 Ki-float limit made width 64 slower (layer4 GEMMs 16 columns wide).
const COL_LIMIT: usize = 1 << 16;

impl ConvShape {
    fn kdim(&self) -> usize {
        self.cin * self.k * self.k
    }
    /// Images per chunk.
    fn chunk(&self) -> usize {
        let limit = COL_LIMIT * (self.cout / 16).max(1);
        (limit / (self.kdim() * self.ho() * self.wo()).max(1)).max(1)
    }
}

/// Contiguous image ranges, one per group (fixed for a given thread count).
fn groups(n: usize) -> Vec<(usize, usize)> {
    let g = rayon::current_num_threads().min(n).max(1);
    let per = n.div_ceil(g);
    (0..g)
        .map(|i| (i * per, ((i + 1) * per).min(n)))
        .filter(|(lo, hi)| lo < hi)
        .collect()
}

/// Copies a short row without a call into `memmove` (im2col rows are 4–56 floats long at the
/// model's sizes, where the call overhead outweighs the copy).
#[inline(always)]
fn copy_row(dst: &mut [f32], src: &[f32]) {
    let n = dst.len();
    let src = &src[..n];
    let mut i = 0;
    while i + 8 <= n {
        let d: &mut [f32; 8] = (&mut dst[i..i + 8]).try_into().unwrap();
        let s: &[f32; 8] = src[i..i + 8].try_into().unwrap();
        *d = *s;
        i += 8;
    }
    if i + 4 <= n {
        let d: &mut [f32; 4] = (&mut dst[i..i + 4]).try_into().unwrap();
        let s: &[f32; 4] = src[i..i + 4].try_into().unwrap();
        *d = *s;
        i += 4;
    }
    if i + 2 <= n {
        dst[i] = src[i];
        dst[i + 1] = src[i + 1];
        i += 2;
    }
    if i < n {
        dst[i] = src[i];
    }
}

/// Writes the col block of a zero-padded image `xp [Cin, h+2p, w+2p]` into `col` (rows `ld`
/// apart): no bounds tests, and contiguous copies when the stride is 1.
fn im2col_padded(s: &ConvShape, xp: &[f32], col: &mut [f32], ld: usize) {
    let (ho, wo, k, st) = (s.ho(), s.wo(), s.k, s.stride);
    let (hp, wp) = (s.h + 2 * s.pad, s.w + 2 * s.pad);
    for c in 0..s.cin {
        let plane = &xp[c * hp * wp..(c + 1) * hp * wp];
        for ki in 0..k {
            for kj in 0..k {
                let row = &mut col[((c * k + ki) * k + kj) * ld..][..ho * wo];
                for (oh, dst) in row.chunks_exact_mut(wo).enumerate() {
                    let src = &plane[(oh * st + ki) * wp + kj..];
                    if st == 1 {
                        copy_row(dst, src);
                    } else {
                        dst.iter_mut()
                            .zip(src.iter().step_by(st))
                            .for_each(|(d, v)| *d = *v);
                    }
                }
            }
        }
    }
}

/// Adjoint of `im2col_padded`: adds `col` (rows `ld` apart) into the padded gradient `gxp`.
fn col2im_padded(s: &ConvShape, col: &[f32], ld: usize, gxp: &mut [f32]) {
    let (ho, wo, k, st) = (s.ho(), s.wo(), s.k, s.stride);
    let (hp, wp) = (s.h + 2 * s.pad, s.w + 2 * s.pad);
    for c in 0..s.cin {
        let plane = &mut gxp[c * hp * wp..(c + 1) * hp * wp];
        for ki in 0..k {
            for kj in 0..k {
                let row = &col[((c * k + ki) * k + kj) * ld..][..ho * wo];
                for (oh, src) in row.chunks_exact(wo).enumerate() {
                    let dst = &mut plane[(oh * st + ki) * wp + kj..];
                    if st == 1 {
                        dst[..wo].iter_mut().zip(src).for_each(|(d, v)| *d += *v);
                    } else {
                        dst.iter_mut()
                            .step_by(st)
                            .zip(src)
                            .for_each(|(d, v)| *d += *v);
                    }
                }
            }
        }
    }
}

/// Copies image `x [Cin, h, w]` into the interior of `xp [Cin, h+2p, w+2p]` (borders untouched).
fn pad_into(s: &ConvShape, x: &[f32], xp: &mut [f32]) {
    let (hp, wp, p) = (s.h + 2 * s.pad, s.w + 2 * s.pad, s.pad);
    for c in 0..s.cin {
        for ih in 0..s.h {
            xp[(c * hp + ih + p) * wp + p..][..s.w]
                .copy_from_slice(&x[(c * s.h + ih) * s.w..][..s.w]);
        }
    }
}

/// Fills `col [kd, nb·howo]` with the col blocks of images `lo..lo+nb`. `xp` is a scratch
/// padded image whose borders are zero.
fn build_col(s: &ConvShape, x: &[f32], lo: usize, nb: usize, col: &mut [f32], xp: &mut [f32]) {
    let (xs, howo) = (s.cin * s.h * s.w, s.ho() * s.wo());
    let ld = nb * howo;
    for j in 0..nb {
        let i = lo + j;
        let xi = &x[i * xs..(i + 1) * xs];
        if s.pad == 0 {
            im2col_padded(s, xi, &mut col[j * howo..], ld);
        } else {
            pad_into(s, xi, xp);
            im2col_padded(s, xp, &mut col[j * howo..], ld);
        }
    }
}

/// Size of the padded scratch image (0 when unpadded).
fn padded_len(s: &ConvShape) -> usize {
    if s.pad == 0 {
        0
    } else {
        s.cin * (s.h + 2 * s.pad) * (s.w + 2 * s.pad)
    }
}

/// Whether the convolution is pointwise (1×1, stride 1, no padding): then each image `[Cin, HW]`
/// already is its own im2col block and every product runs on the tensors in place.
fn pointwise(s: &ConvShape) -> bool {
    s.k == 1 && s.stride == 1 && s.pad == 0
}

pub fn conv2d_fwd(s: &ConvShape, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    let (howo, kd) = (s.ho() * s.wo(), s.kdim());
    let ys = s.cout * howo;
    if s.n * ys == 0 {
        return vec![0.0f32; s.n * ys];
    }
    if pointwise(s) {
        return pointwise_fwd(s, x, w, b);
    }
    let gr = groups(s.n);
    let per = gr[0].1 - gr[0].0;
    let chunk = s.chunk();
    // SAFETY: output chunk `g` is group `g`'s images `glo..ghi`; every chunk of images is copied
    // out of `yt` in full (all `nb` images, all `Cout·howo` values of each).
    unsafe {
        par_fill(s.n * ys, per * ys, |gi, yg| {
            let (glo, ghi) = gr[gi];
            let cap = chunk.min(ghi - glo);
            let mut col = scratch::take(kd * cap * howo);
            let mut xp = scratch::take(padded_len(s));
            xp[..padded_len(s)].fill(0.0);
            let mut yt = scratch::take(s.cout * cap * howo);
            let mut lo = glo;
            while lo < ghi {
                let nb = cap.min(ghi - lo);
                let ld = nb * howo;
                build_col(s, x, lo, nb, &mut col[..kd * ld], &mut xp);
                sgemm(
                    s.cout,
                    ld,
                    kd,
                    w,
                    false,
                    &col[..kd * ld],
                    false,
                    &mut yt[..s.cout * ld],
                    false,
                    false,
                );
                for j in 0..nb {
                    let yi = &mut yg[(lo - glo + j) * ys..(lo - glo + j + 1) * ys];
                    for (co, row) in yi.chunks_mut(howo).enumerate() {
                        let src = &yt[co * ld + j * howo..][..howo];
                        let bias = b.map_or(0.0, |b| b[co]);
                        row.iter_mut().zip(src).for_each(|(d, v)| {
                            d.write(*v + bias);
                        });
                    }
                }
                lo += nb;
            }
            scratch::give(col);
            scratch::give(xp);
            scratch::give(yt);
        })
    }
}

/// Pointwise forward: `y_i [Cout, HW] = W [Cout, Cin] · x_i [Cin, HW] (+ b)`, one GEMM per image
/// written straight into the output.
fn pointwise_fwd(s: &ConvShape, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    let hw = s.h * s.w;
    let (xs, ys) = (s.cin * hw, s.cout * hw);
    // SAFETY: chunk `i` is image `i`'s output; without a bias the GEMM writes all of it, with a
    // bias every row is first set to the bias and the GEMM then accumulates into it.
    unsafe {
        par_fill(s.n * ys, ys, |i, yi| {
            let xi = &x[i * xs..(i + 1) * xs];
            match b {
                None => sgemm_uninit(s.cout, hw, s.cin, w, false, xi, false, yi, false),
                Some(b) => {
                    for (row, bv) in yi.chunks_mut(hw).zip(b) {
                        row.iter_mut().for_each(|v| {
                            v.write(*bv);
                        });
                    }
                    // SAFETY: every element was just initialised.
                    let yi = &mut *(yi as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]);
                    sgemm(s.cout, hw, s.cin, w, false, xi, false, yi, true, false);
                }
            }
        })
    }
}

/// Per-channel sums of `gy [N, Cout, HW]` (the bias gradient), accumulated in f64.
fn bias_grad(gy: &[f32], n: usize, cout: usize, hw: usize) -> Vec<f32> {
    (0..cout)
        .into_par_iter()
        .map(|co| {
            (0..n)
                .map(|i| sum8(&gy[(i * cout + co) * hw..][..hw], |v| v as f64))
                .sum::<f64>() as f32
        })
        .collect()
}

/// The per-group weight gradients added in group order (so the result depends only on the
/// thread count, not on timing).
fn sum_partials(partials: &[Vec<f32>], len: usize) -> Vec<f32> {
    let mut gw = vec![0.0f32; len];
    for p in partials {
        gw.iter_mut().zip(p).for_each(|(a, b)| *a += *b);
    }
    gw
}

/// Pointwise backward: `gx_i = Wᵀ·gy_i` straight into the output, `gW = Σ_i gy_i·x_iᵀ` summed per
/// group of images (groups fixed by the thread count, added in order).
fn pointwise_bwd(
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    gy: &[f32],
    need_x: bool,
    has_bias: bool,
) -> (Option<Vec<f32>>, Vec<f32>, Option<Vec<f32>>) {
    let hw = s.h * s.w;
    let (xs, ys) = (s.cin * hw, s.cout * hw);
    let gx = need_x.then(|| {
        // SAFETY: the GEMM writes all of chunk `i` (image `i`'s input gradient).
        unsafe {
            par_fill(s.n * xs, xs, |i, gxi| {
                let gyi = &gy[i * ys..(i + 1) * ys];
                sgemm_uninit(s.cin, hw, s.cout, w, true, gyi, false, gxi, false);
            })
        }
    });
    let partials: Vec<Vec<f32>> = groups(s.n)
        .into_par_iter()
        .with_max_len(1)
        .map(|(lo, hi)| {
            let mut gw = vec![0.0f32; s.cout * s.cin];
            for i in lo..hi {
                let (gyi, xi) = (&gy[i * ys..(i + 1) * ys], &x[i * xs..(i + 1) * xs]);
                sgemm(
                    s.cout,
                    s.cin,
                    hw,
                    gyi,
                    false,
                    xi,
                    true,
                    &mut gw,
                    i > lo,
                    false,
                );
            }
            gw
        })
        .collect();
    let gw = sum_partials(&partials, s.cout * s.cin);
    let gb = has_bias.then(|| bias_grad(gy, s.n, s.cout, hw));
    (gx, gw, gb)
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
    if s.n == 0 || ys == 0 || xs == 0 {
        let gb = has_bias.then(|| vec![0.0f32; s.cout]);
        return (
            need_x.then(|| vec![0.0f32; s.n * xs]),
            vec![0.0f32; s.cout * kd],
            gb,
        );
    }
    if pointwise(s) {
        return pointwise_bwd(s, x, w, gy, need_x, has_bias);
    }
    let gr = groups(s.n);
    let per = gr[0].1 - gr[0].0;
    let chunk = s.chunk();
    let mut gx = if need_x {
        Some(vec![0.0f32; s.n * xs])
    } else {
        None
    };
    let gx_chunks: Vec<Option<&mut [f32]>> = match gx.as_mut() {
        Some(g) => g.chunks_mut(per * xs).map(Some).collect(),
        None => (0..gr.len()).map(|_| None).collect(),
    };
    // Each group sums its weight gradient into its own buffer; the buffers are added in order.
    let partials: Vec<Vec<f32>> = gx_chunks
        .into_par_iter()
        .zip(gr.par_iter())
        .with_max_len(1)
        .map(|(mut gxg, &(glo, ghi))| {
            let mut gw = vec![0.0f32; s.cout * kd];
            let cap = chunk.min(ghi - glo);
            let mut col = scratch::take(kd * cap * howo);
            let mut xp = scratch::take(padded_len(s));
            xp[..padded_len(s)].fill(0.0);
            let mut gxp = scratch::take(if need_x { padded_len(s) } else { 0 });
            let mut gyt = scratch::take(s.cout * cap * howo);
            let mut lo = glo;
            let mut first = true;
            while lo < ghi {
                let nb = cap.min(ghi - lo);
                let ld = nb * howo;
                // gY' [Cout, nb·howo].
                for j in 0..nb {
                    let gyi = &gy[(lo + j) * ys..(lo + j + 1) * ys];
                    for (co, row) in gyi.chunks(howo).enumerate() {
                        gyt[co * ld + j * howo..][..howo].copy_from_slice(row);
                    }
                }
                build_col(s, x, lo, nb, &mut col[..kd * ld], &mut xp);
                sgemm(
                    s.cout,
                    kd,
                    ld,
                    &gyt[..s.cout * ld],
                    false,
                    &col[..kd * ld],
                    true,
                    &mut gw,
                    !first,
                    false,
                );
                first = false;
                if let Some(g) = gxg.as_deref_mut() {
                    // Reuse `col` for gcol = Wᵀ·gY'.
                    sgemm(
                        kd,
                        ld,
                        s.cout,
                        w,
                        true,
                        &gyt[..s.cout * ld],
                        false,
                        &mut col[..kd * ld],
                        false,
                        false,
                    );
                    for j in 0..nb {
                        let gxi = &mut g[(lo - glo + j) * xs..(lo - glo + j + 1) * xs];
                        if s.pad == 0 {
                            col2im_padded(s, &col[j * howo..], ld, gxi);
                        } else {
                            gxp[..padded_len(s)].fill(0.0);
                            col2im_padded(s, &col[j * howo..], ld, &mut gxp);
                            let (hp, wp, p) = (s.h + 2 * s.pad, s.w + 2 * s.pad, s.pad);
                            for c in 0..s.cin {
                                for ih in 0..s.h {
                                    gxi[(c * s.h + ih) * s.w..][..s.w]
                                        .copy_from_slice(&gxp[(c * hp + ih + p) * wp + p..][..s.w]);
                                }
                            }
                        }
                    }
                }
                lo += nb;
            }
            scratch::give(col);
            scratch::give(xp);
            scratch::give(gxp);
            scratch::give(gyt);
            gw
        })
        .collect();
    let gw = sum_partials(&partials, s.cout * kd);
    let gb = has_bias.then(|| bias_grad(gy, s.n, s.cout, howo));
    (gx, gw, gb)
}
