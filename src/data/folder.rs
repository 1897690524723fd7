//! Image folder: `root/<class>/*.{png,jpg,jpeg}`, or with an official split
//! `root/{train,val,test}/<class>/*` (then the classes are train's folders, and a class folder in
//! val/test that train lacks is an error). Hidden entries (starting with `.`) are ignored; any other
//! file that is not an image is an error, so nothing is dropped silently.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::dataset::{Dataset, Format, Split};
use super::imageio::{self, Decoded};
use super::isic::assemble;
use crate::bail;
use crate::error::{Error, Result};

fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let p = e.path();
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if !hidden {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}

fn name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Class folders directly under `dir`; image files there (outside any class) are an error.
fn class_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in entries(dir)? {
        if p.is_dir() {
            out.push(p);
        } else if imageio::is_image_ext(&p) {
            bail!(
                "{}: image file directly in {} has no class folder (expected {}/<class>/<image>)",
                p.display(),
                dir.display(),
                dir.display()
            );
        }
    }
    Ok(out)
}

fn images_in(class_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in entries(class_dir)? {
        if p.is_file() && imageio::is_image_ext(&p) {
            out.push(p);
        } else if p.is_dir() {
            bail!(
                "{}: nested folder inside class folder {} (expected only .png/.jpg/.jpeg images)",
                p.display(),
                class_dir.display()
            );
        } else {
            bail!(
                "{}: not a .png/.jpg/.jpeg image (class folders may hold only images)",
                p.display()
            );
        }
    }
    if out.is_empty() {
        bail!(
            "{}: class folder holds no images (empty class)",
            class_dir.display()
        );
    }
    Ok(out)
}

pub(crate) fn load_folder(
    root: &Path,
    image_size: Option<usize>,
    expected: Option<&[String]>,
) -> Result<Dataset> {
    if !root.is_dir() {
        return Err(Error::io(
            root,
            std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        ));
    }
    let top = class_dirs(root)?;
    let top_names: Vec<String> = top.iter().map(|p| name(p)).collect();
    let has_split = top_names.iter().any(|n| n == "train")
        && top_names.iter().all(|n| n.parse::<Split>().is_ok());
    // (class folder, split)
    let mut groups: Vec<(PathBuf, Option<Split>)> = Vec::new();
    let classes: Vec<String>;
    if has_split {
        let train = root.join("train");
        let tc: Vec<String> = class_dirs(&train)?.iter().map(|p| name(p)).collect();
        classes = match expected {
            Some(e) => e.to_vec(),
            None => tc.clone(),
        };
        for p in &top {
            let s: Split = name(p).parse()?;
            for c in class_dirs(p)? {
                if !classes.contains(&name(&c)) {
                    bail!(
                        "{}: unknown class folder '{}' (the classes are {}: {})",
                        c.display(),
                        name(&c),
                        if expected.is_some() {
                            "as given"
                        } else {
                            "train's folders"
                        },
                        classes.join(", ")
                    );
                }
                groups.push((c, Some(s)));
            }
        }
    } else {
        classes = match expected {
            Some(e) => e.to_vec(),
            None => top_names.clone(),
        };
        for (p, n) in top.iter().zip(&top_names) {
            if !classes.contains(n) {
                bail!(
                    "{}: unknown class folder '{n}' (expected classes: {})",
                    p.display(),
                    classes.join(", ")
                );
            }
            groups.push((p.clone(), None));
        }
    }
    if classes.is_empty() {
        bail!(
            "{}: no class folders (expected {0}/<class>/<image>)",
            root.display()
        );
    }
    for c in &classes {
        if !groups.iter().any(|(p, _)| name(p) == *c) {
            bail!(
                "{}: no folder for class '{c}' (empty class)",
                root.display()
            );
        }
    }
    // Order: split (train, val, test), then class index, then file name.
    groups.sort_by_key(|(p, s)| (*s, classes.iter().position(|c| *c == name(p))));
    let mut files = Vec::new();
    let mut labels = Vec::new();
    let mut split = Vec::new();
    for (dir, s) in &groups {
        let label = classes
            .iter()
            .position(|c| *c == name(dir))
            .expect("checked");
        for f in images_in(dir)? {
            files.push(f);
            labels.push(label);
            split.push(*s);
        }
    }
    let decoded: Vec<Result<Decoded>> = files
        .par_iter()
        .map(|f| {
            let d = imageio::decode_file(f, "")?;
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
    let descr: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let (height, width, channels, images) = assemble(&decoded, &descr)?;
    let split = if has_split {
        Some(
            split
                .into_iter()
                .map(|s| s.expect("split layout"))
                .collect(),
        )
    } else {
        None
    };
    Ok(Dataset {
        source: root.to_path_buf(),
        format: Format::Folder,
        height,
        width,
        channels,
        images,
        labels,
        classes,
        split_source: has_split.then(|| format!("{}/{{train,val,test}}", root.display())),
        split,
        ids: files
            .iter()
            .map(|f| f.strip_prefix(root).unwrap_or(f).display().to_string())
            .collect(),
        benchmark: None,
    })
}
