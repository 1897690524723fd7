//! Command-line pieces: `medssl data info`, `medssl data preview`, `medssl-bench data`.
//! The binaries own the command tree; they flatten these argument structs and call `run_*`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde_json::json;

use super::augment::{AugmentConfig, Augmenter};
use super::dataset::{load, Dataset, Format, LoadOptions, Split, IMAGE_SIZES};
use super::loader::{LoaderConfig, LoaderMode, Position, SslLoader};
use super::rng::view_rng;
use super::split::{partition, write_partition, Labeled, LabeledProtocol, Partition};

/// Dataset selection shared by the data commands.
#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// Dataset: a raw directory (meta.json + images.u8), a .npz file, an ISIC CSV (or a directory
    /// of them), or an image folder `root/<class>/*.png|jpg`.
    pub path: PathBuf,
    /// Data format (detected from the path when omitted).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Square image side to produce (28, 32, 64, 112, 128, 224); default: the native size
    /// (28 for the HAM10000 JPEG pack).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Fraction of each class's training images that is labelled (default 0.2).
    #[arg(long, conflicts_with = "labeled_protocol")]
    pub labeled_ratio: Option<f64>,
    /// A fixed labelled-subset protocol instead of a ratio.
    #[arg(long, value_enum)]
    pub labeled_protocol: Option<LabeledProtocol>,
    /// Seed for splits, labelled subset and augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder format: the expected class names (comma-separated); other class folders are errors.
    #[arg(long, value_delimiter = ',')]
    pub classes: Option<Vec<String>>,
}

impl DataArgs {
    /// Loads and partitions the dataset as these options say.
    pub fn load(&self) -> anyhow::Result<(Dataset, Partition)> {
        let opts = LoadOptions {
            format: self.format,
            image_size: self.image_size,
            classes: self.classes.clone(),
        };
        let ds = load(&self.path, &opts)?;
        let labeled = Labeled::from_options(self.labeled_ratio, self.labeled_protocol)?;
        let part = partition(&ds, labeled, self.seed)?;
        Ok((ds, part))
    }
}

/// `medssl data info PATH`.
#[derive(clap::Args, Debug, Clone)]
pub struct InfoArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write labeled.txt, unlabeled.txt and partition.json into this directory.
    #[arg(long)]
    pub write_split: Option<PathBuf>,
}

/// `medssl data preview PATH --out FILE.png`.
#[derive(clap::Args, Debug, Clone)]
pub struct PreviewArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Output image (.png).
    #[arg(long)]
    pub out: PathBuf,
    /// Rows (images), taken round-robin over the classes.
    #[arg(long, default_value_t = 8)]
    pub rows: usize,
    /// Weak views per row.
    #[arg(long, default_value_t = 2)]
    pub weak: usize,
    /// Strong views per row.
    #[arg(long, default_value_t = 4)]
    pub strong: usize,
    /// Split to draw from (train, val, test).
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Weak-view rotation in degrees (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub rotate_deg: f32,
}

/// `medssl-bench data`: loader throughput.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Folder holding ham10000/ and pneumoniamnist/.
    #[arg(long, default_value = "../shared/data")]
    pub data_root: PathBuf,
    /// Cases: raw28 (HAM10000 images.u8, 28 px RGB), jpeg112 (HAM10000 JPEG pack at 112 px),
    /// pneumonia28 (PneumoniaMNIST, 28 px grey). Default: raw28 and jpeg112.
    #[arg(long = "case", value_delimiter = ',')]
    pub cases: Vec<String>,
    /// Timed repeats (median reported).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Batches per repeat.
    #[arg(long, default_value_t = 40)]
    pub steps: usize,
    /// Loader worker threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    #[arg(long, default_value_t = 12)]
    pub batch_labeled: usize,
    #[arg(long, default_value_t = 36)]
    pub batch_unlabeled: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

fn counts_json(ds: &Dataset, ix: &[usize]) -> serde_json::Value {
    json!({ "n": ix.len(), "class_counts": ds.class_counts(Some(ix)) })
}

/// The facts `data info` prints, as JSON.
pub fn info_json(ds: &Dataset, part: &Partition) -> serde_json::Value {
    let (mean, std) = super::augment::channel_stats(ds, &part.train);
    json!({
        "path": ds.source.display().to_string(),
        "format": ds.format,
        "n": ds.len(),
        "height": ds.height,
        "width": ds.width,
        "channels": ds.channels,
        "classes": ds.classes,
        "class_counts": ds.class_counts(None),
        "split_source": part.split_source,
        "splits": {
            "train": counts_json(ds, &part.train),
            "val": counts_json(ds, &part.val),
            "test": counts_json(ds, &part.test),
        },
        "labeled_spec": part.labeled_spec,
        "seed": part.seed,
        "labeled": counts_json(ds, &part.labeled),
        "unlabeled": counts_json(ds, &part.unlabeled),
        "train_mean": mean,
        "train_std": std,
    })
}

/// Runs `medssl data info`.
pub fn run_info(args: &InfoArgs) -> anyhow::Result<()> {
    let (ds, part) = args.data.load()?;
    if let Some(dir) = &args.write_split {
        write_partition(dir, &part, &ds)?;
    }
    let v = info_json(&ds, &part);
    if args.json {
        println!("{v}");
        return Ok(());
    }
    println!("dataset    {} ({})", ds.source.display(), ds.format);
    println!(
        "images     {} × {}x{}x{} (HxWxC)",
        ds.len(),
        ds.height,
        ds.width,
        ds.channels
    );
    if ds.height != ds.width || !IMAGE_SIZES.contains(&ds.height) {
        println!(
            "note       image size is not one of {IMAGE_SIZES:?}; pass --image-size to resize"
        );
    }
    println!("classes    {}: {}", ds.num_classes(), ds.classes.join(" "));
    println!("split      {}", part.split_source);
    let w = ds
        .classes
        .iter()
        .map(|c| c.len().max(6))
        .collect::<Vec<_>>();
    let mut head = format!("{:<12}{:>7}", "", "total");
    for (c, w) in ds.classes.iter().zip(&w) {
        head.push_str(&format!(" {c:>w$}"));
    }
    println!("{head}");
    let row = |name: &str, ix: Option<&[usize]>| {
        let cc = ds.class_counts(ix);
        let mut s = format!("{name:<12}{:>7}", cc.iter().sum::<usize>());
        for (n, w) in cc.iter().zip(&w) {
            s.push_str(&format!(" {n:>w$}"));
        }
        println!("{s}");
    };
    row("all", None);
    row("train", Some(&part.train));
    row("val", Some(&part.val));
    row("test", Some(&part.test));
    row("labelled", Some(&part.labeled));
    row("unlabelled", Some(&part.unlabeled));
    println!("labelled   {} (seed {})", part.labeled_spec, part.seed);
    let fmt = |k: &str| -> String {
        let vals: Vec<String> = v[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_f64())
                    .map(|x| format!("{x:.4}"))
                    .collect()
            })
            .unwrap_or_default();
        format!("[{}]", vals.join(", "))
    };
    println!("train mean {}  std {}", fmt("train_mean"), fmt("train_std"));
    if let Some(dir) = &args.write_split {
        println!(
            "wrote      {}/{{labeled.txt,unlabeled.txt,partition.json}}",
            dir.display()
        );
    }
    Ok(())
}

/// Picks `n` rows of `ix`, round-robin over the classes, seeded.
fn pick_rows(ds: &Dataset, ix: &[usize], n: usize, seed: u64) -> Vec<usize> {
    let mut per: Vec<Vec<usize>> = vec![Vec::new(); ds.num_classes()];
    for &i in ix {
        per[ds.labels[i]].push(i);
    }
    let mut rng = crate::rng::stream(seed, "data/preview");
    for p in &mut per {
        super::rng::shuffle(p, &mut rng);
    }
    let mut out = Vec::new();
    let mut k = 0;
    while out.len() < n && per.iter().any(|p| k < p.len()) {
        for p in &per {
            if k < p.len() && out.len() < n {
                out.push(p[k]);
            }
        }
        k += 1;
    }
    out
}

/// Runs `medssl data preview`: rows of original | weak views | strong views, upscaled.
pub fn run_preview(args: &PreviewArgs) -> anyhow::Result<()> {
    let (ds, part) = args.data.load()?;
    let split: Split = args.split.parse()?;
    let rows = pick_rows(&ds, part.split(split), args.rows, args.data.seed);
    anyhow::ensure!(!rows.is_empty(), "the {split} split is empty");
    let cfg = AugmentConfig {
        rotate_deg: args.rotate_deg,
        ..AugmentConfig::default()
    };
    let aug = Augmenter::for_dataset(&ds, &part.train, cfg);
    let (h, w, c) = (ds.height, ds.width, ds.channels);
    let scale = 112usize.div_ceil(h.max(w)).max(1);
    let (ch, cw) = (h * scale, w * scale);
    let pad = 4;
    let cols = 1 + args.weak + args.strong;
    let gw = cols * (cw + pad) + pad + pad; // extra gap after the original column
    let gh = rows.len() * (ch + pad) + pad;
    let mut canvas = image::RgbImage::from_pixel(gw as u32, gh as u32, image::Rgb([255, 255, 255]));
    let mut blit = |img: &[u8], r: usize, col: usize| {
        let x0 = pad + col * (cw + pad) + if col > 0 { pad } else { 0 };
        let y0 = pad + r * (ch + pad);
        for y in 0..ch {
            for x in 0..cw {
                let p = ((y / scale) * w + x / scale) * c;
                let px = if c == 3 {
                    [img[p], img[p + 1], img[p + 2]]
                } else {
                    [img[p]; 3]
                };
                canvas.put_pixel((x0 + x) as u32, (y0 + y) as u32, image::Rgb(px));
            }
        }
    };
    for (r, &i) in rows.iter().enumerate() {
        let src = ds.image(i);
        blit(src, r, 0);
        for k in 0..args.weak {
            let mut rng = view_rng(args.data.seed, i as u64, 1, k as u64);
            blit(&aug.weak_u8(src, &mut rng), r, 1 + k);
        }
        for k in 0..args.strong {
            let mut rng = view_rng(args.data.seed, i as u64, 2, k as u64);
            blit(&aug.strong_u8(src, &mut rng), r, 1 + args.weak + k);
        }
    }
    canvas
        .save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "wrote {} ({} rows: original | {} weak | {} strong, {}x{} px upscaled {scale}x, split {split}, classes {})",
        args.out.display(),
        rows.len(),
        args.weak,
        args.strong,
        h,
        w,
        rows.iter().map(|&i| ds.classes[ds.labels[i]].as_str()).collect::<Vec<_>>().join(",")
    );
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Runs `medssl-bench data`: SSL loader throughput (labelled + unlabelled images per second,
/// full weak + strong augmentation), median over repeats.
pub fn run_bench(args: &BenchArgs) -> anyhow::Result<()> {
    let cases: Vec<String> = if args.cases.is_empty() {
        vec!["raw28".into(), "jpeg112".into()]
    } else {
        args.cases.clone()
    };
    anyhow::ensure!(
        args.repeats > 0 && args.steps > 0,
        "--repeats and --steps must be positive"
    );
    for case in &cases {
        let (name, path, format, size) = match case.as_str() {
            "raw28" => ("ham10000", args.data_root.join("ham10000"), Format::Raw, 28),
            "jpeg112" => (
                "ham10000",
                args.data_root.join("ham10000"),
                Format::JpegPack,
                112,
            ),
            "pneumonia28" => (
                "pneumoniamnist",
                args.data_root.join("pneumoniamnist"),
                Format::Raw,
                28,
            ),
            other => anyhow::bail!("unknown bench case '{other}' (raw28, jpeg112, pneumonia28)"),
        };
        let t0 = Instant::now();
        let ds = load(
            &path,
            &LoadOptions {
                format: Some(format),
                image_size: Some(size),
                classes: None,
            },
        )?;
        let load_s = t0.elapsed().as_secs_f64();
        let part = partition(&ds, Labeled::Ratio(0.2), args.seed)?;
        let (c, h, w) = (ds.channels, ds.height, ds.width);
        let cfg = LoaderConfig {
            batch_labeled: args.batch_labeled,
            batch_unlabeled: args.batch_unlabeled,
            seed: args.seed,
            workers: args.workers,
            prefetch: 2 * args.workers.max(1),
            mode: LoaderMode::Ssl,
            augment: AugmentConfig::default(),
        };
        let mut loader = SslLoader::new(Arc::new(ds), &part, cfg, Position::default())?;
        for _ in 0..args.steps.min(10) {
            std::hint::black_box(loader.next_batch());
        }
        let per_step = (args.batch_labeled + args.batch_unlabeled) as f64;
        let mut ips = Vec::with_capacity(args.repeats);
        for _ in 0..args.repeats {
            let t = Instant::now();
            for _ in 0..args.steps {
                std::hint::black_box(loader.next_batch());
            }
            ips.push(args.steps as f64 * per_step / t.elapsed().as_secs_f64());
        }
        let min = ips.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = ips.iter().cloned().fold(0.0, f64::max);
        let med = median(&mut ips);
        let views = med * (args.batch_labeled + 2 * args.batch_unlabeled) as f64 / per_step;
        if args.json {
            println!(
                "{}",
                json!({
                    "bench": "data",
                    "case": case,
                    "dataset": name,
                    "format": format,
                    "image_size": size,
                    "height": h,
                    "width": w,
                    "channels": c,
                    "batch_labeled": args.batch_labeled,
                    "batch_unlabeled": args.batch_unlabeled,
                    "workers": args.workers,
                    "steps": args.steps,
                    "repeats": args.repeats,
                    "load_s": load_s,
                    "images_per_s": med,
                    "images_per_s_min": min,
                    "images_per_s_max": max,
                    "views_per_s": views,
                })
            );
        } else {
            println!(
                "data {case:<12} {name} {format} {h}x{w}x{c}  B_l={} B_u={} workers={}  {med:>9.0} images/s (median of {}, min {min:.0}, max {max:.0}; {views:.0} views/s)  load {load_s:.2}s",
                args.batch_labeled, args.batch_unlabeled, args.workers, args.repeats
            );
        }
    }
    Ok(())
}
