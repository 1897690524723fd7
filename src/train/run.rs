//! The training run: data, loop, per-epoch evaluation, checkpoints, logs and the final test.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::autograd::Graph;
use crate::bail;
use crate::data::{self, Dataset, LoaderConfig, LoaderMode, Normalize, Partition, SslLoader};
use crate::error::{Error, Result};
use crate::nn::{Binding, MedFuseNet, ModelConfig};
use crate::optim::{OptimKind, Schedule};
use crate::ssl::{Batch, DsrBalance, DsrMode};
use crate::tensor::{Device, Tensor};
use crate::train::checkpoint::{self, CkptState};
use crate::train::config::TrainConfig;
use crate::train::metrics::{self, Metrics};
use crate::train::step::{train_step_overlapped, Method, StepConfig, StepStats, TrainState};

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Finished,
    /// Stopped by SIGTERM/SIGINT after writing a checkpoint.
    Interrupted,
    /// Stopped at `max_steps` (tests, benchmarks) after writing a checkpoint.
    StepLimit,
}

/// Options of one `train` invocation that are not part of the model/run configuration.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub out: PathBuf,
    /// Continue the run in `out` from its `last.safetensors`.
    pub resume: bool,
    /// Stop after this many optimiser steps in total (0: no limit).
    pub max_steps: u64,
    /// Skip the per-epoch validation (tests).
    pub no_eval: bool,
    /// Print nothing but errors.
    pub quiet: bool,
}

/// Loads the dataset named by `cfg` and its partition.
pub fn load_data(cfg: &TrainConfig) -> Result<(Dataset, Partition)> {
    let opts = data::LoadOptions {
        format: if cfg.format.is_empty() {
            None
        } else {
            Some(cfg.format.parse()?)
        },
        image_size: Some(cfg.image_size),
        classes: None,
    };
    let ds = data::load(&cfg.data, &opts)?;
    let protocol = match cfg.labeled_protocol.as_str() {
        "" => None,
        p => Some(p.parse::<data::LabeledProtocol>()?),
    };
    // A protocol fixes the labelled subset; a ratio set beside it would be silently ignored.
    if protocol.is_some() && cfg.labeled_ratio != data::DEFAULT_LABELED_RATIO {
        bail!(
            "labeled_ratio {} and labeled_protocol '{}' are mutually exclusive: the protocol fixes the labelled subset (srcmt: train rows 0..1399, srcmt-full: all 7000 training rows); drop one",
            cfg.labeled_ratio,
            cfg.labeled_protocol
        );
    }
    let labeled = data::Labeled::from_options(
        if protocol.is_some() {
            None
        } else {
            Some(cfg.labeled_ratio)
        },
        protocol,
    )?;
    let part = data::partition(&ds, labeled, cfg.seed)?;
    Ok((ds, part))
}

/// The model configuration a run uses for `ds`.
pub fn model_config(cfg: &TrainConfig, ds: &Dataset) -> ModelConfig {
    ModelConfig {
        in_ch: ds.channels,
        width: cfg.width,
        d: cfg.fusion_dim,
        emb: cfg.emb,
        classes: ds.classes.len(),
        small_stem: ModelConfig::small_stem_for(cfg.image_size),
        fusion: cfg.fusion,
    }
}

/// Evaluates `model` (eval-mode BN) on dataset rows `idx`: metrics and mean cross-entropy.
pub fn evaluate(
    model: &mut MedFuseNet,
    ds: &Dataset,
    idx: &[usize],
    norm: &Normalize,
    batch: usize,
    device: Device,
    threshold: f64,
) -> Result<Metrics> {
    let bk = crate::backend::get(device)?;
    let (mut probs, mut labels) = (Vec::new(), Vec::new());
    let mut loss_sum = 0.0f64;
    for b in data::eval_batches(ds, idx, norm, batch) {
        let n = b.y.len();
        let x = bk.from_host(&b.x, &[n, ds.channels, ds.height, ds.width])?;
        let mut g = Graph::new();
        let (p, l) = g.no_grad(|g| -> Result<(Tensor, f32)> {
            let mut bind = Binding::new(false);
            let xv = g.constant(x);
            let o = model.forward(g, &mut bind, xv, false)?;
            let l = g.cross_entropy(o.logits, &b.y)?;
            let p = g.softmax(o.logits)?;
            Ok((g.value(p).clone(), g.value(l).item()?))
        })?;
        probs.extend(p.to_vec()?);
        labels.extend_from_slice(&b.y);
        loss_sum += l as f64 * n as f64;
    }
    if labels.is_empty() {
        bail!("evaluation split is empty");
    }
    let mut m = metrics::compute(&probs, &labels, model.cfg.classes, threshold)?;
    m.loss = Some(loss_sum / labels.len() as f64);
    Ok(m)
}

fn step_config(cfg: &TrainConfig, steps_per_epoch: u64) -> Result<StepConfig> {
    // Ramp length: `ramp_epochs`, or a third of the run if that is shorter.
    let total = cfg.epochs * steps_per_epoch;
    let ramp = ((cfg.ramp_epochs * steps_per_epoch as f64) as u64)
        .min(total / 3)
        .max(1);
    Ok(StepConfig {
        method: cfg.method.parse()?,
        dsr: cfg.dsr.parse::<DsrMode>()?,
        balance: cfg.dsr_balance.parse::<DsrBalance>()?,
        pgc: cfg.pgc,
        lambda_cons_max: cfg.lambda_cons,
        lambda_pgc_max: cfg.lambda_pgc,
        temperature: cfg.temperature,
        meta_beta: cfg.meta_beta,
        ema_alpha: cfg.ema_alpha,
        ramp_steps: ramp,
        cuda_graph: cfg
            .cuda_graph
            .enabled(crate::tensor::Device::parse(&cfg.device)?),
    })
}

fn schedule(cfg: &TrainConfig, steps_per_epoch: u64) -> Schedule {
    match cfg.schedule.as_str() {
        "cosine" => Schedule::Cosine {
            total: cfg.epochs * steps_per_epoch,
        },
        "step" => Schedule::Step {
            every: steps_per_epoch,
            gamma: cfg.lr_gamma,
        },
        _ => Schedule::Constant,
    }
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))
}

/// Keeps the first `n` lines of a JSONL file (a resumed run rewrites what follows).
fn truncate_lines(path: &Path, n: u64) -> Result<Vec<serde_json::Value>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    let kept: Vec<&str> = text.lines().take(n as usize).collect();
    let mut s = kept.join("\n");
    if !s.is_empty() {
        s.push('\n');
    }
    crate::golden::atomic_write(path, s.as_bytes())?;
    kept.iter()
        .map(|l| {
            serde_json::from_str(l).map_err(|e| Error::msg(format!("{}: {e}", path.display())))
        })
        .collect()
}

/// A resumed run may change the schedule (epochs, learning rate, logging, device, workers) but
/// not what defines the model, the data or the state layout.
fn check_resumable(saved: &TrainConfig, new: &TrainConfig) -> Result<()> {
    let a = toml::Value::try_from(saved).map_err(|e| Error::msg(e.to_string()))?;
    let b = toml::Value::try_from(new).map_err(|e| Error::msg(e.to_string()))?;
    for k in [
        "data",
        "format",
        "image_size",
        "labeled_ratio",
        "labeled_protocol",
        "width",
        "fusion_dim",
        "emb",
        "fusion",
        "method",
        "dsr_balance",
        "queue",
        "batch_labeled",
        "batch_unlabeled",
        "optimizer",
        "seed",
    ] {
        if a.get(k) != b.get(k) {
            bail!(
                "--resume: setting '{k}' was {} in the saved run and is {} now; it cannot change on resume",
                a.get(k).map(|v| v.to_string()).unwrap_or_default(),
                b.get(k).map(|v| v.to_string()).unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Why a run should stop after step `step`, if it should.
fn stop_reason(signal: &AtomicBool, max_steps: u64, step: u64) -> Option<Outcome> {
    if signal.load(Ordering::SeqCst) {
        Some(Outcome::Interrupted)
    } else if max_steps > 0 && step >= max_steps {
        Some(Outcome::StepLimit)
    } else {
        None
    }
}

/// Runs (or resumes) training into `opts.out`. Returns the outcome and the summary JSON.
pub fn train(cfg: TrainConfig, opts: &RunOptions) -> Result<(Outcome, serde_json::Value)> {
    let out = &opts.out;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let last_path = out.join("last.safetensors");
    let best_path = out.join("best.safetensors");
    let resumed = if opts.resume {
        if !last_path.exists() {
            bail!(
                "--resume {}: no last.safetensors there to resume from",
                out.display()
            );
        }
        Some(checkpoint::load(&last_path)?)
    } else {
        if last_path.exists() {
            bail!(
                "{}: already holds a run (last.safetensors); pass --resume to continue it or choose another --out",
                out.display()
            );
        }
        None
    };
    if let Some(ck) = &resumed {
        check_resumable(&ck.config, &cfg)?;
    }
    cfg.validate()?;
    crate::golden::atomic_write(&out.join("config.toml"), cfg.to_toml().as_bytes())?;
    let device = Device::parse(&cfg.device)?;
    let bk = crate::backend::get(device)?;
    let log = |s: &str| {
        if !opts.quiet {
            eprintln!("{s}");
        }
    };

    let (ds, part) = load_data(&cfg)?;
    data::write_partition(out, &part, &ds)?;
    let ds = Arc::new(ds);
    let method: Method = cfg.method.parse()?;
    let mode = if method == Method::Supervised {
        LoaderMode::Supervised
    } else {
        LoaderMode::Ssl
    };
    let start_pos = resumed
        .as_ref()
        .map(|c| c.state.position)
        .unwrap_or_default();
    let loader_cfg = LoaderConfig {
        batch_labeled: cfg.batch_labeled,
        batch_unlabeled: cfg.batch_unlabeled,
        seed: cfg.seed,
        workers: cfg.workers,
        prefetch: 4,
        mode,
        augment: Default::default(),
    };
    let mut loader = SslLoader::new(Arc::clone(&ds), &part, loader_cfg, start_pos)?;
    let norm = loader.normalize().clone();
    // An epoch is one pass over the unlabelled set (SPEC §1.6), also for supervised baselines on
    // the same split; with no unlabelled set it is one pass over the labelled set.
    let steps_per_epoch = if part.unlabeled.len() >= cfg.batch_unlabeled {
        (part.unlabeled.len() / cfg.batch_unlabeled) as u64
    } else {
        loader.steps_per_epoch()
    };
    let mcfg = model_config(&cfg, &ds);
    let opt = match cfg.optimizer.as_str() {
        "sgd" => OptimKind::Sgd {
            momentum: cfg.momentum,
        },
        _ => OptimKind::adam(),
    };
    let mut st = TrainState::new(
        mcfg,
        cfg.seed,
        device,
        opt,
        cfg.weight_decay,
        cfg.queue,
        part.unlabeled.len(),
    )?;
    let mut state = CkptState::default();
    if let Some(ck) = &resumed {
        ck.restore(&mut st)?;
        state = ck.state.clone();
        log(&format!(
            "resumed {} at step {} (epoch {})",
            out.display(),
            st.step,
            state.epochs_done
        ));
    }
    let metrics_path = out.join("metrics.jsonl");
    let mut history = truncate_lines(&metrics_path, state.epochs_done)?;
    let scfg = step_config(&cfg, steps_per_epoch)?;
    let sched = schedule(&cfg, steps_per_epoch);
    let total_steps = cfg.epochs * steps_per_epoch;
    log(&format!(
        "medssl train: {} on {} ({} images {}x{}x{}, {} classes; labelled {}, unlabelled {}, val {}, test {}), {} epochs x {} steps, device {}{}",
        cfg.method, ds.source.display(), ds.len(), ds.height, ds.width, ds.channels, ds.classes.len(),
        part.labeled.len(), part.unlabeled.len(), part.val.len(), part.test.len(), cfg.epochs, steps_per_epoch, bk.name(),
        if scfg.cuda_graph {
            format!(", steps from a CUDA graph once their shapes settle (cuda_graph = {})", cfg.cuda_graph.name())
        } else {
            String::new()
        }
    ));

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .map_err(|e| Error::msg(format!("signal handler: {e}")))?;
    }
    let save = |st: &TrainState, state: &CkptState, path: &Path| {
        checkpoint::save(path, st, state, &cfg, &ds.classes, &norm.mean, &norm.std)
    };
    let keep_checkpoint = |e: Error| {
        Error::msg(format!(
            "{e}; the last good checkpoint ({}) is kept",
            last_path.display()
        ))
    };
    let log_stop = |o: Outcome, step: u64| {
        log(&format!(
            "{} at step {step}: checkpoint written to {}; continue with `medssl train --resume --out {}`",
            if o == Outcome::StepLimit { "step limit reached" } else { "stopped by signal" },
            last_path.display(),
            out.display()
        ))
    };
    let tty = std::io::stderr().is_terminal() && !opts.quiet;
    let log_every = if cfg.log_every > 0 {
        cfg.log_every
    } else {
        (steps_per_epoch / 10).max(1)
    };
    let t_run = Instant::now();
    // Wall time of the earlier invocations of a resumed run; every checkpoint stores the total.
    let wall_before = state.wall_seconds;
    let wall_total = || wall_before + t_run.elapsed().as_secs_f64();
    let mut outcome = Outcome::Finished;
    let (c, h, w) = (ds.channels, ds.height, ds.width);

    'epochs: while st.step < total_steps {
        let epoch = st.step / steps_per_epoch;
        let bar = tty.then(|| {
            let b = indicatif::ProgressBar::new(steps_per_epoch);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "epoch {prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("template"),
            );
            b.set_prefix(format!("{}/{}", epoch + 1, cfg.epochs));
            b.set_position(st.step % steps_per_epoch);
            b
        });
        let mut sums = StepStats::default();
        let mut pseudo_counts = vec![0u64; ds.classes.len()];
        let mut n_in_epoch = 0u32;
        let t_epoch = Instant::now();
        // Adds a finished step to the epoch's sums and shows it.
        let mut account = |s: &StepStats| {
            for (a, v) in [
                (&mut sums.loss, s.loss),
                (&mut sums.loss_sup, s.loss_sup),
                (&mut sums.loss_cons, s.loss_cons),
                (&mut sums.loss_pgc, s.loss_pgc),
                (&mut sums.mean_weight, s.mean_weight),
            ] {
                *a += v;
            }
            sums.lambda_cons = s.lambda_cons;
            sums.lambda_pgc = s.lambda_pgc;
            sums.lr = s.lr;
            for &l in &s.pseudo_labels {
                pseudo_counts[l] += 1;
            }
            n_in_epoch += 1;
            let in_epoch = s.step - epoch * steps_per_epoch;
            if let Some(b) = &bar {
                b.set_position(in_epoch);
                b.set_message(format!(
                    "loss {:.4} (sup {:.3} cons {:.4} pgc {:.3})",
                    s.loss, s.loss_sup, s.loss_cons, s.loss_pgc
                ));
            } else if in_epoch.is_multiple_of(log_every) {
                log(&format!(
                    "epoch {}/{} step {}/{} loss {:.4} sup {:.4} cons {:.4} pgc {:.4} w {:.3} lr {:.2e} | {:.1} steps/s",
                    epoch + 1, cfg.epochs, in_epoch, steps_per_epoch, s.loss, s.loss_sup, s.loss_cons, s.loss_pgc, s.mean_weight, s.lr,
                    n_in_epoch as f64 / t_epoch.elapsed().as_secs_f64().max(1e-9)
                ));
            }
        };
        while st.step / steps_per_epoch == epoch && st.step < total_steps {
            let b = loader.next_batch();
            let batch = Batch {
                x_lab: bk.from_host(&b.x_lab, &[b.y_lab.len(), c, h, w])?,
                y_lab: b.y_lab.clone(),
                u_weak: bk.from_host(&b.u_weak, &[b.u_slot.len(), c, h, w])?,
                u_strong: bk.from_host(&b.u_strong, &[b.u_slot.len(), c, h, w])?,
            };
            let lr = sched.lr(cfg.lr, st.step);
            // On a device whose reads are queued (CUDA, unless `MEDSSL_CUDA_STEP_READ=wait`) the
            // step returns once issued and the previous step's results come back now; on the CPU
            // this step's.
            let done = train_step_overlapped(&mut st, &batch, &b.u_slot, &scfg, lr)
                .map_err(&keep_checkpoint)?;
            for s in &done {
                account(s);
            }
            state.position = loader.position();
            // A stop request on the last step of an epoch lets the epoch end (evaluation, metrics
            // line, checkpoint) first, so no epoch is left without its record.
            let at_epoch_end = st.step % steps_per_epoch == 0;
            if !at_epoch_end {
                if let Some(o) = stop_reason(&stop, opts.max_steps, st.step) {
                    if let Some(s) = st.finish_pending().map_err(&keep_checkpoint)? {
                        account(&s);
                    }
                    if let Some(b) = &bar {
                        b.abandon();
                    }
                    state.step = st.step;
                    state.queue_ptr = st.queue.ptr;
                    state.queue_len = st.queue.len;
                    state.wall_seconds = wall_total();
                    save(&st, &state, &last_path)?;
                    outcome = o;
                    log_stop(o, st.step);
                    break 'epochs;
                }
            }
        }
        // The epoch's last step, still pending where reads are queued (`train_step_overlapped`):
        // its values count in this epoch's record, and its meta weights in the checkpoint.
        if let Some(s) = st.finish_pending().map_err(&keep_checkpoint)? {
            account(&s);
        }
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        let n = n_in_epoch.max(1) as f32;
        let train_rec = serde_json::json!({
            "loss": sums.loss / n, "loss_sup": sums.loss_sup / n, "loss_cons": sums.loss_cons / n,
            "loss_pgc": sums.loss_pgc / n, "mean_weight": sums.mean_weight / n,
            "lambda_cons": sums.lambda_cons, "lambda_pgc": sums.lambda_pgc, "lr": sums.lr,
            "steps": n_in_epoch, "seconds": t_epoch.elapsed().as_secs_f64(),
        });
        state.epochs_done = epoch + 1;
        state.step = st.step;
        state.queue_ptr = st.queue.ptr;
        state.queue_len = st.queue.len;
        let mut rec = serde_json::json!({"epoch": epoch + 1, "step": st.step, "train": train_rec});
        // The teacher's pseudo-label class fractions over the epoch's steps (class imbalance of
        // the pseudo-labels), and the running prior of `--dsr-balance` when it is on.
        let n_pseudo: u64 = pseudo_counts.iter().sum();
        if n_pseudo > 0 {
            let frac: Vec<f64> = pseudo_counts
                .iter()
                .map(|&k| k as f64 / n_pseudo as f64)
                .collect();
            log(&format!(
                "epoch {}/{} pseudo-label fractions: {}",
                epoch + 1,
                cfg.epochs,
                ds.classes
                    .iter()
                    .zip(&frac)
                    .map(|(c, f)| format!("{c} {f:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            rec["train"]["pseudo_label_frac"] = serde_json::json!(frac);
        }
        if scfg.balance != DsrBalance::Off && method == Method::Dsrpgc {
            rec["train"]["dsr_prior"] = serde_json::json!(st.dsr_prior.p);
        }
        if !opts.no_eval {
            let vt = evaluate(
                &mut st.teacher,
                &ds,
                &part.val,
                &norm,
                cfg.eval_batch,
                device,
                cfg.srcmt_threshold,
            )?;
            let vs = evaluate(
                &mut st.student,
                &ds,
                &part.val,
                &norm,
                cfg.eval_batch,
                device,
                cfg.srcmt_threshold,
            )?;
            log(&format!(
                "epoch {}/{} loss {:.4} | val teacher {} | student {}",
                epoch + 1,
                cfg.epochs,
                sums.loss / n,
                metrics::summary_line(&vt),
                metrics::summary_line(&vs)
            ));
            state.wall_seconds = wall_total();
            if vt.macro_auc > state.best_val_auc || state.best_epoch == 0 {
                state.best_val_auc = vt.macro_auc;
                state.best_epoch = epoch + 1;
                save(&st, &state, &best_path)?;
            }
            rec["val_teacher"] = serde_json::to_value(&vt).unwrap();
            rec["val_student"] = serde_json::to_value(&vs).unwrap();
        }
        state.wall_seconds = wall_total();
        save(&st, &state, &last_path)?;
        append_line(&metrics_path, &rec.to_string())?;
        history.push(rec);
        if let Err(e) = crate::train::plot::plot_curves(&out.join("curves.png"), &history) {
            log(&format!("warning: curves.png not written: {e}"));
        }
        if st.step < total_steps {
            if let Some(o) = stop_reason(&stop, opts.max_steps, st.step) {
                outcome = o;
                log_stop(o, st.step);
                break;
            }
        }
    }

    let this_invocation = t_run.elapsed().as_secs_f64();
    let mut summary = serde_json::json!({
        "outcome": outcome,
        "method": cfg.method,
        "data": cfg.data,
        "epochs": cfg.epochs,
        "epochs_done": state.epochs_done,
        "steps": st.step,
        "steps_per_epoch": steps_per_epoch,
        "seed": cfg.seed,
        "device": bk.name(),
        "wall_seconds": wall_before + this_invocation,
        "wall_seconds_this_invocation": this_invocation,
        "resumed": resumed.is_some(),
        "labeled": part.labeled.len(),
        "unlabeled": part.unlabeled.len(),
    });
    if outcome == Outcome::Finished && best_path.exists() {
        let ck = checkpoint::load(&best_path)?;
        let mut model = MedFuseNet::new(ck.model, 0);
        model
            .store
            .load_named(&best_path.display().to_string(), &ck.tensors, "teacher.")?;
        model.store.to_device(device)?;
        let test = evaluate(
            &mut model,
            &ds,
            &part.test,
            &norm,
            cfg.eval_batch,
            device,
            cfg.srcmt_threshold,
        )?;
        log(&format!(
            "best epoch {} (val macro-AUC {:.4}); test: {}",
            ck.state.best_epoch,
            ck.state.best_val_auc,
            metrics::summary_line(&test)
        ));
        log(&metrics::confusion_ascii(&test, &ds.classes));
        if let Err(e) =
            crate::train::plot::plot_confusion(&out.join("confusion.png"), &test, &ds.classes)
        {
            log(&format!("warning: confusion.png not written: {e}"));
        }
        crate::golden::atomic_write(
            &out.join("confusion.txt"),
            metrics::confusion_ascii(&test, &ds.classes).as_bytes(),
        )?;
        summary["best_epoch"] = ck.state.best_epoch.into();
        summary["best_val_macro_auc"] = ck.state.best_val_auc.into();
        summary["test"] = serde_json::to_value(&test).unwrap();
    }
    crate::golden::atomic_write(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&summary).unwrap().as_bytes(),
    )?;
    Ok((outcome, summary))
}
