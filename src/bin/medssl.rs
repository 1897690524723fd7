//! `medssl`: conformance, data tools, training and evaluation.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use medssl::golden;
use medssl::tensor::Device;

#[derive(Parser)]
#[command(
    name = "medssl",
    version,
    about = "Semi-supervised medical image classification (DSRPGC)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run PyTorch golden cases (SPEC §5) and report the worst errors per output.
    Conformance {
        /// Folder of *.safetensors cases.
        #[arg(long, default_value = "../shared/golden")]
        golden: PathBuf,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// One JSON object per case, then a summary object.
        #[arg(long)]
        json: bool,
    },
    /// Train a model (DSRPGC by default) and evaluate it every epoch; writes a run directory.
    Train(TrainArgs),
    /// Evaluate a checkpoint's teacher on a split of a dataset.
    Eval {
        /// A checkpoint written by `medssl train` (best.safetensors or last.safetensors).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Dataset path (default: the one the checkpoint was trained on).
        #[arg(long)]
        data: Option<String>,
        /// train, val or test.
        #[arg(long, default_value = "test")]
        split: String,
        /// Evaluate the student instead of the teacher.
        #[arg(long)]
        student: bool,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        json: bool,
    },
    /// Class probabilities for image files (PNG/JPEG), as JSON.
    Predict {
        #[arg(long)]
        checkpoint: PathBuf,
        /// Image files.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Dataset tools: info and preview.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
    /// Results table of finished run directories: one row per group of runs that differ only in
    /// the seed (test metrics of the best checkpoint, mean ± spread over seeds).
    Report(ReportArgs),
}

#[derive(Subcommand)]
enum DataCmd {
    /// Sizes, classes, split and labelled/unlabelled counts.
    Info(medssl::data::cli::InfoArgs),
    /// A PNG grid of originals with their weak and strong views.
    Preview(medssl::data::cli::PreviewArgs),
}

#[derive(clap::Args)]
struct ReportArgs {
    /// Run directories written by `medssl train` (config.toml + summary.json).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Markdown tables (the README format).
    #[arg(long, conflicts_with = "json")]
    markdown: bool,
    /// One JSON object (rows with every value per seed).
    #[arg(long)]
    json: bool,
    /// Spread over seeds: std (sample standard deviation, n − 1) or half-range.
    #[arg(long, default_value = "std")]
    spread: String,
    /// Leave out run directories that cannot be read or did not finish (listed on stderr and
    /// under the table) instead of failing.
    #[arg(long)]
    skip_bad: bool,
}

fn report(a: ReportArgs) -> Result<()> {
    let opts = medssl::report::ReportOptions {
        spread: a.spread.parse()?,
        skip_bad: a.skip_bad,
    };
    let r = medssl::report::build(&a.runs, opts)?;
    for (dir, why) in &r.skipped {
        eprintln!("medssl report: skipped {}: {why}", dir.display());
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r.json())?);
    } else if a.markdown {
        print!("{}", r.markdown());
    } else {
        print!("{}", r.text());
    }
    Ok(())
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Dataset path: medssl raw folder, MedMNIST .npz, ISIC 2018 CSV layout or an image folder.
    #[arg(long)]
    data: Option<String>,
    /// Run directory (config, logs, metrics, checkpoints).
    #[arg(long, default_value = "runs/latest")]
    out: PathBuf,
    /// fast (default), paper or srcmt-isic2018.
    #[arg(long, default_value = "fast")]
    preset: String,
    /// TOML file of settings (keys as in the run directory's config.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override any setting: --set key=value (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    #[arg(long)]
    epochs: Option<u64>,
    #[arg(long)]
    labeled_ratio: Option<f64>,
    /// srcmt: the HAM10000/ISIC2018 SSL benchmark protocol.
    #[arg(long)]
    labeled_protocol: Option<String>,
    /// supervised, mean-teacher or dsrpgc.
    #[arg(long)]
    method: Option<String>,
    /// off, entropy, meta or both.
    #[arg(long)]
    dsr: Option<String>,
    /// Optional class balancing inside DSR (not in the paper): off, class (class-balanced DSR
    /// weights) or align (distribution alignment of the teacher's probabilities). DSRPGC only.
    #[arg(long)]
    dsr_balance: Option<String>,
    /// Classifier on pooled layer4 features (no similarity fusion).
    #[arg(long)]
    no_fusion: bool,
    /// Drop the PGC term.
    #[arg(long)]
    no_pgc: bool,
    #[arg(long)]
    image_size: Option<usize>,
    #[arg(long)]
    width: Option<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<String>,
    /// Replay each training step from a CUDA graph once its shapes have settled (the key queue
    /// is full); same results, fewer launches. The default on a CUDA device (config key
    /// `cuda_graph`, `auto`); with this flag a CPU device is an error.
    #[arg(long, conflicts_with = "no_cuda_graph")]
    cuda_graph: bool,
    /// Run every training step plain, without a CUDA graph (`cuda_graph = off`).
    #[arg(long)]
    no_cuda_graph: bool,
    #[arg(long)]
    seed: Option<u64>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stop (with a checkpoint) after this many steps in total.
    #[arg(long, default_value_t = 0)]
    max_steps: u64,
    /// Skip per-epoch validation.
    #[arg(long)]
    no_eval: bool,
}

fn train(a: TrainArgs) -> Result<()> {
    use medssl::train::config::TrainConfig;
    let mut sets = a.sets.clone();
    let mut flag = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            sets.push(format!("{k}={v}"));
        }
    };
    flag("data", a.data.clone());
    flag("epochs", a.epochs.map(|v| v.to_string()));
    flag("labeled_ratio", a.labeled_ratio.map(|v| v.to_string()));
    flag("labeled_protocol", a.labeled_protocol.clone());
    flag("method", a.method.clone());
    flag("dsr", a.dsr.clone());
    flag("dsr_balance", a.dsr_balance.clone());
    flag("image_size", a.image_size.map(|v| v.to_string()));
    flag("width", a.width.map(|v| v.to_string()));
    flag("device", a.device.clone());
    flag("seed", a.seed.map(|v| v.to_string()));
    flag("fusion", a.no_fusion.then(|| "false".to_string()));
    flag("pgc", a.no_pgc.then(|| "false".to_string()));
    flag("cuda_graph", a.cuda_graph.then(|| "on".to_string()));
    flag("cuda_graph", a.no_cuda_graph.then(|| "off".to_string()));
    // A resumed run starts from its own saved settings; flags and --set change what may change.
    let saved = a.out.join("config.toml");
    let file = match (&a.config, a.resume) {
        (Some(f), _) => Some(f.clone()),
        (None, true) if saved.exists() => Some(saved),
        _ => None,
    };
    let cfg = TrainConfig::resolve(&a.preset, file.as_deref(), &sets)?;
    let opts = medssl::train::run::RunOptions {
        out: a.out.clone(),
        resume: a.resume,
        max_steps: a.max_steps,
        no_eval: a.no_eval,
        quiet: false,
    };
    let (outcome, _) = medssl::train::run::train(cfg, &opts)?;
    eprintln!("run directory: {} ({outcome:?})", a.out.display());
    Ok(())
}

fn eval(
    checkpoint: &std::path::Path,
    data: Option<String>,
    split: &str,
    student: bool,
    device: &str,
    json: bool,
) -> Result<()> {
    use medssl::train::{checkpoint as ck, metrics, run};
    let c = ck::load(checkpoint)?;
    let mut cfg = c.config.clone();
    if let Some(d) = data {
        cfg.data = d;
    }
    let dev = Device::parse(device)?;
    let (ds, part) = run::load_data(&cfg)?;
    if ds.classes.len() != c.model.classes || ds.channels != c.model.in_ch {
        bail!(
            "{}: {} classes / {} channels, the checkpoint expects {} / {}",
            cfg.data,
            ds.classes.len(),
            ds.channels,
            c.model.classes,
            c.model.in_ch
        );
    }
    let idx = match split {
        "train" => &part.train,
        "val" => &part.val,
        "test" => &part.test,
        s => bail!("--split '{s}': expected train, val or test"),
    };
    let mut model = medssl::nn::MedFuseNet::new(c.model, 0);
    let prefix = if student { "student." } else { "teacher." };
    model
        .store
        .load_named(&checkpoint.display().to_string(), &c.tensors, prefix)?;
    model.store.to_device(dev)?;
    let norm = medssl::data::Normalize::new(c.norm_mean.clone(), c.norm_std.clone());
    let m = run::evaluate(
        &mut model,
        &ds,
        idx,
        &norm,
        cfg.eval_batch,
        dev,
        cfg.srcmt_threshold,
    )?;
    if json {
        println!(
            "{}",
            serde_json::json!({"checkpoint": checkpoint, "data": cfg.data, "split": split, "model": prefix.trim_end_matches('.'), "metrics": m})
        );
    } else {
        println!(
            "{} on {} ({split}, {} images, {}):",
            checkpoint.display(),
            cfg.data,
            idx.len(),
            prefix.trim_end_matches('.')
        );
        println!("  {}", metrics::summary_line(&m));
        println!(
            "  per-class AUC: {}",
            ds.classes
                .iter()
                .zip(&m.auc)
                .map(|(c, a)| format!(
                    "{c} {}",
                    a.map(|a| format!("{a:.4}")).unwrap_or("n/a".into())
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("  SRC-MT convention (threshold {}): acc {:.4} sens {:.4} spec {:.4} prec {:.4} F1 {:.4}", m.srcmt.threshold, m.srcmt.accuracy, m.srcmt.sensitivity, m.srcmt.specificity, m.srcmt.precision, m.srcmt.f1);
        println!("{}", metrics::confusion_ascii(&m, &ds.classes));
    }
    Ok(())
}

fn predict(checkpoint: &std::path::Path, images: &[PathBuf], device: &str) -> Result<()> {
    use medssl::autograd::Graph;
    use medssl::nn::Binding;
    let c = medssl::train::checkpoint::load(checkpoint)?;
    let dev = Device::parse(device)?;
    let bk = medssl::backend::get(dev)?;
    let mut model = medssl::nn::MedFuseNet::new(c.model, 0);
    model
        .store
        .load_named(&checkpoint.display().to_string(), &c.tensors, "teacher.")?;
    model.store.to_device(dev)?;
    let size = c.config.image_size;
    let ch = c.model.in_ch;
    let norm = medssl::data::Normalize::new(c.norm_mean.clone(), c.norm_std.clone());
    let mut out = Vec::new();
    for p in images {
        let img =
            image::open(p).with_context(|| format!("{}: cannot decode image", p.display()))?;
        let img = img.resize_exact(
            size as u32,
            size as u32,
            image::imageops::FilterType::CatmullRom,
        );
        let raw: Vec<u8> = if ch == 1 {
            img.to_luma8().into_raw()
        } else {
            img.to_rgb8().into_raw()
        };
        let mut x = vec![0.0f32; ch * size * size];
        norm.apply(&raw, &mut x);
        let mut g = Graph::new();
        let probs = g.no_grad(|g| -> medssl::Result<Vec<f32>> {
            let mut bind = Binding::new(false);
            let xv = g.constant(bk.from_host(&x, &[1, ch, size, size])?);
            let o = model.forward(g, &mut bind, xv, false)?;
            let pr = g.softmax(o.logits)?;
            g.value(pr).to_vec()
        })?;
        let best = probs
            .iter()
            .enumerate()
            .fold(0, |b, (i, v)| if *v > probs[b] { i } else { b });
        let map: serde_json::Map<String, serde_json::Value> = c
            .classes
            .iter()
            .zip(&probs)
            .map(|(k, v)| (k.clone(), serde_json::json!(v)))
            .collect();
        out.push(
            serde_json::json!({"image": p, "prediction": c.classes[best], "probabilities": map}),
        );
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn conformance(dir: &std::path::Path, device: &str, json: bool) -> Result<bool> {
    let dev = Device::parse(device)?;
    // The backend's own name: it says when `cuda` is the CPU emulation.
    let dev_name = medssl::backend::get(dev)
        .with_context(|| format!("--device {device}"))?
        .name();
    let files = golden::case_files(dir)?;
    if files.is_empty() {
        bail!("{}: no *.safetensors case found", dir.display());
    }
    let (mut passed, mut failed) = (0, 0);
    for f in &files {
        let r = golden::run_case(f, dev);
        if r.pass {
            passed += 1;
        } else {
            failed += 1;
        }
        if json {
            println!("{}", serde_json::to_string(&r)?);
            continue;
        }
        let name = f.file_stem().and_then(|s| s.to_str()).unwrap_or("?");
        println!(
            "{} {name} (op {})",
            if r.pass { "PASS" } else { "FAIL" },
            r.op
        );
        if let Some(e) = &r.error {
            println!("    error: {e}");
        }
        for c in &r.checks {
            println!(
                "    {:<44} max_abs {:.3e}  max_rel {:.3e}{}{}",
                c.name,
                c.max_abs,
                c.max_rel,
                if c.pass { "" } else { "  FAIL" },
                c.problem
                    .as_deref()
                    .map(|p| format!(" ({p})"))
                    .unwrap_or_default()
            );
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"summary": true, "device": dev_name, "passed": passed, "failed": failed})
        );
    }
    println!("{passed} passed, {failed} failed on {dev_name}");
    Ok(failed == 0)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    medssl::backend::cpu::check_env()?;
    match cli.cmd {
        Cmd::Conformance {
            golden,
            device,
            json,
        } => {
            if !conformance(&golden, &device, json)? {
                std::process::exit(1);
            }
        }
        Cmd::Train(a) => train(a)?,
        Cmd::Eval {
            checkpoint,
            data,
            split,
            student,
            device,
            json,
        } => eval(&checkpoint, data, &split, student, &device, json)?,
        Cmd::Predict {
            checkpoint,
            images,
            device,
        } => predict(&checkpoint, &images, &device)?,
        Cmd::Data { cmd } => match cmd {
            DataCmd::Info(a) => medssl::data::cli::run_info(&a)?,
            DataCmd::Preview(a) => medssl::data::cli::run_preview(&a)?,
        },
        Cmd::Report(a) => report(a)?,
    }
    Ok(())
}
