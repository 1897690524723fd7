//! The common in-memory dataset and format detection.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::bail;
use crate::error::{Error, Result};

/// On-disk layouts understood by [`load`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// medssl raw arrays: `images.u8` `[N,H,W,C]`, `labels.u8`, `split.u8`, `meta.json`.
    Raw,
    /// MedMNIST `.npz`: `train_images`, `train_labels`, `val_*`, `test_*`.
    Npz,
    /// ISIC 2018 Task 3: one-hot ground-truth CSV(s) + JPEG/PNG images.
    IsicCsv,
    /// `root/<class>/*.{png,jpg,jpeg}` (optionally `root/{train,val,test}/<class>/…`).
    Folder,
    /// The HAM10000 200×150 JPEG pack (`jpeg_200x150.bin` + `.idx`) beside the raw arrays.
    JpegPack,
}

impl Format {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Npz => "npz",
            Format::IsicCsv => "isic-csv",
            Format::Folder => "folder",
            Format::JpegPack => "jpeg-pack",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        Ok(match s {
            "raw" => Format::Raw,
            "npz" => Format::Npz,
            "isic-csv" | "isic" | "csv" => Format::IsicCsv,
            "folder" => Format::Folder,
            "jpeg-pack" | "jpeg" => Format::JpegPack,
            _ => bail!(
                "unknown data format '{s}' (expected raw, npz, isic-csv, folder or jpeg-pack)"
            ),
        })
    }
}

/// Train / validation / test membership (`split.u8` codes 0 / 1 / 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train = 0,
    Val = 1,
    Test = 2,
}

impl Split {
    /// All three, in code order.
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    /// Decodes a `split.u8` byte.
    pub fn from_code(c: u8) -> Option<Split> {
        match c {
            0 => Some(Split::Train),
            1 => Some(Split::Val),
            2 => Some(Split::Test),
            _ => None,
        }
    }

    /// `train`, `val` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Split> {
        Ok(match s {
            "train" => Split::Train,
            "val" | "valid" | "validation" => Split::Val,
            "test" => Split::Test,
            _ => bail!("unknown split '{s}' (expected train, val or test)"),
        })
    }
}

/// A benchmark split with its own row numbering (SRC-MT / RAC-MT csv rows), used by
/// `--labeled-protocol srcmt`: labelled = train rows 0..1399, unlabelled = train rows 1400..6999.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Benchmark {
    /// Split membership in the benchmark (may differ from [`Dataset::split`]).
    pub split: Vec<Split>,
    /// Row of each image inside its benchmark csv.
    pub row: Vec<u32>,
    /// Where it came from (for messages).
    pub source: String,
}

/// A whole dataset in memory: u8 HWC images of one size, labels, class names, optional splits.
#[derive(Clone)]
pub struct Dataset {
    /// The path it was read from.
    pub source: PathBuf,
    /// The reader used.
    pub format: Format,
    pub height: usize,
    pub width: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// `len() × height × width × channels` bytes, row-major HWC per image.
    pub images: Vec<u8>,
    /// Class index per image, `< classes.len()`.
    pub labels: Vec<usize>,
    /// Class names, index = label.
    pub classes: Vec<String>,
    /// The source's own train/val/test split, when it has one.
    pub split: Option<Vec<Split>>,
    /// What the official split is (file name), for messages.
    pub split_source: Option<String>,
    /// A human-readable identifier per image (file name, image id or `row i`).
    pub ids: Vec<String>,
    /// SRC-MT-style benchmark split, when the source has one (HAM10000 `split_racmt.u8`).
    pub benchmark: Option<Benchmark>,
}

impl fmt::Debug for Dataset {
    /// A summary (the pixel buffer would be megabytes).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dataset")
            .field("source", &self.source)
            .field("format", &self.format)
            .field("n", &self.len())
            .field("hwc", &(self.height, self.width, self.channels))
            .field("classes", &self.classes)
            .field("split_source", &self.split_source)
            .field("benchmark", &self.benchmark.as_ref().map(|b| &b.source))
            .finish_non_exhaustive()
    }
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes per image (`H·W·C`).
    pub fn image_len(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// Image `i` as u8 HWC.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Images per class over `indices` (all images when `None`).
    pub fn class_counts(&self, indices: Option<&[usize]>) -> Vec<usize> {
        let mut c = vec![0; self.classes.len()];
        match indices {
            Some(ix) => ix.iter().for_each(|&i| c[self.labels[i]] += 1),
            None => self.labels.iter().for_each(|&l| c[l] += 1),
        }
        c
    }

    /// Checks the invariants every reader promises (sizes agree, labels in range).
    pub fn validate(&self) -> Result<()> {
        let src = self.source.display();
        if self.channels != 1 && self.channels != 3 {
            bail!(
                "{src}: {} channels (only 1 or 3 are supported)",
                self.channels
            );
        }
        if self.height == 0 || self.width == 0 {
            bail!("{src}: empty image size {}x{}", self.height, self.width);
        }
        if self.images.len() != self.len() * self.image_len() {
            bail!(
                "{src}: {} image bytes for {} labels of {}x{}x{}",
                self.images.len(),
                self.len(),
                self.height,
                self.width,
                self.channels
            );
        }
        if self.classes.len() < 2 {
            bail!("{src}: {} classes (need at least 2)", self.classes.len());
        }
        if let Some((row, &l)) = self
            .labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l >= self.classes.len())
        {
            bail!(
                "{src}: row {row} ({}): label {l} out of range for {} classes",
                self.ids[row],
                self.classes.len()
            );
        }
        if let Some(s) = &self.split {
            if s.len() != self.len() {
                bail!(
                    "{src}: split has {} entries for {} images",
                    s.len(),
                    self.len()
                );
            }
        }
        if self.ids.len() != self.len() {
            bail!("{src}: {} ids for {} images", self.ids.len(), self.len());
        }
        Ok(())
    }
}

/// How to read a dataset.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Layout; detected from the path when `None`.
    pub format: Option<Format>,
    /// Side of the square images to produce. `None` keeps the native size (folder / ISIC: every
    /// image must then have the size of the first). Raw/npz data of another size is resized
    /// (bicubic). The JPEG pack is always decoded and resized (whole image, aspect squashed like
    /// `images.u8`); for it `None` means 28.
    pub image_size: Option<usize>,
    /// Folder layout: the expected class names; a class folder not in the list is an error.
    pub classes: Option<Vec<String>>,
}

/// Image sizes the models are built for; others are accepted but warned about by the CLI.
pub const IMAGE_SIZES: [usize; 6] = [28, 32, 64, 112, 128, 224];

/// Detects the layout of `path`.
///
/// A directory with `meta.json` and `images.u8` is raw, unless `image_size` is larger than its
/// native size and a JPEG pack lies beside it (then the pack is used: upscaling 28 px arrays when
/// 200×150 sources exist would only blur). A directory with a pack but no `images.u8` is the
/// pack. A `.npz` file is npz; a `.csv` file, or a directory holding `.csv` files (directly or
/// in an immediate sub-directory), is ISIC; any other directory is an image folder.
pub fn detect(path: &Path, image_size: Option<usize>) -> Result<Format> {
    if !path.exists() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "dataset path does not exist"),
        ));
    }
    if path.is_file() {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        return match ext.as_str() {
            "npz" => Ok(Format::Npz),
            "csv" => Ok(Format::IsicCsv),
            _ => bail!(
                "{}: cannot tell the data format of this file (expected a .npz or .csv file, or a directory); pass --format",
                path.display()
            ),
        };
    }
    let has_pack = path.join(super::raw::PACK_BIN).is_file();
    if path.join("meta.json").is_file() {
        if path.join("images.u8").is_file() {
            if has_pack {
                let native = super::raw::read_meta(path)?.height;
                if image_size.is_some_and(|s| s > native) {
                    return Ok(Format::JpegPack);
                }
            }
            return Ok(Format::Raw);
        }
        if has_pack {
            return Ok(Format::JpegPack);
        }
    }
    let entries = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
    let mut npz = Vec::new();
    let mut csv = false;
    for e in entries {
        let e = e.map_err(|e| Error::io(path, e))?;
        let p = e.path();
        if p.is_dir() {
            // The official ISIC release keeps each CSV in its own `…_GroundTruth/` folder.
            if let Ok(sub) = std::fs::read_dir(&p) {
                csv |= sub.flatten().any(|f| {
                    f.path()
                        .extension()
                        .is_some_and(|x| x.eq_ignore_ascii_case("csv"))
                });
            }
            continue;
        }
        if !p.is_file() {
            continue;
        }
        match p
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
        {
            Some(x) if x == "csv" => csv = true,
            Some(x) if x == "npz" => npz.push(p),
            _ => {}
        }
    }
    if csv {
        return Ok(Format::IsicCsv);
    }
    if !npz.is_empty() {
        bail!(
            "{}: directory holds .npz file(s) ({}); pass the .npz file itself",
            path.display(),
            npz[0].display()
        );
    }
    Ok(Format::Folder)
}

/// Reads a dataset from `path` (format detected unless given) and validates it.
pub fn load(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Dataset> {
    let path = path.as_ref();
    if let Some(s) = opts.image_size {
        if s == 0 {
            bail!("--image-size 0: image size must be positive");
        }
    }
    let format = match opts.format {
        Some(f) => f,
        None => detect(path, opts.image_size)?,
    };
    let mut ds = match format {
        Format::Raw => super::raw::load_raw(path, opts.image_size)?,
        Format::JpegPack => super::raw::load_jpeg_pack(path, opts.image_size.unwrap_or(28))?,
        Format::Npz => super::npz::load_npz(path, opts.image_size)?,
        Format::IsicCsv => super::isic::load_isic(path, opts.image_size)?,
        Format::Folder => {
            super::folder::load_folder(path, opts.image_size, opts.classes.as_deref())?
        }
    };
    ds.format = format;
    ds.validate()?;
    Ok(ds)
}
