//! `medssl report`: the results table of a set of run directories.
//!
//! Each run directory is one finished `medssl train` run: its `config.toml` (the resolved
//! settings) and `summary.json` (test-split metrics of the teacher of the best-validation epoch,
//! wall time). Runs whose settings differ only in the seed (and in settings that cannot change the
//! result: device, loader threads, logging, evaluation batch, preset name, dataset location) form
//! one group; each group is one row: its test metrics as mean and spread over the seeds, the
//! seeds, epochs and mean wall time. The row label is derived from the settings ("Supervised 20 %",
//! "Mean Teacher", "DSRPGC", "DSRPGC − DSR", ...).
//!
//! A run directory that cannot be read (missing or corrupt `summary.json` or `config.toml`, a run
//! that did not finish) is an error naming the file; with `skip_bad` it is left out of the table
//! and listed in [`Report::skipped`] (the CLI prints it on stderr and the table notes it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::bail;
use crate::error::{Error, Result};

/// Settings that do not define a group: the seed (what a group averages over) and settings that
/// cannot change the result (or only name where things are).
const NOT_GROUPING: [&str; 7] = [
    "seed",
    "device",
    "workers",
    "log_every",
    "eval_batch",
    "preset",
    "data",
];

/// The reported test metrics: key (in the JSON output), column header, path in `summary.json`.
pub const METRICS: [(&str, &str, &[&str]); 5] = [
    ("accuracy", "top-1", &["test", "accuracy"]),
    (
        "balanced_accuracy",
        "bal. acc.",
        &["test", "balanced_accuracy"],
    ),
    ("macro_f1", "macro-F1", &["test", "macro_f1"]),
    ("macro_auc", "macro-AUC", &["test", "macro_auc"]),
    (
        "srcmt_accuracy",
        "SRC-MT acc.",
        &["test", "srcmt", "accuracy"],
    ),
];

/// How the spread over seeds is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Spread {
    /// Sample standard deviation (divisor n − 1).
    #[default]
    Std,
    /// Half the range, (max − min) / 2.
    HalfRange,
}

impl std::str::FromStr for Spread {
    type Err = Error;
    fn from_str(s: &str) -> Result<Spread> {
        match s {
            "std" => Ok(Spread::Std),
            "half-range" => Ok(Spread::HalfRange),
            _ => bail!("--spread '{s}': expected std or half-range"),
        }
    }
}

impl Spread {
    /// Short name (`std`, `half-range`).
    pub fn name(self) -> &'static str {
        match self {
            Spread::Std => "std",
            Spread::HalfRange => "half-range",
        }
    }

    /// What `±` means in the tables.
    pub fn describe(self) -> &'static str {
        match self {
            Spread::Std => "mean ± sample standard deviation over seeds (n − 1)",
            Spread::HalfRange => "mean ± half the range over seeds ((max − min) / 2)",
        }
    }

    /// The spread of `v` (None for fewer than two values).
    pub fn of(self, v: &[f64]) -> Option<f64> {
        if v.len() < 2 {
            return None;
        }
        Some(match self {
            Spread::Std => {
                let m = mean(v);
                (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
            }
            Spread::HalfRange => {
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                (hi - lo) / 2.0
            }
        })
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Report options.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReportOptions {
    pub spread: Spread,
    /// Leave unreadable or unfinished runs out (listed in [`Report::skipped`]) instead of failing.
    pub skip_bad: bool,
}

/// One finished run, as read from its directory.
#[derive(Clone, Debug)]
pub struct RunRecord {
    pub dir: PathBuf,
    /// `config.toml`, as written by the trainer.
    pub config: toml::Table,
    pub seed: u64,
    /// Dataset name (the last component of the `data` setting, without extension).
    pub dataset: String,
    /// Fraction of the training images that were labelled (from the run's counts).
    pub labeled_fraction: f64,
    pub labeled: u64,
    pub unlabeled: u64,
    pub epochs: u64,
    pub wall_seconds: f64,
    pub device: String,
    /// Values in the order of [`METRICS`] (NaN where the metric is undefined, e.g. macro-AUC).
    pub metrics: Vec<f64>,
}

fn json_u64(v: &serde_json::Value, key: &str, file: &Path) -> Result<u64> {
    v.get(key).and_then(|x| x.as_u64()).ok_or_else(|| {
        Error::msg(format!(
            "{}: field '{key}' is missing or not a non-negative integer",
            file.display()
        ))
    })
}

/// The dataset name of a `data` setting: `../shared/data/ham10000/` → `ham10000`,
/// `x/pneumoniamnist.npz` → `pneumoniamnist`.
pub fn dataset_name(data: &str) -> String {
    let p = Path::new(data.trim_end_matches(['/', '\\']));
    let name = p
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| data.to_string());
    match name.rsplit_once('.') {
        Some((stem, ext)) if ["npz", "csv", "bin"].contains(&ext) && !stem.is_empty() => {
            stem.to_string()
        }
        _ => name,
    }
}

/// How a dataset is named in the tables.
pub fn dataset_display(name: &str) -> String {
    match name.to_ascii_lowercase().as_str() {
        "ham10000" => "HAM10000".into(),
        "pneumoniamnist" => "PneumoniaMNIST".into(),
        "isic2018" => "ISIC 2018".into(),
        _ => name.to_string(),
    }
}

/// Reads one run directory (`config.toml` + `summary.json` of a finished run).
pub fn load_run(dir: &Path) -> Result<RunRecord> {
    let cfg_path = dir.join("config.toml");
    let sum_path = dir.join("summary.json");
    if !dir.is_dir() {
        bail!("{}: not a run directory", dir.display());
    }
    let text = std::fs::read_to_string(&sum_path).map_err(|e| Error::io(&sum_path, e))?;
    let summary: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::msg(format!("{}: not valid JSON: {e}", sum_path.display())))?;
    if !summary.is_object() {
        bail!("{}: not a JSON object", sum_path.display());
    }
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let config: toml::Table = text
        .parse()
        .map_err(|e| Error::msg(format!("{}: not valid TOML: {e}", cfg_path.display())))?;

    let outcome = summary
        .get("outcome")
        .and_then(|v| v.as_str())
        .unwrap_or("?");
    if summary.get("test").is_none_or(|t| t.is_null()) {
        let done = summary
            .get("epochs_done")
            .map(|v| v.to_string())
            .unwrap_or("?".into());
        let of = summary
            .get("epochs")
            .map(|v| v.to_string())
            .unwrap_or("?".into());
        bail!(
            "{}: no test metrics (outcome '{outcome}', {done}/{of} epochs): the run did not finish; continue it with `medssl train --resume --out {}`",
            sum_path.display(),
            dir.display()
        );
    }
    let mut metrics = Vec::with_capacity(METRICS.len());
    for (key, _, path) in METRICS {
        let mut v = &summary;
        for p in path {
            v = v.get(*p).unwrap_or(&serde_json::Value::Null);
        }
        let x = match v {
            serde_json::Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
            // macro-AUC is written as null when no class has both positives and negatives.
            serde_json::Value::Null if key == "macro_auc" && summary["test"].get(key).is_some() => {
                f64::NAN
            }
            _ => bail!(
                "{}: field '{}' is missing or not a number",
                sum_path.display(),
                path.join(".")
            ),
        };
        metrics.push(x);
    }
    let seed = json_u64(&summary, "seed", &sum_path)?;
    let cfg_seed = config.get("seed").and_then(|v| v.as_integer());
    if cfg_seed != Some(seed as i64) {
        bail!(
            "{}: seed {seed} differs from config.toml's seed {}",
            sum_path.display(),
            cfg_seed
                .map(|s| s.to_string())
                .unwrap_or("(missing)".into())
        );
    }
    let data = config
        .get("data")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::msg(format!("{}: no 'data' setting", cfg_path.display())))?;
    let labeled = json_u64(&summary, "labeled", &sum_path)?;
    let unlabeled = json_u64(&summary, "unlabeled", &sum_path)?;
    let epochs = json_u64(&summary, "epochs", &sum_path)?;
    let wall_seconds = summary
        .get("wall_seconds")
        .and_then(|v| v.as_f64())
        .ok_or_else(|| {
            Error::msg(format!(
                "{}: field 'wall_seconds' is missing or not a number",
                sum_path.display()
            ))
        })?;
    Ok(RunRecord {
        dir: dir.to_path_buf(),
        dataset: dataset_name(data),
        seed,
        labeled_fraction: if labeled + unlabeled > 0 {
            labeled as f64 / (labeled + unlabeled) as f64
        } else {
            0.0
        },
        labeled,
        unlabeled,
        epochs,
        wall_seconds,
        device: summary
            .get("device")
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .to_string(),
        metrics,
        config,
    })
}

fn cfg_str<'a>(c: &'a toml::Table, k: &str) -> &'a str {
    c.get(k).and_then(|v| v.as_str()).unwrap_or("")
}

fn cfg_bool(c: &toml::Table, k: &str, default: bool) -> bool {
    c.get(k).and_then(|v| v.as_bool()).unwrap_or(default)
}

/// The settings that define a run's group, as `key → TOML value` (the dataset by name).
pub fn group_settings(run: &RunRecord) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = run
        .config
        .iter()
        .filter(|(k, _)| !NOT_GROUPING.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect();
    // A labelled-subset protocol replaces the ratio (which the trainer then ignores).
    if !cfg_str(&run.config, "labeled_protocol").is_empty() {
        m.remove("labeled_ratio");
    }
    m.insert("dataset".into(), format!("{:?}", run.dataset));
    m
}

/// A percentage without a needless decimal: 0.2 → "20", 0.055 → "5.5".
fn pct(f: f64) -> String {
    let p = f * 100.0;
    if (p - p.round()).abs() < 0.05 {
        format!("{}", p.round())
    } else {
        format!("{p:.1}")
    }
}

/// The labelled subset as shown in the tables: `20 % (srcmt split)` (a labelled-subset protocol,
/// which also fixes train/val/test), `100 % (dataset split)` (`labeled_ratio` of the training
/// part of the dataset's own split).
pub fn labels_text(run: &RunRecord) -> String {
    let proto = cfg_str(&run.config, "labeled_protocol");
    let frac = if proto.is_empty() {
        run.config
            .get("labeled_ratio")
            .and_then(|v| v.as_float())
            .unwrap_or(run.labeled_fraction)
    } else {
        run.labeled_fraction
    };
    if proto.is_empty() {
        format!("{} % (dataset split)", pct(frac))
    } else {
        format!("{} % ({proto} split)", pct(frac))
    }
}

/// The row label of a run's settings: "Supervised 20 %", "Mean Teacher", "DSRPGC",
/// "DSRPGC − DSR", "DSRPGC − fusion", "DSRPGC − PGC", and readable combinations of the same
/// parts for anything else ("DSRPGC (DSR: entropy only) − PGC", "DSRPGC + DSR balance (align)").
/// Parts that a method does not use (DSR and PGC for Mean Teacher and supervised) are not shown.
pub fn label(run: &RunRecord) -> String {
    let c = &run.config;
    let method = cfg_str(c, "method");
    let mut s = match method {
        "supervised" => format!(
            "Supervised {}",
            labels_text(run).split(" (").next().unwrap_or("")
        ),
        "mean-teacher" => "Mean Teacher".to_string(),
        "dsrpgc" => "DSRPGC".to_string(),
        other => other.to_string(),
    };
    if method == "dsrpgc" {
        match cfg_str(c, "dsr") {
            "both" | "" => {}
            "off" => s.push_str(" − DSR"),
            "entropy" => s.push_str(" (DSR: entropy only)"),
            "meta" => s.push_str(" (DSR: meta weight only)"),
            other => s.push_str(&format!(" (DSR: {other})")),
        }
    }
    if !cfg_bool(c, "fusion", true) {
        s.push_str(" − fusion");
    }
    if method == "dsrpgc" {
        if !cfg_bool(c, "pgc", true) {
            s.push_str(" − PGC");
        }
        match cfg_str(c, "dsr_balance") {
            "off" | "" => {}
            b => s.push_str(&format!(" + DSR balance ({b})")),
        }
    }
    s
}

/// Where a row sorts inside its dataset: supervised (by labelled fraction), Mean Teacher, DSRPGC,
/// then its ablations in the order DSR, fusion, PGC; anything else after.
fn order_key(run: &RunRecord) -> (u32, i64, u32) {
    let c = &run.config;
    let method = cfg_str(c, "method");
    let m = match method {
        "supervised" => 0,
        "mean-teacher" => 1,
        "dsrpgc" => 2,
        _ => 3,
    };
    let ablation = if method == "dsrpgc" {
        let dsr_off = cfg_str(c, "dsr") == "off";
        let dsr_other = !matches!(cfg_str(c, "dsr"), "both" | "off" | "");
        let no_fusion = !cfg_bool(c, "fusion", true);
        let no_pgc = !cfg_bool(c, "pgc", true);
        let balance = !matches!(cfg_str(c, "dsr_balance"), "off" | "");
        match (dsr_off, dsr_other, no_fusion, no_pgc, balance) {
            (false, false, false, false, false) => 0,
            (true, false, false, false, false) => 1,
            (false, false, true, false, false) => 2,
            (false, false, false, true, false) => 3,
            _ => 4,
        }
    } else {
        u32::from(!cfg_bool(c, "fusion", true))
    };
    (m, (run.labeled_fraction * 1e6) as i64, ablation)
}

/// Mean and spread of one metric over a group's seeds.
#[derive(Clone, Debug, PartialEq)]
pub struct Stat {
    pub mean: f64,
    pub spread: Option<f64>,
    pub values: Vec<f64>,
}

/// One row of the table: a group of runs that differ only in the seed.
#[derive(Clone, Debug)]
pub struct Row {
    pub dataset: String,
    pub label: String,
    /// The labelled subset (`20 % (srcmt split)`).
    pub labels: String,
    pub labeled_fraction: f64,
    pub image_size: Option<i64>,
    pub srcmt_threshold: Option<f64>,
    /// Run directories, sorted by seed.
    pub runs: Vec<PathBuf>,
    pub seeds: Vec<u64>,
    pub epochs: u64,
    /// One per metric of [`METRICS`].
    pub metrics: Vec<Stat>,
    pub wall_seconds: Vec<f64>,
    pub devices: Vec<String>,
    /// The group's settings (without the seed and the settings that do not define groups).
    pub settings: BTreeMap<String, String>,
}

impl Row {
    pub fn wall_mean(&self) -> f64 {
        mean(&self.wall_seconds)
    }
    /// The metric named `key` of [`METRICS`].
    pub fn metric(&self, key: &str) -> Option<&Stat> {
        METRICS
            .iter()
            .position(|m| m.0 == key)
            .map(|i| &self.metrics[i])
    }
}

/// The results table.
#[derive(Clone, Debug)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Run directories left out (with `skip_bad`) and why.
    pub skipped: Vec<(PathBuf, String)>,
    pub spread: Spread,
}

/// Reads `dirs` and groups them into rows (see the module documentation).
pub fn build(dirs: &[PathBuf], opts: ReportOptions) -> Result<Report> {
    let mut skipped = Vec::new();
    let mut runs = Vec::new();
    let mut seen_dirs = BTreeSet::new();
    for d in dirs {
        let canon = std::fs::canonicalize(d).unwrap_or_else(|_| d.clone());
        if !seen_dirs.insert(canon) {
            let why = "named twice".to_string();
            if opts.skip_bad {
                skipped.push((d.clone(), why));
                continue;
            }
            bail!("{}: run directory {why}", d.display());
        }
        match load_run(d) {
            Ok(r) => runs.push(r),
            Err(e) if opts.skip_bad => skipped.push((d.clone(), e.to_string())),
            Err(e) => return Err(e),
        }
    }
    // Group by settings; keep the first-seen order only as a tie-break.
    let mut groups: Vec<(BTreeMap<String, String>, Vec<RunRecord>)> = Vec::new();
    for r in runs {
        let key = group_settings(&r);
        let gi = match groups.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                groups.push((key, Vec::new()));
                groups.len() - 1
            }
        };
        let g = &mut groups[gi].1;
        if let Some(other) = g.iter().find(|o| o.seed == r.seed) {
            let why = format!(
                "same settings and seed {} as {}",
                r.seed,
                other.dir.display()
            );
            if opts.skip_bad {
                skipped.push((r.dir.clone(), why));
                continue;
            }
            bail!("{}: {why}", r.dir.display());
        }
        g.push(r);
    }
    let mut rows: Vec<(String, (u32, i64, u32), Row)> = groups
        .into_iter()
        .map(|(settings, mut g)| {
            g.sort_by_key(|r| r.seed);
            let first = &g[0];
            let metrics = (0..METRICS.len())
                .map(|i| {
                    let values: Vec<f64> = g.iter().map(|r| r.metrics[i]).collect();
                    Stat {
                        mean: mean(&values),
                        spread: opts.spread.of(&values),
                        values,
                    }
                })
                .collect();
            let devices: Vec<String> = g
                .iter()
                .map(|r| r.device.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let row = Row {
                dataset: first.dataset.clone(),
                label: label(first),
                labels: labels_text(first),
                labeled_fraction: first.labeled_fraction,
                image_size: first.config.get("image_size").and_then(|v| v.as_integer()),
                srcmt_threshold: first
                    .config
                    .get("srcmt_threshold")
                    .and_then(|v| v.as_float()),
                runs: g.iter().map(|r| r.dir.clone()).collect(),
                seeds: g.iter().map(|r| r.seed).collect(),
                epochs: first.epochs,
                metrics,
                wall_seconds: g.iter().map(|r| r.wall_seconds).collect(),
                devices,
                settings,
            };
            (first.dataset.clone(), order_key(first), row)
        })
        .collect();
    rows.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut rows: Vec<Row> = rows.into_iter().map(|r| r.2).collect();
    disambiguate(&mut rows);
    Ok(Report {
        rows,
        skipped,
        spread: opts.spread,
    })
}

/// Rows of one dataset with the same label differ in some other setting: the label names it.
fn disambiguate(rows: &mut [Row]) {
    let n = rows.len();
    let mut extra = vec![String::new(); n];
    for i in 0..n {
        let same: Vec<usize> = (0..n)
            .filter(|&j| rows[j].dataset == rows[i].dataset && rows[j].label == rows[i].label)
            .collect();
        if same.len() < 2 {
            continue;
        }
        let keys: BTreeSet<&String> = same
            .iter()
            .flat_map(|&j| rows[j].settings.keys())
            .filter(|k| {
                let v0 = rows[same[0]].settings.get(*k);
                same.iter().any(|&j| rows[j].settings.get(*k) != v0)
            })
            .collect();
        extra[i] = keys
            .iter()
            .map(|k| {
                format!(
                    "{k}={}",
                    rows[i]
                        .settings
                        .get(*k)
                        .map(|s| s.as_str())
                        .unwrap_or("(unset)")
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
    }
    for (r, e) in rows.iter_mut().zip(extra) {
        if !e.is_empty() {
            r.label = format!("{} [{e}]", r.label);
        }
    }
}

/// `12.34 ± 0.56` in percent (`n/a` when undefined).
fn fmt_stat(s: &Stat) -> String {
    if !s.mean.is_finite() {
        return "n/a".into();
    }
    match s.spread {
        Some(d) if d.is_finite() => format!("{:.2} ± {:.2}", 100.0 * s.mean, 100.0 * d),
        _ => format!("{:.2}", 100.0 * s.mean),
    }
}

/// `42 s`, `12.5 min`, `1.52 h`.
pub fn fmt_duration(s: f64) -> String {
    if s < 90.0 {
        format!("{s:.0} s")
    } else if s < 5400.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.2} h", s / 3600.0)
    }
}

const HEADERS_BEFORE: [&str; 2] = ["method", "labels"];
const HEADERS_AFTER: [&str; 3] = ["seeds", "epochs", "wall time"];

impl Report {
    /// Datasets in table order.
    pub fn datasets(&self) -> Vec<String> {
        let mut d: Vec<String> = self.rows.iter().map(|r| r.dataset.clone()).collect();
        d.dedup();
        d
    }

    fn cells(r: &Row) -> Vec<String> {
        let mut c = vec![r.label.clone(), r.labels.clone()];
        c.extend(r.metrics.iter().map(fmt_stat));
        c.push(
            r.seeds
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        );
        c.push(r.epochs.to_string());
        c.push(fmt_duration(r.wall_mean()));
        c
    }

    fn headers() -> Vec<String> {
        HEADERS_BEFORE
            .iter()
            .copied()
            .chain(METRICS.iter().map(|m| m.1))
            .chain(HEADERS_AFTER.iter().copied())
            .map(|s| s.to_string())
            .collect()
    }

    /// The caption of one dataset's table.
    fn caption(&self, ds: &str) -> String {
        let rows: Vec<&Row> = self.rows.iter().filter(|r| r.dataset == ds).collect();
        let sizes: BTreeSet<String> = rows
            .iter()
            .filter_map(|r| r.image_size.map(|s| format!("{s} px")))
            .collect();
        let thresholds: BTreeSet<String> = rows
            .iter()
            .filter_map(|r| r.srcmt_threshold.map(|t| t.to_string()))
            .collect();
        let devices: BTreeSet<&str> = rows
            .iter()
            .flat_map(|r| r.devices.iter().map(|s| s.as_str()))
            .collect();
        format!(
            "{}{}: test split, teacher of the epoch with the best validation macro-AUC; metrics in %, {}; SRC-MT accuracy at threshold {}; wall time = mean `wall_seconds` of the runs' summary.json (device: {}).",
            dataset_display(ds),
            if sizes.is_empty() {
                String::new()
            } else {
                format!(" ({})", sizes.into_iter().collect::<Vec<_>>().join(", "))
            },
            self.spread.describe(),
            thresholds.into_iter().collect::<Vec<_>>().join(", "),
            devices.into_iter().collect::<Vec<_>>().join(", ")
        )
    }

    fn skipped_note(&self) -> Option<String> {
        (!self.skipped.is_empty()).then(|| {
            format!(
                "Left out: {} run director{} that could not be read or did not finish: {}.",
                self.skipped.len(),
                if self.skipped.len() == 1 { "y" } else { "ies" },
                self.skipped
                    .iter()
                    .map(|(d, _)| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    /// One Markdown table per dataset, each preceded by its caption (the README format).
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        for ds in self.datasets() {
            if !s.is_empty() {
                s.push('\n');
            }
            s.push_str(&format!("**{}**\n\n", self.caption(&ds)));
            let h = Self::headers();
            s.push_str(&format!("| {} |\n", h.join(" | ")));
            s.push_str(&format!("|{}\n", "---|".repeat(h.len())));
            for r in self.rows.iter().filter(|r| r.dataset == ds) {
                s.push_str(&format!("| {} |\n", Self::cells(r).join(" | ")));
            }
        }
        if self.rows.is_empty() {
            s.push_str("(no finished runs)\n");
        }
        if let Some(n) = self.skipped_note() {
            s.push_str(&format!("\n{n}\n"));
        }
        s
    }

    /// Aligned plain-text tables.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for ds in self.datasets() {
            if !s.is_empty() {
                s.push('\n');
            }
            s.push_str(&self.caption(&ds));
            s.push('\n');
            let mut table = vec![Self::headers()];
            table.extend(
                self.rows
                    .iter()
                    .filter(|r| r.dataset == ds)
                    .map(Self::cells),
            );
            let w: Vec<usize> = (0..table[0].len())
                .map(|i| {
                    table
                        .iter()
                        .map(|r| r[i].chars().count())
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            for r in &table {
                let line: Vec<String> = r
                    .iter()
                    .zip(&w)
                    .map(|(c, &w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
                    .collect();
                s.push_str(line.join("  ").trim_end());
                s.push('\n');
            }
        }
        if self.rows.is_empty() {
            s.push_str("(no finished runs)\n");
        }
        if let Some(n) = self.skipped_note() {
            s.push_str(&format!("\n{n}\n"));
        }
        s
    }

    /// Everything as one JSON object: `spread`, `rows`, `skipped`.
    pub fn json(&self) -> serde_json::Value {
        let num = |x: f64| {
            if x.is_finite() {
                serde_json::json!(x)
            } else {
                serde_json::Value::Null
            }
        };
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|r| {
                let metrics: serde_json::Map<String, serde_json::Value> = METRICS
                    .iter()
                    .zip(&r.metrics)
                    .map(|(m, st)| {
                        (
                            m.0.to_string(),
                            serde_json::json!({
                                "mean": num(st.mean),
                                "spread": st.spread.map(num),
                                "values": st.values.iter().map(|&v| num(v)).collect::<Vec<_>>(),
                            }),
                        )
                    })
                    .collect();
                serde_json::json!({
                    "dataset": r.dataset,
                    "label": r.label,
                    "labels": r.labels,
                    "labeled_fraction": r.labeled_fraction,
                    "image_size": r.image_size,
                    "seeds": r.seeds,
                    "runs": r.runs,
                    "epochs": r.epochs,
                    "wall_seconds_mean": num(r.wall_mean()),
                    "wall_seconds": r.wall_seconds,
                    "devices": r.devices,
                    "metrics": metrics,
                    "settings": r.settings,
                })
            })
            .collect();
        serde_json::json!({
            "spread": self.spread.name(),
            "spread_description": self.spread.describe(),
            "split": "test",
            "model": "teacher of the best-validation-macro-AUC epoch",
            "rows": rows,
            "skipped": self.skipped.iter().map(|(d, why)| serde_json::json!({"run": d, "error": why})).collect::<Vec<_>>(),
        })
    }
}
