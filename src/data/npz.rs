//! MedMNIST `.npz`: `{train,val,test}_images` u8 [N,H,W] or [N,H,W,3], `{…}_labels` integer [N]
//! or [N,1]. Class names come from a `meta.json` beside the file when it has `classes`, else
//! `0..K-1` with K = max label + 1.

use std::io::{Read, Seek};
use std::path::Path;

use npyz::npz::NpzArchive;
use npyz::{NpyFile, Order};

use super::dataset::{Dataset, Format, Split};
use super::imageio;
use crate::bail;
use crate::error::{Error, Result};

fn array<'a, R: Read + Seek>(
    npz: &'a mut NpzArchive<R>,
    path: &Path,
    name: &str,
) -> Result<NpyFile<impl Read + 'a>> {
    let f = npz
        .by_name(name)
        .map_err(|e| Error::msg(format!("{}: array '{name}': {e}", path.display())))?
        .ok_or_else(|| Error::msg(format!("{}: missing array '{name}'", path.display())))?;
    if f.order() == Order::Fortran && f.shape().len() > 1 {
        bail!(
            "{}: array '{name}' is Fortran-ordered (only C order is supported)",
            path.display()
        );
    }
    Ok(f)
}

fn read_ints<R: Read>(f: NpyFile<R>, path: &Path, name: &str) -> Result<Vec<i64>> {
    let err = |e: std::io::Error| Error::msg(format!("{}: array '{name}': {e}", path.display()));
    let dtype = format!("{:?}", f.dtype());
    macro_rules! try_as {
        ($f:expr, $($t:ty),*) => {{
            let f = $f;
            $(
                let f = match f.try_data::<$t>() {
                    Ok(r) => return r.map(|x| x.map(|v| v as i64)).collect::<std::io::Result<Vec<i64>>>().map_err(err),
                    Err(f) => f,
                };
            )*
            drop(f);
        }};
    }
    try_as!(f, u8, i64, i32, u16, i16, i8, u32, u64);
    bail!(
        "{}: array '{name}' has dtype {dtype} (expected an integer type)",
        path.display()
    )
}

pub(crate) fn load_npz(path: &Path, image_size: Option<usize>) -> Result<Dataset> {
    let mut npz = NpzArchive::open(path).map_err(|e| {
        Error::msg(format!(
            "{}: not a readable .npz (zip) archive: {e}",
            path.display()
        ))
    })?;
    let mut images = Vec::new();
    let mut labels: Vec<i64> = Vec::new();
    let mut split = Vec::new();
    let mut hwc: Option<(usize, usize, usize)> = None;
    for s in Split::ALL {
        let iname = format!("{}_images", s.name());
        let lname = format!("{}_labels", s.name());
        let f = array(&mut npz, path, &iname)?;
        let shape: Vec<usize> = f.shape().iter().map(|&d| d as usize).collect();
        let (n, h, w, c) = match shape[..] {
            [n, h, w] => (n, h, w, 1),
            [n, h, w, c] if c == 1 || c == 3 => (n, h, w, c),
            _ => bail!(
                "{}: array '{iname}' has shape {shape:?} (expected [N,H,W] or [N,H,W,3])",
                path.display()
            ),
        };
        if let Some(prev) = hwc {
            if prev != (h, w, c) {
                bail!(
                    "{}: array '{iname}' has images {h}x{w}x{c} but earlier splits have {}x{}x{}",
                    path.display(),
                    prev.0,
                    prev.1,
                    prev.2
                );
            }
        }
        hwc = Some((h, w, c));
        let dtype = format!("{:?}", f.dtype());
        let data: Vec<u8> = match f.try_data::<u8>() {
            Ok(r) => r
                .collect::<std::io::Result<Vec<u8>>>()
                .map_err(|e| Error::msg(format!("{}: array '{iname}': {e}", path.display())))?,
            Err(_) => bail!(
                "{}: array '{iname}' has dtype {dtype} (expected uint8)",
                path.display()
            ),
        };
        if data.len() != n * h * w * c {
            bail!(
                "{}: array '{iname}' holds {} values for shape {shape:?} (truncated)",
                path.display(),
                data.len()
            );
        }
        let lf = array(&mut npz, path, &lname)?;
        let lshape: Vec<usize> = lf.shape().iter().map(|&d| d as usize).collect();
        if !(lshape == [n] || lshape == [n, 1]) {
            bail!(
                "{}: array '{lname}' has shape {lshape:?} (expected [{n}] or [{n}, 1] to match '{iname}'; multi-label data is not supported)",
                path.display()
            );
        }
        let l = read_ints(lf, path, &lname)?;
        if l.len() != n {
            bail!(
                "{}: array '{lname}' holds {} values, expected {n} (truncated)",
                path.display(),
                l.len()
            );
        }
        if let Some((row, v)) = l.iter().enumerate().find(|(_, &v)| v < 0) {
            bail!(
                "{}: array '{lname}' row {row}: negative label {v}",
                path.display()
            );
        }
        images.extend_from_slice(&data);
        labels.extend_from_slice(&l);
        split.extend(std::iter::repeat_n(s, n));
    }
    let (h, w, c) = hwc.expect("three splits read");
    let max = labels.iter().copied().max().unwrap_or(0) as usize;
    let meta_path = path.with_file_name("meta.json");
    let classes = match meta_classes(&meta_path)? {
        Some(cl) => {
            if max >= cl.len() {
                let (row, v) = labels
                    .iter()
                    .enumerate()
                    .find(|(_, &v)| v as usize >= cl.len())
                    .unwrap();
                bail!(
                    "{}: row {row} (over train, val, test): label {v} out of range for the {} classes in {}",
                    path.display(),
                    cl.len(),
                    meta_path.display()
                );
            }
            cl
        }
        None => (0..=max).map(|k| k.to_string()).collect(),
    };
    let n = labels.len();
    let mut ids = Vec::with_capacity(n);
    for s in Split::ALL {
        let cnt = split.iter().filter(|&&x| x == s).count();
        ids.extend((0..cnt).map(|i| format!("{}_images[{i}]", s.name())));
    }
    let (images, size) = match image_size {
        Some(sz) if sz != h || sz != w => (imageio::resize_all(&images, n, h, w, c, sz), (sz, sz)),
        _ => (images, (h, w)),
    };
    Ok(Dataset {
        source: path.to_path_buf(),
        format: Format::Npz,
        height: size.0,
        width: size.1,
        channels: c,
        images,
        labels: labels.into_iter().map(|v| v as usize).collect(),
        classes,
        split: Some(split),
        split_source: Some(format!("{} (train/val/test arrays)", path.display())),
        ids,
        benchmark: None,
    })
}

/// `classes` from a `meta.json` beside the file, if there is one with that field.
fn meta_classes(meta_path: &Path) -> Result<Option<Vec<String>>> {
    if !meta_path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(meta_path).map_err(|e| Error::io(meta_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::msg(format!("{}: invalid JSON: {e}", meta_path.display())))?;
    Ok(v.get("classes").and_then(|c| c.as_array()).map(|a| {
        a.iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect()
    }))
}
