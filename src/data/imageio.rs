//! Image decoding and resizing shared by the readers.

use std::path::Path;

use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, RgbImage};

use crate::error::{Error, Result};

/// A decoded image, u8 HWC.
pub(crate) struct Decoded {
    pub height: usize,
    pub width: usize,
    /// 1 when the source is grey (with or without alpha), else 3.
    pub channels: usize,
    pub data: Vec<u8>,
}

fn from_dynamic(img: DynamicImage) -> Decoded {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let grey = !img.color().has_color();
    if grey {
        Decoded {
            height: h,
            width: w,
            channels: 1,
            data: img.into_luma8().into_raw(),
        }
    } else {
        Decoded {
            height: h,
            width: w,
            channels: 3,
            data: img.into_rgb8().into_raw(),
        }
    }
}

/// Decodes an in-memory image; `what` names it in errors (file, pack entry).
pub(crate) fn decode_bytes(bytes: &[u8], what: &str) -> Result<Decoded> {
    let img = image::load_from_memory(bytes)
        .map_err(|e| Error::msg(format!("{what}: cannot decode image: {e}")))?;
    Ok(from_dynamic(img))
}

/// Reads and decodes an image file; `what` adds context (e.g. the CSV row).
pub(crate) fn decode_file(path: &Path, what: &str) -> Result<Decoded> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let ctx = if what.is_empty() {
        path.display().to_string()
    } else {
        format!("{} ({what})", path.display())
    };
    decode_bytes(&bytes, &ctx)
}

/// Converts u8 HWC between 1 and 3 channels (grey → RGB replicates; RGB → grey is refused by the
/// callers, which promote the whole dataset to RGB instead).
pub(crate) fn to_channels(d: Decoded, channels: usize) -> Decoded {
    if d.channels == channels {
        return d;
    }
    assert!(
        d.channels == 1 && channels == 3,
        "only grey → RGB promotion"
    );
    let mut data = Vec::with_capacity(d.data.len() * 3);
    for &v in &d.data {
        data.extend_from_slice(&[v, v, v]);
    }
    Decoded {
        channels: 3,
        data,
        ..d
    }
}

/// Bicubic (Catmull-Rom) resize of u8 HWC to `out_h × out_w`; a no-op when the size matches.
pub(crate) fn resize(
    data: &[u8],
    h: usize,
    w: usize,
    c: usize,
    out_h: usize,
    out_w: usize,
) -> Vec<u8> {
    if h == out_h && w == out_w {
        return data.to_vec();
    }
    let (ow, oh) = (out_w as u32, out_h as u32);
    match c {
        1 => {
            let img = GrayImage::from_raw(w as u32, h as u32, data.to_vec()).expect("size checked");
            image::imageops::resize(&img, ow, oh, FilterType::CatmullRom).into_raw()
        }
        3 => {
            let img = RgbImage::from_raw(w as u32, h as u32, data.to_vec()).expect("size checked");
            image::imageops::resize(&img, ow, oh, FilterType::CatmullRom).into_raw()
        }
        _ => unreachable!("channels validated"),
    }
}

/// Resizes every image of a packed u8 NHWC buffer (in parallel).
pub(crate) fn resize_all(
    images: &[u8],
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    size: usize,
) -> Vec<u8> {
    use rayon::prelude::*;
    if h == size && w == size {
        return images.to_vec();
    }
    let src = h * w * c;
    let dst = size * size * c;
    let mut out = vec![0u8; n * dst];
    out.par_chunks_mut(dst)
        .zip(images.par_chunks(src))
        .for_each(|(o, i)| o.copy_from_slice(&resize(i, h, w, c, size, size)));
    out
}

/// True for the image file extensions the readers accept.
pub(crate) fn is_image_ext(path: &Path) -> bool {
    matches!(
        path.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("png" | "jpg" | "jpeg")
    )
}
