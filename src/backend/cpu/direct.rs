//! 3×3 convolutions of stride 1 and padding 1 computed directly, without im2col, for layers with
//! few channels on wide maps (width 16's first stages), where im2col's copy of every input value
//! nine times costs as much as the products and Winograd's GEMMs are too small to pay.
//!
//! Each image's input channels are copied once into zero-padded planes `[H + 2, Wp]` (value
//! `(r, c)` at row `r + 1`, column `c + 1`, zeros around it and in the columns up to `Wp`, `Wp`
//! at least `W + 2` and the row's width in whole vectors). An output row is cut into column
//! blocks of up to [`MAX_V`] vectors of [`L`] lanes (lane `l` of vector `v` = column
//! `c0 + 16v + l`), and a register tile holds one row block of `CB` output channels:
//!
//! ```text
//! acc[c][v][l] = Σ_ci Σ_kh Σ_kw  w[co0 + c, ci, kh, kw] · xp[ci, oh + kh, c0 + 16v + l + kw]
//! ```
//!
//! one fused multiply-add per lane and term, the tap's input vector loaded once for the `CB`
//! channels and each weight broadcast for the `V` vectors (`CB · V` accumulators, at most 16 of
//! the 32 vector registers: `CB` 16, 8 or 4 for rows of 1, 2 or 3–4 vectors). Lanes past the
//! row's end compute values that are never stored. The weights are reordered once per call into
//! `[block][Cin][9][CB]`, zero for channels past `Cout`, so that a tap's `CB` weights are
//! adjacent.
//!
//! The input gradient is the same kernel run on the zero-padded output gradient, with the
//! kernels flipped and the channel roles swapped (`w'[ci, co, kh, kw] = w[co, ci, 2 − kh,
//! 2 − kw]`). The weight gradient
//!
//! ```text
//! gw[co, ci, kh, kw] = Σ_j Σ_oh Σ_ow  gy[j, co, oh, ow] · xp[j, ci, oh + kh, ow + kw]
//! ```
//!
//! runs over [`WCB`] output channels, one input channel and one kernel row at a time: 24
//! accumulators `[c][kw]` of [`L`] lanes (lane `l` summing the columns `≡ l (mod 16)` of every
//! row of every image of a part), added across their lanes in a fixed tree at the end. The output
//! gradient's padded planes are zero past column `W`, so lanes past the row's end add nothing.
//!
//! The batch's images run in parallel for the forward pass; the backward pass cuts the batch into
//! parts fixed by the shape (each its own weight-gradient buffer, added in part order), so every
//! result bit is the same on any number of threads. The kernels are written once over a 16-lane
//! vector type ([`Vec16`]) and run on AVX-512 registers where the CPU has them, else on arrays
//! with `f32::mul_add`: a fused multiply-add with one rounding either way, so the same bits on
//! every CPU.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::conv::{
    bias_grad, copy_row, inner_parallel, partial_buffers, split, sum_partials, ConvShape, Grads,
};
use super::elementwise::par_fill;
use super::scratch;
use super::simd;

/// Lanes of one vector.
const L: usize = 16;

/// One vector's lanes.
type Lanes = [f32; L];

/// Most vectors in a column block of the forward kernel (64 columns).
const MAX_V: usize = 4;

/// Output channels per register tile of the weight gradient.
const WCB: usize = 8;

/// Most parts the batch is cut into for the weight gradient (each needs its own buffer of
/// `Cout · Cin · 9` floats).
const MAX_PARTS: usize = 16;

/// Most floats of the parts' weight-gradient buffers together (16 MiB): reached only by layers
/// far wider than the ones `auto` sends here (512 channels each way: 9.4 MiB per part), when
/// `MEDSSL_CPU_CONV=direct` forces them.
const PARTIALS_FLOATS: usize = 1 << 22;

/// Floats of padded input and output-gradient planes a part of the backward pass aims at (as
/// many images as fit, at least one): each weight-gradient tile adds its lanes once per part,
/// so parts of a few small images spend a large share of the time there.
const PART_FLOATS: usize = 1 << 19;

/// The padded planes of one layer's maps: `H + 2` rows of `wp` floats.
#[derive(Clone, Copy, Debug)]
struct Planes {
    h: usize,
    w: usize,
    wp: usize,
}

impl Planes {
    fn new(h: usize, w: usize) -> Self {
        Planes {
            h,
            w,
            wp: (w + 2).max(w.div_ceil(L) * L),
        }
    }
    /// Floats in one padded plane.
    fn len(&self) -> usize {
        (self.h + 2) * self.wp
    }
    /// Floats for `planes` padded planes and the two past the last one that the widest loads
    /// of the last row reach (rounded up to a vector).
    fn buffer(&self, planes: usize) -> usize {
        planes * self.len() + L
    }
    /// The output row's column blocks: `(first column, columns, vectors)`.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize, usize)> {
        let w = self.w;
        (0..w).step_by(MAX_V * L).map(move |c0| {
            let bw = (w - c0).min(MAX_V * L);
            (c0, bw, bw.div_ceil(L))
        })
    }
    /// Output channels per register tile of the forward kernel: at most 16 accumulators (12 for
    /// rows of 3 vectors).
    fn cb(&self) -> usize {
        match self.w.div_ceil(L).min(MAX_V) {
            1 => 16,
            2 => 8,
            _ => 4,
        }
    }
}

/// Copies `planes` maps `[H, W]` from `src` into the first `planes` padded planes of `dst` and
/// zeroes the next `zeros` planes (channels a register tile has past the layer's last one).
fn pad(p: &Planes, src: &[f32], planes: usize, zeros: usize, dst: &mut [f32]) {
    let (h, w, wp) = (p.h, p.w, p.wp);
    let dst = &mut dst[..(planes + zeros) * p.len()];
    for (c, d) in dst.chunks_exact_mut(p.len()).enumerate() {
        if c >= planes {
            d.fill(0.0);
            continue;
        }
        let s = &src[c * h * w..][..h * w];
        d[..wp].fill(0.0);
        for (r, row) in d[wp..(h + 1) * wp].chunks_exact_mut(wp).enumerate() {
            row[0] = 0.0;
            copy_row(&mut row[1..=w], &s[r * w..][..w]);
            row[w + 1..].fill(0.0);
        }
        d[(h + 1) * wp..].fill(0.0);
    }
}

/// A weight tensor reordered for the forward kernel: `[block][inputs][9][cb]`, tap `t = 3·kh +
/// kw` of output `o` and input `i` at `[o / cb][i][t][o % cb]` taken from `value(o, i, t)`, zero
/// for the outputs past `outputs`.
fn tile_weights(
    outputs: usize,
    inputs: usize,
    cb: usize,
    value: impl Fn(usize, usize, usize) -> f32,
) -> Vec<f32> {
    let mut wt = vec![0.0f32; outputs.div_ceil(cb) * inputs * 9 * cb];
    for o in 0..outputs {
        for i in 0..inputs {
            for t in 0..9 {
                wt[((o / cb * inputs + i) * 9 + t) * cb + o % cb] = value(o, i, t);
            }
        }
    }
    wt
}

/// Sixteen `f32` lanes with the three operations the kernels need, on a vector register
/// ([`Avx512`]) or on an array ([`Portable`]): the same fused multiply-add, with one rounding, on
/// both.
trait Vec16: Copy {
    fn zero() -> Self;
    fn splat(v: f32) -> Self;
    /// `a · b + c` in every lane, rounded once.
    fn fma(a: Self, b: Self, c: Self) -> Self;
    /// # Safety
    /// `p` readable at 16 floats.
    unsafe fn load(p: *const f32) -> Self;
    fn lanes(self) -> Lanes;
}

/// [`Vec16`] on arrays, for CPUs without AVX-512 (`f32::mul_add`: the C library's `fmaf` on the
/// baseline build, slow but with the same bits).
#[derive(Clone, Copy)]
struct Portable(Lanes);

impl Vec16 for Portable {
    #[inline(always)]
    fn zero() -> Self {
        Portable([0.0; L])
    }
    #[inline(always)]
    fn splat(v: f32) -> Self {
        Portable([v; L])
    }
    #[inline(always)]
    fn fma(a: Self, b: Self, c: Self) -> Self {
        Portable(std::array::from_fn(|l| a.0[l].mul_add(b.0[l], c.0[l])))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller's guarantee.
        Portable(unsafe { p.cast::<Lanes>().read_unaligned() })
    }
    #[inline(always)]
    fn lanes(self) -> Lanes {
        self.0
    }
}

/// [`Vec16`] on AVX-512 registers. Its operations are only ever inlined into the functions
/// compiled with `#[target_feature(enable = "avx512f")]` that [`simd::has_avx512`] guards (the
/// `avx512` functions below), never called elsewhere.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx512(std::arch::x86_64::__m512);

#[cfg(target_arch = "x86_64")]
impl Vec16 for Avx512 {
    #[inline(always)]
    fn zero() -> Self {
        // SAFETY: reached only from AVX-512 code (see the type).
        Avx512(unsafe { std::arch::x86_64::_mm512_setzero_ps() })
    }
    #[inline(always)]
    fn splat(v: f32) -> Self {
        // SAFETY: as above.
        Avx512(unsafe { std::arch::x86_64::_mm512_set1_ps(v) })
    }
    #[inline(always)]
    fn fma(a: Self, b: Self, c: Self) -> Self {
        // SAFETY: as above.
        Avx512(unsafe { std::arch::x86_64::_mm512_fmadd_ps(a.0, b.0, c.0) })
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: as above, and the caller's guarantee.
        Avx512(unsafe { std::arch::x86_64::_mm512_loadu_ps(p) })
    }
    #[inline(always)]
    fn lanes(self) -> Lanes {
        // SAFETY: both are 64 bytes of floats.
        unsafe { std::mem::transmute::<std::arch::x86_64::__m512, Lanes>(self.0) }
    }
}

/// Defines `$name(args)` that runs `$with::<Avx512>(args)` compiled for AVX-512 where
/// [`simd::has_avx512`], else `$with::<Portable>(args)`.
macro_rules! on_widest {
    ($(#[$m:meta])* fn $name:ident = $with:ident($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) {
                    $with::<Avx512>($($arg),*)
                }
                if simd::has_avx512() {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { avx512($($arg),*) };
                }
            }
            $with::<Portable>($($arg),*)
        }
    };
}

/// One register tile of the forward kernel: `CB` output channels of the `V` vectors of one row
/// block whose top-left input (tap `(0, 0)` of lane 0, padded coordinates) is at `x`.
///
/// # Safety
/// `x` must be readable at every `ci·plen + kh·wp + kw + 16v + l` (`ci < cin`, `kh, kw < 3`,
/// `v < V`, `l < 16`), and `wt` at `cin · 9 · CB` floats.
#[inline(always)]
unsafe fn tile<S: Vec16, const CB: usize, const V: usize>(
    x: *const f32,
    (plen, wp): (usize, usize),
    cin: usize,
    wt: *const f32,
) -> [[S; V]; CB] {
    let mut acc = [[S::zero(); V]; CB];
    for ci in 0..cin {
        for kh in 0..3 {
            for kw in 0..3 {
                // SAFETY: within the caller's bounds.
                let (xr, wk) = unsafe {
                    (
                        x.add(ci * plen + kh * wp + kw),
                        wt.add((ci * 9 + kh * 3 + kw) * CB),
                    )
                };
                // SAFETY: as above; unaligned loads of 16 floats.
                let xv: [S; V] = std::array::from_fn(|v| unsafe { S::load(xr.add(v * L)) });
                for (c, a) in acc.iter_mut().enumerate() {
                    // SAFETY: as above.
                    let wv = S::splat(unsafe { *wk.add(c) });
                    for v in 0..V {
                        a[v] = S::fma(xv[v], wv, a[v]);
                    }
                }
            }
        }
    }
    acc
}

/// The forward kernel over one image's block of output channels: every row block of
/// [`tile`]`::<S, CB, V>` with `V` taken from the block, stored (plus the bias) into `y`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block_rows<S: Vec16, const CB: usize>(
    p: &Planes,
    xp: &[f32],
    cin: usize,
    wt: &[f32],
    blk: usize,
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
) {
    let (h, w, wp) = (p.h, p.w, p.wp);
    let hw = h * w;
    let nco = y.len() / hw;
    assert!(nco <= CB && y.len() == nco * hw);
    assert!(xp.len() >= cin * p.len() + 2);
    let wb = &wt[blk * cin * 9 * CB..][..cin * 9 * CB];
    let geom = (p.len(), wp);
    for oh in 0..h {
        for (c0, bw, v) in p.blocks() {
            // Tap (0, 0) of column c0 + l of output row oh is padded (oh, c0 + l). The widest
            // read, (cin − 1)·plen + (oh + 2)·wp + c0 + 2 + 16·V − 1 with c0 + 16·V ≤ wp and
            // oh < h, is below cin·plen + 2: within the assertion above.
            let x = xp[oh * wp + c0..].as_ptr();
            let mut put = |c: usize, row: &[S]| {
                let b = bias.map_or(0.0, |b| b[blk * CB + c]);
                let dst = &mut y[c * hw + oh * w + c0..][..bw];
                for (d, lanes) in dst.chunks_mut(L).zip(row) {
                    for (d, v) in d.iter_mut().zip(lanes.lanes()) {
                        d.write(v + b);
                    }
                }
            };
            // SAFETY: the bounds shown above; `wb` holds `cin · 9 · CB` floats.
            unsafe {
                match v {
                    1 => {
                        let acc = tile::<S, CB, 1>(x, geom, cin, wb.as_ptr());
                        (0..nco).for_each(|c| put(c, &acc[c]));
                    }
                    2 => {
                        let acc = tile::<S, CB, 2>(x, geom, cin, wb.as_ptr());
                        (0..nco).for_each(|c| put(c, &acc[c]));
                    }
                    3 => {
                        let acc = tile::<S, CB, 3>(x, geom, cin, wb.as_ptr());
                        (0..nco).for_each(|c| put(c, &acc[c]));
                    }
                    _ => {
                        let acc = tile::<S, CB, MAX_V>(x, geom, cin, wb.as_ptr());
                        (0..nco).for_each(|c| put(c, &acc[c]));
                    }
                }
            }
        }
    }
}

/// [`forward_block`] on lanes `S`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_block_with<S: Vec16>(
    p: &Planes,
    xp: &[f32],
    cin: usize,
    wt: &[f32],
    cb: usize,
    blk: usize,
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
) {
    match cb {
        16 => block_rows::<S, 16>(p, xp, cin, wt, blk, bias, y),
        8 => block_rows::<S, 8>(p, xp, cin, wt, blk, bias, y),
        _ => block_rows::<S, 4>(p, xp, cin, wt, blk, bias, y),
    }
}

on_widest! {
    /// Output channels `blk·cb ..` (as many as `y` holds, at most `cb`) of one image from its
    /// padded input planes `xp`.
    fn forward_block = forward_block_with(
        p: &Planes,
        xp: &[f32],
        cin: usize,
        wt: &[f32],
        cb: usize,
        blk: usize,
        bias: Option<&[f32]>,
        y: &mut [MaybeUninit<f32>],
    )
}

/// One image's output `y [Cout, H, W]` (every element written) from its padded planes `xp`: the
/// blocks of `cb` output channels in parallel when `par`.
#[allow(clippy::too_many_arguments)]
fn forward_image(
    p: &Planes,
    xp: &[f32],
    cin: usize,
    wt: &[f32],
    cb: usize,
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
    par: bool,
) {
    let f = |(blk, yb): (usize, &mut [MaybeUninit<f32>])| {
        forward_block(p, xp, cin, wt, cb, blk, bias, yb)
    };
    let per = cb * p.h * p.w;
    if par {
        y.par_chunks_mut(per).enumerate().for_each(f);
    } else {
        y.chunks_mut(per).enumerate().for_each(f);
    }
}

/// The forward convolution `y [N, Cout, H, W]` (+ bias) of a 3×3 stride-1 padding-1 layer.
pub fn forward(s: &ConvShape, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    debug_assert!(s.k == 3 && s.stride == 1 && s.pad == 1);
    let p = Planes::new(s.h, s.w);
    let cb = p.cb();
    let (xs, ys) = (s.cin * s.h * s.w, s.cout * s.h * s.w);
    let wt = tile_weights(s.cout, s.cin, cb, |o, i, t| w[(o * s.cin + i) * 9 + t]);
    let par = inner_parallel(s.n);
    // SAFETY: chunk `j` is image `j`'s output, written whole by `forward_image`.
    unsafe {
        par_fill(s.n * ys, ys, |j, yj| {
            let mut xp = scratch::take(p.buffer(s.cin));
            pad(&p, &x[j * xs..][..xs], s.cin, 0, &mut xp);
            forward_image(&p, &xp, s.cin, &wt, cb, b, yj, par);
            scratch::give(xp);
        })
    }
}

/// Adds the 16 lanes in a fixed order (halves, then quarters, …).
#[inline(always)]
fn lane_sum(mut v: Lanes) -> f32 {
    let mut n = L;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            v[i] += v[i + n];
        }
    }
    v[0]
}

/// The weight-gradient accumulators `[c][kw]` of one kernel row, over the rows of one column
/// block of `V` vectors in one image: `x` at padded (kh, c0) of input channel `ci`, `g` at padded
/// (1, c0 + 1) of the tile's first output channel.
///
/// # Safety
/// `x` readable at `r·wp + kw + 16v + l` and `g` at `c·plen + r·wp + 16v + l` for `r < h`,
/// `kw < 3`, `c <` [`WCB`], `v < V`, `l < 16`.
#[inline(always)]
unsafe fn grad_rows<S: Vec16, const V: usize>(
    x: *const f32,
    g: *const f32,
    (plen, wp, h): (usize, usize, usize),
    acc: &mut [[S; 3]; WCB],
) {
    for r in 0..h {
        for v in 0..V {
            // SAFETY: within the caller's bounds; unaligned loads of 16 floats.
            let xs: [S; 3] =
                std::array::from_fn(|kw| unsafe { S::load(x.add(r * wp + kw + v * L)) });
            for (c, a) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                let gv = unsafe { S::load(g.add(c * plen + r * wp + v * L)) };
                for (kw, ak) in a.iter_mut().enumerate() {
                    *ak = S::fma(xs[kw], gv, *ak);
                }
            }
        }
    }
}

/// [`weight_grad_tile`] on lanes `S`.
#[inline(always)]
fn weight_grad_tile_with<S: Vec16>(
    p: &Planes,
    xp: &[f32],
    gp: &[f32],
    (nb, cin, cor): (usize, usize, usize),
    (blk, ci): (usize, usize),
    out: &mut [f32],
) {
    let (plen, wp) = (p.len(), p.wp);
    assert!(xp.len() >= nb * cin * plen + 2 && gp.len() > nb * cor * plen);
    assert!((blk + 1) * WCB <= cor && ci < cin && out.len() == WCB * 9);
    for kh in 0..3 {
        let mut acc = [[S::zero(); 3]; WCB];
        for j in 0..nb {
            let xj = &xp[(j * cin + ci) * plen + kh * wp..];
            let gj = &gp[(j * cor + blk * WCB) * plen + wp + 1..];
            for (c0, _, v) in p.blocks() {
                let (x, g) = (xj[c0..].as_ptr(), gj[c0..].as_ptr());
                let geom = (plen, wp, p.h);
                // SAFETY: x's widest read, (h − 1 + kh)·wp + c0 + 2 + 16·V − 1 past the plane's
                // start with c0 + 16·V ≤ wp, stays below the next plane's third float (the
                // buffer's slack for the last one); g's, (WCB − 1)·plen + h·wp + c0 + 16·V past
                // the tile's first plane, is the last channel's padded row h + 1, column ≤ wp:
                // within its plane or the next plane's first float (the slack for the last).
                unsafe {
                    match v {
                        1 => grad_rows::<S, 1>(x, g, geom, &mut acc),
                        2 => grad_rows::<S, 2>(x, g, geom, &mut acc),
                        3 => grad_rows::<S, 3>(x, g, geom, &mut acc),
                        _ => grad_rows::<S, MAX_V>(x, g, geom, &mut acc),
                    }
                }
            }
        }
        for (c, a) in acc.into_iter().enumerate() {
            for (kw, lanes) in a.into_iter().enumerate() {
                out[c * 9 + kh * 3 + kw] = lane_sum(lanes.lanes());
            }
        }
    }
}

on_widest! {
    /// Output channels `blk·WCB ..` and input channel `ci` of a part's weight gradient, into
    /// `out [WCB][9]`: summed over the part's `nb` images, from their padded input planes `xp`
    /// (`cin` per image) and padded output-gradient planes `gp` (`cor` per image, zero past
    /// `Cout`); `dims = (nb, cin, cor)`, `tile = (blk, ci)`.
    fn weight_grad_tile = weight_grad_tile_with(
        p: &Planes,
        xp: &[f32],
        gp: &[f32],
        dims: (usize, usize, usize),
        tile: (usize, usize),
        out: &mut [f32],
    )
}

/// The backward pass's parts of the batch: equal runs of images (the last may be shorter), as
/// many per part as [`PART_FLOATS`] allows, but at most [`MAX_PARTS`] parts and at most
/// [`PARTIALS_FLOATS`] floats of weight-gradient buffers in all; fixed by the shape.
fn parts(s: &ConvShape) -> Vec<std::ops::Range<usize>> {
    let cor = s.cout.next_multiple_of(WCB);
    let per_image = (s.cin + cor) * Planes::new(s.h, s.w).len();
    let per_part = (PART_FLOATS / per_image).max(1);
    let most = (PARTIALS_FLOATS / (cor * s.cin * 9).max(1)).clamp(1, MAX_PARTS);
    split(s.n, s.n.div_ceil(per_part).min(most))
}

/// The backward convolution `(gx, gw, gb)` of a 3×3 stride-1 padding-1 layer (the input gradient
/// when `need_x`, the bias gradient when `has_bias`).
pub fn backward(
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    gy: &[f32],
    need_x: bool,
    has_bias: bool,
) -> Grads {
    debug_assert!(s.k == 3 && s.stride == 1 && s.pad == 1);
    let p = Planes::new(s.h, s.w);
    let (hw, plen) = (s.h * s.w, p.len());
    let (xs, ys) = (s.cin * hw, s.cout * hw);
    let cor = s.cout.next_multiple_of(WCB);
    // One part's weight gradient in the tiles' layout `[Cout / WCB][Cin][WCB][9]`.
    let len = cor * s.cin * 9;
    let parts = parts(s);
    let per = parts[0].len();
    // The input gradient: the forward kernel with the flipped kernels, channels swapped.
    let cb = p.cb();
    let wa =
        need_x.then(|| tile_weights(s.cin, s.cout, cb, |o, i, t| w[(i * s.cin + o) * 9 + 8 - t]));
    let mut gx: Vec<f32> = Vec::with_capacity(if need_x { s.n * xs } else { 0 });
    let gx_parts: Vec<Option<&mut [MaybeUninit<f32>]>> = if need_x {
        gx.spare_capacity_mut()[..s.n * xs]
            .chunks_mut(per * xs)
            .map(Some)
            .collect()
    } else {
        parts.iter().map(|_| None).collect()
    };
    // Each tile writes its whole `[WCB][9]` block of its part's buffer.
    let mut partials = partial_buffers(parts.len(), len);
    gx_parts
        .into_par_iter()
        .zip(partials[..parts.len() * len].par_chunks_mut(len))
        .zip(parts.par_iter())
        .with_max_len(1)
        .for_each(|((gxp, pw), r)| {
            let nb = r.len();
            let mut xp = scratch::take(p.buffer(nb * s.cin));
            pad(&p, &x[r.start * xs..][..nb * xs], nb * s.cin, 0, &mut xp);
            xp[nb * s.cin * plen..][..L].fill(0.0);
            let mut gp = scratch::take(p.buffer(nb * cor));
            for j in 0..nb {
                let gyj = &gy[(r.start + j) * ys..][..ys];
                pad(&p, gyj, s.cout, cor - s.cout, &mut gp[j * cor * plen..]);
            }
            gp[nb * cor * plen..][..L].fill(0.0);
            // The part's tiles and images run on the pool too, whatever the number of parts:
            // parts are few (3 at width 16's 28 px layers), and one part per thread left one of
            // two threads idle for a third of the time (the backward 1.12–1.18× faster with
            // the stealing, the step 1.02×).
            let dims = (nb, s.cin, cor);
            pw.par_chunks_mut(WCB * 9).enumerate().for_each(|(t, out)| {
                weight_grad_tile(&p, &xp, &gp, dims, (t / s.cin, t % s.cin), out)
            });
            if let (Some(gxp), Some(wa)) = (gxp, wa.as_ref()) {
                for (j, gxj) in gxp.chunks_mut(xs).enumerate() {
                    let gpj = &gp[j * cor * plen..];
                    forward_image(&p, gpj, s.cout, wa, cb, None, gxj, true);
                }
            }
            scratch::give(xp);
            scratch::give(gp);
        });
    // SAFETY: each part's images' input gradients were written whole by `forward_image`.
    unsafe { gx.set_len(if need_x { s.n * xs } else { 0 }) };
    // The parts added in part order, then reordered from the tiles' layout `[blk][ci][c][9]`.
    let sum = sum_partials(partials, parts.len(), len);
    let mut gw = vec![0.0f32; s.cout * s.cin * 9];
    for (co, gwo) in gw.chunks_exact_mut(s.cin * 9).enumerate() {
        for (ci, g) in gwo.chunks_exact_mut(9).enumerate() {
            let at = ((co / WCB * s.cin + ci) * WCB + co % WCB) * 9;
            g.copy_from_slice(&sum[at..at + 9]);
        }
    }
    let gb = has_bias.then(|| bias_grad(gy, s.n, s.cout, hw));
    (need_x.then_some(gx), gw, gb)
}

/// Fewest columns, fewest channels on either side and most channels on either side for which
/// [`auto`] takes this path, on CPUs with AVX-512. Measured on the development machine, batch 48,
/// one thread, `medssl-bench ops --cpu-conv im2col,auto` or `im2col,direct`
/// (`bench/results/2026-11-27-cpu-2core-d/`), im2col time / this path's, forward / backward with
/// the input gradient: 16 channels at 28 × 28 1.10–1.17 / 1.25–1.31, at 14 × 14 1.27–1.28 /
/// 1.11–1.22; 32 at 28 × 28 1.08–1.09 / 1.10–1.11, at 14 × 14 1.16–1.27 / 1.06–1.07. Below 14
/// columns most lanes of the one vector per row are idle (32 at 7 × 7 0.69–0.75 / 0.72–0.73); from
/// 64 channels the weight gradient falls behind im2col's GEMM (64 at 14 × 14 backward 0.95,
/// forward 1.11–1.15; Winograd takes those layers anyway); with 3 input channels (the stem)
/// im2col's single GEMM is faster forward (0.74–0.81). Without AVX-512 the kernels run on arrays
/// (a fraction of im2col's speed), so `auto` keeps im2col there.
const MIN_W: usize = 14;
/// See [`MIN_W`].
const MIN_CHANNELS: usize = 8;
/// See [`MIN_W`].
const MAX_CHANNELS: usize = 32;

/// Whether `MEDSSL_CPU_CONV=auto` takes this path, on a CPU with AVX-512, for a 3×3 stride-1
/// padding-1 layer that Winograd does not take: see [`MIN_W`].
pub(super) fn auto(s: &ConvShape) -> bool {
    s.w >= MIN_W && s.cin.min(s.cout) >= MIN_CHANNELS && s.cin.max(s.cout) <= MAX_CHANNELS
}

#[cfg(test)]
mod tests {
    use super::super::conv::tests::{geom3 as geom, Path3};
    use super::*;

    const PATH: Path3 = Path3 { forward, backward };

    /// Forward, input, weight and bias gradients against the direct convolution in f64, on maps
    /// of every column-block layout: 1 to 16 columns (one vector, `Wp` set by the padding or by
    /// the vector), 17–32 (two), 33–64 (three and four), 65 and more (a 64-column block and a
    /// shorter one); square or not, down to 1 × 1; channel counts that are no multiple of the
    /// register tiles (4, 8, 16) on either side; batch 1; a batch cut into five parts, the last
    /// one shorter (the weight gradient summed across them). Without a bias the forward values
    /// are the same bits before the bias is added.
    #[test]
    fn matches_the_direct_convolution() {
        let shapes = [
            geom(2, 3, (5, 7), 4),
            geom(1, 5, (8, 16), 3),
            geom(2, 2, (1, 1), 3),
            geom(3, 6, (7, 14), 17),
            geom(2, 4, (28, 28), 9),
            geom(2, 3, (6, 31), 6),
            geom(1, 2, (4, 40), 5),
            geom(2, 3, (3, 64), 7),
            geom(1, 2, (5, 100), 3),
            geom(37, 7, (40, 40), 18),
        ];
        for s in shapes {
            if s.n == 37 {
                // Parts of 8, 8, 8, 8 and 5 images.
                let p = parts(&s);
                assert!(p.len() > 1 && p[0].len() > p[p.len() - 1].len(), "{p:?}");
            }
            PATH.check(&s, 0.0);
        }
    }

    /// The same bits on 1, 2, 3 and 8 threads: batch 1 (the channel blocks and tiles split
    /// across threads), fewer images than threads, and three parts (more threads than parts on
    /// 8).
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let three = geom(40, 16, (28, 28), 16);
        assert_eq!(parts(&three).len(), 3);
        for s in [geom(1, 16, (28, 28), 16), geom(5, 7, (9, 20), 6), three] {
            PATH.check_threads(&s);
        }
    }

    /// Parts: as many images each as the plane budget allows, at most 16, and the weight-gradient
    /// buffers bounded whatever the channels.
    #[test]
    fn parts_follow_their_budgets() {
        let count = |s: &ConvShape| parts(s).len();
        // 16 channels at 28 px: 32 planes of 30 × 32 per image, 17 images per part.
        assert_eq!(count(&geom(48, 16, (28, 28), 16)), 3);
        assert_eq!(count(&geom(400, 16, (28, 28), 16)), MAX_PARTS);
        // 512 channels each way: one part (a buffer of 2.4 M floats); 256: seven (0.6 M each)
        // where the planes would make ten.
        assert_eq!(count(&geom(48, 512, (4, 4), 512)), 1);
        assert_eq!(count(&geom(96, 256, (4, 4), 256)), 7);
    }

    /// The AVX-512 build and the baseline (arrays, `f32::mul_add`) give the same bits.
    #[test]
    fn vector_width_does_not_change_the_bits() {
        PATH.check_baseline_bits(&geom(3, 5, (9, 37), 6));
    }
}
