//! 2-D convolution by im2col + GEMM over chunks of images. Pointwise layers (1×1, stride 1)
//! skip im2col (one GEMM per image on the tensors in place), and 3×3 stride-1 padding-1 layers
//! go to [`super::winograd`] when they have enough channels or to the direct kernel
//! (`cpu/direct.rs`) when they have few on wide maps (see [`Algo`], chosen by `MEDSSL_CPU_CONV`).
//!
//! The batch is cut into contiguous chunks of `nb` images whose `col` matrices sit side by side
//! in one `[Cin·k·k, nb·Ho·Wo]` matrix: row `(c·k + ki)·k + kj`, column `j·Ho·Wo + oh·Wo + ow`
//! holding `x[j, c, oh·s − p + ki, ow·s − p + kj]` (0 outside the image). One GEMM per chunk then
//! computes `Y' [Cout, nb·Ho·Wo] = W·col`, which is copied back to NCHW. The chunks run in
//! parallel. The weight gradient sums over the batch: runs of consecutive chunks ("parts") each
//! sum into their own buffer, and the buffers are added in part order.
//!
//! Chunks and parts are fixed by the layer's shape alone, never by the number of threads, so
//! every GEMM has the same shape whatever the thread count; as the GEMM's own summation order
//! depends only on its shape (and the CPU model), results are bit-for-bit the same on 1 thread
//! or 64.

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use rayon::prelude::*;

use super::elementwise::{par_fill, sum8, CHUNK};
use super::gemm::{sgemm, sgemm_uninit};
use super::scratch;
use super::{direct, winograd};

/// The CPU convolution algorithm chosen by `MEDSSL_CPU_CONV` for the 3×3 stride-1 padding-1
/// layers (pointwise layers always take their own GEMM path, the other layers im2col + GEMM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    /// Unset or `auto`: Winograd for the layers with many channels (`winograd::auto`: at least
    /// 64 input and output channels and 2²⁸ multiply-adds), the direct kernel for those with few
    /// on wide maps (`direct::auto`: 8 to 32 channels, at least 14 columns, a CPU with
    /// AVX-512), im2col + GEMM for the others.
    Auto,
    /// `im2col`: im2col + GEMM for every layer.
    Im2col,
    /// `winograd`: Winograd for every 3×3 stride-1 padding-1 layer, whatever its channels.
    Winograd,
    /// `direct`: the direct kernel for every 3×3 stride-1 padding-1 layer.
    Direct,
}

impl Algo {
    /// The value of `MEDSSL_CPU_CONV` that selects it.
    pub fn name(self) -> &'static str {
        match self {
            Algo::Auto => "auto",
            Algo::Im2col => "im2col",
            Algo::Winograd => "winograd",
            Algo::Direct => "direct",
        }
    }
}

/// Parses a `MEDSSL_CPU_CONV` value (`None`: unset).
pub fn parse_algo(v: Option<&str>) -> Result<Algo, String> {
    match v {
        None | Some("") | Some("auto") => Ok(Algo::Auto),
        Some("im2col") => Ok(Algo::Im2col),
        Some("winograd") => Ok(Algo::Winograd),
        Some("direct") => Ok(Algo::Direct),
        Some(other) => Err(format!(
            "MEDSSL_CPU_CONV='{other}' is not a CPU convolution algorithm (auto, im2col, \
             winograd or direct)"
        )),
    }
}

/// Every algorithm, in the order of [`OVERRIDE`]'s codes.
const ALGOS: [Algo; 4] = [Algo::Auto, Algo::Im2col, Algo::Winograd, Algo::Direct];

/// The algorithm [`set_algo`] put in place of `MEDSSL_CPU_CONV`: 0 none, else `1 +` its index in
/// [`ALGOS`].
static OVERRIDE: AtomicU8 = AtomicU8::new(0);

/// The algorithm in force: the one [`set_algo`] set, else `MEDSSL_CPU_CONV`, read once (the
/// binaries report an invalid value with [`super::check_env`] before any work; here it falls
/// back to `auto`).
pub fn algo() -> Algo {
    static ENV: OnceLock<Algo> = OnceLock::new();
    match OVERRIDE.load(Ordering::Relaxed) {
        0 => *ENV.get_or_init(|| {
            let v = std::env::var("MEDSSL_CPU_CONV").ok();
            parse_algo(v.as_deref()).unwrap_or(Algo::Auto)
        }),
        n => ALGOS[usize::from(n) - 1],
    }
}

/// Puts `a` in place of `MEDSSL_CPU_CONV` for every later convolution of this process (`None`:
/// back to the variable). For benchmarks that compare the algorithms side by side in one process
/// (`medssl-bench ops --cpu-conv`); training never calls it, since the algorithms round
/// differently.
pub fn set_algo(a: Option<Algo>) {
    let code = a.map_or(0, |a| {
        1 + ALGOS
            .iter()
            .position(|x| *x == a)
            .expect("every algorithm is listed") as u8
    });
    OVERRIDE.store(code, Ordering::Relaxed);
}

/// How a convolution is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Pointwise,
    Winograd,
    Direct,
    Im2col,
}

/// The path [`conv2d_fwd`] and [`conv2d_bwd`] take for a shape, under [`algo`].
fn path(s: &ConvShape) -> Path {
    choose(s, algo(), super::simd::cpu_has_avx512())
}

/// The name of the path the CPU backend takes for a convolution of shape `s` on this CPU under
/// `MEDSSL_CPU_CONV`: `pointwise` (1×1 stride-1, one GEMM per image), `winograd`, `direct` or
/// `im2col` (`medssl-bench ops` reports it per convolution row as `cpu_path`).
pub fn path_name(s: &ConvShape) -> &'static str {
    match path(s) {
        Path::Pointwise => "pointwise",
        Path::Winograd => "winograd",
        Path::Direct => "direct",
        Path::Im2col => "im2col",
    }
}

/// The path for a shape under `algo` on a CPU with or without AVX-512.
fn choose(s: &ConvShape, algo: Algo, avx512: bool) -> Path {
    if pointwise(s) {
        return Path::Pointwise;
    }
    if !(s.k == 3 && s.stride == 1 && s.pad == 1) {
        return Path::Im2col;
    }
    match algo {
        Algo::Auto if winograd::auto(s) => Path::Winograd,
        Algo::Auto if avx512 && direct::auto(s) => Path::Direct,
        Algo::Auto | Algo::Im2col => Path::Im2col,
        Algo::Winograd => Path::Winograd,
        Algo::Direct => Path::Direct,
    }
}

/// Static description of one convolution (validated by [`crate::backend::shapes::conv`]).
pub use crate::backend::shapes::ConvGeom as ConvShape;

/// A backward pass's `(gx, gw, gb)`: the input gradient when asked for, the weight gradient,
/// the bias gradient when the layer has a bias.
pub type Grads = (Option<Vec<f32>>, Vec<f32>, Option<Vec<f32>>);

/// Upper bound (in floats) on one chunk's `col` matrix per 16 output channels: 256 KiB for a
/// 16-channel layer, so that the block written by im2col is still in the core's L2 cache when a
/// GEMM with few rows (each packed `col` element is used only `Cout` times) reads it; layers with
/// more output channels reuse each element more and get proportionally larger chunks, which keeps
/// the GEMM from becoming skinny on deep layers with few pixels per image (layer4 at 28 px has 16).
/// Measured on the DSRPGC step: 2 Mi-float chunks for every layer made width 16 about 30 % slower,
/// a flat 128 Ki-float limit made width 64 slower (layer4 GEMMs 16 columns wide).
const COL_LIMIT: usize = 1 << 16;

/// Most parts the batch is cut into for the weight gradient: each part needs its own
/// `Cout × Cin·k·k` buffer, so this bounds the extra memory whatever the batch or core count.
pub(super) const MAX_PARTS: usize = 16;

/// Fewest chunks a batch is cut into, so that a few threads find work side by side even on
/// layers whose whole batch would fit in one chunk.
const MIN_CHUNKS: usize = 4;

impl ConvShape {
    fn kdim(&self) -> usize {
        self.cin * self.k * self.k
    }
    /// Most images per chunk.
    fn chunk(&self) -> usize {
        let limit = COL_LIMIT * (self.cout / 16).max(1);
        (limit / (self.kdim() * self.ho() * self.wo()).max(1)).max(1)
    }
    /// The batch's chunks, of near-equal length: as few as [`Self::chunk`] allows, but at least
    /// [`MIN_CHUNKS`] (when there are that many images).
    fn chunks(&self) -> Vec<Range<usize>> {
        let k = self.n.div_ceil(self.chunk()).max(MIN_CHUNKS);
        split(self.n, k)
    }
}

/// `0..n` cut into at most `k` contiguous ranges of `⌈n/k⌉` items each (the last one may be
/// shorter): equal lengths, so the ranges line up with equal chunks of an output buffer.
pub(super) fn split(n: usize, k: usize) -> Vec<Range<usize>> {
    let len = n.div_ceil(k.max(1)).max(1);
    (0..n)
        .step_by(len)
        .map(|lo| lo..(lo + len).min(n))
        .collect()
}

/// Whether the work inside each of `tasks` parallel items (its GEMMs, im2col and copies) should
/// itself use the thread pool: when there are fewer items than threads. This changes only who
/// computes what, never the arithmetic.
pub(super) fn inner_parallel(tasks: usize) -> bool {
    tasks < rayon::current_num_threads()
}

/// Copies a short row without a call into `memmove` (im2col rows are 4–56 floats long at the
/// model's sizes, where the call overhead outweighs the copy).
#[inline(always)]
pub(super) fn copy_row(dst: &mut [f32], src: &[f32]) {
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

/// [`im2col_padded`] for an output width and stride fixed at compile time: at stride 1 the
/// model's wide feature maps (28 and 14 at 28 px; 56 and 112 at larger sizes), each output row's
/// segment a straight-line vector copy, without the per-segment loop and tests of [`copy_row`]
/// (im2col was bound by them, not by memory: width 16's first two stages at batch 48 1.07–1.12×
/// faster with it; the 7- and 4-wide maps of the last stages were no faster); at stride 2 the
/// downsampling layers' outputs (28, 14, 7 and 4 wide; 56 at larger sizes), each segment an
/// unrolled gather of every second element instead of a strided iterator (width 16's strided
/// layers at batch 48 1.2–1.37× faster forward and 1.1–1.37× backward with the same in
/// [`col2im_fixed`], alternating within one process). Returns false, writing nothing, for other
/// widths and strides.
///
/// # Safety
/// As [`im2col_padded`].
unsafe fn im2col_fixed(s: &ConvShape, xp: &[f32], col: ImageColumns, j: usize) -> bool {
    unsafe fn nest<const W: usize, const S: usize>(
        s: &ConvShape,
        xp: &[f32],
        col: ImageColumns,
        j: usize,
    ) {
        let (k, hp, wp) = (s.k, s.h + 2 * s.pad, s.w + 2 * s.pad);
        for c in 0..s.cin {
            let plane = &xp[c * hp * wp..(c + 1) * hp * wp];
            for ki in 0..k {
                for kj in 0..k {
                    // SAFETY: image `j`'s own columns, by the caller's guarantee.
                    let row = unsafe { col.row(j, (c * k + ki) * k + kj) };
                    for (oh, d) in row.chunks_exact_mut(W).enumerate() {
                        let src = &plane[(oh * S + ki) * wp + kj..][..(W - 1) * S + 1];
                        let d: &mut [f32; W] = d.try_into().unwrap();
                        *d = std::array::from_fn(|i| src[i * S]);
                    }
                }
            }
        }
    }
    // SAFETY: the caller's guarantee, passed on.
    unsafe {
        match (s.stride, s.wo()) {
            (1, 14) => nest::<14, 1>(s, xp, col, j),
            (1, 28) => nest::<28, 1>(s, xp, col, j),
            (1, 56) => nest::<56, 1>(s, xp, col, j),
            (1, 112) => nest::<112, 1>(s, xp, col, j),
            (2, 4) => nest::<4, 2>(s, xp, col, j),
            (2, 7) => nest::<7, 2>(s, xp, col, j),
            (2, 14) => nest::<14, 2>(s, xp, col, j),
            (2, 28) => nest::<28, 2>(s, xp, col, j),
            (2, 56) => nest::<56, 2>(s, xp, col, j),
            _ => return false,
        }
    }
    true
}

/// A matrix of `rows` rows `ld` floats apart whose column blocks (one per image, `width` wide)
/// several threads fill at once, each thread its own images.
#[derive(Clone, Copy)]
pub(super) struct ImageColumns {
    ptr: *mut f32,
    rows: usize,
    ld: usize,
    width: usize,
}

// SAFETY: an `ImageColumns` is only used while the matrix it points into is exclusively borrowed
// (see `ImageColumns::new`), and each thread writes only the column block of its own images.
unsafe impl Send for ImageColumns {}
unsafe impl Sync for ImageColumns {}

impl ImageColumns {
    /// Column blocks `width` wide in `m`, which holds `rows` rows `ld` apart.
    pub(super) fn new(m: &mut [f32], rows: usize, ld: usize, width: usize) -> Self {
        assert!(m.len() >= rows * ld && width > 0 && ld.is_multiple_of(width));
        ImageColumns {
            ptr: m.as_mut_ptr(),
            rows,
            ld,
            width,
        }
    }

    /// Row `r` of image `j`'s column block.
    ///
    /// # Safety
    /// The matrix must still be borrowed by whoever made `self`, and no two live slices may be
    /// for the same `(j, r)`.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn row(&self, j: usize, r: usize) -> &mut [f32] {
        assert!(r < self.rows && (j + 1) * self.width <= self.ld);
        // SAFETY: in bounds by the assert and `new`; exclusive by the caller's guarantee.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.add(r * self.ld + j * self.width), self.width)
        }
    }
}

/// Writes the col block of image `j`, given zero-padded as `xp [Cin, h+2p, w+2p]`, into its
/// columns of `col`: no bounds tests, and contiguous copies when the stride is 1.
///
/// # Safety
/// No other thread may be writing image `j`'s columns of `col`.
unsafe fn im2col_padded(s: &ConvShape, xp: &[f32], col: ImageColumns, j: usize) {
    let (wo, k, st) = (s.wo(), s.k, s.stride);
    let (hp, wp) = (s.h + 2 * s.pad, s.w + 2 * s.pad);
    for c in 0..s.cin {
        let plane = &xp[c * hp * wp..(c + 1) * hp * wp];
        for ki in 0..k {
            for kj in 0..k {
                // SAFETY: image `j`'s own columns, by the caller's guarantee.
                let row = unsafe { col.row(j, (c * k + ki) * k + kj) };
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

/// [`col2im_fixed`] where it applies, else [`col2im_padded`].
fn col2im(s: &ConvShape, col: &[f32], ld: usize, gxp: &mut [f32]) {
    if !col2im_fixed(s, col, ld, gxp) {
        col2im_padded(s, col, ld, gxp);
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

/// [`col2im_padded`] for an output width and stride fixed at compile time (at stride 1 7, 14,
/// 28, 56 or 112 wide; at stride 2 4, 7, 14, 28 or 56): straight-line vector adds per output
/// row's segment at stride 1 (width 16's 3×3 backward at batch 48 1.07–1.12× faster for the first
/// three stages), unrolled adds to every second element at stride 2, as [`im2col_fixed`]; each
/// element receives its terms in the same order as in [`col2im_padded`]. Returns false, adding
/// nothing, for other widths and strides.
fn col2im_fixed(s: &ConvShape, col: &[f32], ld: usize, gxp: &mut [f32]) -> bool {
    fn nest<const W: usize, const S: usize>(
        s: &ConvShape,
        col: &[f32],
        ld: usize,
        gxp: &mut [f32],
    ) {
        let (ho, k, hp, wp) = (s.ho(), s.k, s.h + 2 * s.pad, s.w + 2 * s.pad);
        for c in 0..s.cin {
            let plane = &mut gxp[c * hp * wp..(c + 1) * hp * wp];
            for ki in 0..k {
                for kj in 0..k {
                    let row = &col[((c * k + ki) * k + kj) * ld..][..ho * W];
                    for (oh, src) in row.chunks_exact(W).enumerate() {
                        let d = &mut plane[(oh * S + ki) * wp + kj..][..(W - 1) * S + 1];
                        let src: &[f32; W] = src.try_into().unwrap();
                        for (i, v) in src.iter().enumerate() {
                            d[i * S] += *v;
                        }
                    }
                }
            }
        }
    }
    match (s.stride, s.wo()) {
        (1, 7) => nest::<7, 1>(s, col, ld, gxp),
        (1, 14) => nest::<14, 1>(s, col, ld, gxp),
        (1, 28) => nest::<28, 1>(s, col, ld, gxp),
        (1, 56) => nest::<56, 1>(s, col, ld, gxp),
        (1, 112) => nest::<112, 1>(s, col, ld, gxp),
        (2, 4) => nest::<4, 2>(s, col, ld, gxp),
        (2, 7) => nest::<7, 2>(s, col, ld, gxp),
        (2, 14) => nest::<14, 2>(s, col, ld, gxp),
        (2, 28) => nest::<28, 2>(s, col, ld, gxp),
        (2, 56) => nest::<56, 2>(s, col, ld, gxp),
        _ => return false,
    }
    true
}

/// A scratch padded image with zero borders (empty when the convolution is unpadded).
fn padded_scratch(s: &ConvShape) -> Vec<f32> {
    let mut xp = scratch::take(padded_len(s));
    xp[..padded_len(s)].fill(0.0);
    xp
}

/// Fills `col [kd, nb·howo]` with the col blocks of images `lo..lo+nb`, the images in parallel
/// when `par`. `xp` is a scratch padded image whose borders are zero (for the serial loop).
fn build_col(
    s: &ConvShape,
    x: &[f32],
    (lo, nb): (usize, usize),
    col: &mut [f32],
    xp: &mut [f32],
    par: bool,
) {
    let (xs, howo) = (s.cin * s.h * s.w, s.ho() * s.wo());
    let cols = ImageColumns::new(col, s.kdim(), nb * howo, howo);
    for_images(s, vec![(); nb], par, xp, |xp, j, ()| {
        let xi = &x[(lo + j) * xs..(lo + j + 1) * xs];
        let src = if s.pad == 0 {
            xi
        } else {
            pad_into(s, xi, xp);
            &xp[..]
        };
        // SAFETY: image `j` is handled by this call alone.
        unsafe {
            if !im2col_fixed(s, src, cols, j) {
                im2col_padded(s, src, cols, j);
            }
        }
    });
}

/// Calls `f(xp, j, items[j])` for the images `j` of a chunk: in parallel when `par` (each rayon
/// job with its own padded scratch image, borders zero), else in order with `xp`.
fn for_images<I: Send>(
    s: &ConvShape,
    items: Vec<I>,
    par: bool,
    xp: &mut [f32],
    f: impl Fn(&mut [f32], usize, I) + Sync + Send,
) {
    if par {
        items.into_par_iter().enumerate().for_each_init(
            || scratch::Taken(padded_scratch(s)),
            |xp, (j, item)| f(&mut xp.0, j, item),
        );
    } else {
        for (j, item) in items.into_iter().enumerate() {
            f(xp, j, item);
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

/// The forward convolution `y [N, Cout, Ho, Wo]` (+ bias) on the shape's path: pointwise
/// layers as one GEMM per image, 3×3 stride-1 layers by Winograd or the direct kernel, the others
/// by im2col.
pub fn conv2d_fwd(s: &ConvShape, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    let ys = s.cout * s.ho() * s.wo();
    if s.n * ys == 0 {
        return vec![0.0f32; s.n * ys];
    }
    match path(s) {
        Path::Pointwise => pointwise_fwd(s, x, w, b),
        Path::Winograd => winograd::forward(s, x, w, b),
        Path::Direct => direct::forward(s, x, w, b),
        Path::Im2col => im2col_fwd(s, x, w, b),
    }
}

/// The forward convolution by im2col + GEMM over chunks of images (a shape with outputs).
fn im2col_fwd(s: &ConvShape, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    let (howo, kd) = (s.ho() * s.wo(), s.kdim());
    let ys = s.cout * howo;
    let chunks = s.chunks();
    let par = inner_parallel(chunks.len());
    // SAFETY: output chunk `c` is the images of `chunks[c]` (all of equal length but the last);
    // each of its images is copied out of `yt` in full (all `Cout·howo` values), or for a
    // single image written whole by `image_gemm`.
    unsafe {
        par_fill(s.n * ys, chunks[0].len() * ys, |c, yc| {
            let (lo, nb) = (chunks[c].start, chunks[c].len());
            let ld = nb * howo;
            let mut col = scratch::take(kd * ld);
            let mut xp = padded_scratch(s);
            build_col(s, x, (lo, nb), &mut col[..kd * ld], &mut xp, par);
            if nb == 1 {
                // The image's output is the product itself: no copy.
                image_gemm(yc, w, &col[..kd * ld], (s.cout, ld, kd), b, par);
                scratch::give(col);
                scratch::give(xp);
                return;
            }
            let mut yt = scratch::take(s.cout * ld);
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
                par,
            );
            let copy_out = |(j, yi): (usize, &mut [MaybeUninit<f32>])| {
                for (co, row) in yi.chunks_mut(howo).enumerate() {
                    let src = &yt[co * ld + j * howo..][..howo];
                    let bias = b.map_or(0.0, |b| b[co]);
                    row.iter_mut().zip(src).for_each(|(d, v)| {
                        d.write(*v + bias);
                    });
                }
            };
            if par {
                yc.par_chunks_mut(ys).enumerate().for_each(copy_out);
            } else {
                yc.chunks_mut(ys).enumerate().for_each(copy_out);
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
            image_gemm(yi, w, xi, (s.cout, hw, s.cin), b, false);
        })
    }
}

/// `y_i [m, n] = W [m, k] · B [k, n] (+ b)` written straight into an image's uninitialised
/// output: without a bias the GEMM writes all of it, with one every row is first set to its
/// bias and the GEMM then accumulates into it.
fn image_gemm(
    yi: &mut [MaybeUninit<f32>],
    w: &[f32],
    bm: &[f32],
    (m, n, k): (usize, usize, usize),
    b: Option<&[f32]>,
    par: bool,
) {
    match b {
        None => sgemm_uninit(m, n, k, w, false, bm, false, yi, par),
        Some(b) => {
            for (row, bv) in yi.chunks_mut(n).zip(b) {
                row.iter_mut().for_each(|v| {
                    v.write(*bv);
                });
            }
            // SAFETY: every element was just initialised.
            let yi = unsafe { &mut *(yi as *mut [MaybeUninit<f32>] as *mut [f32]) };
            sgemm(m, n, k, w, false, bm, false, yi, true, par);
        }
    }
}

super::simd::widest_simd! {
    /// `out[r] = Σ plane r of x` ([`sum8`] in f64) for the `out.len()` planes of `hw` values at
    /// the start of `x`: one image's per-channel sums of the output gradient.
    fn plane_sums(x: &[f32], hw: usize, out: &mut [f64]) {
        for (o, p) in out.iter_mut().zip(x.chunks_exact(hw)) {
            *o = sum8(p, |v| v as f64);
        }
    }
}

/// The bias gradient from per-image channel sums `sums [N, Cout]` ([`plane_sums`]): each
/// channel's sums added in image order, in f64.
fn bias_from_sums(sums: &[f64], n: usize, cout: usize) -> Vec<f32> {
    (0..cout)
        .map(|co| (0..n).map(|i| sums[i * cout + co]).sum::<f64>() as f32)
        .collect()
}

/// Per-channel sums of `gy [N, Cout, HW]` (the bias gradient), accumulated in f64: each image's
/// plane sums ([`plane_sums`]), then per channel over the images in order.
pub(super) fn bias_grad(gy: &[f32], n: usize, cout: usize, hw: usize) -> Vec<f32> {
    let mut sums = vec![0.0f64; n * cout];
    sums.par_chunks_mut(cout)
        .zip(gy.par_chunks(cout * hw))
        .for_each(|(o, g)| plane_sums(g, hw, o));
    bias_from_sums(&sums, n, cout)
}

/// `parts` buffers of `len` floats each, side by side in one scratch block taken on the calling
/// thread (which gives it back in [`sum_partials`]): rayon jobs may run on any thread, so buffers
/// taken inside them would end up in another thread's pool and be allocated (and faulted in)
/// afresh on every call.
pub(super) fn partial_buffers(parts: usize, len: usize) -> Vec<f32> {
    scratch::take(parts * len)
}

/// The per-part weight gradients, `len` floats each side by side in `partials` (from
/// [`partial_buffers`], returned to the pool here), added in part order into a fresh vector:
/// element ranges in parallel, every element summing the parts in the same order whatever the
/// thread count.
pub(super) fn sum_partials(partials: Vec<f32>, parts: usize, len: usize) -> Vec<f32> {
    // SAFETY: chunk `c` covers elements `c·CHUNK ..` of every part; each is written once.
    let gw = unsafe {
        par_fill(len, CHUNK, |c, g| {
            let n = g.len();
            let part = |p: usize| &partials[p * len + c * CHUNK..][..n];
            g.iter_mut().zip(part(0)).for_each(|(a, b)| {
                a.write(*b);
            });
            // SAFETY: every element was just initialised.
            let g = &mut *(g as *mut [MaybeUninit<f32>] as *mut [f32]);
            for p in 1..parts {
                g.iter_mut().zip(part(p)).for_each(|(a, b)| *a += *b);
            }
        })
    };
    scratch::give(partials);
    gw
}

/// Whether the weight gradient's GEMMs compute `gWᵀ [kd, Cout] = col · gY'ᵀ` (transposed once at
/// the end by [`sum_partials_transposed`]) rather than `gW = gY' · colᵀ`: when `kd > Cout`, as for
/// every 3×3 convolution of the model, and the weight has at most 2²⁰ elements. The `gemm` crate
/// runs the taller orientation faster (one thread of the development machine: 107–110 against
/// 88–97 GFLOP/s for the 3×3 layers of widths 16–64 at 28 px; the whole backward of width 64's
/// first-stage 3×3 layer 1.19× faster, its third-stage one 1.07×), but not the deepest layers'
/// (4608 × 512 × 192: 100 against 101), whose large weight gradients then only pay for the
/// transposition (width 64's 512-channel layers 0.90× with it).
fn weight_grad_transposed(s: &ConvShape) -> bool {
    s.kdim() > s.cout && s.kdim() * s.cout <= 1 << 20
}

/// [`sum_partials`] for parts that hold `gWᵀ [rows, cols]`: returns `gW [cols, rows]`, each
/// element the parts added in part order. The parts are first added into the first one
/// (contiguous streams), which is then transposed in 16 × 16 tiles, blocks of 16 rows of gW in
/// parallel, so every cache line read or written is used whole.
fn sum_partials_transposed(
    mut partials: Vec<f32>,
    parts: usize,
    rows: usize,
    cols: usize,
) -> Vec<f32> {
    const T: usize = 16;
    let len = rows * cols;
    {
        let (first, rest) = partials[..parts * len].split_at_mut(len);
        let rest = &*rest;
        first.par_chunks_mut(CHUNK).enumerate().for_each(|(c, g)| {
            for p in 0..parts - 1 {
                let part = &rest[p * len + c * CHUNK..][..g.len()];
                g.iter_mut().zip(part).for_each(|(a, v)| *a += *v);
            }
        });
    }
    let sum = &partials[..len];
    // SAFETY: chunk `b` is rows `b·T ..` of gW (all `rows` elements each), written once.
    let gw = unsafe {
        par_fill(len, T * rows, |b, g| {
            let c0 = b * T;
            let cb = g.len() / rows;
            for r0 in (0..rows).step_by(T) {
                for r in r0..(r0 + T).min(rows) {
                    let src = &sum[r * cols + c0..][..cb];
                    for (cc, v) in src.iter().enumerate() {
                        g[cc * rows + r].write(*v);
                    }
                }
            }
        })
    };
    scratch::give(partials);
    gw
}

/// Pointwise backward: `gx_i = Wᵀ·gy_i` straight into the output, `gW = Σ_i gy_i·x_iᵀ` summed per
/// part of the batch (at most [`MAX_PARTS`], fixed by the batch size), parts added in order.
fn pointwise_bwd(
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    gy: &[f32],
    need_x: bool,
    has_bias: bool,
) -> Grads {
    let hw = s.h * s.w;
    let (xs, ys) = (s.cin * hw, s.cout * hw);
    let parts = split(s.n, MAX_PARTS);
    let (np, len) = (parts.len(), s.cout * s.cin);
    let par_gemm = inner_parallel(np);
    let mut partials = partial_buffers(np, len);
    // Each part's images take both products in turn, the input gradient's and the weight
    // gradient's, so that an image's output gradient is read from memory once and a second
    // time from the core's cache (with the input gradient of the whole batch first, the weight
    // gradient re-read all of gy from memory: it is the layer's largest tensor).
    let mut gx: Vec<f32> = Vec::with_capacity(if need_x { s.n * xs } else { 0 });
    let part_len = parts[0].len();
    let mut gx_parts: Vec<&mut [MaybeUninit<f32>]> = if need_x {
        gx.spare_capacity_mut()[..s.n * xs]
            .chunks_mut(part_len * xs)
            .collect()
    } else {
        Vec::new()
    };
    gx_parts.resize_with(np, || &mut []);
    // Each image's channel sums of gy (for the bias gradient), taken while it is in cache.
    let mut sums = vec![0.0f64; if has_bias { s.n * s.cout } else { 0 }];
    let mut sum_parts: Vec<&mut [f64]> = sums.chunks_mut(part_len * s.cout).collect();
    sum_parts.resize_with(np, || &mut []);
    partials[..np * len]
        .par_chunks_mut(len)
        .zip(parts)
        .zip(gx_parts)
        .zip(sum_parts)
        .with_max_len(1)
        .for_each(|(((gw, r), gxp), sp)| {
            // Written by the first image's GEMM (which does not accumulate) before any read.
            for i in r.clone() {
                let (gyi, xi) = (&gy[i * ys..(i + 1) * ys], &x[i * xs..(i + 1) * xs]);
                if has_bias {
                    plane_sums(gyi, hw, &mut sp[(i - r.start) * s.cout..][..s.cout]);
                }
                if need_x {
                    let gxi = &mut gxp[(i - r.start) * xs..][..xs];
                    sgemm_uninit(s.cin, hw, s.cout, w, true, gyi, false, gxi, par_gemm);
                }
                sgemm(
                    s.cout,
                    s.cin,
                    hw,
                    gyi,
                    false,
                    xi,
                    true,
                    gw,
                    i > r.start,
                    par_gemm,
                );
            }
        });
    let gx = need_x.then(|| {
        // SAFETY: every image's input gradient was written whole by its part's GEMM above.
        unsafe { gx.set_len(s.n * xs) };
        gx
    });
    let gw = sum_partials(partials, np, len);
    let gb = has_bias.then(|| bias_from_sums(&sums, s.n, s.cout));
    (gx, gw, gb)
}

/// The backward convolution `(gx, gw, gb)` (the input gradient when `need_x`, the bias gradient
/// when `has_bias`), on the same path as [`conv2d_fwd`] takes for the shape.
pub fn conv2d_bwd(
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    gy: &[f32],
    need_x: bool,
    has_bias: bool,
) -> Grads {
    let (howo, kd) = (s.ho() * s.wo(), s.kdim());
    let xs = s.cin * s.h * s.w;
    let ys = s.cout * howo;
    if s.n == 0 || ys == 0 || xs == 0 {
        // Without input channels the output is the bias alone, whose gradient is still Σ gy.
        let gb = has_bias.then(|| {
            if s.n * ys == 0 {
                vec![0.0f32; s.cout]
            } else {
                bias_grad(gy, s.n, s.cout, howo)
            }
        });
        return (
            need_x.then(|| vec![0.0f32; s.n * xs]),
            vec![0.0f32; s.cout * kd],
            gb,
        );
    }
    match path(s) {
        Path::Pointwise => pointwise_bwd(s, x, w, gy, need_x, has_bias),
        Path::Winograd => winograd::backward(s, x, w, gy, need_x, has_bias),
        Path::Direct => direct::backward(s, x, w, gy, need_x, has_bias),
        Path::Im2col => im2col_bwd(s, x, w, gy, need_x, has_bias),
    }
}

/// The backward convolution by im2col + GEMM over chunks of images (a shape with outputs and
/// inputs): `(gx, gw, gb)`.
fn im2col_bwd(
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    gy: &[f32],
    need_x: bool,
    has_bias: bool,
) -> Grads {
    let (howo, kd) = (s.ho() * s.wo(), s.kdim());
    let xs = s.cin * s.h * s.w;
    let ys = s.cout * howo;
    let chunks = s.chunks();
    let cap = chunks[0].len();
    // Parts: runs of `per_part` consecutive chunks, so all but the last cover the same images.
    let per_part = chunks.len().div_ceil(MAX_PARTS);
    let parts: Vec<&[Range<usize>]> = chunks.chunks(per_part).collect();
    let par = inner_parallel(parts.len());
    let mut gx = if need_x {
        Some(vec![0.0f32; s.n * xs])
    } else {
        None
    };
    let gx_parts: Vec<Option<&mut [f32]>> = match gx.as_mut() {
        Some(g) => g.chunks_mut(per_part * cap * xs).map(Some).collect(),
        None => (0..parts.len()).map(|_| None).collect(),
    };
    // Each part sums its weight gradient into its own buffer (written by the part's first GEMM,
    // which does not accumulate, before any read); the buffers are added in order.
    let (np, len) = (parts.len(), s.cout * kd);
    let gw_transposed = weight_grad_transposed(s);
    let mut partials = partial_buffers(np, len);
    gx_parts
        .into_par_iter()
        .zip(partials[..np * len].par_chunks_mut(len))
        .zip(parts.par_iter())
        .with_max_len(1)
        .for_each(|((mut gxg, gw), part)| {
            let glo = part[0].start;
            let mut col = scratch::take(kd * cap * howo);
            let mut xp = padded_scratch(s);
            // The padded input gradient (zeroed per image: col2im writes the borders too).
            let mut gxp = scratch::take(if need_x { padded_len(s) } else { 0 });
            // Packed gY' for chunks of several images (one image's gradient is used in place).
            let mut gyt = scratch::take(if cap > 1 { s.cout * cap * howo } else { 0 });
            for (ci, r) in part.iter().enumerate() {
                let (lo, nb) = (r.start, r.len());
                let ld = nb * howo;
                // gY' [Cout, nb·howo]: a single image's gradient as it is, else packed.
                let gyc: &[f32] = if nb == 1 {
                    &gy[lo * ys..(lo + 1) * ys]
                } else {
                    let gyt_cols = ImageColumns::new(&mut gyt[..s.cout * ld], s.cout, ld, howo);
                    let pack = |j: usize| {
                        let gyi = &gy[(lo + j) * ys..(lo + j + 1) * ys];
                        for (co, row) in gyi.chunks(howo).enumerate() {
                            // SAFETY: image `j`'s columns, written by this call alone.
                            unsafe { gyt_cols.row(j, co) }.copy_from_slice(row);
                        }
                    };
                    if par {
                        (0..nb).into_par_iter().for_each(pack);
                    } else {
                        (0..nb).for_each(pack);
                    }
                    &gyt[..s.cout * ld]
                };
                build_col(s, x, (lo, nb), &mut col[..kd * ld], &mut xp, par);
                if gw_transposed {
                    // gWᵀ [kd, Cout] = col · gY'ᵀ.
                    sgemm(
                        kd,
                        s.cout,
                        ld,
                        &col[..kd * ld],
                        false,
                        gyc,
                        true,
                        gw,
                        ci > 0,
                        par,
                    );
                } else {
                    sgemm(
                        s.cout,
                        kd,
                        ld,
                        gyc,
                        false,
                        &col[..kd * ld],
                        true,
                        gw,
                        ci > 0,
                        par,
                    );
                }
                if let Some(g) = gxg.as_deref_mut() {
                    // Reuse `col` for gcol = Wᵀ·gY'.
                    sgemm(
                        kd,
                        ld,
                        s.cout,
                        w,
                        true,
                        gyc,
                        false,
                        &mut col[..kd * ld],
                        false,
                        par,
                    );
                    let gxc: Vec<&mut [f32]> = g[(lo - glo) * xs..(lo - glo + nb) * xs]
                        .chunks_mut(xs)
                        .collect();
                    let col = &col[..kd * ld];
                    for_images(s, gxc, par, &mut gxp, |gxp, j, gxi| {
                        if s.pad == 0 {
                            col2im(s, &col[j * howo..], ld, gxi);
                        } else {
                            gxp[..padded_len(s)].fill(0.0);
                            col2im(s, &col[j * howo..], ld, gxp);
                            let (hp, wp, p) = (s.h + 2 * s.pad, s.w + 2 * s.pad, s.pad);
                            for c in 0..s.cin {
                                for ih in 0..s.h {
                                    gxi[(c * s.h + ih) * s.w..][..s.w]
                                        .copy_from_slice(&gxp[(c * hp + ih + p) * wp + p..][..s.w]);
                                }
                            }
                        }
                    });
                }
            }
            scratch::give(col);
            scratch::give(xp);
            scratch::give(gxp);
            scratch::give(gyt);
        });
    let gw = if gw_transposed {
        sum_partials_transposed(partials, np, kd, s.cout)
    } else {
        sum_partials(partials, np, len)
    };
    let gb = has_bias.then(|| bias_grad(gy, s.n, s.cout, howo));
    (gx, gw, gb)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::backend::cpu) fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 / 1001.0 - 1.0) * 0.5)
            .collect()
    }

    /// `(n, cin, h = w, cout, k, stride, pad)`.
    pub(in crate::backend::cpu) type Dims = (usize, usize, usize, usize, usize, usize, usize);

    pub(in crate::backend::cpu) fn shape((n, cin, hw, cout, k, stride, pad): Dims) -> ConvShape {
        ConvShape {
            n,
            cin,
            h: hw,
            w: hw,
            cout,
            k,
            stride,
            pad,
        }
    }

    /// `[x, w, b, gy]` for `s`, from seeds `seed ..= seed + 3`.
    pub(in crate::backend::cpu) fn inputs(s: &ConvShape, seed: usize) -> [Vec<f32>; 4] {
        [
            data(s.n * s.cin * s.h * s.w, seed),
            data(s.cout * s.kdim(), seed + 1),
            data(s.cout, seed + 2),
            data(s.n * s.cout * s.ho() * s.wo(), seed + 3),
        ]
    }

    /// `[y, gx, gw, gb]`: the forward with a bias and the backward with every gradient.
    fn forward_backward(s: &ConvShape, [x, w, b, gy]: [&[f32]; 4]) -> [Vec<f32>; 4] {
        let y = conv2d_fwd(s, x, w, Some(b));
        let (gx, gw, gb) = conv2d_bwd(s, x, w, gy, true, true);
        [y, gx.unwrap(), gw, gb.unwrap()]
    }

    pub(in crate::backend::cpu) fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Direct convolution in f64: `(y, gx, gw, gb)` for upstream gradient `gy`.
    pub(in crate::backend::cpu) fn reference(
        s: &ConvShape,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        gy: &[f32],
    ) -> [Vec<f64>; 4] {
        let (ho, wo, k) = (s.ho(), s.wo(), s.k);
        let mut y = vec![0.0f64; s.n * s.cout * ho * wo];
        let mut gx = vec![0.0f64; x.len()];
        let mut gw = vec![0.0f64; w.len()];
        let mut gb = vec![0.0f64; s.cout];
        for i in 0..s.n {
            for co in 0..s.cout {
                for oh in 0..ho {
                    for ow in 0..wo {
                        let yi = ((i * s.cout + co) * ho + oh) * wo + ow;
                        let g = gy[yi] as f64;
                        let mut acc = b[co] as f64;
                        gb[co] += g;
                        for ci in 0..s.cin {
                            for ki in 0..k {
                                for kj in 0..k {
                                    let ih = (oh * s.stride + ki) as isize - s.pad as isize;
                                    let iw = (ow * s.stride + kj) as isize - s.pad as isize;
                                    if ih < 0 || iw < 0 || ih >= s.h as isize || iw >= s.w as isize
                                    {
                                        continue;
                                    }
                                    let xi =
                                        ((i * s.cin + ci) * s.h + ih as usize) * s.w + iw as usize;
                                    let wi = ((co * s.cin + ci) * k + ki) * k + kj;
                                    acc += x[xi] as f64 * w[wi] as f64;
                                    gx[xi] += g * w[wi] as f64;
                                    gw[wi] += g * x[xi] as f64;
                                }
                            }
                        }
                        y[yi] = acc;
                    }
                }
            }
        }
        [y, gx, gw, gb]
    }

    /// Forward, input, weight and bias gradients against the direct convolution, on shapes that
    /// take every path: weight gradients computed transposed (`kd > Cout`) and summed over many
    /// parts (37 images in 1-image chunks), with `Cout` and `kd` not multiples of the 16-row
    /// transposition tiles; as computed directly (`kd < Cout`); strided and pointwise layers;
    /// the fixed-width im2col and col2im (28, 14, 7 wide, 3×3 and 7×7; at stride 2 28, 7 and 4
    /// wide, 3×3 and 1×1) and the general ones (5 wide at stride 2); batch 1.
    #[test]
    fn matches_the_direct_convolution() {
        let shapes = [
            (37, 7, 30, 20, 3, 1, 1),
            (9, 20, 10, 40, 3, 2, 1),
            (6, 12, 9, 30, 1, 2, 0),
            (5, 24, 6, 17, 1, 1, 0),
            (1, 5, 8, 3, 3, 1, 1),
            (3, 5, 28, 6, 3, 1, 1),
            (4, 6, 14, 5, 3, 1, 1),
            (2, 4, 7, 9, 3, 1, 1),
            (2, 3, 28, 4, 7, 1, 3),
            (3, 5, 28, 6, 3, 2, 1),
            (2, 4, 7, 9, 3, 2, 1),
            (2, 6, 14, 5, 1, 2, 0),
            (1, 3, 56, 2, 3, 2, 1),
        ];
        for t in shapes {
            let s = shape(t);
            let [x, w, b, gy] = inputs(&s, 5);
            let got = forward_backward(&s, [&x, &w, &b, &gy]);
            assert_matches_reference(&s, &got, [&x, &w, &b, &gy]);
        }
    }

    /// The pointwise backward computes each part's input gradients, weight gradient and bias
    /// sums image by image: parts of unequal length (37 images in 13 parts of 3 and one of 1),
    /// batch 1, and the calls without the input gradient or the bias give the same weight
    /// gradient (and bias gradient) bits as the full call.
    #[test]
    fn pointwise_backward_in_parts() {
        for t in [
            (37, 8, 5, 12, 1, 1, 0),
            (1, 3, 4, 5, 1, 1, 0),
            (16, 20, 3, 6, 1, 1, 0),
        ] {
            let s = shape(t);
            assert_eq!(path(&s), Path::Pointwise);
            let [x, w, b, gy] = inputs(&s, 3);
            let got = forward_backward(&s, [&x, &w, &b, &gy]);
            assert_matches_reference(&s, &got, [&x, &w, &b, &gy]);
            let (gx, gw, gb) = conv2d_bwd(&s, &x, &w, &gy, false, true);
            assert!(gx.is_none());
            assert_eq!(bits(&gw), bits(&got[2]), "gw of {s:?} without gx");
            assert_eq!(bits(&gb.unwrap()), bits(&got[3]), "gb of {s:?} without gx");
            let (gx, gw, gb) = conv2d_bwd(&s, &x, &w, &gy, true, false);
            assert!(gb.is_none());
            assert_eq!(
                bits(&gx.unwrap()),
                bits(&got[1]),
                "gx of {s:?} without a bias"
            );
            assert_eq!(bits(&gw), bits(&got[2]), "gw of {s:?} without a bias");
        }
    }

    /// Without input channels the output is the bias alone: its gradient is still Σ gy (the
    /// weight and input gradients are empty), as the reference and the CUDA backend give.
    #[test]
    fn no_input_channels_still_give_the_bias_gradient() {
        for t in [
            (2, 0, 3, 4, 1, 1, 0),
            (3, 0, 5, 2, 3, 2, 1),
            (1, 0, 4, 3, 3, 1, 1),
        ] {
            let s = shape(t);
            let [x, w, b, gy] = inputs(&s, 5);
            let got = forward_backward(&s, [&x, &w, &b, &gy]);
            assert_matches_reference(&s, &got, [&x, &w, &b, &gy]);
            assert!(
                got[3].iter().any(|v| *v != 0.0),
                "gb of {s:?}: {:?}",
                got[3]
            );
        }
    }

    /// `[y, gx, gw, gb]` within `1e-5 ·` the largest value of each (at least 1) of the direct
    /// convolution of `[x, w, b, gy]`.
    pub(in crate::backend::cpu) fn assert_matches_reference(
        s: &ConvShape,
        got: &[Vec<f32>; 4],
        [x, w, b, gy]: [&[f32]; 4],
    ) {
        let want = reference(s, x, w, b, gy);
        for (what, (g, r)) in ["y", "gx", "gw", "gb"].iter().zip(got.iter().zip(&want)) {
            assert_eq!(g.len(), r.len(), "{what} of {s:?}");
            let scale = r.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            for (i, (a, e)) in g.iter().zip(r).enumerate() {
                assert!(
                    (*a as f64 - e).abs() <= 1e-5 * scale,
                    "{what}[{i}] of {s:?}: {a} against {e}"
                );
            }
        }
    }

    /// The bits of `f()` run on a pool of `threads` threads.
    pub(in crate::backend::cpu) fn bits_on<const K: usize>(
        threads: usize,
        f: impl FnOnce() -> [Vec<f32>; K] + Send,
    ) -> [Vec<u32>; K] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| f().map(|v| bits(&v)))
    }

    #[test]
    fn the_algorithm_is_named_by_the_environment_value() {
        assert_eq!(parse_algo(None), Ok(Algo::Auto));
        assert_eq!(parse_algo(Some("")), Ok(Algo::Auto));
        for a in [Algo::Auto, Algo::Im2col, Algo::Winograd, Algo::Direct] {
            assert_eq!(parse_algo(Some(a.name())), Ok(a));
        }
        let err = parse_algo(Some("Winograd ")).unwrap_err();
        assert!(err.contains("MEDSSL_CPU_CONV='Winograd '"), "{err}");
        assert!(err.contains("winograd or direct"), "{err}");
    }

    /// The paths `auto` takes for the model's layers at batch 48: Winograd for width 64's 3×3
    /// stride-1 layers, the direct kernel for width 16's at 28 and 14 px where the CPU has
    /// AVX-512 (im2col without), im2col for the stem, the 7- and 4-px layers of width 16 and every
    /// strided layer; and the forced paths.
    #[test]
    fn auto_picks_the_documented_paths() {
        for avx512 in [true, false] {
            let direct = if avx512 { Path::Direct } else { Path::Im2col };
            for (dims, want) in [
                ((48, 64, 28, 64, 3, 1, 1), Path::Winograd),
                ((48, 512, 4, 512, 3, 1, 1), Path::Winograd),
                ((48, 16, 28, 16, 3, 1, 1), direct),
                ((48, 32, 14, 32, 3, 1, 1), direct),
                ((48, 3, 28, 16, 3, 1, 1), Path::Im2col),
                ((48, 64, 7, 64, 3, 1, 1), Path::Im2col),
                ((48, 128, 4, 128, 3, 1, 1), Path::Im2col),
                ((48, 16, 28, 32, 3, 2, 1), Path::Im2col),
                ((48, 16, 28, 128, 1, 1, 0), Path::Pointwise),
            ] {
                let s = shape(dims);
                assert_eq!(choose(&s, Algo::Auto, avx512), want, "{dims:?}");
                assert_eq!(
                    choose(&s, Algo::Im2col, avx512) == Path::Im2col,
                    want != Path::Pointwise
                );
                if s.k == 3 && s.stride == 1 {
                    assert_eq!(choose(&s, Algo::Winograd, avx512), Path::Winograd);
                    assert_eq!(choose(&s, Algo::Direct, avx512), Path::Direct);
                }
            }
        }
    }

    /// A 3×3 stride-1 padding-1 layer.
    pub(in crate::backend::cpu) fn geom3(
        n: usize,
        cin: usize,
        (h, w): (usize, usize),
        cout: usize,
    ) -> ConvShape {
        ConvShape {
            n,
            cin,
            h,
            w,
            cout,
            k: 3,
            stride: 1,
            pad: 1,
        }
    }

    /// A path's forward convolution `(s, x, w, b) → y`.
    type Forward = fn(&ConvShape, &[f32], &[f32], Option<&[f32]>) -> Vec<f32>;
    /// A path's backward convolution `(s, x, w, gy, need_x, has_bias) → (gx, gw, gb)`.
    type Backward = fn(&ConvShape, &[f32], &[f32], &[f32], bool, bool) -> Grads;

    /// The entry points of one path for 3×3 stride-1 padding-1 layers, called whatever
    /// [`Algo`] says, with the checks the paths share.
    pub(in crate::backend::cpu) struct Path3 {
        pub forward: Forward,
        pub backward: Backward,
    }

    impl Path3 {
        /// `[y, gx, gw, gb]`: the forward with a bias and the backward with every gradient.
        fn forward_backward(&self, s: &ConvShape, [x, w, b, gy]: [&[f32]; 4]) -> [Vec<f32>; 4] {
            let y = (self.forward)(s, x, w, Some(b));
            let (gx, gw, gb) = (self.backward)(s, x, w, gy, true, true);
            [y, gx.unwrap(), gw, gb.unwrap()]
        }

        /// Forward, input, weight and bias gradients against the direct convolution in f64
        /// ([`assert_matches_reference`]); without a bias and without the input gradient the
        /// same weight gradient bits and forward values within `y_tol` relative (the bias added
        /// after the sums, or with them).
        pub(in crate::backend::cpu) fn check(&self, s: &ConvShape, y_tol: f32) {
            let [x, w, b, gy] = inputs(s, 7);
            let got = self.forward_backward(s, [&x, &w, &b, &gy]);
            assert_matches_reference(s, &got, [&x, &w, &b, &gy]);
            let y = (self.forward)(s, &x, &w, None);
            let (gx, gw, gb) = (self.backward)(s, &x, &w, &gy, false, false);
            assert!(gx.is_none() && gb.is_none());
            assert_eq!(bits(&gw), bits(&got[2]), "gw of {s:?} without gx");
            let hw = s.h * s.w;
            for (i, (a, e)) in y.iter().zip(&got[0]).enumerate() {
                let bias = b[(i / hw) % s.cout];
                assert!(
                    (a + bias - e).abs() <= y_tol * (1.0 + e.abs()),
                    "y[{i}] of {s:?}"
                );
            }
        }

        /// The same bits on 1, 2, 3 and 8 threads.
        pub(in crate::backend::cpu) fn check_threads(&self, s: &ConvShape) {
            let [x, w, b, gy] = inputs(s, 3);
            let run = |threads| bits_on(threads, || self.forward_backward(s, [&x, &w, &b, &gy]));
            let one = run(1);
            for threads in [2, 3, 8] {
                assert!(run(threads) == one, "{s:?} on {threads} threads");
            }
        }

        /// The same bits from the vector builds and the baseline (on a CPU without wider
        /// vectors both runs take the baseline and this checks nothing more).
        pub(in crate::backend::cpu) fn check_baseline_bits(&self, s: &ConvShape) {
            use super::super::simd::BASELINE_ONLY;
            let [x, w, b, gy] = inputs(s, 5);
            let run = |baseline: bool| {
                BASELINE_ONLY.store(baseline, std::sync::atomic::Ordering::Relaxed);
                self.forward_backward(s, [&x, &w, &b, &gy])
                    .map(|v| bits(&v))
            };
            let wide = run(false);
            let base = run(true);
            BASELINE_ONLY.store(false, std::sync::atomic::Ordering::Relaxed);
            assert!(
                wide == base,
                "{s:?}: the vector builds and the baseline differ"
            );
        }
    }

    /// Forward and backward on 1, 2, 3 and 8 threads give the same bits: many chunks in many
    /// parts, fewer chunks than threads (the GEMMs and copies then parallel inside a chunk),
    /// strided, 7×7 and pointwise layers, batch 1.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let shapes = [
            (37, 16, 28, 16, 3, 1, 1),
            (40, 32, 14, 16, 3, 1, 1),
            (48, 64, 7, 128, 3, 2, 1),
            (5, 3, 28, 8, 7, 2, 3),
            (3, 3, 112, 16, 7, 2, 3),
            (20, 24, 14, 32, 1, 1, 0),
            (37, 8, 5, 12, 1, 1, 0),
            (1, 8, 9, 4, 3, 1, 1),
        ];
        for t in shapes {
            let s = shape(t);
            let [x, w, b, gy] = inputs(&s, 1);
            let run = |threads| bits_on(threads, || forward_backward(&s, [&x, &w, &b, &gy]));
            let one = run(1);
            assert!(one[2].iter().any(|&v| f32::from_bits(v) != 0.0));
            for threads in [2, 3, 8] {
                let got = run(threads);
                for (i, what) in ["y", "gx", "gw", "gb"].iter().enumerate() {
                    assert!(
                        got[i] == one[i],
                        "{what} of {s:?} on {threads} threads differs from one thread"
                    );
                }
            }
        }
    }
}
