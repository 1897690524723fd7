//! 3×3 convolutions of stride 1 and padding 1 by Winograd's minimal filtering F(2×2, 3×3).
//!
//! The output is cut into 2×2 tiles. Each tile `Y` comes from the 4×4 input patch `d` around it
//! (rows `2ty−1 ..= 2ty+2`, columns likewise, zero outside the image) and a 3×3 kernel `g` as
//! `Y = Aᵀ[(G·g·Gᵀ) ⊙ (Bᵀ·d·B)]A`: 16 products per input and output channel where the direct
//! convolution takes 36 (2.25× fewer; on maps of odd size the last tile row and column are half
//! outside, 1.72× fewer at 7 × 7). With
//!
//! ```text
//!      ⎡1  0 −1  0⎤       ⎡ 1   0   0⎤        ⎡1 1  1  0⎤
//! Bᵀ = ⎢0  1  1  0⎥   G = ⎢1/2 1/2 1/2⎥   Aᵀ = ⎣0 1 −1 −1⎦
//!      ⎢0 −1  1  0⎥       ⎢1/2 −1/2 1/2⎥
//!      ⎣0  1  0 −1⎦       ⎣ 0   0   1⎦
//! ```
//!
//! (coefficients 0, ±1 and ±1/2 only: each transform is a few additions and exact halvings, and
//! the results stay as close to an f64 direct convolution as im2col's, within 1e-5 of each
//! tensor's largest value in the tests, the golden cases passing either way). Summed over the
//! input channels, the 16 transform points ξ are 16 independent GEMMs:
//! `M_ξ [Cout, tiles] = U_ξ [Cout, Cin] · V_ξ [Cin, tiles]`, with `U = G·g·Gᵀ` for every
//! channel pair (the weight transform) and `V = Bᵀ·d·B` for every input channel and tile (the
//! input transform); the output transform `Aᵀ·M·A` then gives each tile.
//!
//! The backward pass is the exact adjoint of these linear steps: `gM = A·gY·Aᵀ` per output tile
//! (zero beyond the image), the weight gradient `gU_ξ = Σ gM_ξ · V_ξᵀ` brought back to 3×3 by
//! `gW = Gᵀ·gU·G`, and the input gradient `gV_ξ = U_ξᵀ · gM_ξ` brought back by adding `B·gV·Bᵀ`
//! of the overlapping tiles into each input plane, tiles in order.
//!
//! Layouts: `V [16][C][nt]`, `M` and `gM [16][Cout][nt]`, `U` and `gU [16][Cout][Cin]`, point
//! `ξ = 4i + k` (row `i`, column `k` of the 4×4 transform), tile `j·T + ty·tw + tx` for image
//! `j` of a chunk of images (`T = th·tw` tiles per image, `th = ⌈H/2⌉`, `tw = ⌈W/2⌉`). The
//! batch is cut into chunks by its shape alone (`chunks`), each chunk's transforms run over its
//! (image, channel) planes in parallel and its 16 GEMMs side by side; the weight gradient sums
//! the chunks in order. The GEMMs' shapes, and so every result bit, do not depend on the number
//! of threads.

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::conv::{bias_grad, copy_row, inner_parallel, split, ConvShape, Grads, ImageColumns};
use super::elementwise::par_fill;
use super::gemm::sgemm;
use super::scratch;
use super::simd::widest_simd;

/// Transform points per tile (4 × 4).
const P: usize = 16;

/// Most floats in one chunk's transformed tiles of the wider side (`16 · max(Cin, Cout) · nt`),
/// 2 MiB: a chunk's transforms and products then stay in the cache shared by the cores between
/// the transform that writes them and the GEMM or transform that reads them (4 MiB chunks were
/// no faster on the development machine, 8 MiB slower for the 64- and 128-channel layers).
const CHUNK_FLOATS: usize = 1 << 19;

/// Fewest tiles in a chunk (when the batch has them), whatever [`CHUNK_FLOATS`] says: the
/// chunk's tiles are the GEMMs' columns (and the inner dimension of the weight gradient's), and
/// with fewer the products run well below the GEMM's peak (width 64's 512-channel layer, whose
/// 4 × 4 maps have 4 tiles each, at 64 tiles per chunk: backward GEMMs 23.4 ms, at 192 17.2).
const MIN_TILES: usize = 384;

/// Fewest input and output channels, and fewest multiply-adds of the direct convolution
/// (`N·H·W·Cin·Cout·9`), for which [`auto`] picks this path (`MEDSSL_CPU_CONV` unset or `auto`).
/// The GEMMs' inner dimension is a channel count and their other dimensions are the channels and
/// the batch's tiles; on smaller layers they run too far below the GEMM's peak, and the
/// transforms cost too much, for the 2.25× fewer products to pay. Measured on the development
/// machine (2 threads, batch 48, fastest of 3 alternating rounds, im2col time / this path's,
/// forward / backward): width 64's layers with 64 channels at 28 × 28 1.13 / 1.10, 128 at
/// 14 × 14 1.50 / 1.45, 256 at 7 × 7 1.32 / 1.32, 512 at 4 × 4 1.24 / 1.58; width 16's layers
/// (16 to 128 channels, at most 113 M multiply-adds) 0.66–0.92 / 0.76–0.95.
const MIN_CHANNELS: usize = 64;
/// See [`MIN_CHANNELS`].
const MIN_MACS: usize = 1 << 28;

/// Whether `MEDSSL_CPU_CONV=auto` takes this path for a 3×3 stride-1 padding-1 layer:
/// [`MIN_CHANNELS`] input and output channels and [`MIN_MACS`] multiply-adds.
pub(super) fn auto(s: &ConvShape) -> bool {
    s.cin.min(s.cout) >= MIN_CHANNELS && s.n * s.h * s.w * s.cin * s.cout * 9 >= MIN_MACS
}

/// Tile rows and columns of one image: `(⌈H/2⌉, ⌈W/2⌉)`.
fn tiles(s: &ConvShape) -> (usize, usize) {
    (s.h.div_ceil(2), s.w.div_ceil(2))
}

/// The batch's chunks: equal runs of images (the last may be shorter) whose transformed tiles
/// hold at most [`CHUNK_FLOATS`] floats, but at least [`MIN_TILES`] tiles and one image each.
fn chunks(s: &ConvShape) -> Vec<Range<usize>> {
    let (th, tw) = tiles(s);
    let per_image = P * s.cin.max(s.cout) * th * tw;
    let nb = (CHUNK_FLOATS / per_image.max(1)).max(MIN_TILES.div_ceil(th * tw));
    split(s.n, s.n.div_ceil(nb))
}

/// The 16 segments of plane `(j, r)` (image `j`, channel `r`) of a `[16][rows][nt]` matrix seen
/// as `cols`, one per point: `t` floats at column `j·t` of row `r` of every point's matrix.
///
/// # Safety
/// As [`ImageColumns::row`] for rows `ξ·rows + r`: no two live sets of segments may be for the
/// same plane.
#[allow(clippy::mut_from_ref)]
unsafe fn segments(cols: &ImageColumns, rows: usize, (j, r): (usize, usize)) -> [&mut [f32]; P] {
    // SAFETY: the caller's guarantee, passed on; the 16 rows are distinct.
    std::array::from_fn(|xi| unsafe { cols.row(j, xi * rows + r) })
}

/// Values the transforms handle side by side, one per lane of a vector register: kernels
/// (input channels) or tiles.
const L: usize = 16;

// The one-dimensional transforms, each a matrix times a column (their transposes are the
// adjoints used by the backward pass).

/// `Bᵀ·d`.
#[inline(always)]
fn bt([d0, d1, d2, d3]: [f32; 4]) -> [f32; 4] {
    [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
}
/// `B·v` (the adjoint of [`bt`]).
#[inline(always)]
fn b([v0, v1, v2, v3]: [f32; 4]) -> [f32; 4] {
    [v0, v1 - v2 + v3, v1 + v2 - v0, -v3]
}
/// `G·g`.
#[inline(always)]
fn g([g0, g1, g2]: [f32; 3]) -> [f32; 4] {
    [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2]
}
/// `Gᵀ·u` (the adjoint of [`g`]).
#[inline(always)]
fn gt([u0, u1, u2, u3]: [f32; 4]) -> [f32; 3] {
    [u0 + 0.5 * (u1 + u2), 0.5 * (u1 - u2), 0.5 * (u1 + u2) + u3]
}
/// `Aᵀ·m`.
#[inline(always)]
fn at([m0, m1, m2, m3]: [f32; 4]) -> [f32; 2] {
    [m0 + m1 + m2, m1 - m2 - m3]
}
/// `A·y` (the adjoint of [`at`]).
#[inline(always)]
fn a([y0, y1]: [f32; 2]) -> [f32; 4] {
    [y0, y0 + y1, y0 - y1, -y1]
}

/// `F·X·Fᵀ` for every lane `l` of `x` (`I × I` values, row-major, each [`L`] lanes) into `y`
/// (`O × O`), with the one-dimensional transform `f = F·`: `f` down every column of the lane's
/// `X`, then along every row of the result. Lane by lane, so the loop over lanes vectorises.
#[inline(always)]
fn sandwich<const I: usize, const O: usize, const II: usize, const OO: usize>(
    x: &[[f32; L]; II],
    y: &mut [[f32; L]; OO],
    f: impl Fn([f32; I]) -> [f32; O],
) {
    debug_assert!(II == I * I && OO == O * O);
    for l in 0..L {
        let cols: [[f32; O]; I] =
            std::array::from_fn(|k| f(std::array::from_fn(|i| x[i * I + k][l])));
        for r in 0..O {
            let row = f(std::array::from_fn(|k| cols[k][r]));
            for (c, v) in row.into_iter().enumerate() {
                y[r * O + c][l] = v;
            }
        }
    }
}

// The transforms run on the widest vectors the CPU has (`widest_simd`): additions, subtractions
// and exact halvings only (no multiply-adds to fuse), so every build gives the same bits.

widest_simd! {
    /// Output channel `co`'s kernels of `w [Cout, Cin, 3, 3]` transformed, `G·g·Gᵀ`, into its 16
    /// segments of `U`, [`L`] input channels at a time.
    fn weight_channel(w: &[f32], cin: usize, co: usize, seg: [&mut [f32]; P]) {
        let mut x = [[0.0f32; L]; 9];
        let mut u = [[0.0f32; L]; P];
        for c0 in (0..cin).step_by(L) {
            let n = L.min(cin - c0);
            for (l, k) in w[(co * cin + c0) * 9..][..n * 9].chunks_exact(9).enumerate() {
                for (e, v) in k.iter().enumerate() {
                    x[e][l] = *v;
                }
            }
            sandwich::<3, 4, 9, P>(&x, &mut u, g);
            for (xi, v) in u.iter().enumerate() {
                copy_lanes(&mut seg[xi][c0..c0 + n], &v[..n]);
            }
        }
    }
}

/// `U [16][Cout][Cin] = G·g·Gᵀ` for every kernel `g = w[co, ci]` of `w [Cout, Cin, 3, 3]`, into
/// a scratch buffer, output channels in parallel.
fn weight_transform(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut u = scratch::take(P * cout * cin);
    let pts = ImageColumns::new(&mut u, P * cout, cin, cin);
    (0..cout).into_par_iter().for_each(|co| {
        // SAFETY: output channel `co`'s segments, written by this call alone.
        weight_channel(w, cin, co, unsafe { segments(&pts, cout, (0, co)) });
    });
    u
}

widest_simd! {
    /// Output channel `co`'s kernel gradients `gw [Cin, 3, 3]` from `gu [16][Cout][Cin]`:
    /// `Gᵀ·gU·G`, [`L`] input channels at a time.
    fn weight_grad_channel(gu: &[f32], cout: usize, cin: usize, co: usize, gw: &mut [MaybeUninit<f32>]) {
        let pairs = cout * cin;
        let mut x = [[0.0f32; L]; P];
        let mut k = [[0.0f32; L]; 9];
        for c0 in (0..cin).step_by(L) {
            let n = L.min(cin - c0);
            for (xi, v) in x.iter_mut().enumerate() {
                copy_lanes(&mut v[..n], &gu[xi * pairs + co * cin + c0..][..n]);
            }
            sandwich::<4, 3, P, 9>(&x, &mut k, gt);
            for (l, dst) in gw[c0 * 9..][..n * 9].chunks_exact_mut(9).enumerate() {
                for (e, d) in dst.iter_mut().enumerate() {
                    d.write(k[e][l]);
                }
            }
        }
    }
}

/// `gW [Cout, Cin, 3, 3] = Gᵀ·gU·G` for every channel pair of `gu [16][Cout][Cin]`, output
/// channels in parallel.
fn weight_grad_inverse(gu: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    // SAFETY: chunk `co` is output channel `co`'s `Cin` kernels, all 9 values of each written.
    unsafe {
        par_fill(cout * cin * 9, cin * 9, |co, gw| {
            weight_grad_channel(gu, cout, cin, co, gw)
        })
    }
}

/// Copies the `n ≤ L` lanes in use: whole blocks as one fixed-length copy, shorter ones without
/// a call into `memmove`.
#[inline(always)]
fn copy_lanes(dst: &mut [f32], src: &[f32]) {
    match (
        <&mut [f32; L]>::try_from(&mut *dst),
        <&[f32; L]>::try_from(src),
    ) {
        (Ok(d), Ok(s)) => *d = *s,
        _ => copy_row(dst, src),
    }
}

/// Splits a plane `src [h, w]` into its four subsampled planes `q[2a + b] [rows, cols]`
/// (`rows·cols` floats apart): `q[2a + b][y][x]` is pixel `(2y + a, 2x + b)`, zero where that is
/// outside the image. Pixel `(a, b)` of every 2×2 tile is then one run of these planes, in the
/// tiles' order.
#[inline(always)]
fn subsample(src: &[f32], (h, w): (usize, usize), (rows, cols): (usize, usize), q: &mut [f32]) {
    let ql = rows * cols;
    debug_assert!(src.len() == h * w && h.div_ceil(2) <= rows && w.div_ceil(2) <= cols);
    q[..4 * ql].fill(0.0);
    for (r, row) in src.chunks_exact(w).enumerate() {
        let (y, a) = (r / 2, r % 2);
        let (q0, q1) = q[2 * a * ql..(2 * a + 2) * ql].split_at_mut(ql);
        let (even, odd) = (&mut q0[y * cols..][..cols], &mut q1[y * cols..][..cols]);
        for ((e, o), p) in even.iter_mut().zip(odd.iter_mut()).zip(row.chunks_exact(2)) {
            *e = p[0];
            *o = p[1];
        }
        if w % 2 == 1 {
            even[w / 2] = row[w - 1];
        }
    }
}

/// The padded plane of `src [h, w]` (its pixel `(r, c)` at `(r + 1, c + 1)`, zero around it)
/// as eight `rows × tw` planes, `ql` floats apart: plane `2·(2a + b) + s` holds pixel
/// `(2y + a, 2(x + s) + b)` of the padded plane at `[y][x]`, i.e. the subsampled plane of row
/// parity `a` and column parity `b` (as [`subsample`] splits a plane), from its column `s` on.
/// Point `(i, k)` of tile `(ty, tx)` is then pixel `[ty + i/2][tx]` of plane
/// `2·(2·(i%2) + k%2) + k/2`, so the tiles `t = ty·tw + tx` of a plane read one contiguous run
/// per point.
#[inline(always)]
fn subsample_shifted(
    src: &[f32],
    (h, w): (usize, usize),
    (rows, tw, ql): (usize, usize, usize),
    q: &mut [f32],
) {
    debug_assert!(src.len() == h * w && h.div_ceil(2) < rows && w.div_ceil(2) <= tw);
    q[..8 * ql].fill(0.0);
    let plane = |a: usize, b: usize, s: usize| (2 * (2 * a + b) + s) * ql;
    for (r, row) in src.chunks_exact(w).enumerate() {
        let pr = r + 1;
        let (y, a) = (pr / 2, pr % 2);
        // Pixel 2x (column 2x + 1, parity 1) is x of the unshifted plane and x − 1 of the
        // shifted one; pixel 2x + 1 (column 2x + 2, parity 0) is x + 1 unshifted, x shifted.
        let (lo, hi) = q.split_at_mut(plane(a, 1, 0));
        let (a0s0, a0s1) = lo[plane(a, 0, 0)..].split_at_mut(ql);
        let (a1s0, a1s1) = hi.split_at_mut(ql);
        let (a0s0, a0s1) = (&mut a0s0[y * tw..][..tw], &mut a0s1[y * tw..][..tw]);
        let (a1s0, a1s1) = (&mut a1s0[y * tw..][..tw], &mut a1s1[y * tw..][..tw]);
        for ((e, o), p) in a1s0
            .iter_mut()
            .zip(a0s1.iter_mut())
            .zip(row.chunks_exact(2))
        {
            *e = p[0];
            *o = p[1];
        }
        for ((o, e), p) in a0s0[1..]
            .iter_mut()
            .zip(a1s1.iter_mut())
            .zip(row[1..].chunks_exact(2))
        {
            *o = p[0];
            *e = p[1];
        }
        if w % 2 == 1 {
            a1s0[w / 2] = row[w - 1];
        }
    }
}

/// `dst[2x] = even[x] + bias`, `dst[2x + 1] = odd[x] + bias` for the `dst.len()` pixels of a row.
#[inline(always)]
fn interleave(dst: &mut [MaybeUninit<f32>], even: &[f32], odd: &[f32], bias: f32) {
    let w = dst.len();
    for ((d, e), o) in dst.chunks_exact_mut(2).zip(even).zip(odd) {
        d[0].write(*e + bias);
        d[1].write(*o + bias);
    }
    if w % 2 == 1 {
        dst[w - 1].write(even[w / 2] + bias);
    }
}

/// Runs `f(plane, segments, scratch)` for every (image `j`, channel) plane of images
/// `lo..lo+nb` of `x [N, C, H, W]`, planes in parallel: `segments` are the plane's 16 tile
/// segments of `dst [16][C][nb·T]`, `scratch` a buffer of `len` floats per job.
#[allow(clippy::too_many_arguments)]
fn for_planes(
    x: &[f32],
    c: usize,
    (h, w): (usize, usize),
    (lo, nb): (usize, usize),
    dst: &mut [f32],
    t: usize,
    len: usize,
    f: impl Fn(&[f32], [&mut [f32]; P], &mut [f32]) + Sync,
) {
    let pts = ImageColumns::new(dst, P * c, nb * t, t);
    (0..nb * c).into_par_iter().with_min_len(16).for_each_init(
        || vec![0.0f32; len],
        |buf, plane| {
            let (j, ch) = (plane / c, plane % c);
            let src = &x[((lo + j) * c + ch) * h * w..][..h * w];
            // SAFETY: plane `(j, ch)`'s segments, written by this call alone.
            f(src, unsafe { segments(&pts, c, (j, ch)) }, buf);
        },
    );
}

widest_simd! {
    /// [`input_transform`] of one plane `src [h, w]` into its segments, `buf` holding the four
    /// subsampled planes (`ql` floats apart, `tw + 1` wide) and the transformed tiles in the
    /// order `q` (`nq` per point).
    fn input_plane(
        src: &[f32],
        h_w: (usize, usize),
        th_tw: (usize, usize),
        seg: [&mut [f32]; P],
        buf: &mut [f32],
    ) {
        let (th, tw) = th_tw;
        let (t, ql) = (th * tw, (th + 1) * tw);
        subsample_shifted(src, h_w, (th + 1, tw, ql), buf);
        let mut d = [[0.0f32; L]; P];
        let mut o = [[0.0f32; L]; P];
        for t0 in (0..t).step_by(L) {
            let n = L.min(t - t0);
            for (xi, di) in d.iter_mut().enumerate() {
                let (i, k) = (xi / 4, xi % 4);
                let plane = &buf[(2 * (2 * (i % 2) + k % 2) + k / 2) * ql..][..ql];
                copy_lanes(&mut di[..n], &plane[t0 + (i / 2) * tw..][..n]);
            }
            sandwich::<4, 4, P, P>(&d, &mut o, bt);
            for (xi, oi) in o.iter().enumerate() {
                copy_lanes(&mut seg[xi][t0..t0 + n], &oi[..n]);
            }
        }
    }
}

/// `V [16][C][nb·T]`: `Bᵀ·d·B` for every tile's 4×4 patch `d` of images `lo..lo+nb` of
/// `x [N, C, H, W]` (zero outside the image), [`L`] tiles of a plane at a time, each point read
/// as a contiguous run of the plane's shifted subsampled planes ([`subsample_shifted`]) and
/// written as a contiguous run of `V`.
fn input_transform(x: &[f32], c: usize, s: &ConvShape, (lo, nb): (usize, usize), v: &mut [f32]) {
    let (th, tw) = tiles(s);
    let len = 8 * (th + 1) * tw;
    for_planes(
        x,
        c,
        (s.h, s.w),
        (lo, nb),
        v,
        th * tw,
        len,
        |src, seg, buf| input_plane(src, (s.h, s.w), (th, tw), seg, buf),
    );
}

widest_simd! {
    /// [`grad_output_transform`] of one plane `src [h, w]` into its segments, `z` holding the
    /// four subsampled planes (`th × tw`).
    fn grad_output_plane(
        src: &[f32],
        h_w: (usize, usize),
        th_tw: (usize, usize),
        seg: [&mut [f32]; P],
        z: &mut [f32],
    ) {
        let (h, w) = h_w;
        let (th, tw) = th_tw;
        let t = th * tw;
        subsample(src, (h, w), (th, tw), z);
        let mut d = [[0.0f32; L]; 4];
        let mut o = [[0.0f32; L]; P];
        for t0 in (0..t).step_by(L) {
            let n = L.min(t - t0);
            for (e, de) in d.iter_mut().enumerate() {
                copy_lanes(&mut de[..n], &z[e * t + t0..][..n]);
            }
            sandwich::<2, 4, 4, P>(&d, &mut o, a);
            for (xi, oi) in o.iter().enumerate() {
                copy_lanes(&mut seg[xi][t0..t0 + n], &oi[..n]);
            }
        }
    }
}

/// `gM [16][Cout][nb·T]`: `A·gY·Aᵀ` for every 2×2 output tile of images `lo..lo+nb` of
/// `gy [N, Cout, H, W]` (zero beyond the image): pixel `(a, b)` of tile `t` is pixel `t` of
/// subsampled plane `(a, b)` (`th × tw`), so [`L`] tiles at a time read contiguous runs and write
/// contiguous runs of `gM`.
fn grad_output_transform(gy: &[f32], s: &ConvShape, (lo, nb): (usize, usize), gm: &mut [f32]) {
    let (th, tw) = tiles(s);
    let t = th * tw;
    for_planes(
        gy,
        s.cout,
        (s.h, s.w),
        (lo, nb),
        gm,
        t,
        4 * t,
        |src, seg, z| grad_output_plane(src, (s.h, s.w), (th, tw), seg, z),
    );
}

/// The 16 points of tiles `t0 .. t0 + n` of plane `(j, r)` of `m [16][rows][nt]` (`t` tiles per
/// plane) into `x`, lane `l` holding tile `t0 + l`.
#[inline(always)]
fn load_points(
    m: &[f32],
    (rows, nt, t): (usize, usize, usize),
    (j, r): (usize, usize),
    (t0, n): (usize, usize),
    x: &mut [[f32; L]; P],
) {
    for (xi, v) in x.iter_mut().enumerate() {
        copy_lanes(&mut v[..n], &m[(xi * rows + r) * nt + j * t + t0..][..n]);
    }
}

widest_simd! {
    /// [`output_transform`] of plane `(j, co)` into `yp [h, w]`, `out` holding the four
    /// subsampled output planes (`th × tw`).
    fn output_plane(
        m: &[f32],
        cout_nt: (usize, usize),
        j_co: (usize, usize),
        h_w: (usize, usize),
        th_tw: (usize, usize),
        bias: f32,
        yp: &mut [MaybeUninit<f32>],
        out: &mut [f32],
    ) {
        let (cout, nt) = cout_nt;
        let (j, co) = j_co;
        let (h, w) = h_w;
        let (th, tw) = th_tw;
        let t = th * tw;
        let mut x = [[0.0f32; L]; P];
        let mut yt = [[0.0f32; L]; 4];
        for t0 in (0..t).step_by(L) {
            let n = L.min(t - t0);
            load_points(m, (cout, nt, t), (j, co), (t0, n), &mut x);
            sandwich::<4, 2, P, 4>(&x, &mut yt, at);
            for (e, ye) in yt.iter().enumerate() {
                copy_lanes(&mut out[e * t + t0..][..n], &ye[..n]);
            }
        }
        for (r, row) in yp[..h * w].chunks_exact_mut(w).enumerate() {
            let (ty, a) = (r / 2, r % 2);
            let even = &out[2 * a * t + ty * tw..][..tw];
            let odd = &out[(2 * a + 1) * t + ty * tw..][..tw];
            interleave(row, even, odd, bias);
        }
    }
}

/// Images `0..nb` of `y [nb, Cout, H, W]` (+ bias) from `m [16][Cout][nb·T]`: `Aᵀ·M·A` for every
/// tile, [`L`] tiles at a time, into the four subsampled output planes (pixel `(a, b)` of every
/// tile), which are then interleaved into the image rows.
fn output_transform(
    m: &[f32],
    s: &ConvShape,
    nb: usize,
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
) {
    let (th, tw) = tiles(s);
    let t = th * tw;
    y.par_chunks_mut(s.h * s.w)
        .with_min_len(16)
        .enumerate()
        .for_each_init(
            || vec![0.0f32; 4 * t],
            |out, (plane, yp)| {
                let (j, co) = (plane / s.cout, plane % s.cout);
                let bv = bias.map_or(0.0, |b| b[co]);
                output_plane(
                    m,
                    (s.cout, nb * t),
                    (j, co),
                    (s.h, s.w),
                    (th, tw),
                    bv,
                    yp,
                    out,
                );
            },
        );
}

widest_simd! {
    /// [`input_adjoint`] of plane `(j, ci)` into `gp [h, w]`, `buf` holding the four subsampled
    /// planes of the padded gradient and `gV` in the tile order `q`.
    fn adjoint_plane(
        gv: &[f32],
        cin_nt: (usize, usize),
        j_ci: (usize, usize),
        h_w: (usize, usize),
        th_tw: (usize, usize),
        gp: &mut [MaybeUninit<f32>],
        buf: &mut [f32],
    ) {
        let (cin, nt) = cin_nt;
        let (j, ci) = j_ci;
        let (h, w) = h_w;
        let (th, tw) = th_tw;
        let (t, ql) = (th * tw, (th + 1) * tw);
        let (q, rows) = buf.split_at_mut(8 * ql);
        q.fill(0.0);
        let mut x = [[0.0f32; L]; P];
        let mut d = [[0.0f32; L]; P];
        for t0 in (0..t).step_by(L) {
            let n = L.min(t - t0);
            for (xi, v) in x.iter_mut().enumerate() {
                copy_lanes(&mut v[..n], &gv[(xi * cin + ci) * nt + j * t + t0..][..n]);
            }
            sandwich::<4, 4, P, P>(&x, &mut d, b);
            for (xi, di) in d.iter().enumerate() {
                let (i, k) = (xi / 4, xi % 4);
                let plane = &mut q[(2 * (2 * (i % 2) + k % 2) + k / 2) * ql..][..ql];
                let dst = &mut plane[t0 + (i / 2) * tw..][..n];
                dst.iter_mut().zip(di).for_each(|(d, v)| *d += *v);
            }
        }
        // Image pixel (r, c) is padded pixel (r + 1, c + 1): the unshifted plane's value at its
        // column plus the shifted plane's one column to the left.
        let (even, odd) = rows.split_at_mut(tw);
        let odd = &mut odd[..tw];
        for (r, row) in gp[..h * w].chunks_exact_mut(w).enumerate() {
            let pr = r + 1;
            let (y, a) = (pr / 2, pr % 2);
            let at = |b: usize, s: usize| &q[(2 * (2 * a + b) + s) * ql + y * tw..][..tw];
            // Pixel 2x: parity 1 at x; pixel 2x + 1: parity 0 at x + 1.
            even.copy_from_slice(at(1, 0));
            for (e, v) in even[1..].iter_mut().zip(at(1, 1)) {
                *e += *v;
            }
            odd.copy_from_slice(at(0, 1));
            for (o, v) in odd.iter_mut().zip(&at(0, 0)[1..]) {
                *o += *v;
            }
            interleave(row, even, odd, 0.0);
        }
    }
}

/// Images `0..nb` of the input gradient `gx [nb, Cin, H, W]` from `gv [16][Cin][nb·T]`: for
/// every plane, `B·gV·Bᵀ` of each tile ([`L`] tiles at a time, each point's run read from `gV`
/// as it is) added into the eight shifted subsampled planes (the adjoint of
/// [`input_transform`]'s reads, points in order), which are then summed and interleaved into the
/// gradient's rows.
fn input_adjoint(gv: &[f32], s: &ConvShape, nb: usize, gx: &mut [MaybeUninit<f32>]) {
    let (th, tw) = tiles(s);
    let t = th * tw;
    let len = 8 * (th + 1) * tw + 2 * tw;
    gx.par_chunks_mut(s.h * s.w)
        .with_min_len(16)
        .enumerate()
        .for_each_init(
            || vec![0.0f32; len],
            |buf, (plane, gp)| {
                let (j, ci) = (plane / s.cin, plane % s.cin);
                adjoint_plane(gv, (s.cin, nb * t), (j, ci), (s.h, s.w), (th, tw), gp, buf);
            },
        );
}

/// The forward convolution `y [N, Cout, H, W]` (+ bias) of `x [N, Cin, H, W]` with
/// `w [Cout, Cin, 3, 3]`, stride 1, padding 1.
pub fn forward(s: &ConvShape, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    debug_assert!(s.k == 3 && s.stride == 1 && s.pad == 1);
    let (th, tw) = tiles(s);
    let t = th * tw;
    let ys = s.cout * s.h * s.w;
    let chunks = chunks(s);
    let cap = chunks[0].len() * t;
    let u = weight_transform(w, s.cout, s.cin);
    let mut v = scratch::take(P * s.cin * cap);
    let mut m = scratch::take(P * s.cout * cap);
    let par = inner_parallel(P);
    let mut y: Vec<f32> = Vec::with_capacity(s.n * ys);
    for r in &chunks {
        let (nb, nt) = (r.len(), r.len() * t);
        input_transform(x, s.cin, s, (r.start, nb), &mut v[..P * s.cin * nt]);
        m[..P * s.cout * nt]
            .par_chunks_mut(s.cout * nt)
            .zip(v[..P * s.cin * nt].par_chunks(s.cin * nt))
            .zip(u[..P * s.cout * s.cin].par_chunks(s.cout * s.cin))
            .with_max_len(1)
            .for_each(|((mx, vx), ux)| {
                sgemm(s.cout, nt, s.cin, ux, false, vx, false, mx, false, par);
            });
        let yc = &mut y.spare_capacity_mut()[r.start * ys..r.end * ys];
        output_transform(&m[..P * s.cout * nt], s, nb, b, yc);
    }
    // SAFETY: every chunk's output transform wrote all of its images' outputs, and the chunks
    // cover the batch.
    unsafe { y.set_len(s.n * ys) };
    scratch::give(u);
    scratch::give(v);
    scratch::give(m);
    y
}

/// The backward pass of [`forward`]: `(gx, gw, gb)`, the input gradient only when `need_x`, the
/// bias gradient only when `has_bias`.
pub fn backward(
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    gy: &[f32],
    need_x: bool,
    has_bias: bool,
) -> Grads {
    debug_assert!(s.k == 3 && s.stride == 1 && s.pad == 1);
    let (th, tw) = tiles(s);
    let t = th * tw;
    let (xs, pairs) = (s.cin * s.h * s.w, s.cout * s.cin);
    let chunks = chunks(s);
    let cap = chunks[0].len() * t;
    let u = need_x.then(|| weight_transform(w, s.cout, s.cin));
    let mut gu = scratch::take(P * pairs);
    let mut v = scratch::take(P * s.cin * cap);
    let mut gm = scratch::take(P * s.cout * cap);
    let par = inner_parallel(P);
    let mut gx: Option<Vec<f32>> = need_x.then(|| Vec::with_capacity(s.n * xs));
    for (c, r) in chunks.iter().enumerate() {
        let (nb, nt) = (r.len(), r.len() * t);
        input_transform(x, s.cin, s, (r.start, nb), &mut v[..P * s.cin * nt]);
        grad_output_transform(gy, s, (r.start, nb), &mut gm[..P * s.cout * nt]);
        gu[..P * pairs]
            .par_chunks_mut(pairs)
            .zip(v[..P * s.cin * nt].par_chunks_mut(s.cin * nt))
            .zip(gm[..P * s.cout * nt].par_chunks(s.cout * nt))
            .enumerate()
            .with_max_len(1)
            .for_each(|(xi, ((gux, vx), gmx))| {
                // gU_ξ [Cout, Cin] (+)= gM_ξ · V_ξᵀ: written by the first chunk, which does not
                // accumulate, then summed chunk by chunk in order.
                sgemm(s.cout, s.cin, nt, gmx, false, vx, true, gux, c > 0, par);
                if let Some(u) = &u {
                    // gV_ξ [Cin, nt] = U_ξᵀ · gM_ξ, over V_ξ, which is no longer needed.
                    let ux = &u[xi * pairs..][..pairs];
                    sgemm(s.cin, nt, s.cout, ux, true, gmx, false, vx, false, par);
                }
            });
        if let Some(g) = gx.as_mut() {
            let gc = &mut g.spare_capacity_mut()[r.start * xs..r.end * xs];
            input_adjoint(&v[..P * s.cin * nt], s, nb, gc);
        }
    }
    if let Some(g) = gx.as_mut() {
        // SAFETY: every chunk's adjoint wrote all of its images' gradients, and the chunks
        // cover the batch.
        unsafe { g.set_len(s.n * xs) };
    }
    let gw = weight_grad_inverse(&gu[..P * pairs], s.cout, s.cin);
    if let Some(u) = u {
        scratch::give(u);
    }
    scratch::give(gu);
    scratch::give(v);
    scratch::give(gm);
    let gb = has_bias.then(|| bias_grad(gy, s.n, s.cout, s.h * s.w));
    (gx, gw, gb)
}

#[cfg(test)]
mod tests {
    use super::super::conv::tests::{data, geom3 as geom, Path3};
    use super::*;

    const PATH: Path3 = Path3 { forward, backward };

    /// Forward, input, weight and bias gradients against the direct convolution in f64: maps
    /// of odd and even size, square or not, down to 1 × 1 (a single tile, three quarters
    /// outside); batch 1; a batch cut into three chunks, the last one shorter (the weight
    /// gradient summed across them); channel counts that are no multiple of anything.
    #[test]
    fn matches_the_direct_convolution() {
        let shapes = [
            geom(2, 3, (5, 7), 4),
            geom(1, 5, (8, 8), 3),
            geom(3, 6, (7, 7), 5),
            geom(2, 2, (1, 1), 3),
            geom(1, 2, (2, 3), 2),
            geom(2, 4, (28, 28), 6),
            geom(37, 40, (14, 14), 33),
        ];
        for s in shapes {
            if s.n == 37 {
                // Chunks of 13, 13 and 11 images: the last one shorter.
                let c = chunks(&s);
                assert!(c.len() > 1 && c[0].len() > c[c.len() - 1].len(), "{c:?}");
            }
            PATH.check(&s, 1e-6);
        }
    }

    /// The same bits on 1, 2, 3 and 8 threads, with one chunk and with several.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        for s in [geom(5, 7, (9, 6), 6), geom(40, 48, (14, 14), 40)] {
            PATH.check_threads(&s);
        }
    }

    /// The AVX-512, AVX2 and baseline builds of the transforms give the same bits.
    #[test]
    fn vector_width_does_not_change_the_bits() {
        PATH.check_baseline_bits(&geom(3, 20, (9, 14), 18));
    }

    /// The weight transform and its adjoint: `⟨G·g·Gᵀ, u⟩ = ⟨g, Gᵀ·u·G⟩` for every kernel.
    #[test]
    fn weight_transforms_are_adjoint() {
        let (cout, cin) = (3, 5);
        let w = data(cout * cin * 9, 11);
        let gu = data(P * cout * cin, 12);
        let u = weight_transform(&w, cout, cin);
        let gw = weight_grad_inverse(&gu, cout, cin);
        let lhs: f64 = u[..P * cout * cin]
            .iter()
            .zip(&gu)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        let rhs: f64 = w.iter().zip(&gw).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!(
            (lhs - rhs).abs() <= 1e-5 * lhs.abs().max(1.0),
            "{lhs} against {rhs}"
        );
        scratch::give(u);
    }
}
