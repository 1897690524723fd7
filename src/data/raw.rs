//! medssl raw arrays (`images.u8`, `labels.u8`, `split.u8`, `meta.json`) and the HAM10000
//! 200×150 JPEG pack (`jpeg_200x150.bin` + little-endian u64 offsets `jpeg_200x150.idx`, N+1
//! entries, image i = bin[idx[i]..idx[i+1]]).

use std::path::Path;

use rayon::prelude::*;

use super::dataset::{Benchmark, Dataset, Format, Split};
use super::imageio;
use crate::bail;
use crate::error::{Error, Result};

pub(crate) const PACK_BIN: &str = "jpeg_200x150.bin";
pub(crate) const PACK_IDX: &str = "jpeg_200x150.idx";

/// The fields of `meta.json` the reader needs.
pub(crate) struct Meta {
    pub n: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub classes: Vec<String>,
}

pub(crate) fn read_meta(dir: &Path) -> Result<Meta> {
    let path = dir.join("meta.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::msg(format!("{}: invalid JSON: {e}", path.display())))?;
    let int = |k: &str| -> Result<usize> {
        v.get(k)
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
            .ok_or_else(|| {
                Error::msg(format!(
                    "{}: missing or non-integer field \"{k}\"",
                    path.display()
                ))
            })
    };
    let classes = v
        .get("classes")
        .and_then(|c| c.as_array())
        .ok_or_else(|| {
            Error::msg(format!(
                "{}: missing array field \"classes\"",
                path.display()
            ))
        })?
        .iter()
        .enumerate()
        .map(|(i, c)| {
            c.as_str().map(str::to_string).ok_or_else(|| {
                Error::msg(format!("{}: classes[{i}] is not a string", path.display()))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Meta {
        n: int("N")?,
        height: int("H")?,
        width: int("W")?,
        channels: int("C")?,
        classes,
    })
}

/// Reads a whole file and checks its length.
fn read_exact_len(path: &Path, want: usize, what: &str) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.len() != want {
        bail!(
            "{}: {} bytes, expected {want} ({what}); the file is truncated or does not match meta.json",
            path.display(),
            bytes.len()
        );
    }
    Ok(bytes)
}

fn read_labels(dir: &Path, meta: &Meta) -> Result<Vec<usize>> {
    let path = dir.join("labels.u8");
    let raw = read_exact_len(&path, meta.n, &format!("u8 [{}]", meta.n))?;
    let k = meta.classes.len();
    if let Some((row, &l)) = raw.iter().enumerate().find(|(_, &l)| l as usize >= k) {
        bail!(
            "{}: row {row}: label {l} out of range (meta.json lists {k} classes)",
            path.display()
        );
    }
    Ok(raw.into_iter().map(usize::from).collect())
}

fn read_split(path: &Path, n: usize) -> Result<Vec<Split>> {
    let raw = read_exact_len(path, n, &format!("u8 [{n}]"))?;
    raw.iter()
        .enumerate()
        .map(|(row, &c)| {
            Split::from_code(c).ok_or_else(|| {
                Error::msg(format!(
                    "{}: row {row}: split code {c} (expected 0 train, 1 val or 2 test)",
                    path.display()
                ))
            })
        })
        .collect()
}

/// `split_racmt.u8` + `racmt_row.u16` when both exist (one without the other is an error).
fn read_benchmark(dir: &Path, n: usize) -> Result<Option<Benchmark>> {
    let sp = dir.join("split_racmt.u8");
    let rp = dir.join("racmt_row.u16");
    match (sp.is_file(), rp.is_file()) {
        (false, false) => return Ok(None),
        (true, false) => bail!("{}: missing (needed with {})", rp.display(), sp.display()),
        (false, true) => bail!("{}: missing (needed with {})", sp.display(), rp.display()),
        (true, true) => {}
    }
    let split = read_split(&sp, n)?;
    let raw = read_exact_len(&rp, 2 * n, &format!("little-endian u16 [{n}]"))?;
    let row = raw
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
        .collect();
    Ok(Some(Benchmark {
        split,
        row,
        source: sp.display().to_string(),
    }))
}

/// Everything but the pixels: labels, split, benchmark, ids.
fn read_common(dir: &Path, meta: &Meta, format: Format) -> Result<Dataset> {
    let labels = read_labels(dir, meta)?;
    let sp = dir.join("split.u8");
    let (split, split_source) = if sp.is_file() {
        (
            Some(read_split(&sp, meta.n)?),
            Some(sp.display().to_string()),
        )
    } else {
        (None, None)
    };
    Ok(Dataset {
        source: dir.to_path_buf(),
        format,
        height: meta.height,
        width: meta.width,
        channels: meta.channels,
        images: Vec::new(),
        labels,
        classes: meta.classes.clone(),
        split,
        split_source,
        ids: (0..meta.n).map(|i| format!("row {i}")).collect(),
        benchmark: read_benchmark(dir, meta.n)?,
    })
}

/// Reads a medssl raw directory; resizes when `image_size` differs from the native size.
pub(crate) fn load_raw(dir: &Path, image_size: Option<usize>) -> Result<Dataset> {
    let meta = read_meta(dir)?;
    if meta.channels != 1 && meta.channels != 3 {
        bail!(
            "{}: C = {} (only 1 or 3 channels are supported)",
            dir.join("meta.json").display(),
            meta.channels
        );
    }
    let mut ds = read_common(dir, &meta, Format::Raw)?;
    let path = dir.join("images.u8");
    let len = meta.n * meta.height * meta.width * meta.channels;
    let images = read_exact_len(
        &path,
        len,
        &format!(
            "u8 [{}, {}, {}, {}]",
            meta.n, meta.height, meta.width, meta.channels
        ),
    )?;
    ds.images = match image_size {
        Some(s) if s != meta.height || s != meta.width => {
            ds.height = s;
            ds.width = s;
            imageio::resize_all(&images, meta.n, meta.height, meta.width, meta.channels, s)
        }
        _ => images,
    };
    Ok(ds)
}

/// Decodes the JPEG pack beside the raw arrays and resizes each image (whole image, aspect
/// squashed like `images.u8`) to `size × size`.
pub(crate) fn load_jpeg_pack(dir: &Path, size: usize) -> Result<Dataset> {
    let meta = read_meta(dir)?;
    let mut ds = read_common(dir, &meta, Format::JpegPack)?;
    let idx_path = dir.join(PACK_IDX);
    let bin_path = dir.join(PACK_BIN);
    let raw = read_exact_len(
        &idx_path,
        8 * (meta.n + 1),
        &format!("little-endian u64 [{}]", meta.n + 1),
    )?;
    let idx: Vec<u64> = raw
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let bin = std::fs::read(&bin_path).map_err(|e| Error::io(&bin_path, e))?;
    if idx[0] != 0 {
        bail!("{}: entry 0 is {} (expected 0)", idx_path.display(), idx[0]);
    }
    for i in 0..meta.n {
        if idx[i + 1] <= idx[i] {
            bail!(
                "{}: offsets not increasing at image {i} ({} then {})",
                idx_path.display(),
                idx[i],
                idx[i + 1]
            );
        }
    }
    if idx[meta.n] != bin.len() as u64 {
        bail!(
            "{}: last offset {} but {} is {} bytes (truncated or mismatched pack)",
            idx_path.display(),
            idx[meta.n],
            bin_path.display(),
            bin.len()
        );
    }
    let dst = size * size * 3;
    let mut images = vec![0u8; meta.n * dst];
    images
        .par_chunks_mut(dst)
        .enumerate()
        .try_for_each(|(i, out)| -> Result<()> {
            let bytes = &bin[idx[i] as usize..idx[i + 1] as usize];
            let what = format!(
                "{}: image {i} (bytes {}..{})",
                bin_path.display(),
                idx[i],
                idx[i + 1]
            );
            let d = imageio::to_channels(imageio::decode_bytes(bytes, &what)?, 3);
            out.copy_from_slice(&imageio::resize(&d.data, d.height, d.width, 3, size, size));
            Ok(())
        })?;
    ds.images = images;
    ds.height = size;
    ds.width = size;
    ds.channels = 3;
    Ok(ds)
}
