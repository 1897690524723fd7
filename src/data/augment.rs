//! Weak and strong views (SPEC §4) on u8 HWC images with 1 or 3 channels, output as normalised
//! f32 CHW.
//!
//! - Weak: horizontal and vertical flips (p = 0.5 each), a random integer translation of at most
//!   `translate` (12.5 %) of the side in each axis implemented as reflect-pad + crop, and an
//!   optional small rotation (uniform in ±`rotate_deg`, bilinear, reflect border; off by default).
//! - Strong: weak, then RandAugment — `ra_ops` (2) ops drawn uniformly with replacement from
//!   AutoContrast, Brightness, Color, Contrast, Equalize, Identity, Posterize, Rotate, Sharpness,
//!   ShearX, ShearY, Solarize, TranslateX, TranslateY, each with its own magnitude m ~ U[0, 1)
//!   and (for signed ops) a random sign — then Cutout (a square of side `cutout` × side, centre
//!   uniform in the image, clipped, filled with `fill`).
//!
//! Magnitude ranges (m = 1): enhance factors 1 ± 0.9 (Brightness, Color, Contrast, Sharpness, PIL
//! `ImageEnhance` semantics), Rotate ±30°, Shear ±0.3, Translate ±30 % of the side, Posterize to
//! 4 bits (8 − round(4m)), Solarize threshold 256·(1 − m). Geometric RandAugment ops sample
//! nearest-neighbour about the image centre and fill with `fill` (128, as FixMatch).
//! Every random number comes from the generator passed in, so a view is a pure function of
//! (image, generator state).

use rand::RngCore;

use super::dataset::Dataset;
use super::rng::{below, coin, unit};

/// Augmentation settings; the defaults are SPEC §4's.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AugmentConfig {
    /// Random horizontal flip.
    pub flip_h: bool,
    /// Random vertical flip (dermoscopy and X-ray crops have no canonical "up"; set false to
    /// keep orientation).
    pub flip_v: bool,
    /// Maximum translation as a fraction of the side (weak view).
    pub translate: f32,
    /// Maximum weak-view rotation in degrees (0 = off).
    pub rotate_deg: f32,
    /// RandAugment ops per strong view.
    pub ra_ops: usize,
    /// Cutout side as a fraction of the shorter side (0 = off).
    pub cutout: f32,
    /// Fill value for Cutout and RandAugment's geometric ops.
    pub fill: u8,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            flip_h: true,
            flip_v: true,
            translate: 0.125,
            rotate_deg: 0.0,
            ra_ops: 2,
            cutout: 0.5,
            fill: 128,
        }
    }
}

/// Per-channel normalisation `(v/255 − mean) / std`, as a lookup table.
#[derive(Clone, Debug)]
pub struct Normalize {
    /// Per-channel mean in [0, 1] units.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation in [0, 1] units.
    pub std: Vec<f32>,
    lut: Vec<f32>,
}

impl Normalize {
    /// From per-channel mean and std in [0, 1] units (a zero std is treated as 1).
    pub fn new(mean: Vec<f32>, std: Vec<f32>) -> Normalize {
        assert_eq!(mean.len(), std.len(), "mean/std channel count");
        let mut lut = Vec::with_capacity(256 * mean.len());
        for (m, s) in mean.iter().zip(&std) {
            let s = if *s > 0.0 { *s } else { 1.0 };
            lut.extend((0..256).map(|v| (v as f32 / 255.0 - m) / s));
        }
        Normalize { mean, std, lut }
    }

    /// Mean/std of the images `indices` of `ds` (its training split, typically).
    pub fn from_dataset(ds: &Dataset, indices: &[usize]) -> Normalize {
        let (m, s) = channel_stats(ds, indices);
        Normalize::new(m, s)
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.mean.len()
    }

    /// u8 HWC → normalised f32 CHW (`out.len() == h·w·c`).
    pub fn apply(&self, src: &[u8], out: &mut [f32]) {
        let c = self.channels();
        let hw = src.len() / c;
        debug_assert_eq!(out.len(), src.len());
        for ch in 0..c {
            let lut = &self.lut[ch * 256..(ch + 1) * 256];
            let o = &mut out[ch * hw..(ch + 1) * hw];
            for (p, v) in o.iter_mut().enumerate() {
                *v = lut[src[p * c + ch] as usize];
            }
        }
    }

    /// Normalised f32 CHW → u8 HWC (for previews).
    pub fn invert(&self, x: &[f32]) -> Vec<u8> {
        let c = self.channels();
        let hw = x.len() / c;
        let mut out = vec![0u8; x.len()];
        for ch in 0..c {
            let s = if self.std[ch] > 0.0 {
                self.std[ch]
            } else {
                1.0
            };
            for p in 0..hw {
                let v = (x[ch * hw + p] * s + self.mean[ch]) * 255.0;
                out[p * c + ch] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
        out
    }
}

/// Per-channel mean and (population) std, in [0, 1] units, over the images `indices`.
/// Exact integer sums, so the result does not depend on thread count.
pub fn channel_stats(ds: &Dataset, indices: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let c = ds.channels;
    let mut sum = vec![0u64; c];
    let mut sq = vec![0u64; c];
    for &i in indices {
        for px in ds.image(i).chunks_exact(c) {
            for ch in 0..c {
                let v = px[ch] as u64;
                sum[ch] += v;
                sq[ch] += v * v;
            }
        }
    }
    let n = (indices.len() * ds.height * ds.width).max(1) as f64;
    let mut mean = Vec::with_capacity(c);
    let mut std = Vec::with_capacity(c);
    for ch in 0..c {
        let m = sum[ch] as f64 / n;
        let var = (sq[ch] as f64 / n - m * m).max(0.0);
        mean.push((m / 255.0) as f32);
        std.push((var.sqrt() / 255.0) as f32);
    }
    (mean, std)
}

/// The RandAugment op list (order fixes which op a draw picks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RaOp {
    AutoContrast,
    Brightness,
    Color,
    Contrast,
    Equalize,
    Identity,
    Posterize,
    Rotate,
    Sharpness,
    ShearX,
    ShearY,
    Solarize,
    TranslateX,
    TranslateY,
}

impl RaOp {
    /// All ops, in draw order.
    pub const ALL: [RaOp; 14] = [
        RaOp::AutoContrast,
        RaOp::Brightness,
        RaOp::Color,
        RaOp::Contrast,
        RaOp::Equalize,
        RaOp::Identity,
        RaOp::Posterize,
        RaOp::Rotate,
        RaOp::Sharpness,
        RaOp::ShearX,
        RaOp::ShearY,
        RaOp::Solarize,
        RaOp::TranslateX,
        RaOp::TranslateY,
    ];
}

/// Makes views of images of one size.
#[derive(Clone, Debug)]
pub struct Augmenter {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub config: AugmentConfig,
    pub norm: Normalize,
}

/// Reflect index (no edge repeat, as torch `reflect` padding) into `0..n`.
#[inline]
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let mut i = i.rem_euclid(period);
    if i >= n {
        i = period - i;
    }
    i as usize
}

#[inline]
fn clamp_u8(v: f32) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

impl Augmenter {
    /// An augmenter for `h × w × c` images normalised by `norm`.
    pub fn new(h: usize, w: usize, c: usize, config: AugmentConfig, norm: Normalize) -> Augmenter {
        assert!(c == 1 || c == 3, "1 or 3 channels");
        assert_eq!(norm.channels(), c, "normalisation channels");
        Augmenter {
            height: h,
            width: w,
            channels: c,
            config,
            norm,
        }
    }

    /// For `ds`, with mean/std from the images `train`.
    pub fn for_dataset(ds: &Dataset, train: &[usize], config: AugmentConfig) -> Augmenter {
        Augmenter::new(
            ds.height,
            ds.width,
            ds.channels,
            config,
            Normalize::from_dataset(ds, train),
        )
    }

    /// Values per image (`H·W·C`).
    pub fn image_len(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// Weak-view flip/translate as per-axis source maps.
    fn weak_maps(&self, rng: &mut impl RngCore) -> (Vec<usize>, Vec<usize>) {
        let (h, w) = (self.height, self.width);
        let fh = self.config.flip_h && coin(rng);
        let fv = self.config.flip_v && coin(rng);
        let tx = (self.config.translate * w as f32).floor() as usize;
        let ty = (self.config.translate * h as f32).floor() as usize;
        let dx = below(rng, 2 * tx + 1) as isize - tx as isize;
        let dy = below(rng, 2 * ty + 1) as isize - ty as isize;
        let xmap = (0..w)
            .map(|x| {
                let s = reflect(x as isize - dx, w);
                if fh {
                    w - 1 - s
                } else {
                    s
                }
            })
            .collect();
        let ymap = (0..h)
            .map(|y| {
                let s = reflect(y as isize - dy, h);
                if fv {
                    h - 1 - s
                } else {
                    s
                }
            })
            .collect();
        (ymap, xmap)
    }

    /// The weak view as u8 HWC.
    pub fn weak_u8(&self, src: &[u8], rng: &mut impl RngCore) -> Vec<u8> {
        let (w, c) = (self.width, self.channels);
        let (ymap, xmap) = self.weak_maps(rng);
        let mut out = Vec::with_capacity(src.len());
        for &sy in &ymap {
            let row = &src[sy * w * c..(sy + 1) * w * c];
            for &sx in &xmap {
                out.extend_from_slice(&row[sx * c..sx * c + c]);
            }
        }
        if self.config.rotate_deg > 0.0 {
            let a = (2.0 * unit(rng) - 1.0) * self.config.rotate_deg.to_radians();
            out = self.rotate_bilinear_reflect(&out, a);
        }
        out
    }

    /// The strong view as u8 HWC.
    pub fn strong_u8(&self, src: &[u8], rng: &mut impl RngCore) -> Vec<u8> {
        let mut img = self.weak_u8(src, rng);
        for _ in 0..self.config.ra_ops {
            let op = RaOp::ALL[below(rng, RaOp::ALL.len())];
            let m = unit(rng);
            let sign = if coin(rng) { 1.0 } else { -1.0 };
            self.apply_op(&mut img, op, m, sign);
        }
        if self.config.cutout > 0.0 {
            self.cutout(&mut img, rng);
        }
        img
    }

    /// Weak view, normalised f32 CHW into `out`.
    pub fn weak(&self, src: &[u8], rng: &mut impl RngCore, out: &mut [f32]) {
        if self.config.rotate_deg > 0.0 {
            let v = self.weak_u8(src, rng);
            self.norm.apply(&v, out);
            return;
        }
        // Fused gather + normalise: the common case, no intermediate image.
        let (h, w, c) = (self.height, self.width, self.channels);
        let (ymap, xmap) = self.weak_maps(rng);
        let hw = h * w;
        for ch in 0..c {
            let lut = &self.norm.lut[ch * 256..(ch + 1) * 256];
            let o = &mut out[ch * hw..(ch + 1) * hw];
            for (y, &sy) in ymap.iter().enumerate() {
                let row = &src[sy * w * c..(sy + 1) * w * c];
                let orow = &mut o[y * w..(y + 1) * w];
                for (v, &sx) in orow.iter_mut().zip(&xmap) {
                    *v = lut[row[sx * c + ch] as usize];
                }
            }
        }
    }

    /// Strong view, normalised f32 CHW into `out`.
    pub fn strong(&self, src: &[u8], rng: &mut impl RngCore, out: &mut [f32]) {
        let v = self.strong_u8(src, rng);
        self.norm.apply(&v, out);
    }

    /// No augmentation, normalised f32 CHW into `out`.
    pub fn plain(&self, src: &[u8], out: &mut [f32]) {
        self.norm.apply(src, out);
    }

    /// Applies one RandAugment op with magnitude `m ∈ [0, 1)` and sign `sign = ±1`.
    pub fn apply_op(&self, img: &mut Vec<u8>, op: RaOp, m: f32, sign: f32) {
        let (h, w) = (self.height as f32, self.width as f32);
        let factor = 1.0 + sign * 0.9 * m;
        match op {
            RaOp::Identity => {}
            RaOp::AutoContrast => self.autocontrast(img),
            RaOp::Equalize => self.equalize(img),
            RaOp::Brightness => {
                let lut: Vec<u8> = (0..256).map(|v| clamp_u8(v as f32 * factor)).collect();
                img.iter_mut().for_each(|v| *v = lut[*v as usize]);
            }
            RaOp::Contrast => {
                let mean = self.grey_mean(img);
                let lut: Vec<u8> = (0..256)
                    .map(|v| clamp_u8(mean + factor * (v as f32 - mean)))
                    .collect();
                img.iter_mut().for_each(|v| *v = lut[*v as usize]);
            }
            RaOp::Color => {
                if self.channels == 3 {
                    let lut = blend_lut(factor);
                    for px in img.chunks_exact_mut(3) {
                        let l = grey_i(px);
                        for v in px.iter_mut() {
                            *v = (l + lut[(*v as i32 - l + 255) as usize]).clamp(0, 255) as u8;
                        }
                    }
                }
            }
            RaOp::Sharpness => self.sharpness(img, factor),
            RaOp::Posterize => {
                let bits = 8 - (4.0 * m).round() as u32;
                let mask = (0xffu32 << (8 - bits)) as u8;
                img.iter_mut().for_each(|v| *v &= mask);
            }
            RaOp::Solarize => {
                let t = (256.0 * (1.0 - m)).round() as u32;
                img.iter_mut().for_each(|v| {
                    if *v as u32 >= t {
                        *v = 255 - *v
                    }
                });
            }
            RaOp::Rotate => {
                let a = sign * 30f32.to_radians() * m;
                let (s, c) = a.sin_cos();
                *img = self.affine_nearest(img, [c, s, 0.0, -s, c, 0.0]);
            }
            RaOp::ShearX => {
                *img = self.affine_nearest(img, [1.0, sign * 0.3 * m, 0.0, 0.0, 1.0, 0.0])
            }
            RaOp::ShearY => {
                *img = self.affine_nearest(img, [1.0, 0.0, 0.0, sign * 0.3 * m, 1.0, 0.0])
            }
            RaOp::TranslateX => *img = self.shift(img, (sign * 0.3 * m * w).round() as isize, 0),
            RaOp::TranslateY => *img = self.shift(img, 0, (sign * 0.3 * m * h).round() as isize),
        }
    }

    fn grey_mean(&self, img: &[u8]) -> f32 {
        let n = (self.height * self.width) as u64;
        let s: u64 = if self.channels == 3 {
            img.chunks_exact(3).map(|p| grey_i(p) as u64).sum()
        } else {
            img.iter().map(|&v| v as u64).sum()
        };
        ((s + n / 2) / n) as f32
    }

    /// `img` moved right by `dx` and down by `dy` whole pixels, uncovered area = `fill`.
    fn shift(&self, img: &[u8], dx: isize, dy: isize) -> Vec<u8> {
        let (h, w, c) = (self.height as isize, self.width as isize, self.channels);
        let mut out = vec![self.config.fill; img.len()];
        let (x0, x1) = (dx.max(0), (w + dx).min(w));
        if x1 <= x0 {
            return out;
        }
        for y in dy.max(0)..(h + dy).min(h) {
            let sy = y - dy;
            let o = ((y * w + x0) as usize) * c;
            let i = ((sy * w + x0 - dx) as usize) * c;
            let len = (x1 - x0) as usize * c;
            out[o..o + len].copy_from_slice(&img[i..i + len]);
        }
        out
    }

    fn autocontrast(&self, img: &mut [u8]) {
        let c = self.channels;
        for ch in 0..c {
            let (mut lo, mut hi) = (255u8, 0u8);
            for px in img.chunks_exact(c) {
                lo = lo.min(px[ch]);
                hi = hi.max(px[ch]);
            }
            if hi <= lo {
                continue;
            }
            let scale = 255.0 / (hi - lo) as f32;
            let lut: Vec<u8> = (0..256)
                .map(|v| clamp_u8((v as f32 - lo as f32) * scale))
                .collect();
            for px in img.chunks_exact_mut(c) {
                px[ch] = lut[px[ch] as usize];
            }
        }
    }

    /// PIL `ImageOps.equalize`, per channel.
    fn equalize(&self, img: &mut [u8]) {
        let c = self.channels;
        for ch in 0..c {
            let mut hist = [0usize; 256];
            for px in img.chunks_exact(c) {
                hist[px[ch] as usize] += 1;
            }
            let nonzero: Vec<usize> = hist.iter().copied().filter(|&x| x > 0).collect();
            if nonzero.len() <= 1 {
                continue;
            }
            let step = (nonzero.iter().sum::<usize>() - nonzero[nonzero.len() - 1]) / 255;
            if step == 0 {
                continue;
            }
            let mut lut = [0u8; 256];
            let mut n = step / 2;
            for i in 0..256 {
                lut[i] = (n / step).min(255) as u8;
                n += hist[i];
            }
            for px in img.chunks_exact_mut(c) {
                px[ch] = lut[px[ch] as usize];
            }
        }
    }

    /// PIL `ImageEnhance.Sharpness`: blend with the SMOOTH-filtered image (border unchanged).
    fn sharpness(&self, img: &mut [u8], factor: f32) {
        let (h, w, c) = (self.height, self.width, self.channels);
        if h < 3 || w < 3 {
            return;
        }
        let src = img.to_vec();
        let lut = blend_lut(factor);
        let (r, cc) = (w * c, c);
        for y in 1..h - 1 {
            for p in (y * w + 1) * c..(y * w + w - 1) * c {
                let at = |q: usize| src[q] as i32;
                let s = at(p - r - cc)
                    + at(p - r)
                    + at(p - r + cc)
                    + at(p - cc)
                    + 5 * at(p)
                    + at(p + cc)
                    + at(p + r - cc)
                    + at(p + r)
                    + at(p + r + cc);
                let d = (s + 6) / 13;
                img[p] = (d + lut[(at(p) - d + 255) as usize]).clamp(0, 255) as u8;
            }
        }
    }

    /// Inverse-maps every output pixel through `[a, b, c, d, e, f]` about the image centre
    /// (`src = (a·X + b·Y + c, d·X + e·Y + f)`, X/Y relative to the centre), nearest neighbour,
    /// outside → `fill`.
    fn affine_nearest(&self, img: &[u8], m: [f32; 6]) -> Vec<u8> {
        let (h, w, c) = (self.height, self.width, self.channels);
        let (cx, cy) = ((w as f32 - 1.0) * 0.5, (h as f32 - 1.0) * 0.5);
        let mut out = vec![self.config.fill; img.len()];
        // floor(v + 0.5) by truncation of a positive number (no libm call per pixel).
        const OFF: f32 = 4096.5;
        for y in 0..h {
            let yy = y as f32 - cy;
            let bx = m[1] * yy + m[2] + cx - m[0] * cx + OFF;
            let by = m[4] * yy + m[5] + cy - m[3] * cx + OFF;
            let orow = &mut out[y * w * c..(y + 1) * w * c];
            for x in 0..w {
                let sx = (m[0] * x as f32 + bx) as isize - 4096;
                let sy = (m[3] * x as f32 + by) as isize - 4096;
                if sx >= 0 && sy >= 0 && (sx as usize) < w && (sy as usize) < h {
                    let s = (sy as usize * w + sx as usize) * c;
                    orow[x * c..x * c + c].copy_from_slice(&img[s..s + c]);
                }
            }
        }
        out
    }

    /// Rotation by `a` radians about the centre, bilinear, reflect border (weak view).
    fn rotate_bilinear_reflect(&self, img: &[u8], a: f32) -> Vec<u8> {
        let (h, w, c) = (self.height, self.width, self.channels);
        let (s, co) = a.sin_cos();
        let (cx, cy) = ((w as f32 - 1.0) * 0.5, (h as f32 - 1.0) * 0.5);
        let mut out = vec![0u8; img.len()];
        for y in 0..h {
            let yy = y as f32 - cy;
            for x in 0..w {
                let xx = x as f32 - cx;
                let sx = co * xx + s * yy + cx;
                let sy = -s * xx + co * yy + cy;
                let (x0, y0) = (sx.floor(), sy.floor());
                let (fx, fy) = (sx - x0, sy - y0);
                let (x0, y0) = (x0 as isize, y0 as isize);
                let xa = reflect(x0, w);
                let xb = reflect(x0 + 1, w);
                let ya = reflect(y0, h);
                let yb = reflect(y0 + 1, h);
                for ch in 0..c {
                    let p = |yy: usize, xx: usize| img[(yy * w + xx) * c + ch] as f32;
                    let top = p(ya, xa) * (1.0 - fx) + p(ya, xb) * fx;
                    let bot = p(yb, xa) * (1.0 - fx) + p(yb, xb) * fx;
                    out[(y * w + x) * c + ch] = clamp_u8(top * (1.0 - fy) + bot * fy);
                }
            }
        }
        out
    }

    fn cutout(&self, img: &mut [u8], rng: &mut impl RngCore) {
        let (h, w, c) = (self.height, self.width, self.channels);
        let side = (self.config.cutout * h.min(w) as f32).round() as usize;
        let cy = below(rng, h);
        let cx = below(rng, w);
        if side == 0 {
            return;
        }
        let y0 = cy.saturating_sub(side / 2);
        let x0 = cx.saturating_sub(side / 2);
        let y1 = (cy + side - side / 2).min(h);
        let x1 = (cx + side - side / 2).min(w);
        for y in y0..y1 {
            img[(y * w + x0) * c..(y * w + x1) * c].fill(self.config.fill);
        }
    }
}

/// ITU-R 601-2 luma (PIL's `L` conversion), rounded.
#[inline]
fn grey_i(px: &[u8]) -> i32 {
    (px[0] as i32 * 299 + px[1] as i32 * 587 + px[2] as i32 * 114 + 500) / 1000
}

/// `round(factor · k)` for `k = −255..=255` (index `k + 255`): the blend term of PIL's
/// `ImageEnhance` (`degenerate + factor · (image − degenerate)`).
fn blend_lut(factor: f32) -> [i32; 511] {
    let mut lut = [0i32; 511];
    for (i, v) in lut.iter_mut().enumerate() {
        *v = (factor * (i as f32 - 255.0)).round() as i32;
    }
    lut
}
