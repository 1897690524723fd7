//! ISIC 2018 Task 3 layout: ground-truth CSV `image,MEL,NV,BCC,AKIEC,BKL,DF,VASC` (one-hot,
//! `1.0`/`0.0`) plus a folder of `<image>.jpg|.jpeg|.png`.
//!
//! `path` is either one CSV file or a directory. A directory's CSVs are those directly inside it
//! and inside its immediate sub-directories (the official release puts each CSV in its own
//! `…_GroundTruth/` folder). One CSV: no official split. Several: each must name its split
//! (`train`, `val`, `test` in the file name, e.g. `ISIC2018_Task3_Validation_GroundTruth.csv` or
//! SRC-MT's `training.csv`/`validation.csv`/`testing.csv`), and then each image's row inside its
//! CSV is kept as [`Benchmark`] rows, so `--labeled-protocol srcmt` works on SRC-MT csvs.
//! Images are looked up by `image` + extension in the CSV's folder, its sub-folders, and the
//! directory given (and its sub-folders); for a `…_GroundTruth` folder also the sibling
//! `…_Input` folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::dataset::{Benchmark, Dataset, Format, Split};
use super::imageio::{self, Decoded};
use crate::bail;
use crate::error::{Error, Result};

struct Row {
    csv: usize,
    row: usize,
    line: usize,
    image: String,
    label: usize,
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        v.push(e.path());
    }
    v.sort();
    Ok(v)
}

fn is_csv(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
}

fn split_of_name(p: &Path) -> Option<Split> {
    let name = p.file_name()?.to_str()?.to_ascii_lowercase();
    let hits: Vec<Split> = [
        ("train", Split::Train),
        ("val", Split::Val),
        ("test", Split::Test),
    ]
    .into_iter()
    .filter(|(k, _)| name.contains(k))
    .map(|(_, s)| s)
    .collect();
    (hits.len() == 1).then(|| hits[0])
}

/// Parses one CSV into rows; checks the header, field counts and the one-hot labels.
fn parse_csv(path: &Path, csv: usize, rows: &mut Vec<Row>) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        bail!(
            "{}: empty CSV (expected a header 'image,<class>,…')",
            path.display()
        );
    };
    let header: Vec<String> = header
        .trim_start_matches('\u{feff}')
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    if header[0] != "image" {
        bail!(
            "{}: line 1: first column is '{}' (expected 'image,MEL,NV,BCC,AKIEC,BKL,DF,VASC' or 'image,<class>,…')",
            path.display(),
            header[0]
        );
    }
    if header.len() < 3 {
        bail!(
            "{}: line 1: {} class column(s) (need at least 2 one-hot class columns after 'image')",
            path.display(),
            header.len() - 1
        );
    }
    let classes = header[1..].to_vec();
    for (row, (i, line)) in lines.enumerate() {
        let lineno = i + 1;
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() != header.len() {
            bail!(
                "{}: row {row} (line {lineno}): {} fields, but the header has {} (column mismatch)",
                path.display(),
                f.len(),
                header.len()
            );
        }
        if f[0].is_empty() {
            bail!(
                "{}: row {row} (line {lineno}): empty image name",
                path.display()
            );
        }
        let mut pos = Vec::new();
        for (k, v) in f[1..].iter().enumerate() {
            let x: f64 = v.parse().map_err(|_| {
                Error::msg(format!(
                    "{}: row {row} (line {lineno}): column {}: '{v}' is not a number",
                    path.display(),
                    classes[k]
                ))
            })?;
            if x == 1.0 {
                pos.push(k);
            } else if x != 0.0 {
                bail!(
                    "{}: row {row} (line {lineno}) ({}): column {} is {v} (one-hot labels must be 0 or 1)",
                    path.display(),
                    f[0],
                    classes[k]
                );
            }
        }
        match pos.len() {
            1 => {}
            0 => bail!(
                "{}: row {row} (line {lineno}) ({}): no positive label (all class columns are 0)",
                path.display(),
                f[0]
            ),
            _ => bail!(
                "{}: row {row} (line {lineno}) ({}): several positive labels ({})",
                path.display(),
                f[0],
                pos.iter()
                    .map(|&k| classes[k].as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
        rows.push(Row {
            csv,
            row,
            line: lineno,
            image: f[0].to_string(),
            label: pos[0],
        });
    }
    Ok(classes)
}

/// file stem → candidate paths, over the given folders (not recursive).
fn index_images(dirs: &[PathBuf]) -> Result<HashMap<String, Vec<PathBuf>>> {
    let mut m: HashMap<String, Vec<PathBuf>> = HashMap::new();
    for d in dirs {
        for p in list_dir(d)? {
            if p.is_file() && imageio::is_image_ext(&p) {
                if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                    m.entry(stem.to_string()).or_default().push(p.clone());
                }
                if let Some(name) = p.file_name().and_then(|s| s.to_str()) {
                    m.entry(name.to_string()).or_default().push(p.clone());
                }
            }
        }
    }
    Ok(m)
}

fn push_dir_and_subdirs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if !out.iter().any(|d| d == dir) {
        out.push(dir.to_path_buf());
    }
    for p in list_dir(dir)? {
        if p.is_dir() && !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(())
}

pub(crate) fn load_isic(path: &Path, image_size: Option<usize>) -> Result<Dataset> {
    let mut csvs = Vec::new();
    let mut search = Vec::new();
    if path.is_file() {
        csvs.push(path.to_path_buf());
    } else if path.is_dir() {
        for p in list_dir(path)? {
            if is_csv(&p) {
                csvs.push(p);
            } else if p.is_dir() {
                csvs.extend(list_dir(&p)?.into_iter().filter(|q| is_csv(q)));
            }
        }
        if csvs.is_empty() {
            bail!(
                "{}: no ground-truth .csv found in the directory or its sub-directories",
                path.display()
            );
        }
        push_dir_and_subdirs(path, &mut search)?;
    } else {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    }
    for c in &csvs {
        let dir = c.parent().unwrap_or(Path::new("."));
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        push_dir_and_subdirs(dir, &mut search)?;
        if let Some(name) = dir.file_name().and_then(|n| n.to_str()) {
            if let Some(base) = name.strip_suffix("_GroundTruth") {
                let sib = dir.with_file_name(format!("{base}_Input"));
                if sib.is_dir() && !search.contains(&sib) {
                    search.push(sib);
                }
            }
        }
    }
    // Split per CSV (only with several CSVs), ordered train, val, test.
    let splits: Option<Vec<Split>> = if csvs.len() == 1 {
        None
    } else {
        let mut s = Vec::new();
        for c in &csvs {
            match split_of_name(c) {
                Some(x) => s.push(x),
                None => bail!(
                    "{}: {} CSV files found; this one's name says none (or several) of train/val/test, so the split is ambiguous (pass one CSV file instead)",
                    c.display(),
                    csvs.len()
                ),
            }
        }
        let mut order: Vec<usize> = (0..csvs.len()).collect();
        order.sort_by_key(|&i| s[i]);
        for w in order.windows(2) {
            if s[w[0]] == s[w[1]] {
                bail!(
                    "{} and {}: two CSV files for the {} split",
                    csvs[w[0]].display(),
                    csvs[w[1]].display(),
                    s[w[0]]
                );
            }
        }
        csvs = order.iter().map(|&i| csvs[i].clone()).collect();
        Some(order.iter().map(|&i| s[i]).collect())
    };
    let mut rows = Vec::new();
    let mut classes: Option<Vec<String>> = None;
    for (ci, c) in csvs.iter().enumerate() {
        let cl = parse_csv(c, ci, &mut rows)?;
        match &classes {
            None => classes = Some(cl),
            Some(prev) if *prev != cl => bail!(
                "{}: class columns {:?} differ from {}'s {:?} (column mismatch)",
                c.display(),
                cl,
                csvs[0].display(),
                prev
            ),
            Some(_) => {}
        }
    }
    let classes = classes.expect("at least one csv");
    if rows.is_empty() {
        bail!("{}: no image rows", csvs[0].display());
    }
    let mut seen: HashMap<&str, &Row> = HashMap::new();
    for r in &rows {
        if let Some(prev) = seen.insert(&r.image, r) {
            bail!(
                "{}: row {} (line {}): image '{}' already listed at {} row {}",
                csvs[r.csv].display(),
                r.row,
                r.line,
                r.image,
                csvs[prev.csv].display(),
                prev.row
            );
        }
    }
    let index = index_images(&search)?;
    let mut files = Vec::with_capacity(rows.len());
    for r in &rows {
        let cands = index.get(&r.image).map(|v| v.as_slice()).unwrap_or(&[]);
        let mut uniq: Vec<&PathBuf> = cands.iter().collect();
        uniq.dedup();
        match uniq.len() {
            1 => files.push(uniq[0].clone()),
            0 => bail!(
                "{}: row {} (line {}): image file for '{}' not found (looked for {0}.jpg/.jpeg/.png in {})",
                csvs[r.csv].display(),
                r.row,
                r.line,
                r.image,
                search.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
            _ => bail!(
                "{}: row {} (line {}): image '{}' is ambiguous: {}",
                csvs[r.csv].display(),
                r.row,
                r.line,
                r.image,
                uniq.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        }
    }
    let decoded: Vec<Result<Decoded>> = files
        .par_iter()
        .zip(rows.par_iter())
        .map(|(f, r)| {
            let what = format!("{} row {} (line {})", csvs[r.csv].display(), r.row, r.line);
            let d = imageio::decode_file(f, &what)?;
            Ok(match image_size {
                Some(s) => Decoded {
                    data: imageio::resize(&d.data, d.height, d.width, d.channels, s, s),
                    height: s,
                    width: s,
                    ..d
                },
                None => d,
            })
        })
        .collect();
    let decoded: Vec<Decoded> = decoded.into_iter().collect::<Result<_>>()?;
    let descr: Vec<String> = rows
        .iter()
        .zip(&files)
        .map(|(r, f)| {
            format!(
                "{} (from {} row {})",
                f.display(),
                csvs[r.csv].display(),
                r.row
            )
        })
        .collect();
    let (height, width, channels, images) = assemble(&decoded, &descr)?;
    let split_vec = splits
        .as_ref()
        .map(|s| rows.iter().map(|r| s[r.csv]).collect::<Vec<_>>());
    let benchmark = split_vec.as_ref().map(|sv| Benchmark {
        split: sv.clone(),
        row: rows.iter().map(|r| r.row as u32).collect(),
        source: csvs
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    });
    Ok(Dataset {
        source: path.to_path_buf(),
        format: Format::IsicCsv,
        height,
        width,
        channels,
        images,
        labels: rows.iter().map(|r| r.label).collect(),
        classes,
        split: split_vec,
        split_source: splits.map(|_| {
            csvs.iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }),
        ids: rows.iter().map(|r| r.image.clone()).collect(),
        benchmark,
    })
}

/// Packs decoded images into one NHWC buffer: all must share the first image's size (callers
/// resize first when an image size is requested); grey images are promoted to RGB when any image
/// has colour. `descr[i]` names image i in errors.
pub(crate) fn assemble(
    decoded: &[Decoded],
    descr: &[String],
) -> Result<(usize, usize, usize, Vec<u8>)> {
    let (h, w) = (decoded[0].height, decoded[0].width);
    for (d, name) in decoded.iter().zip(descr) {
        if d.height != h || d.width != w {
            bail!(
                "{name}: image is {}x{} (WxH) but {} is {w}x{h}; all images must have one size (or pass --image-size to resize them)",
                d.width,
                d.height,
                descr[0]
            );
        }
    }
    let c = if decoded.iter().any(|d| d.channels == 3) {
        3
    } else {
        1
    };
    let mut images = Vec::with_capacity(decoded.len() * h * w * c);
    for d in decoded {
        if d.channels == c {
            images.extend_from_slice(&d.data);
        } else {
            for &v in &d.data {
                images.extend_from_slice(&[v, v, v]);
            }
        }
    }
    Ok((h, w, c, images))
}
