//! PNG figures of a run: training curves from `metrics.jsonl` records and a confusion heat-map.
//!
//! Everything is drawn by hand on an RGB raster (lines, rectangles and a built-in 5×7 bitmap
//! font), so no font or plotting library is needed. Files are written atomically (temporary file
//! in the same directory, then rename).

use std::path::Path;

use image::{Rgb, RgbImage};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::train::metrics::{class_name, Metrics};

// ---------------------------------------------------------------------------------------------
// Font: classic 5×7 ASCII (0x20..=0x7E), five column bytes per glyph, bit 0 = top row.

#[rustfmt::skip]
const FONT5X7: [[u8; 5]; 95] = [
    [0x00,0x00,0x00,0x00,0x00], [0x00,0x00,0x5F,0x00,0x00], [0x00,0x07,0x00,0x07,0x00], // ' ' ! "
    [0x14,0x7F,0x14,0x7F,0x14], [0x24,0x2A,0x7F,0x2A,0x12], [0x23,0x13,0x08,0x64,0x62], // # $ %
    [0x36,0x49,0x55,0x22,0x50], [0x00,0x05,0x03,0x00,0x00], [0x00,0x1C,0x22,0x41,0x00], // & ' (
    [0x00,0x41,0x22,0x1C,0x00], [0x08,0x2A,0x1C,0x2A,0x08], [0x08,0x08,0x3E,0x08,0x08], // ) * +
    [0x00,0x50,0x30,0x00,0x00], [0x08,0x08,0x08,0x08,0x08], [0x00,0x60,0x60,0x00,0x00], // , - .
    [0x20,0x10,0x08,0x04,0x02], [0x3E,0x51,0x49,0x45,0x3E], [0x00,0x42,0x7F,0x40,0x00], // / 0 1
    [0x42,0x61,0x51,0x49,0x46], [0x21,0x41,0x45,0x4B,0x31], [0x18,0x14,0x12,0x7F,0x10], // 2 3 4
    [0x27,0x45,0x45,0x45,0x39], [0x3C,0x4A,0x49,0x49,0x30], [0x01,0x71,0x09,0x05,0x03], // 5 6 7
    [0x36,0x49,0x49,0x49,0x36], [0x06,0x49,0x49,0x29,0x1E], [0x00,0x36,0x36,0x00,0x00], // 8 9 :
    [0x00,0x56,0x36,0x00,0x00], [0x08,0x14,0x22,0x41,0x00], [0x14,0x14,0x14,0x14,0x14], // ; < =
    [0x00,0x41,0x22,0x14,0x08], [0x02,0x01,0x51,0x09,0x06], [0x32,0x49,0x79,0x41,0x3E], // > ? @
    [0x7E,0x11,0x11,0x11,0x7E], [0x7F,0x49,0x49,0x49,0x36], [0x3E,0x41,0x41,0x41,0x22], // A B C
    [0x7F,0x41,0x41,0x22,0x1C], [0x7F,0x49,0x49,0x49,0x41], [0x7F,0x09,0x09,0x01,0x01], // D E F
    [0x3E,0x41,0x41,0x51,0x32], [0x7F,0x08,0x08,0x08,0x7F], [0x00,0x41,0x7F,0x41,0x00], // G H I
    [0x20,0x40,0x41,0x3F,0x01], [0x7F,0x08,0x14,0x22,0x41], [0x7F,0x40,0x40,0x40,0x40], // J K L
    [0x7F,0x02,0x04,0x02,0x7F], [0x7F,0x04,0x08,0x10,0x7F], [0x3E,0x41,0x41,0x41,0x3E], // M N O
    [0x7F,0x09,0x09,0x09,0x06], [0x3E,0x41,0x51,0x21,0x5E], [0x7F,0x09,0x19,0x29,0x46], // P Q R
    [0x46,0x49,0x49,0x49,0x31], [0x01,0x01,0x7F,0x01,0x01], [0x3F,0x40,0x40,0x40,0x3F], // S T U
    [0x1F,0x20,0x40,0x20,0x1F], [0x7F,0x20,0x18,0x20,0x7F], [0x63,0x14,0x08,0x14,0x63], // V W X
    [0x03,0x04,0x78,0x04,0x03], [0x61,0x51,0x49,0x45,0x43], [0x00,0x7F,0x41,0x41,0x00], // Y Z [
    [0x02,0x04,0x08,0x10,0x20], [0x00,0x41,0x41,0x7F,0x00], [0x04,0x02,0x01,0x02,0x04], // \ ] ^
    [0x40,0x40,0x40,0x40,0x40], [0x00,0x01,0x02,0x04,0x00], [0x20,0x54,0x54,0x54,0x78], // _ ` a
    [0x7F,0x48,0x44,0x44,0x38], [0x38,0x44,0x44,0x44,0x20], [0x38,0x44,0x44,0x48,0x7F], // b c d
    [0x38,0x54,0x54,0x54,0x18], [0x08,0x7E,0x09,0x01,0x02], [0x0C,0x52,0x52,0x52,0x3E], // e f g
    [0x7F,0x08,0x04,0x04,0x78], [0x00,0x44,0x7D,0x40,0x00], [0x20,0x40,0x44,0x3D,0x00], // h i j
    [0x7F,0x10,0x28,0x44,0x00], [0x00,0x41,0x7F,0x40,0x00], [0x7C,0x04,0x18,0x04,0x78], // k l m
    [0x7C,0x08,0x04,0x04,0x78], [0x38,0x44,0x44,0x44,0x38], [0x7C,0x14,0x14,0x14,0x08], // n o p
    [0x08,0x14,0x14,0x18,0x7C], [0x7C,0x08,0x04,0x04,0x08], [0x48,0x54,0x54,0x54,0x20], // q r s
    [0x04,0x3F,0x44,0x40,0x20], [0x3C,0x40,0x40,0x20,0x7C], [0x1C,0x20,0x40,0x20,0x1C], // t u v
    [0x3C,0x40,0x30,0x40,0x3C], [0x44,0x28,0x10,0x28,0x44], [0x0C,0x50,0x50,0x50,0x3C], // w x y
    [0x44,0x64,0x54,0x4C,0x44], [0x00,0x08,0x36,0x41,0x00], [0x00,0x00,0x7F,0x00,0x00], // z { |
    [0x00,0x41,0x36,0x08,0x00], [0x08,0x04,0x08,0x10,0x08],                             // } ~
];

/// Horizontal advance of one glyph at scale 1 (5 columns + 1 blank).
const ADVANCE: i32 = 6;
/// Glyph height at scale 1.
const GLYPH_H: i32 = 7;

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const AXIS: Rgb<u8> = Rgb([60, 60, 60]);
/// Colour cycle (Tableau 10).
const PALETTE: [Rgb<u8>; 8] = [
    Rgb([31, 119, 180]),
    Rgb([255, 127, 14]),
    Rgb([44, 160, 44]),
    Rgb([214, 39, 40]),
    Rgb([148, 103, 189]),
    Rgb([140, 86, 75]),
    Rgb([227, 119, 194]),
    Rgb([127, 127, 127]),
];

/// A raster with clipped drawing primitives.
struct Canvas {
    img: RgbImage,
}

impl Canvas {
    fn new(w: u32, h: u32) -> Canvas {
        Canvas {
            img: RgbImage::from_pixel(w, h, WHITE),
        }
    }

    fn put(&mut self, x: i32, y: i32, c: Rgb<u8>) {
        if x >= 0 && y >= 0 && (x as u32) < self.img.width() && (y as u32) < self.img.height() {
            self.img.put_pixel(x as u32, y as u32, c);
        }
    }

    fn fill_rect(&mut self, x0: i32, y0: i32, w: i32, h: i32, c: Rgb<u8>) {
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                self.put(x, y, c);
            }
        }
    }

    fn rect_outline(&mut self, x0: i32, y0: i32, w: i32, h: i32, c: Rgb<u8>) {
        self.fill_rect(x0, y0, w, 1, c);
        self.fill_rect(x0, y0 + h - 1, w, 1, c);
        self.fill_rect(x0, y0, 1, h, c);
        self.fill_rect(x0 + w - 1, y0, 1, h, c);
    }

    /// A line of the given thickness (Bresenham, each step stamped with a square).
    fn line(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, thick: i32, c: Rgb<u8>) {
        let (mut x, mut y) = (x0.round() as i32, y0.round() as i32);
        let (xe, ye) = (x1.round() as i32, y1.round() as i32);
        let dx = (xe - x).abs();
        let dy = -(ye - y).abs();
        let sx = if x < xe { 1 } else { -1 };
        let sy = if y < ye { 1 } else { -1 };
        let mut err = dx + dy;
        let off = thick / 2;
        loop {
            self.fill_rect(x - off, y - off, thick, thick, c);
            if x == xe && y == ye {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Draws `text` with its top-left corner at (x, y); returns the width in pixels.
    fn text(&mut self, x: i32, y: i32, text: &str, scale: i32, c: Rgb<u8>) -> i32 {
        let mut cx = x;
        for ch in text.chars() {
            let glyph = glyph(ch);
            for (col, bits) in glyph.iter().enumerate() {
                for row in 0..GLYPH_H {
                    if bits >> row & 1 == 1 {
                        self.fill_rect(cx + col as i32 * scale, y + row * scale, scale, scale, c);
                    }
                }
            }
            cx += ADVANCE * scale;
        }
        cx - x
    }

    fn text_centered(&mut self, cx: i32, y: i32, text: &str, scale: i32, c: Rgb<u8>) {
        let w = text_width(text, scale);
        self.text(cx - w / 2, y, text, scale, c);
    }

    /// Text rotated 90° counter-clockwise (reads bottom to top), centred on (cx, cy).
    fn text_vertical(&mut self, cx: i32, cy: i32, text: &str, scale: i32, c: Rgb<u8>) {
        let w = text_width(text, scale);
        let x0 = cx - GLYPH_H * scale / 2;
        let y0 = cy + w / 2;
        for (i, ch) in text.chars().enumerate() {
            let glyph = glyph(ch);
            for (col, bits) in glyph.iter().enumerate() {
                for row in 0..GLYPH_H {
                    if bits >> row & 1 == 1 {
                        let px = x0 + row * scale;
                        let py = y0 - (i as i32 * ADVANCE + col as i32 + 1) * scale;
                        self.fill_rect(px, py, scale, scale, c);
                    }
                }
            }
        }
    }
}

fn text_width(text: &str, scale: i32) -> i32 {
    let n = text.chars().count() as i32;
    if n == 0 {
        0
    } else {
        (n * ADVANCE - 1) * scale
    }
}

/// Encodes `img` as PNG and writes it atomically to `path`.
fn save_png_atomic(path: &Path, img: &RgbImage) -> Result<()> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| Error::msg(format!("{}: PNG encoding failed: {e}", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::msg(format!("{}: not a file path", path.display())))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(buf.get_ref())?;
        f.sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

// ---------------------------------------------------------------------------------------------
// Line charts.

/// One named series of (x, y) points; non-finite points break the line.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
    dashed: bool,
}

/// "Nice" tick positions (1-2-5 steps) covering [lo, hi].
fn nice_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, f64) {
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let step = mag
        * if norm <= 1.0 {
            1.0
        } else if norm <= 2.0 {
            2.0
        } else if norm <= 2.5 {
            2.5
        } else if norm <= 5.0 {
            5.0
        } else {
            10.0
        };
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    let ticks = (first..=last).map(|k| k as f64 * step).collect();
    (ticks, step)
}

fn format_tick(v: f64, step: f64, max_abs: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    if !(1e-3..1e5).contains(&max_abs) {
        let s = format!("{v:.1e}");
        return s.replace(".0e", "e");
    }
    let decimals =
        (-(step.log10().floor()) as i32).max(0) as usize + usize::from(step_needs_extra(step));
    format!("{v:.decimals$}")
}

/// True when the step has two significant digits (e.g. 0.25).
fn step_needs_extra(step: f64) -> bool {
    let mag = 10f64.powf(step.log10().floor());
    let r = step / mag;
    (r - r.round()).abs() > 1e-6
}

/// Draws one chart panel in the rectangle (x0, y0, w, h).
#[allow(clippy::too_many_arguments)]
fn draw_panel(
    cv: &mut Canvas,
    x0: i32,
    y0: i32,
    w: i32,
    h: i32,
    title: &str,
    xlabel: &str,
    series: &[Series],
    y_range_hint: Option<(f64, f64)>,
) {
    let scale = 2;
    let ch = GLYPH_H * scale;

    let pts = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    let n_pts = pts().count();
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in pts() {
        xmin = xmin.min(x);
        xmax = xmax.max(x);
        ymin = ymin.min(y);
        ymax = ymax.max(y);
    }

    // Plot area.
    let left = x0 + 82;
    let right = x0 + w - 14;
    let top = y0 + 8 + ch + 12;
    let bottom = y0 + h - (ch * 2 + 20);
    let (pw, ph) = (right - left, bottom - top);
    cv.text_centered(left + pw / 2, y0 + 8, title, scale, BLACK);
    cv.rect_outline(left, top, pw + 1, ph + 1, AXIS);
    if n_pts == 0 {
        cv.text_centered(left + pw / 2, top + ph / 2 - ch / 2, "no data", scale, AXIS);
        return;
    }
    if let Some((lo, hi)) = y_range_hint {
        if ymin >= lo && ymax <= hi {
            ymin = lo;
            ymax = hi;
        }
    }
    if xmax - xmin <= 0.0 {
        xmin -= 1.0;
        xmax += 1.0;
    }
    if ymax - ymin <= 0.0 {
        let d = if ymax.abs() > 0.0 {
            ymax.abs() * 0.1
        } else {
            1.0
        };
        ymin -= d;
        ymax += d;
    } else if y_range_hint.is_none_or(|(lo, hi)| ymin != lo || ymax != hi) {
        let pad = (ymax - ymin) * 0.05;
        ymin -= pad;
        ymax += pad;
    }
    let sx = |x: f64| left as f64 + (x - xmin) / (xmax - xmin) * pw as f64;
    let sy = |y: f64| bottom as f64 - (y - ymin) / (ymax - ymin) * ph as f64;

    // Grid and ticks.
    let (yt, ystep) = nice_ticks(ymin, ymax, 5);
    let ymax_abs = yt.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    for &v in &yt {
        let py = sy(v).round() as i32;
        cv.fill_rect(left + 1, py, pw - 1, 1, GRID);
        cv.fill_rect(left - 5, py, 5, 1, AXIS);
        let label = format_tick(v, ystep, ymax_abs);
        let tw = text_width(&label, scale);
        cv.text(left - 9 - tw, py - ch / 2, &label, scale, BLACK);
    }
    let (mut xt, mut xstep) = nice_ticks(xmin, xmax, 6);
    if xmax - xmin >= 2.0 && xstep < 1.0 {
        // Epochs are integers: no fractional ticks.
        let t = nice_ticks(xmin, xmax, ((xmax - xmin) as usize).max(1));
        xt = t.0;
        xstep = t.1;
    }
    let xmax_abs = xt.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    for &v in &xt {
        let px = sx(v).round() as i32;
        cv.fill_rect(px, top + 1, 1, ph - 1, GRID);
        cv.fill_rect(px, bottom + 1, 1, 5, AXIS);
        let label = format_tick(v, xstep, xmax_abs);
        cv.text_centered(px, bottom + 9, &label, scale, BLACK);
    }
    cv.rect_outline(left, top, pw + 1, ph + 1, AXIS);
    cv.text_centered(left + pw / 2, bottom + 9 + ch + 6, xlabel, scale, BLACK);

    // Series.
    for (k, s) in series.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let mut prev: Option<(f64, f64)> = None;
        let mut seg = 0usize;
        for &(x, y) in &s.points {
            if !(x.is_finite() && y.is_finite()) {
                prev = None;
                continue;
            }
            let p = (sx(x), sy(y));
            if let Some(q) = prev {
                if !s.dashed || seg.is_multiple_of(2) {
                    cv.line(q.0, q.1, p.0, p.1, 3, color);
                }
                seg += 1;
            }
            // Marker.
            cv.fill_rect(p.0.round() as i32 - 3, p.1.round() as i32 - 3, 7, 7, color);
            prev = Some(p);
        }
    }

    // Legend: in the plot-area corner that covers the fewest drawn points.
    let named: Vec<(usize, &Series)> = series
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.points.is_empty())
        .collect();
    if !named.is_empty() {
        let row_h = ch + 6;
        let lw = named
            .iter()
            .map(|(_, s)| text_width(&s.name, scale))
            .max()
            .unwrap_or(0)
            + 44;
        let lh = named.len() as i32 * row_h + 8;
        // Samples along every segment, in pixel coordinates.
        let mut samples: Vec<(f64, f64)> = Vec::new();
        for s in series {
            let fin: Vec<(f64, f64)> = s
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|&(x, y)| (sx(x), sy(y)))
                .collect();
            samples.extend(fin.iter().copied());
            for w in fin.windows(2) {
                for t in 1..16 {
                    let f = t as f64 / 16.0;
                    samples.push((
                        w[0].0 + (w[1].0 - w[0].0) * f,
                        w[0].1 + (w[1].1 - w[0].1) * f,
                    ));
                }
            }
        }
        let corners = [
            (right - lw - 6, top + 6),
            (left + 8, top + 6),
            (right - lw - 6, bottom - lh - 6),
            (left + 8, bottom - lh - 6),
        ];
        let covered = |&(lx, ly): &(i32, i32)| {
            samples
                .iter()
                .filter(|&&(x, y)| {
                    x >= (lx - 6) as f64
                        && x <= (lx + lw + 6) as f64
                        && y >= (ly - 6) as f64
                        && y <= (ly + lh + 6) as f64
                })
                .count()
        };
        // First corner with the minimum count (top-right preferred on ties).
        let (lx, ly) = corners
            .iter()
            .copied()
            .min_by_key(|c| covered(c))
            .unwrap_or(corners[0]);
        cv.fill_rect(lx, ly, lw, lh, WHITE);
        cv.rect_outline(lx, ly, lw, lh, AXIS);
        for (row, (k, s)) in named.iter().enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            let yy = ly + 6 + row as i32 * row_h;
            if s.dashed {
                cv.fill_rect(lx + 6, yy + ch / 2 - 1, 10, 3, color);
                cv.fill_rect(lx + 22, yy + ch / 2 - 1, 10, 3, color);
            } else {
                cv.fill_rect(lx + 6, yy + ch / 2 - 1, 26, 3, color);
            }
            cv.text(lx + 38, yy, &s.name, scale, BLACK);
        }
    }
}

/// Looks up a number at a `/`-separated path inside a record.
fn num_at(v: &Value, path: &str) -> Option<f64> {
    let mut cur = v;
    for part in path.split('/') {
        cur = cur.get(part)?;
    }
    cur.as_f64()
}

/// Builds a series from the records; records without the field are skipped.
fn series(records: &[Value], xs: &[f64], path: &str, name: &str, dashed: bool) -> Series {
    let points = records
        .iter()
        .zip(xs)
        .filter_map(|(r, &x)| num_at(r, path).map(|y| (x, y)))
        .collect();
    Series {
        name: name.to_string(),
        points,
        dashed,
    }
}

/// Width and height of the curves figure.
pub const CURVES_SIZE: (u32, u32) = (1200, 800);

/// Plots training curves from per-epoch `metrics.jsonl` records into a 1200×800 PNG with six
/// panels: training losses, λ ramps, mean DSR weight, learning rate, validation macro-AUC and
/// validation accuracy (teacher and student). Missing fields are skipped; a panel with no data
/// says so. A record's x value is its `"epoch"`, or its 1-based position when that is absent.
pub fn plot_curves(path: &Path, records: &[Value]) -> Result<()> {
    let (w, h) = CURVES_SIZE;
    let mut cv = Canvas::new(w, h);
    let xs: Vec<f64> = records
        .iter()
        .enumerate()
        .map(|(i, r)| num_at(r, "epoch").unwrap_or((i + 1) as f64))
        .collect();
    let s = |p: &str, n: &str| series(records, &xs, p, n, false);
    let sd = |p: &str, n: &str| series(records, &xs, p, n, true);

    type Panel<'a> = (&'a str, Vec<Series>, Option<(f64, f64)>);
    let panels: Vec<Panel> = vec![
        (
            "Training losses",
            vec![
                s("train/loss", "total"),
                s("train/loss_sup", "supervised"),
                s("train/loss_cons", "consistency"),
                s("train/loss_pgc", "PGC"),
            ],
            None,
        ),
        (
            "Loss weights (lambda ramps)",
            vec![
                s("train/lambda_cons", "lambda_cons"),
                s("train/lambda_pgc", "lambda_pgc"),
            ],
            None,
        ),
        (
            "Mean DSR weight",
            vec![s("train/mean_weight", "mean weight")],
            Some((0.0, 1.0)),
        ),
        ("Learning rate", vec![s("train/lr", "lr")], None),
        (
            "Validation macro-AUC",
            vec![
                s("val_teacher/macro_auc", "teacher"),
                sd("val_student/macro_auc", "student"),
            ],
            Some((0.0, 1.0)),
        ),
        (
            "Validation accuracy",
            vec![
                s("val_teacher/accuracy", "teacher"),
                sd("val_student/accuracy", "student"),
                s("val_teacher/balanced_accuracy", "teacher bal."),
                sd("val_student/balanced_accuracy", "student bal."),
            ],
            Some((0.0, 1.0)),
        ),
    ];
    let (cols, rows) = (3, 2);
    let (pw, ph) = (w as i32 / cols, h as i32 / rows);
    for (i, (title, ser, hint)) in panels.iter().enumerate() {
        let (c, r) = (i as i32 % cols, i as i32 / cols);
        // Keep legend colours stable per panel even when some series are empty.
        draw_panel(&mut cv, c * pw, r * ph, pw, ph, title, "epoch", ser, *hint);
    }
    save_png_atomic(path, &cv.img)
}

/// Plots the confusion matrix as a heat-map (cells shaded by row-normalised recall, with counts).
pub fn plot_confusion(path: &Path, m: &Metrics, class_names: &[String]) -> Result<()> {
    let k = m.confusion.len();
    if k == 0 {
        crate::bail!("plot_confusion: empty confusion matrix");
    }
    let names: Vec<String> = (0..k).map(|c| class_name(class_names, c)).collect();
    let scale = 2;
    let ch = GLYPH_H * scale;
    let cell = (640 / k as i32).clamp(48, 120);
    let name_w = names
        .iter()
        .map(|n| text_width(n, scale))
        .max()
        .unwrap_or(0);
    let left = 30 + ch + 12 + name_w + 12;
    let top = 16 + ch + 10 + ch + 10 + name_w + 12;
    let legend_w = 20 + 6 + text_width("100%", scale) + 10;
    let title = format!("Confusion matrix (n={}, acc={:.4})", m.n, m.accuracy);
    let footnote = "cells: count and row % (recall)";
    let width = (left + cell * k as i32 + 30 + legend_w)
        .max(text_width(&title, scale) + 40)
        .max(left + text_width(footnote, scale) + 20);
    let height = top + cell * k as i32 + 20 + ch + 20;
    let mut cv = Canvas::new(width as u32, height as u32);

    cv.text_centered(width / 2, 16, &title, scale, BLACK);
    let grid_cx = left + cell * k as i32 / 2;
    cv.text_centered(grid_cx, 16 + ch + 10, "predicted", scale, BLACK);
    cv.text_vertical(20 + ch / 2, top + cell * k as i32 / 2, "true", scale, BLACK);

    let shade = |f: f64| {
        let f = f.clamp(0.0, 1.0);
        let lerp = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
        Rgb([lerp(247.0, 8.0), lerp(251.0, 48.0), lerp(255.0, 107.0)])
    };
    for (t, row) in m.confusion.iter().enumerate() {
        let support: usize = row.iter().sum();
        let y = top + t as i32 * cell;
        let label_w = text_width(&names[t], scale);
        cv.text(
            left - 12 - label_w,
            y + cell / 2 - ch / 2,
            &names[t],
            scale,
            BLACK,
        );
        for (p, &v) in row.iter().enumerate() {
            let x = left + p as i32 * cell;
            let frac = if support > 0 {
                v as f64 / support as f64
            } else {
                0.0
            };
            cv.fill_rect(x, y, cell, cell, shade(frac));
            cv.rect_outline(x, y, cell + 1, cell + 1, Rgb([200, 200, 200]));
            let tc = if frac > 0.5 { WHITE } else { BLACK };
            let count = v.to_string();
            let cs = if text_width(&count, scale) + 6 <= cell {
                scale
            } else {
                1
            };
            cv.text_centered(
                x + cell / 2,
                y + cell / 2 - GLYPH_H * cs - 2,
                &count,
                cs,
                tc,
            );
            if support > 0 {
                let pct = format!("{:.0}%", 100.0 * frac);
                let ps = if text_width(&pct, scale) + 6 <= cell {
                    scale
                } else {
                    1
                };
                cv.text_centered(x + cell / 2, y + cell / 2 + 4, &pct, ps, tc);
            }
        }
    }
    // Column labels, vertical, bottom-aligned just above the grid.
    for (p, name) in names.iter().enumerate() {
        let x = left + p as i32 * cell + cell / 2;
        let tw = text_width(name, scale);
        cv.text_vertical(x, top - 10 - tw / 2, name, scale, BLACK);
    }
    cv.rect_outline(left, top, cell * k as i32 + 1, cell * k as i32 + 1, AXIS);

    // Colour bar for the row-normalised fraction.
    let bx = left + cell * k as i32 + 30;
    let bh = cell * k as i32;
    for i in 0..bh {
        let f = 1.0 - i as f64 / (bh - 1).max(1) as f64;
        cv.fill_rect(bx, top + i, 20, 1, shade(f));
    }
    cv.rect_outline(bx, top, 20, bh, AXIS);
    cv.text(bx + 26, top, "100%", scale, BLACK);
    cv.text(bx + 26, top + bh / 2 - ch / 2, "50%", scale, BLACK);
    cv.text(bx + 26, top + bh - ch, "0%", scale, BLACK);
    cv.text(left, top + bh + 16, footnote, scale, AXIS);
    save_png_atomic(path, &cv.img)
}

/// The 5×7 bitmap of a printable ASCII character (`?` for anything else).
fn glyph(ch: char) -> [u8; 5] {
    let code = ch as u32;
    let i = if (0x20..=0x7E).contains(&code) {
        code
    } else {
        '?' as u32
    } - 0x20;
    FONT5X7[i as usize]
}
