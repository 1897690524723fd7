//! `medssl-bench`: throughput of the training step, calibrated against the machine's own GEMM,
//! and per-op timings at the model's real shapes (`ops`).

#[path = "medssl-bench/ops.rs"]
mod ops;

use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use medssl::backend::cpu::conv::{set_algo, Algo};
use medssl::backend::cpu::gemm::sgemm;
use medssl::optim::OptimKind;
use medssl::ssl::{Batch, DsrMode};
use medssl::tensor::Device;
use medssl::train::step::{train_step, train_step_overlapped, Method, StepConfig, TrainState};
use rand::Rng;

#[derive(Parser)]
#[command(name = "medssl-bench", version, about = "medssl throughput benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Time full training steps (forward, backward, optimiser, EMA, queue) on random data.
    Step(StepArgs),
    /// Time every primitive op, forward and backward, at the shapes the model uses.
    Ops(ops::OpsArgs),
    /// Loader throughput with full weak + strong augmentation.
    Data(medssl::data::cli::BenchArgs),
    /// Time a square SGEMM with the project's CPU GEMM (the machine's compute limit).
    Gemm {
        #[arg(long, default_value_t = 2048)]
        n: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Clone)]
struct StepArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// supervised, mean-teacher or dsrpgc.
    #[arg(long, default_value = "dsrpgc")]
    method: String,
    /// Model base width (64 = ResNet-18).
    #[arg(long, default_value_t = 16)]
    width: usize,
    #[arg(long, default_value_t = 28)]
    image_size: usize,
    #[arg(long, default_value_t = 3)]
    channels: usize,
    #[arg(long, default_value_t = 7)]
    classes: usize,
    #[arg(long, default_value_t = 128)]
    fusion_dim: usize,
    #[arg(long, default_value_t = 128)]
    emb: usize,
    /// Labelled images per step.
    #[arg(long, default_value_t = 12)]
    batch_l: usize,
    /// Unlabelled images per step.
    #[arg(long, default_value_t = 36)]
    batch_u: usize,
    #[arg(long, default_value_t = 4096)]
    queue: usize,
    /// Start with a full key queue (random unit keys, labels and weights), as in training after
    /// the first `queue / batch-u` steps; by default the queue starts empty and fills during the
    /// run (the PyTorch peer has the same flag).
    #[arg(long)]
    fill_queue: bool,
    /// Replay the step from a CUDA graph (`medssl train --cuda-graph`). The warm-up then goes on
    /// until the graph has been captured and replayed once, and the DSRPGC queue starts full (as
    /// with --fill-queue), since the step's shapes settle only once the queue is full.
    #[arg(long)]
    cuda_graph: bool,
    /// After the timed steps, time `--repeats` more issued back to back as `medssl train`
    /// issues them: no wait between steps (with `MEDSSL_CUDA_STEP_READ=later` a step returns
    /// once issued, so its host work overlaps the previous step's device work), one wait after
    /// the last (`back_to_back_ms_per_step`: the total over the steps; the timed steps above
    /// wait for the device after each step, as the PyTorch peer's do)
    #[arg(long)]
    back_to_back: bool,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    /// Size of the calibration SGEMM, run in the same invocation: the project's SGEMM on CPU,
    /// the backend's matmul (cuBLAS) on CUDA; 0 skips it.
    #[arg(long, default_value_t = 2048)]
    calib: usize,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// CUDA only: after the timed steps, run as many again while recording every kernel, copy
    /// and fill the device runs (CUPTI; needs libcupti.so on LD_LIBRARY_PATH) and report the
    /// device's busy time per step and the items that take it (`profile` in the JSON).
    #[arg(long)]
    profile: bool,
    /// Items listed by `--profile`, most device time first (the rest are summed).
    #[arg(long, default_value_t = 40)]
    profile_top: usize,
    /// CPU only: time the step with the convolutions under each of these comma-separated
    /// `MEDSSL_CPU_CONV` algorithms (e.g. `im2col,auto`), alternating within this process:
    /// `--rounds` rounds, each running every algorithm in turn (one untimed step after each
    /// switch, then `--repeats` timed ones). One result per algorithm (`cpu_conv`), over all its
    /// timed steps.
    #[arg(long)]
    cpu_conv: Option<String>,
    /// Rounds of the alternation with `--cpu-conv`.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
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

/// Median GFLOP/s of an `n³` SGEMM on all rayon threads.
fn gemm_gflops(n: usize, repeats: usize) -> f64 {
    let a: Vec<f32> = (0..n * n).map(|i| (i % 17) as f32 * 0.01).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 13) as f32 * 0.01).collect();
    let mut c = vec![0.0f32; n * n];
    sgemm(n, n, n, &a, false, &b, false, &mut c, false, true);
    let mut t: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let s = Instant::now();
            sgemm(n, n, n, &a, false, &b, false, &mut c, false, true);
            s.elapsed().as_secs_f64()
        })
        .collect();
    2.0 * (n as f64).powi(3) / median(&mut t) / 1e9
}

/// Peak resident set of this process (`VmHWM` of `/proc/self/status`) in bytes.
fn vm_hwm_bytes() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Starts a peak-memory window; returns what `peak_mem_bytes` will measure: `cuda_pool_in_use`
/// (the caching allocator's peak of bytes handed out), `rss_hwm` (peak resident set since the
/// reset through `/proc/self/clear_refs`) or `rss_hwm_process` (the kernel refused the reset, so
/// the peak since the process started).
fn reset_peak_mem(bk: &dyn medssl::backend::Backend) -> &'static str {
    if bk.device() != Device::Cpu {
        bk.reset_memory_peak();
        return "cuda_pool_in_use";
    }
    // "5" resets VmHWM to the current resident set (Linux ≥ 4.0).
    if std::fs::write("/proc/self/clear_refs", "5").is_ok() {
        "rss_hwm"
    } else {
        "rss_hwm_process"
    }
}

/// The CUDA backend of `dev` (`None` on the CPU or in a build without CUDA).
#[cfg(feature = "cuda")]
fn cuda_backend(dev: Device) -> Option<&'static medssl::backend::cuda::CudaBackend> {
    match dev {
        Device::Cuda(i) => medssl::backend::cuda::CudaBackend::get_concrete(i).ok(),
        Device::Cpu => None,
    }
}

/// The names, in result rows, of the CUDA backend's numerics and kernel-choice switches
/// (`backend::cuda::switches`; `conv` is `MEDSSL_CUDA_CONV`, `conv1x1` `MEDSSL_CUDA_CONV1X1`,
/// `cudnn_fwd_algo` `MEDSSL_CUDNN_FWD_ALGO` (null when unset), and so on).
const SWITCH_KEYS: [&str; 21] = [
    "tf32",
    "cudnn_algo",
    "cudnn_deterministic_first",
    "cudnn_fwd_algo",
    "cudnn_bwd_data_algo",
    "cudnn_bwd_filter_algo",
    "conv",
    "conv1x1",
    "fusion",
    "step_read",
    "bn_fused_max_m",
    "bn_split",
    "bn_stats",
    "bn_inflight",
    "bn_l2",
    "bn_apply",
    "bn_fwd",
    "bn_bwd",
    "bn_vec",
    "bn_pipe",
    "bn_keep",
];

/// The CUDA backend's switches as it reads them, and as they are by default.
struct CudaChoices {
    /// [`SWITCH_KEYS`] in force, valued as the environment spells them (`bn_split`: "wave",
    /// "auto" or a forced count).
    now: serde_json::Map<String, serde_json::Value>,
    /// The same with none of their variables set: this build's defaults, so that a table can
    /// tell a variant row from a default one across versions.
    defaults: serde_json::Map<String, serde_json::Value>,
    /// Streaming multiprocessors of the device (the automatic split follows them).
    sms: usize,
}

/// `MEDSSL_CUDA_BN_SPLIT`'s value for a setting: `auto` (0), `wave`, or the forced count.
#[cfg(feature = "cuda")]
fn split_json(split: usize) -> serde_json::Value {
    match split {
        0 => serde_json::json!("auto"),
        medssl::backend::cuda::BN_SPLIT_WAVE => serde_json::json!("wave"),
        n => serde_json::json!(n),
    }
}

/// [`SWITCH_KEYS`] of `s`, with the batch-norm and determinism settings given apart (a thread
/// may have set its own; see `backend::cuda::set_bn_split` and friends).
#[cfg(feature = "cuda")]
fn switch_values(
    s: &medssl::backend::cuda::switches::Switches,
    deterministic_first: bool,
    fused_max_m: usize,
    (split, welford, chunks, resident, resident_bwd): (usize, bool, bool, bool, bool),
    (inflight, l2_hint, fusion_projected, read_later, vec, pipe, keep): (
        usize,
        bool,
        bool,
        bool,
        bool,
        bool,
        usize,
    ),
) -> serde_json::Map<String, serde_json::Value> {
    let pick = |on: bool, yes: &'static str, no: &'static str| if on { yes } else { no };
    let v = serde_json::json!({
        "tf32": s.tf32,
        "cudnn_algo": s.cudnn_algo.name(),
        "cudnn_deterministic_first": deterministic_first,
        "cudnn_fwd_algo": s.cudnn_fwd_algo,
        "cudnn_bwd_data_algo": s.cudnn_bwd_data_algo,
        "cudnn_bwd_filter_algo": s.cudnn_bwd_filter_algo,
        "conv": pick(s.conv_im2col, "im2col", "cudnn"),
        "conv1x1": pick(s.conv1x1_gemm, "cublas", "cudnn"),
        "fusion": pick(fusion_projected, "projected", "two-ops"),
        "step_read": pick(read_later, "later", "wait"),
        "bn_fused_max_m": fused_max_m,
        "bn_split": split_json(split),
        "bn_stats": pick(welford, "welford", "two-pass"),
        "bn_inflight": match inflight {
            0 => serde_json::json!("auto"),
            n => serde_json::json!(n),
        },
        "bn_l2": pick(l2_hint, "hint", "plain"),
        "bn_apply": pick(chunks, "chunks", "flat"),
        "bn_fwd": pick(resident, "resident", "split"),
        "bn_bwd": pick(resident_bwd, "resident", "split"),
        "bn_vec": pick(vec, "on", "off"),
        "bn_pipe": pick(pipe, "on", "off"),
        "bn_keep": match keep {
            usize::MAX => serde_json::json!("auto"),
            n => serde_json::json!(n),
        },
    });
    match v {
        serde_json::Value::Object(m) => m,
        _ => unreachable!("a JSON object literal"),
    }
}

/// [`CudaChoices`] of the CUDA device `dev`; None on CPU.
fn cuda_choices(dev: Device) -> Option<CudaChoices> {
    #[cfg(feature = "cuda")]
    if dev != Device::Cpu {
        use medssl::backend::cuda;
        let s = cuda::switches::get().ok()?;
        let d = cuda::switches::parse(|_| None).expect("the defaults parse");
        return Some(CudaChoices {
            now: switch_values(
                s,
                cuda::cudnn_deterministic_first(),
                cuda::bn_fused_max_m(),
                (
                    cuda::bn_split(),
                    cuda::bn_welford(),
                    cuda::bn_apply_chunks(),
                    cuda::bn_resident(),
                    cuda::bn_resident_bwd(),
                ),
                (
                    cuda::bn_inflight(),
                    cuda::bn_l2_hint(),
                    cuda::fusion_projected(),
                    cuda::step_read_later(),
                    cuda::bn_vec(),
                    cuda::bn_pipe(),
                    cuda::bn_keep(),
                ),
            ),
            defaults: switch_values(
                &d,
                d.cudnn_deterministic_first,
                d.bn_fused_max_m,
                (
                    d.bn_split,
                    d.bn_welford,
                    d.bn_apply_chunks,
                    d.bn_resident,
                    d.bn_resident_bwd,
                ),
                (
                    d.bn_inflight,
                    d.bn_l2_hint,
                    d.fusion_projected,
                    d.step_read_later,
                    d.bn_vec,
                    d.bn_pipe,
                    d.bn_keep,
                ),
            ),
            sms: match dev {
                Device::Cuda(i) => cuda::CudaBackend::get_concrete(i).ok()?.sm_count(),
                Device::Cpu => 0,
            },
        });
    }
    let _ = dev;
    None
}

/// The JSON fields of [`CudaChoices`] for a result row (each null on CPU), so that rows of runs
/// with different switches can be told apart: [`SWITCH_KEYS`], `defaults` (the same keys at
/// this build's defaults) and `sms`; and on CPU `cpu_conv`, the convolution algorithm chosen by
/// `MEDSSL_CPU_CONV` (null on CUDA).
fn choices_fields(dev: Device) -> serde_json::Map<String, serde_json::Value> {
    let c = cuda_choices(dev);
    let mut m = serde_json::Map::new();
    for k in SWITCH_KEYS {
        let v = c.as_ref().and_then(|c| c.now.get(k).cloned());
        m.insert(k.into(), v.unwrap_or(serde_json::Value::Null));
    }
    m.insert(
        "defaults".into(),
        c.as_ref()
            .map_or(serde_json::Value::Null, |c| c.defaults.clone().into()),
    );
    m.insert("sms".into(), serde_json::json!(c.as_ref().map(|c| c.sms)));
    let cpu_conv = (dev == Device::Cpu).then(|| medssl::backend::cpu::conv::algo().name());
    m.insert("cpu_conv".into(), serde_json::json!(cpu_conv));
    m
}

/// Starts counting the device work items (kernel launches, library calls, copies) on CUDA.
fn reset_launch_counts(dev: Device) {
    #[cfg(feature = "cuda")]
    if let Some(b) = cuda_backend(dev) {
        b.reset_launch_counts();
    }
    let _ = dev;
}

/// Device work items per step since [`reset_launch_counts`], by kernel or call (`None` on CPU).
fn launch_counts_per_step(
    dev: Device,
    steps: usize,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    #[cfg(feature = "cuda")]
    if let Some(b) = cuda_backend(dev) {
        return Some(
            b.launch_counts()
                .into_iter()
                .map(|(k, n)| (k.to_string(), serde_json::json!(n as f64 / steps as f64)))
                .collect(),
        );
    }
    let _ = (dev, steps);
    None
}

/// Runs `f` (one training step) `steps` times under the device profiler and summarises what
/// the device ran: busy time per step against the wall time, and the `top` items by device time.
#[cfg(feature = "cuda")]
fn profile_steps(
    dev: Device,
    bk: &dyn medssl::backend::Backend,
    steps: usize,
    top: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<serde_json::Value> {
    use medssl::backend::cuda::profile;
    cuda_backend(dev).context("--profile needs a CUDA device (--device cuda)")?;
    bk.synchronize()?;
    profile::start().context("--profile")?;
    let t = Instant::now();
    let ran = (0..steps).try_for_each(|_| f());
    let synced = bk.synchronize();
    let wall_s = t.elapsed().as_secs_f64();
    let p = profile::stop();
    ran?;
    synced?;
    let p = p.context("--profile")?;
    let n = steps as f64;
    let us = |ns: u64| ns as f64 / 1e3 / n;
    let busy = p.busy_ns.max(1) as f64;
    let listed: Vec<serde_json::Value> = p
        .entries
        .iter()
        .take(top)
        .map(|e| {
            serde_json::json!({
                "name": e.name,
                "calls_per_step": e.calls as f64 / n,
                "us_per_step": us(e.ns),
                "pct_of_busy": 100.0 * e.ns as f64 / busy,
            })
        })
        .collect();
    let rest = &p.entries[p.entries.len().min(top)..];
    Ok(serde_json::json!({
        "source": p.source,
        "steps": steps,
        "wall_ms_per_step": wall_s * 1e3 / n,
        "busy_ms_per_step": us(p.busy_ns) / 1e3,
        "busy_pct_of_wall": 100.0 * p.busy_ns as f64 / 1e9 / wall_s,
        "span_ms_per_step": us(p.span_ns) / 1e3,
        "items_per_step": p.entries.iter().map(|e| e.calls).sum::<u64>() as f64 / n,
        "distinct_items": p.entries.len(),
        "dropped_records": p.dropped,
        "top": listed,
        "rest_items": rest.len(),
        "rest_us_per_step": us(rest.iter().map(|e| e.ns).sum()),
    }))
}

#[cfg(not(feature = "cuda"))]
fn profile_steps(
    _dev: Device,
    _bk: &dyn medssl::backend::Backend,
    _steps: usize,
    _top: usize,
    _f: impl FnMut() -> Result<()>,
) -> Result<serde_json::Value> {
    anyhow::bail!("--profile needs a CUDA device, and this build has no CUDA (--features cuda)")
}

/// Prints a `profile_steps` summary as a table; `unit` names what `f` ran ("step", or "call" for
/// `ops --profile`).
fn print_profile(p: &serde_json::Value, unit: &str) {
    let f = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "  profile ({}, {} {unit}s): device busy {:.2} ms of {:.2} ms wall per {unit} ({:.0}%), {:.0} items per {unit}",
        p["source"].as_str().unwrap_or("?"),
        p["steps"],
        f("busy_ms_per_step"),
        f("wall_ms_per_step"),
        f("busy_pct_of_wall"),
        f("items_per_step"),
    );
    println!(
        "  {:>9} {:>7} {:>6}  item",
        format!("us/{unit}"),
        "calls",
        "%busy"
    );
    for e in p["top"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or("?");
        let short: String = name.chars().take(100).collect();
        println!(
            "  {:>9.1} {:>7.1} {:>6.1}  {}{}",
            e["us_per_step"].as_f64().unwrap_or(f64::NAN),
            e["calls_per_step"].as_f64().unwrap_or(f64::NAN),
            e["pct_of_busy"].as_f64().unwrap_or(f64::NAN),
            short,
            if short.len() < name.len() { "..." } else { "" }
        );
    }
    if p["rest_items"].as_u64().unwrap_or(0) > 0 {
        println!(
            "  {:>9.1} {:>7} {:>6}  ({} more items)",
            f("rest_us_per_step"),
            "",
            "",
            p["rest_items"]
        );
    }
}

/// Peak bytes since [`reset_peak_mem`] (see there), `None` where nothing is tracked.
fn peak_mem_bytes(bk: &dyn medssl::backend::Backend) -> Option<usize> {
    if bk.device() != Device::Cpu {
        bk.memory_peak()
    } else {
        vm_hwm_bytes()
    }
}

fn step(a: &StepArgs) -> Result<()> {
    let dev = Device::parse(&a.device)?;
    let bk = medssl::backend::get(dev).with_context(|| format!("--device {}", a.device))?;
    ops::warn_if_emulated(bk);
    let method: Method = a.method.parse()?;
    let cfg = ops::bench_model(
        a.channels,
        a.width,
        a.fusion_dim,
        a.emb,
        a.classes,
        a.image_size,
    );
    let n_unl = 1000.max(2 * a.batch_u);
    let mut st = TrainState::new(cfg, 0, dev, OptimKind::adam(), 5e-4, a.queue, n_unl)?;
    let scfg = StepConfig {
        method,
        dsr: DsrMode::Both,
        ramp_steps: 100,
        cuda_graph: a.cuda_graph,
        ..Default::default()
    };
    if a.cuda_graph && dev == Device::Cpu {
        anyhow::bail!("--cuda-graph needs a CUDA device (--device cuda or cuda:N)");
    }
    let fill_queue = a.fill_queue || a.cuda_graph;
    if fill_queue && a.queue > 0 {
        let mut rng = medssl::rng::stream(0, "bench-queue");
        let mut keys = Vec::with_capacity(a.queue * a.emb);
        for _ in 0..a.queue {
            let row: Vec<f32> = (0..a.emb).map(|_| rng.random_range(-1.0..1.0)).collect();
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            keys.extend(row.iter().map(|v| v / norm));
        }
        let labels: Vec<usize> = (0..a.queue)
            .map(|_| rng.random_range(0..a.classes))
            .collect();
        st.queue.set_keys_host(&keys)?;
        st.queue.set_labels_host(&labels)?;
        st.queue.set_weights_host(&vec![1.0; a.queue])?;
        st.queue.len = a.queue;
    }
    let mut rng = medssl::rng::stream(0, "bench");
    let px = a.channels * a.image_size * a.image_size;
    let mut rand_images = |n: usize| -> Result<medssl::Tensor> {
        let v: Vec<f32> = (0..n * px).map(|_| rng.random_range(-1.0..1.0)).collect();
        Ok(bk.from_host(&v, &[n, a.channels, a.image_size, a.image_size])?)
    };
    let batch = Batch {
        x_lab: rand_images(a.batch_l)?,
        y_lab: (0..a.batch_l).map(|i| i % a.classes).collect(),
        u_weak: rand_images(a.batch_u)?,
        u_strong: rand_images(a.batch_u)?,
    };
    // Consecutive steps take disjoint unlabelled samples (two windows in turn), as in training,
    // where a step that shares a sample with the step before it must wait for that step's
    // meta-weight update (see `train_step_overlapped`).
    let windows: [Vec<usize>; 2] = [
        (0..a.batch_u).collect(),
        (a.batch_u..2 * a.batch_u).collect(),
    ];
    let turn = std::cell::Cell::new(0usize);
    let next = || {
        turn.set(turn.get() + 1);
        &windows[turn.get() % 2]
    };
    for _ in 0..a.warmup {
        train_step(&mut st, &batch, next(), &scfg, 1e-3)?;
    }
    // With a graph, the warm-up goes on until the graph has been captured and replayed once
    // (the arena fills in two or three steps, the next one captures), so that the timed steps
    // are replays; at most 12 more steps.
    if a.cuda_graph {
        for _ in 0..12 {
            if bk.step_graph_stats().is_some_and(|s| s.replays >= 2) {
                break;
            }
            train_step(&mut st, &batch, next(), &scfg, 1e-3)?;
        }
    }
    let graph_before = bk.step_graph_stats().filter(|_| a.cuda_graph);
    bk.synchronize()?;
    let peak_kind = reset_peak_mem(bk);
    reset_launch_counts(dev);
    let mut timed_steps = |n: usize, times: &mut Vec<f64>| -> Result<()> {
        for _ in 0..n {
            let s = Instant::now();
            train_step(&mut st, &batch, next(), &scfg, 1e-3)?;
            bk.synchronize()?;
            times.push(s.elapsed().as_secs_f64());
        }
        Ok(())
    };
    // The timed steps: one set, or with --cpu-conv one per algorithm, in alternating rounds.
    let algos = ops::cpu_conv_list(a.cpu_conv.as_deref(), a.rounds, dev)?;
    let mut runs: Vec<(Option<Algo>, Vec<f64>)> = match algos.is_empty() {
        true => vec![(None, Vec::new())],
        false => algos.iter().map(|al| (Some(*al), Vec::new())).collect(),
    };
    for _ in 0..if algos.is_empty() { 1 } else { a.rounds } {
        for (al, times) in &mut runs {
            set_algo(*al);
            let r = match al {
                // The first step on a switched algorithm sizes its scratch buffers: untimed.
                Some(_) => timed_steps(1, &mut Vec::new())
                    .and_then(|()| timed_steps(a.repeats.max(1), times)),
                None => timed_steps(a.repeats.max(1), times),
            };
            set_algo(None);
            r?;
        }
    }
    let peak_mem_mb = peak_mem_bytes(bk).map(|b| b as f64 / (1u64 << 20) as f64);
    // How many timed steps ran from the graph (all of them, unless a step diverged).
    let graph = graph_before.map(|b| {
        let n = bk.step_graph_stats().unwrap_or_default();
        let timed = n.since(&b);
        serde_json::json!({
            "replayed_steps": timed.replays,
            "timed_steps": a.repeats.max(1),
            "divergences": n.divergences,
            "captures": n.captures,
            "nodes": n.nodes,
            "node_updates_per_step": timed.node_updates as f64 / a.repeats.max(1) as f64,
            // The host's part of a replayed step, before the graph's launch (the device idles
            // meanwhile): from the step's start to the launch, per timed step from the graph.
            "shadow_host_ms_per_step": (timed.shadow_steps > 0)
                .then(|| timed.shadow_host_ns as f64 / 1e6 / timed.shadow_steps as f64),
        })
    });
    if let Some(g) = &graph {
        if g["replayed_steps"].as_u64() != Some(a.repeats.max(1) as u64) && !a.json {
            eprintln!(
                "warning: --cuda-graph: only {} of the timed steps ran from the graph ({g})",
                g["replayed_steps"]
            );
        }
    }
    let launches = launch_counts_per_step(dev, a.repeats.max(1));
    let back_to_back_ms = if a.back_to_back {
        let n = a.repeats.max(1);
        bk.synchronize()?;
        let t = Instant::now();
        for _ in 0..n {
            train_step_overlapped(&mut st, &batch, next(), &scfg, 1e-3)?;
        }
        st.finish_pending()?;
        bk.synchronize()?;
        Some(t.elapsed().as_secs_f64() * 1e3 / n as f64)
    } else {
        None
    };
    let profile = if a.profile {
        Some(profile_steps(
            dev,
            bk,
            a.repeats.max(1),
            a.profile_top,
            || {
                train_step(&mut st, &batch, next(), &scfg, 1e-3)?;
                Ok(())
            },
        )?)
    } else {
        None
    };
    let launches_total: Option<f64> = launches
        .as_ref()
        .map(|m| m.values().filter_map(|v| v.as_f64()).sum());
    // One result per set of timed steps (per algorithm with --cpu-conv).
    for (algo, mut times) in runs {
        let (min, max) = (
            times.iter().cloned().fold(f64::INFINITY, f64::min),
            times.iter().cloned().fold(0.0, f64::max),
        );
        let med = median(&mut times);
        let fwd = st.student.forward_flops(a.image_size, a.image_size);
        // Forward + backward (≈ 2× forward) of every student image, forward of every teacher image.
        let (student_imgs, teacher_imgs) = match method {
            Method::Supervised => (a.batch_l, 0),
            _ => (a.batch_l + a.batch_u, a.batch_u),
        };
        let step_flops = fwd * (3 * student_imgs + teacher_imgs) as f64;
        let images = match method {
            Method::Supervised => a.batch_l,
            _ => a.batch_l + a.batch_u,
        };
        let gflops = step_flops / med / 1e9;
        // The step's compute limit measured in the same run: the project's SGEMM on CPU, the
        // backend's matmul (cuBLAS) on CUDA.
        let calib = match (a.calib, dev) {
            (0, _) => None,
            (n, Device::Cpu) => Some(gemm_gflops(n, 3)),
            (n, _) => Some(ops::device_gemm_gflops(bk, n)?),
        };
        let threads = rayon::current_num_threads();
        let mut rec = serde_json::json!({
            "bench": "step",
            "engine": "medssl",
            "device": bk.name(),
            "method": a.method,
            "width": a.width,
            "image_size": a.image_size,
            "channels": a.channels,
            "classes": a.classes,
            "batch_l": a.batch_l,
            "batch_u": a.batch_u,
            "queue": a.queue,
            "queue_filled": fill_queue,
            "cuda_graph": graph,
            "threads": threads,
            "repeats": a.repeats,
            "median_ms": med * 1e3,
            "min_ms": min * 1e3,
            "max_ms": max * 1e3,
            "back_to_back_ms_per_step": back_to_back_ms,
            "images_per_s": images as f64 / med,
            "gflop_per_step": step_flops / 1e9,
            "gflops": gflops,
            "calib_gemm_n": a.calib,
            "calib_gemm_gflops": calib,
            "pct_of_gemm": calib.map(|c| 100.0 * gflops / c),
            "peak_mem_mb": peak_mem_mb,
            "peak_mem_kind": peak_mem_mb.map(|_| peak_kind),
            // Device work items per step (kernel launches, cuBLAS/cuDNN calls, copies); null on CPU.
            "launches_per_step": launches_total,
            "launches_by_kind": launches,
            // `--profile`: what the device ran in as many extra steps (see `profile_steps`).
            "profile": profile,
        });
        // CUDA numerics and convolution-algorithm choice (the environment switches of the CUDA
        // backend); null on CPU.
        let m = rec.as_object_mut().expect("object");
        m.extend(choices_fields(dev));
        // --cpu-conv: this result's algorithm, and the rounds its timed steps came from.
        if let Some(al) = algo {
            m.insert("cpu_conv".into(), al.name().into());
            m.insert("rounds".into(), a.rounds.into());
        }
        if a.json {
            println!("{rec}");
        } else {
            let conv = algo.map_or(String::new(), |al| {
                format!(", convolutions {} ({} rounds)", al.name(), a.rounds)
            });
            println!(
                "step {} w{} {}px {}+{}{conv} on {} ({} threads): median {:.1} ms (min {:.1}, max {:.1}), {:.1} images/s, {:.2} GFLOP/step, {:.1} GFLOP/s{}{}",
                a.method,
                a.width,
                a.image_size,
                a.batch_l,
                a.batch_u,
                bk.name(),
                threads,
                med * 1e3,
                min * 1e3,
                max * 1e3,
                images as f64 / med,
                step_flops / 1e9,
                gflops,
                calib
                    .map(|c| format!(" = {:.0}% of SGEMM {}³ ({c:.1} GFLOP/s)", 100.0 * gflops / c, a.calib))
                    .unwrap_or_default(),
                peak_mem_mb
                    .map(|m| format!(", peak memory {m:.1} MiB ({peak_kind})"))
                    .unwrap_or_default()
            );
            if let Some(ms) = back_to_back_ms {
                println!(
                    "  back to back: {ms:.2} ms per step ({} steps issued without a wait between \
                     them, one wait after the last)",
                    a.repeats.max(1)
                );
            }
            if let Some(g) = &graph {
                println!(
                    "  CUDA graph: {} of {} timed steps replayed ({} nodes, {} node updates per \
                     step), host time before each launch {}",
                    g["replayed_steps"],
                    g["timed_steps"],
                    g["nodes"],
                    g["node_updates_per_step"],
                    g["shadow_host_ms_per_step"]
                        .as_f64()
                        .map_or("-".into(), |ms| format!("{ms:.3} ms"))
                );
            }
            if let (Some(total), Some(by)) = (launches_total, &launches) {
                let mut v: Vec<(&String, f64)> = by
                    .iter()
                    .map(|(k, n)| (k, n.as_f64().unwrap_or(0.0)))
                    .collect();
                v.sort_by(|x, y| y.1.total_cmp(&x.1));
                let top: Vec<String> = v.iter().take(8).map(|(k, n)| format!("{k} {n}")).collect();
                println!(
                    "  {total} device work items per step; most: {}",
                    top.join(", ")
                );
            }
            if let Some(p) = &profile {
                print_profile(p, "step");
            }
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    medssl::backend::cpu::check_env()?;
    match cli.cmd {
        Cmd::Step(a) => step(&a),
        Cmd::Ops(a) => ops::run(&a),
        Cmd::Data(a) => medssl::data::cli::run_bench(&a),
        Cmd::Gemm { n, repeats, json } => {
            let g = gemm_gflops(n, repeats);
            if json {
                println!(
                    "{}",
                    serde_json::json!({"bench": "gemm", "n": n, "gflops": g, "threads": rayon::current_num_threads()})
                );
            } else {
                println!(
                    "sgemm {n}³: {g:.1} GFLOP/s on {} threads",
                    rayon::current_num_threads()
                );
            }
            Ok(())
        }
    }
}
