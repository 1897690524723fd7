//! Train/val/test splits and the labelled subset.
//!
//! - The dataset's own split when it has one, else a stratified, seeded 70/10/20 split
//!   (per class: test = max(1, round(0.2 n)), val = max(1, round(0.1 n)), train = the rest).
//! - Labelled subset of train: [`Labeled::Ratio`] (per class max(1, round(r · n_c)), seeded) or
//!   [`LabeledProtocol::Srcmt`] (HAM10000/ISIC2018 SSL benchmark: the benchmark split, labelled =
//!   train rows 0..1399, unlabelled = train rows 1400..6999 by benchmark csv row; rows ≥ 7000
//!   unused, as in SRC-MT's `train_SRC_MT.py`), or [`LabeledProtocol::SrcmtFull`] (the same split
//!   with all of train rows 0..6999 labelled: the fully supervised upper bound of the benchmark).
//!
//! Every class must keep at least one training and one labelled image, else an error.

use std::path::Path;

use super::dataset::{Dataset, Split};
use super::rng::shuffle;
use crate::bail;
use crate::error::{Error, Result};

/// Default labelled fraction of the training split (the published ISIC2018 anchors use 20 %).
pub const DEFAULT_LABELED_RATIO: f64 = 0.2;
/// SRC-MT: train csv rows `0..SRCMT_LABELED_ROWS` are labelled.
pub const SRCMT_LABELED_ROWS: u32 = 1400;
/// SRC-MT: train csv rows `SRCMT_LABELED_ROWS..SRCMT_TRAIN_ROWS` are unlabelled.
pub const SRCMT_TRAIN_ROWS: u32 = 7000;

/// Named labelled-subset protocols.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LabeledProtocol {
    /// SRC-MT ISIC2018 benchmark (needs a benchmark split: HAM10000 `split_racmt.u8` +
    /// `racmt_row.u16`, or SRC-MT's training/validation/testing csvs).
    Srcmt,
    /// The SRC-MT benchmark split with every training row (0..6999) labelled and none
    /// unlabelled: the fully supervised upper bound on the same train/val/test images.
    #[value(name = "srcmt-full")]
    #[serde(rename = "srcmt-full")]
    SrcmtFull,
}

impl LabeledProtocol {
    /// The name used on the command line and in config files.
    pub fn name(self) -> &'static str {
        match self {
            LabeledProtocol::Srcmt => "srcmt",
            LabeledProtocol::SrcmtFull => "srcmt-full",
        }
    }
}

impl std::str::FromStr for LabeledProtocol {
    type Err = Error;
    fn from_str(s: &str) -> Result<LabeledProtocol> {
        Ok(match s {
            "srcmt" => LabeledProtocol::Srcmt,
            "srcmt-full" => LabeledProtocol::SrcmtFull,
            _ => bail!("labeled protocol '{s}': expected srcmt or srcmt-full"),
        })
    }
}

/// How to choose the labelled subset of the training split.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Labeled {
    /// Fraction in (0, 1] of each class's training images (1 = fully supervised).
    Ratio(f64),
    /// A fixed benchmark protocol.
    Protocol(LabeledProtocol),
}

impl Labeled {
    /// From the CLI's two mutually exclusive options (default: ratio 0.2).
    pub fn from_options(ratio: Option<f64>, protocol: Option<LabeledProtocol>) -> Result<Labeled> {
        match (ratio, protocol) {
            (Some(_), Some(_)) => {
                bail!("--labeled-ratio and --labeled-protocol are mutually exclusive; pass one")
            }
            (_, Some(p)) => Ok(Labeled::Protocol(p)),
            (Some(r), None) => Ok(Labeled::Ratio(r)),
            (None, None) => Ok(Labeled::Ratio(DEFAULT_LABELED_RATIO)),
        }
    }

    /// `ratio 0.2` / `srcmt`.
    pub fn describe(&self) -> String {
        match self {
            Labeled::Ratio(r) => format!("ratio {r}"),
            Labeled::Protocol(p) => p.name().to_string(),
        }
    }
}

/// Row indices (into the [`Dataset`]) of each part; every list sorted ascending.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Partition {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub test: Vec<usize>,
    /// Labelled training images.
    pub labeled: Vec<usize>,
    /// Unlabelled training images; position in this list is the unlabelled slot (the index of
    /// the per-sample persistent weight).
    pub unlabeled: Vec<usize>,
    /// Where train/val/test came from.
    pub split_source: String,
    /// How the labelled subset was chosen.
    pub labeled_spec: String,
    /// The seed used for anything random above.
    pub seed: u64,
}

impl Partition {
    /// The indices of one split.
    pub fn split(&self, s: Split) -> &[usize] {
        match s {
            Split::Train => &self.train,
            Split::Val => &self.val,
            Split::Test => &self.test,
        }
    }
}

/// Stratified, seeded 70/10/20 split of `labels` (each class needs ≥ 3 images).
pub fn stratified_split(
    labels: &[usize],
    classes: &[String],
    seed: u64,
) -> Result<[Vec<usize>; 3]> {
    let mut rng = crate::rng::stream(seed, "data/split");
    let mut out: [Vec<usize>; 3] = Default::default();
    for (c, cname) in classes.iter().enumerate() {
        let mut ix: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
        let n = ix.len();
        if n < 3 {
            bail!(
                "class '{cname}' has {n} image(s): a stratified 70/10/20 split needs at least 3 per class, or a class would be empty after splitting"
            );
        }
        shuffle(&mut ix, &mut rng);
        let n_test = ((0.2 * n as f64).round() as usize).max(1);
        let n_val = ((0.1 * n as f64).round() as usize).max(1);
        let n_train = n - n_test - n_val;
        out[0].extend_from_slice(&ix[..n_train]);
        out[1].extend_from_slice(&ix[n_train..n_train + n_val]);
        out[2].extend_from_slice(&ix[n_train + n_val..]);
    }
    for v in &mut out {
        v.sort_unstable();
    }
    Ok(out)
}

fn by_split(split: &[Split]) -> [Vec<usize>; 3] {
    let mut out: [Vec<usize>; 3] = Default::default();
    for (i, s) in split.iter().enumerate() {
        out[*s as usize].push(i);
    }
    out
}

/// Splits `ds` and chooses its labelled subset.
pub fn partition(ds: &Dataset, labeled: Labeled, seed: u64) -> Result<Partition> {
    let src = ds.source.display();
    let (parts, split_source, lab, unl) = match labeled {
        Labeled::Protocol(p) => {
            let Some(b) = &ds.benchmark else {
                bail!(
                    "{src}: --labeled-protocol {} needs a benchmark split (HAM10000 split_racmt.u8 + racmt_row.u16, or SRC-MT training/validation/testing csvs); this {} dataset has none",
                    p.name(),
                    ds.format
                );
            };
            let parts = by_split(&b.split);
            let labeled_rows = match p {
                LabeledProtocol::Srcmt => SRCMT_LABELED_ROWS,
                LabeledProtocol::SrcmtFull => SRCMT_TRAIN_ROWS,
            };
            let lab: Vec<usize> = parts[0]
                .iter()
                .copied()
                .filter(|&i| b.row[i] < labeled_rows)
                .collect();
            let unl: Vec<usize> = parts[0]
                .iter()
                .copied()
                .filter(|&i| (labeled_rows..SRCMT_TRAIN_ROWS).contains(&b.row[i]))
                .collect();
            (parts, format!("benchmark ({})", b.source), lab, unl)
        }
        Labeled::Ratio(r) => {
            if !(r > 0.0 && r <= 1.0) {
                bail!("--labeled-ratio {r}: must be in (0, 1]");
            }
            let (parts, source) = match &ds.split {
                Some(s) => (
                    by_split(s),
                    format!(
                        "official ({})",
                        ds.split_source.as_deref().unwrap_or("dataset split")
                    ),
                ),
                None => (
                    stratified_split(&ds.labels, &ds.classes, seed)?,
                    format!("stratified 70/10/20 (seed {seed})"),
                ),
            };
            check_train_classes(ds, &parts[0], &source)?;
            let mut rng = crate::rng::stream(seed, "data/labeled");
            let mut lab = Vec::new();
            let mut unl = Vec::new();
            for c in 0..ds.num_classes() {
                let mut ix: Vec<usize> = parts[0]
                    .iter()
                    .copied()
                    .filter(|&i| ds.labels[i] == c)
                    .collect();
                shuffle(&mut ix, &mut rng);
                let k = ((r * ix.len() as f64).round() as usize).clamp(1, ix.len());
                lab.extend_from_slice(&ix[..k]);
                unl.extend_from_slice(&ix[k..]);
            }
            lab.sort_unstable();
            unl.sort_unstable();
            (parts, source, lab, unl)
        }
    };
    let [train, val, test] = parts;
    check_train_classes(ds, &train, &split_source)?;
    let counts = ds.class_counts(Some(&lab));
    if let Some(c) = counts.iter().position(|&n| n == 0) {
        bail!(
            "{src}: class '{}' has no labelled image with {} (empty class after splitting)",
            ds.classes[c],
            labeled.describe()
        );
    }
    Ok(Partition {
        train,
        val,
        test,
        labeled: lab,
        unlabeled: unl,
        split_source,
        labeled_spec: labeled.describe(),
        seed,
    })
}

fn check_train_classes(ds: &Dataset, train: &[usize], source: &str) -> Result<()> {
    let counts = ds.class_counts(Some(train));
    if let Some(c) = counts.iter().position(|&n| n == 0) {
        bail!(
            "{}: class '{}' has no training images in the {source} split (empty class after splitting)",
            ds.source.display(),
            ds.classes[c]
        );
    }
    Ok(())
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

fn write_list(path: &Path, ix: &[usize]) -> Result<()> {
    let mut s = String::with_capacity(ix.len() * 6);
    for i in ix {
        s.push_str(&i.to_string());
        s.push('\n');
    }
    write_file(path, &s)
}

/// Writes `labeled.txt`, `unlabeled.txt` (dataset row per line) and `partition.json` (every list,
/// how it was made, and the dataset's source, size and classes) into `dir` (created if needed).
pub fn write_partition(dir: impl AsRef<Path>, part: &Partition, ds: &Dataset) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_list(&dir.join("labeled.txt"), &part.labeled)?;
    write_list(&dir.join("unlabeled.txt"), &part.unlabeled)?;
    let v = serde_json::json!({
        "dataset": {
            "source": ds.source.display().to_string(),
            "format": ds.format,
            "n": ds.len(),
            "height": ds.height,
            "width": ds.width,
            "channels": ds.channels,
            "classes": ds.classes,
        },
        "partition": part,
    });
    let text = serde_json::to_string_pretty(&v).map_err(|e| Error::msg(e.to_string()))?;
    write_file(&dir.join("partition.json"), &text)
}

/// Reads back the [`Partition`] saved by [`write_partition`].
pub fn read_partition(dir: impl AsRef<Path>) -> Result<Partition> {
    let path = dir.as_ref().join("partition.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::msg(format!("{}: invalid JSON: {e}", path.display())))?;
    let p = v
        .get_mut("partition")
        .map(serde_json::Value::take)
        .ok_or_else(|| Error::msg(format!("{}: missing \"partition\"", path.display())))?;
    serde_json::from_value(p).map_err(|e| Error::msg(format!("{}: {e}", path.display())))
}
