//! `medssl-bench ops`: forward and backward timings of every primitive op at the shapes the
//! MedFuseNet model of a given configuration really uses, through the [`Backend`] trait (so the
//! CPU and CUDA backends are measured the same way), each rated against a peak measured in the
//! same run: a GEMM for compute-bound ops, a streaming copy for memory-bound ones.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use medssl::backend::cpu::conv::{parse_algo, set_algo, Algo};
use medssl::backend::{label_tensor, AdamParams, Backend, ConvParams, OptSlot, PoolParams};
use medssl::nn::{Kind as ParamKind, MedFuseNet, ModelConfig};
use medssl::tensor::{Device, Tensor};
use rand::Rng;
use rayon::prelude::*;

use super::{gemm_gflops, median};

#[derive(clap::Args, Clone, Debug)]
pub struct OpsArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Model base width (64 = ResNet-18).
    #[arg(long, default_value_t = 16)]
    pub width: usize,
    #[arg(long, default_value_t = 28)]
    pub image_size: usize,
    #[arg(long, default_value_t = 3)]
    pub channels: usize,
    #[arg(long, default_value_t = 7)]
    pub classes: usize,
    #[arg(long, default_value_t = 128)]
    pub fusion_dim: usize,
    #[arg(long, default_value_t = 128)]
    pub emb: usize,
    /// Images per op call (default: the unlabelled batch of a step).
    #[arg(long, default_value_t = 36)]
    pub batch: usize,
    /// PGC queue length (the keys are the batch plus this many queued ones).
    #[arg(long, default_value_t = 4096)]
    pub queue: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 10)]
    pub repeats: usize,
    /// Calls per timed sample: each sample times this many back-to-back calls and one
    /// synchronisation, divided by their number. 0 (the default): enough calls for a sample of
    /// about 1 ms, at most 200, from the time of one call; 1: each call with its own
    /// synchronisation, whose round trip to the device (about 10 µs) then counts against the op.
    #[arg(long, default_value_t = 0)]
    pub calls: usize,
    /// Only ops whose name contains one of these comma-separated substrings. `read_reference`
    /// (only when named here) adds, for every distinct batch-norm activation, a global average
    /// pool over it: a read-only pass over the same bytes (forward) and a write-only one
    /// (backward), the references for the batch norm's read-only statistics pass.
    #[arg(long)]
    pub op: Option<String>,
    /// Size of the square SGEMM that sets the compute peak (default 2048 on cpu, 4096 on cuda;
    /// 0 skips it).
    #[arg(long)]
    pub peak_gemm: Option<usize>,
    /// MiB streamed by the memory-bandwidth peak (0 skips it).
    #[arg(long, default_value_t = 256)]
    pub peak_copy_mib: usize,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// CUDA only: after each op's timed samples, one sample's worth of calls again under the
    /// device profiler (CUPTI, as `step --profile`), reporting the device time of each kernel or
    /// library call per op call: which of an op's launches takes its time (`profile` in the
    /// JSON, its "per step" fields per op call).
    #[arg(long)]
    pub profile: bool,
    /// Items listed per op by `--profile`, most device time first (the rest are summed).
    #[arg(long, default_value_t = 8)]
    pub profile_top: usize,
    /// CPU only: time each convolution under each of these comma-separated `MEDSSL_CPU_CONV`
    /// algorithms (`auto`, `im2col`, `winograd`, `direct`; e.g. `im2col,auto`), alternating
    /// within this process: per convolution, `--rounds` rounds each timing every algorithm in
    /// turn, so that drifting machine load hits them alike. One row per algorithm (`cpu_conv`,
    /// and the path it took as `cpu_path`): the median of the rounds' medians and the fastest
    /// sample of all.
    #[arg(long)]
    pub cpu_conv: Option<String>,
    /// Rounds of the alternation with `--cpu-conv`.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// One op at one shape, as the model calls it.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Conv {
        x: [usize; 4],
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        bias: bool,
        /// The input needs a gradient (false only for the stem, whose input is the image).
        need_x: bool,
    },
    BatchNorm {
        x: [usize; 4],
    },
    Relu {
        x: Vec<usize>,
    },
    MaxPool {
        x: [usize; 4],
        p: PoolParams,
    },
    GlobalAvgPool {
        x: [usize; 4],
    },
    Linear {
        n: usize,
        din: usize,
        dout: usize,
    },
    CrossEntropy {
        n: usize,
        c: usize,
    },
    Softmax {
        n: usize,
        c: usize,
    },
    L2Normalize {
        n: usize,
        e: usize,
    },
    /// The fusion of the 1×1 projection (with bias) of a `c`-channel low-level map into `d`
    /// channels with the high-level map (`projected_fusion`).
    Fusion {
        n: usize,
        c: usize,
        d: usize,
        low: [usize; 2],
        high: [usize; 2],
    },
    WeightedConsistency {
        n: usize,
        c: usize,
    },
    EntropyWeight {
        n: usize,
        c: usize,
    },
    Pgc {
        n: usize,
        e: usize,
        keys: usize,
    },
    /// One Adam step over every parameter tensor in one `adam_step_multi` call (as the trainer).
    Adam {
        shapes: Vec<Vec<usize>>,
    },
    /// One teacher EMA update over every parameter tensor.
    Ema {
        shapes: Vec<Vec<usize>>,
    },
    /// A read-bandwidth probe over an activation's bytes (CUDA only: `CudaBackend::read_probe`),
    /// one float (`wide` false) or one float4 per load.
    ReadProbe {
        x: [usize; 4],
        wide: bool,
    },
}

/// A distinct (op, shape) of the model with the layers that use it.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: &'static str,
    pub op: Op,
    /// Layers (or losses) that call the op at this shape; `layers.len()` is the number of calls
    /// per forward pass of one batch.
    pub layers: Vec<String>,
}

fn list(v: &[usize]) -> String {
    let s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    format!("[{}]", s.join(","))
}

fn conv_out(h: usize, k: usize, s: usize, p: usize) -> usize {
    (h + 2 * p - k) / s + 1
}

impl Op {
    /// Short, stable description of the shape.
    pub fn shape(&self) -> String {
        match self {
            Op::Conv {
                x,
                cout,
                k,
                stride,
                pad,
                bias,
                ..
            } => format!(
                "x={} w={} s={stride} p={pad}{}",
                list(x),
                list(&[*cout, x[1], *k, *k]),
                if *bias { " bias" } else { "" }
            ),
            Op::BatchNorm { x } | Op::GlobalAvgPool { x } | Op::ReadProbe { x, .. } => {
                format!("x={}", list(x))
            }
            Op::Relu { x } => format!("x={}", list(x)),
            Op::MaxPool { x, p } => format!(
                "x={} k={} s={} p={}",
                list(x),
                p.kernel,
                p.stride,
                p.padding
            ),
            Op::Linear { n, din, dout } => {
                format!("x={} w={}", list(&[*n, *din]), list(&[*dout, *din]))
            }
            Op::CrossEntropy { n, c }
            | Op::Softmax { n, c }
            | Op::WeightedConsistency { n, c }
            | Op::EntropyWeight { n, c } => format!("z={}", list(&[*n, *c])),
            Op::L2Normalize { n, e } => format!("x={}", list(&[*n, *e])),
            Op::Fusion { n, c, d, low, high } => format!(
                "x={} w={} high={}",
                list(&[*n, *c, low[0], low[1]]),
                list(&[*d, *c, 1, 1]),
                list(&[*n, *d, high[0], high[1]])
            ),
            Op::Pgc { n, e, keys } => format!("q={} keys={}", list(&[*n, *e]), list(&[*keys, *e])),
            Op::Adam { shapes } | Op::Ema { shapes } => format!(
                "{} tensors, {} params",
                shapes.len(),
                shapes
                    .iter()
                    .map(|s| s.iter().product::<usize>())
                    .sum::<usize>()
            ),
        }
    }

    /// FLOPs (2 per multiply-add) of the forward call, for compute-bound ops.
    pub fn fwd_flops(&self) -> Option<f64> {
        match self {
            Op::Conv {
                x,
                cout,
                k,
                stride,
                pad,
                ..
            } => {
                let ho = conv_out(x[2], *k, *stride, *pad);
                let wo = conv_out(x[3], *k, *stride, *pad);
                Some(2.0 * (x[0] * cout * ho * wo * x[1] * k * k) as f64)
            }
            Op::Linear { n, din, dout } => Some(2.0 * (n * din * dout) as f64),
            // The model's count, as PyTorch computes it: the projection P̂ = W·X, then S = P̂ᵀQ̂
            // and P̂·S per image (the CPU's fused form does about c/d of the fusion's products
            // and none of the projection's, so its GFLOP/s is nominal).
            Op::Fusion { n, c, d, low, high } => {
                let (np, nq) = (low[0] * low[1], high[0] * high[1]);
                Some(2.0 * (n * c * d * np) as f64 + 2.0 * 2.0 * (n * d * np * nq) as f64)
            }
            // q·keysᵀ.
            Op::Pgc { n, e, keys } => Some(2.0 * (n * e * keys) as f64),
            _ => None,
        }
    }

    /// FLOPs of the backward call, as the backends compute it.
    pub fn bwd_flops(&self) -> Option<f64> {
        let f = self.fwd_flops()?;
        Some(match self {
            // Filter gradient always, data gradient when the input needs one.
            Op::Conv { need_x, .. } => f * if *need_x { 2.0 } else { 1.0 },
            // gx = g·W and gW = gᵀ·x.
            Op::Linear { .. } => 2.0 * f,
            // The projection's two gradient products and, from the forward's S, the fusion's
            // four (gS = P̂ᵀ·gy, gy·Sᵀ, Q̂·gAᵀ, P̂·gA): twice the forward's.
            Op::Fusion { .. } => 2.0 * f,
            // Logits recomputed, then gq = coef·keys.
            Op::Pgc { .. } => 2.0 * f,
            _ => f,
        })
    }

    /// Bytes read plus written once by the forward (or update) call, for memory-bound ops.
    pub fn fwd_bytes(&self) -> Option<f64> {
        let b = |n: usize| Some(4.0 * n as f64);
        let numel = |s: &[usize]| s.iter().product::<usize>();
        match self {
            // x, γ, β in; y, mean, invstd, var out.
            Op::BatchNorm { x } => b(2 * numel(x) + 5 * x[1]),
            Op::Relu { x } => b(2 * numel(x)),
            Op::MaxPool { x, p } => {
                let (ho, wo) = (
                    conv_out(x[2], p.kernel, p.stride, p.padding),
                    conv_out(x[3], p.kernel, p.stride, p.padding),
                );
                b(numel(x) + x[0] * x[1] * ho * wo)
            }
            Op::GlobalAvgPool { x } => b(numel(x) + x[0] * x[1]),
            // x read (the per-block partial sums it writes, one per 1024 elements, not counted).
            Op::ReadProbe { x, .. } => b(numel(x)),
            Op::CrossEntropy { n, c } => b(n * c + 1),
            Op::Softmax { n, c } | Op::L2Normalize { n, e: c } => b(2 * n * c),
            // zs, zt, w in; one scalar out.
            Op::WeightedConsistency { n, c } => b(2 * n * c + n + 1),
            Op::EntropyWeight { n, c } => b(n * c + n),
            // p, g, m, v in; p, m, v out.
            Op::Adam { shapes } => b(7 * shapes.iter().map(|s| numel(s)).sum::<usize>()),
            // teacher, student in; teacher out.
            Op::Ema { shapes } => b(3 * shapes.iter().map(|s| numel(s)).sum::<usize>()),
            _ => None,
        }
    }

    /// Bytes read plus written once by the backward call.
    pub fn bwd_bytes(&self) -> Option<f64> {
        let b = |n: usize| Some(4.0 * n as f64);
        let numel = |s: &[usize]| s.iter().product::<usize>();
        match self {
            // x, gy, γ, mean, invstd in; gx, gγ, gβ out.
            Op::BatchNorm { x } => b(3 * numel(x) + 5 * x[1]),
            // y, gy in; gx out.
            Op::Relu { x } => b(3 * numel(x)),
            // x, gy in; gx out.
            Op::MaxPool { x, p } => {
                let ny = x[0]
                    * x[1]
                    * conv_out(x[2], p.kernel, p.stride, p.padding)
                    * conv_out(x[3], p.kernel, p.stride, p.padding);
                b(2 * numel(x) + ny)
            }
            Op::GlobalAvgPool { x } => b(numel(x) + x[0] * x[1]),
            // logits in; glogits out.
            Op::CrossEntropy { n, c } => b(2 * n * c + 1),
            // y (or x), gy in; gx out.
            Op::Softmax { n, c } | Op::L2Normalize { n, e: c } => b(3 * n * c),
            Op::WeightedConsistency { n, c } => b(3 * n * c + n + 1),
            _ => None,
        }
    }

    /// Direction label of the single call of ops without a backward.
    fn fwd_dir(&self) -> &'static str {
        match self {
            Op::Adam { .. } | Op::Ema { .. } => "upd",
            _ => "fwd",
        }
    }
}

#[derive(Default)]
struct Cases(Vec<Case>);

impl Cases {
    fn add(&mut self, name: &'static str, op: Op, layer: impl Into<String>) {
        let layer = layer.into();
        match self.0.iter_mut().find(|c| c.name == name && c.op == op) {
            Some(c) => c.layers.push(layer),
            None => self.0.push(Case {
                name,
                op,
                layers: vec![layer],
            }),
        }
    }
}

/// The name of the reference cases [`read_references`] adds (only where `--op` names it).
pub const READ_REFERENCE: &str = "read_reference";
/// The name of its read-bandwidth probe cases: one float per load, and one float4.
pub const READ_PROBE: [&str; 2] = ["read_probe_f32", "read_probe_f32x4"];

/// For every distinct batch-norm activation of `cases`, a global average pool over it, named
/// [`READ_REFERENCE`]: its forward reads the activation once (warp per (n, c) plane, flat and
/// in order) and writes almost nothing, its backward writes an activation's worth; what the
/// memory gives a read-only and a write-only pass over the bytes a batch norm moves, beside the
/// batch norm's own passes (its statistics only read). With `probes` (on CUDA), also the read
/// probes over the same bytes ([`READ_PROBE`]: flat, four loads in flight per thread, of one
/// float each and of one float4 each, the latter where the length is a multiple of 4): the
/// pool's warp adds each load into one running sum, so it is the slower reference; the probes
/// show what a read-only pass can reach, and what 16-byte loads add.
pub fn read_references(cases: &[Case], probes: bool) -> Vec<Case> {
    let mut cs = Cases::default();
    for c in cases {
        if let Op::BatchNorm { x } = &c.op {
            let layers = c.layers.join(", ");
            cs.add(READ_REFERENCE, Op::GlobalAvgPool { x: *x }, layers.clone());
            if probes {
                for (wide, name) in [false, true].into_iter().zip(READ_PROBE) {
                    if !wide || x.iter().product::<usize>() % 4 == 0 {
                        cs.add(name, Op::ReadProbe { x: *x, wide }, layers.clone());
                    }
                }
            }
        }
    }
    cs.0
}

/// Every distinct (op, shape) one training step of `cfg` calls for a batch of `n` images of
/// `image`×`image` pixels, in model order, with a PGC queue of `queue` keys. Derived from the
/// same rules as [`MedFuseNet::new`] / [`MedFuseNet::forward`].
pub fn model_cases(cfg: &ModelConfig, image: usize, n: usize, queue: usize) -> Vec<Case> {
    let mut cs = Cases::default();
    let w = cfg.width;
    #[allow(clippy::too_many_arguments)]
    fn conv(
        cs: &mut Cases,
        layer: &str,
        x: [usize; 4],
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        bias: bool,
        need_x: bool,
    ) -> [usize; 4] {
        cs.add(
            "conv2d",
            Op::Conv {
                x,
                cout,
                k,
                stride,
                pad,
                bias,
                need_x,
            },
            layer,
        );
        [
            x[0],
            cout,
            conv_out(x[2], k, stride, pad),
            conv_out(x[3], k, stride, pad),
        ]
    }
    let img = [n, cfg.in_ch, image, image];
    let mut h = if cfg.small_stem {
        conv(&mut cs, "conv1", img, w, 3, 1, 1, false, false)
    } else {
        conv(&mut cs, "conv1", img, w, 7, 2, 3, false, false)
    };
    cs.add("batch_norm_train", Op::BatchNorm { x: h }, "bn1");
    cs.add("relu", Op::Relu { x: h.to_vec() }, "relu");
    if !cfg.small_stem {
        let p = PoolParams {
            kernel: 3,
            stride: 2,
            padding: 1,
        };
        cs.add("max_pool2d", Op::MaxPool { x: h, p }, "maxpool");
        h = [h[0], h[1], conv_out(h[2], 3, 2, 1), conv_out(h[3], 3, 2, 1)];
    }
    let mut low = h;
    for (li, mult) in [1usize, 2, 4, 8].iter().enumerate() {
        let cout = w * mult;
        for b in 0..2 {
            let stride = if li > 0 && b == 0 { 2 } else { 1 };
            let name = format!("layer{}.{b}", li + 1);
            let x = h;
            let y = conv(
                &mut cs,
                &format!("{name}.conv1"),
                x,
                cout,
                3,
                stride,
                1,
                false,
                true,
            );
            cs.add(
                "batch_norm_train",
                Op::BatchNorm { x: y },
                format!("{name}.bn1"),
            );
            cs.add("relu", Op::Relu { x: y.to_vec() }, format!("{name}.relu1"));
            let y = conv(
                &mut cs,
                &format!("{name}.conv2"),
                y,
                cout,
                3,
                1,
                1,
                false,
                true,
            );
            cs.add(
                "batch_norm_train",
                Op::BatchNorm { x: y },
                format!("{name}.bn2"),
            );
            if stride != 1 || x[1] != cout {
                let s = conv(
                    &mut cs,
                    &format!("{name}.downsample.0"),
                    x,
                    cout,
                    1,
                    stride,
                    0,
                    false,
                    true,
                );
                cs.add(
                    "batch_norm_train",
                    Op::BatchNorm { x: s },
                    format!("{name}.downsample.1"),
                );
            }
            cs.add("relu", Op::Relu { x: y.to_vec() }, format!("{name}.relu2"));
            h = y;
            if li == 0 && b == 1 {
                low = h;
            }
        }
    }
    let fmap = if cfg.fusion {
        let q = conv(&mut cs, "fuse.conv_q", h, cfg.d, 1, 1, 0, true, true);
        cs.add(
            "projected_fusion",
            Op::Fusion {
                n,
                c: low[1],
                d: cfg.d,
                low: [low[2], low[3]],
                high: [q[2], q[3]],
            },
            "fuse.conv_p+fuse",
        );
        q
    } else {
        h
    };
    cs.add("global_avg_pool", Op::GlobalAvgPool { x: fmap }, "avgpool");
    let fd = cfg.feat_dim();
    let lin = |cs: &mut Cases, layer: &str, din: usize, dout: usize| {
        cs.add("linear", Op::Linear { n, din, dout }, layer);
    };
    lin(&mut cs, "fc", fd, cfg.classes);
    lin(&mut cs, "proj.0", fd, fd);
    cs.add("relu", Op::Relu { x: vec![n, fd] }, "proj.1");
    lin(&mut cs, "proj.2", fd, cfg.emb);
    cs.add(
        "l2_normalize",
        Op::L2Normalize { n, e: cfg.emb },
        "embedding",
    );
    let c = cfg.classes;
    cs.add(
        "cross_entropy",
        Op::CrossEntropy { n, c },
        "supervised loss",
    );
    cs.add("softmax", Op::Softmax { n, c }, "probabilities");
    cs.add(
        "weighted_consistency",
        Op::WeightedConsistency { n, c },
        "consistency loss",
    );
    cs.add("entropy_weight", Op::EntropyWeight { n, c }, "DSR weights");
    cs.add(
        "pgc_loss",
        Op::Pgc {
            n,
            e: cfg.emb,
            keys: n + queue,
        },
        "PGC loss",
    );
    let shapes: Vec<Vec<usize>> = MedFuseNet::new(*cfg, 0)
        .store
        .entries()
        .iter()
        .filter(|e| e.kind == ParamKind::Param)
        .map(|e| e.value.shape().to_vec())
        .collect();
    cs.add(
        "adam_step",
        Op::Adam {
            shapes: shapes.clone(),
        },
        "optimiser",
    );
    cs.add("ema_update", Op::Ema { shapes }, "teacher EMA");
    cs.0
}

/// Random test data on one backend.
struct Gen {
    bk: &'static dyn Backend,
    rng: rand_chacha::ChaCha8Rng,
}

impl Gen {
    fn rand(&mut self, shape: &[usize], lo: f32, hi: f32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.rng.random_range(lo..hi)).collect();
        Ok(self.bk.from_host(&v, shape)?)
    }
    fn x(&mut self, shape: &[usize]) -> Result<Tensor> {
        self.rand(shape, -1.0, 1.0)
    }
}

/// Seconds a sample of `--calls 0` aims at, and the most calls it makes.
const SAMPLE_S: f64 = 1e-3;
const MAX_CALLS: usize = 200;

/// `(median, min)` seconds per call of `f` over `repeats` samples, after `warmup` untimed calls,
/// and the calls per sample: each sample times `calls` back-to-back calls and one
/// `synchronize` (`calls` 0: as many as fill about [`SAMPLE_S`], at most [`MAX_CALLS`], judged by
/// one more timed call). Back-to-back calls give the device's time per call, not the host's
/// launch and synchronisation round trip, which is what the bandwidth and FLOP rates are for.
fn time(
    bk: &dyn Backend,
    warmup: usize,
    repeats: usize,
    calls: usize,
    prof: Option<Prof>,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Timing> {
    for _ in 0..warmup {
        f()?;
    }
    bk.synchronize()?;
    let calls = match calls {
        0 => {
            let s = Instant::now();
            f()?;
            bk.synchronize()?;
            let one = s.elapsed().as_secs_f64().max(1e-9);
            ((SAMPLE_S / one).ceil() as usize).clamp(1, MAX_CALLS)
        }
        n => n,
    };
    let mut t = Vec::with_capacity(repeats.max(1));
    for _ in 0..repeats.max(1) {
        let s = Instant::now();
        for _ in 0..calls {
            f()?;
        }
        bk.synchronize()?;
        t.push(s.elapsed().as_secs_f64() / calls as f64);
    }
    let min = t.iter().cloned().fold(f64::INFINITY, f64::min);
    let profile = match prof {
        Some(p) => Some(super::profile_steps(p.dev, bk, calls, p.top, &mut f)?),
        None => None,
    };
    Ok(Timing {
        median: median(&mut t),
        min,
        calls,
        profile,
    })
}

/// `--profile`: the device and how many items to list.
#[derive(Clone, Copy, Debug)]
struct Prof {
    dev: Device,
    top: usize,
}

/// Seconds per call (median and fastest sample), the calls per sample (see [`time`]) and, with
/// `--profile`, what the device ran in one sample's calls.
#[derive(Clone, Debug)]
struct Timing {
    median: f64,
    min: f64,
    calls: usize,
    profile: Option<serde_json::Value>,
}

/// Times the forward (or update) and, where the op has one, the backward call of one case.
fn run_case(
    case: &Case,
    g: &mut Gen,
    warmup: usize,
    repeats: usize,
    calls: usize,
    prof: Option<Prof>,
) -> Result<(Timing, Option<Timing>)> {
    let bk = g.bk;
    let t = |f: &mut dyn FnMut() -> Result<()>| time(bk, warmup, repeats, calls, prof, f);
    Ok(match &case.op {
        Op::Conv {
            x,
            cout,
            k,
            stride,
            pad,
            bias,
            need_x,
        } => {
            let xt = g.x(x)?;
            let fan_in = (x[1] * k * k) as f32;
            let s = (1.0 / fan_in).sqrt();
            let wt = g.rand(&[*cout, x[1], *k, *k], -s, s)?;
            let bt = if *bias { Some(g.x(&[*cout])?) } else { None };
            let p = ConvParams {
                stride: *stride,
                padding: *pad,
            };
            let y = bk.conv2d_fwd(&xt, &wt, bt.as_ref(), p)?;
            let gy = g.x(y.shape())?;
            drop(y);
            let f = t(&mut || {
                bk.conv2d_fwd(&xt, &wt, bt.as_ref(), p)?;
                Ok(())
            })?;
            let b = t(&mut || {
                bk.conv2d_bwd(&xt, &wt, &gy, p, *need_x, *bias)?;
                Ok(())
            })?;
            (f, Some(b))
        }
        Op::BatchNorm { x } => {
            let xt = g.x(x)?;
            let gamma = g.rand(&[x[1]], 0.5, 1.5)?;
            let beta = g.x(&[x[1]])?;
            let o = bk.batch_norm_train_fwd(&xt, &gamma, &beta, medssl::nn::BN_EPS)?;
            let gy = g.x(x)?;
            let f = t(&mut || {
                bk.batch_norm_train_fwd(&xt, &gamma, &beta, medssl::nn::BN_EPS)?;
                Ok(())
            })?;
            let b = t(&mut || {
                bk.batch_norm_train_bwd(&xt, &gamma, &o.mean, &o.invstd, &gy)?;
                Ok(())
            })?;
            (f, Some(b))
        }
        Op::Relu { x } => {
            let xt = g.x(x)?;
            let y = bk.relu_fwd(&xt)?;
            let gy = g.x(x)?;
            let f = t(&mut || {
                bk.relu_fwd(&xt)?;
                Ok(())
            })?;
            let b = t(&mut || {
                bk.relu_bwd(&y, &gy)?;
                Ok(())
            })?;
            (f, Some(b))
        }
        Op::MaxPool { x, p } => {
            let xt = g.x(x)?;
            let y = bk.max_pool2d_fwd(&xt, *p)?;
            let gy = g.x(y.shape())?;
            let f = t(&mut || {
                bk.max_pool2d_fwd(&xt, *p)?;
                Ok(())
            })?;
            let b = t(&mut || {
                bk.max_pool2d_bwd(&xt, &gy, *p)?;
                Ok(())
            })?;
            (f, Some(b))
        }
        Op::ReadProbe { x, wide } => {
            let xt = g.x(x)?;
            #[cfg(feature = "cuda")]
            if let Some(cb) = super::cuda_backend(bk.device()) {
                let f = t(&mut || {
                    cb.read_probe(&xt, *wide)?;
                    Ok(())
                })?;
                return Ok((f, None));
            }
            let _ = (xt, wide);
            anyhow::bail!("read probes run on a CUDA device only")
        }
        Op::GlobalAvgPool { x } => {
            let xt = g.x(x)?;
            let gy = g.x(&[x[0], x[1]])?;
            let f = t(&mut || {
                bk.global_avg_pool_fwd(&xt)?;
                Ok(())
            })?;
            let b = t(&mut || {
                bk.global_avg_pool_bwd(&gy, x)?;
                Ok(())
            })?;
            (f, Some(b))
        }
        Op::Linear { n, din, dout } => {
            let xt = g.x(&[*n, *din])?;
            let s = (1.0 / *din as f32).sqrt();
            let wt = g.rand(&[*dout, *din], -s, s)?;
            let bt = g.x(&[*dout])?;
            let gy = g.x(&[*n, *dout])?;
            let f = t(&mut || {
                bk.linear_fwd(&xt, &wt, Some(&bt))?;
                Ok(())
            })?;
            // As the autograd tape: gx = g·W, gW = gᵀ·x, gb = Σ_rows g.
            let b = t(&mut || {
                bk.matmul(&gy, &wt, false, false)?;
                bk.matmul(&gy, &xt, true, false)?;
                bk.sum_rows(&gy, *dout)?;
                Ok(())
            })?;
            (f, Some(b))
        }
        Op::CrossEntropy { n, c } => {
            let z = g.rand(&[*n, *c], -3.0, 3.0)?;
            let labels: Vec<usize> = (0..*n).map(|i| i % c).collect();
            let one = bk.full(&[1], 1.0)?;
            let f = t(&mut || {
                bk.cross_entropy_fwd(&z, &labels)?;
                Ok(())
            })?;
            let b = t(&mut || {
                bk.cross_entropy_bwd(&z, &labels, &one)?;
                Ok(())
            })?;
            (f, Some(b))
        }
        Op::Softmax { n, c } => {
            let z = g.rand(&[*n, *c], -3.0, 3.0)?;
            let y = bk.softmax_fwd(&z)?;
            let gy = g.x(&[*n, *c])?;
            let f = t(&mut || {
                bk.softmax_fwd(&z)?;
                Ok(())
            })?;
            let b = t(&mut || {
                bk.softmax_bwd(&y, &gy)?;
                Ok(())
            })?;
            (f, Some(b))
        }
        Op::L2Normalize { n, e } => {
            let xt = g.x(&[*n, *e])?;
            let gy = g.x(&[*n, *e])?;
            let f = t(&mut || {
                bk.l2_normalize_fwd(&xt)?;
                Ok(())
            })?;
            let b = t(&mut || {
                bk.l2_normalize_bwd(&xt, &gy)?;
                Ok(())
            })?;
            (f, Some(b))
        }
        Op::Fusion { n, c, d, low, high } => {
            let x = g.x(&[*n, *c, low[0], low[1]])?;
            let w = g.x(&[*d, *c, 1, 1])?;
            let b = g.x(&[*d])?;
            let hi = g.x(&[*n, *d, high[0], high[1]])?;
            let gy = g.x(hi.shape())?;
            let f = t(&mut || {
                bk.projected_fusion_fwd(&x, &w, Some(&b), &hi)?;
                Ok(())
            })?;
            let (_, saved) = bk.projected_fusion_fwd(&x, &w, Some(&b), &hi)?;
            let b = t(&mut || {
                bk.projected_fusion_bwd(&x, &w, true, &hi, &saved, &gy)?;
                Ok(())
            })?;
            (f, Some(b))
        }
        Op::WeightedConsistency { n, c } => {
            let zs = g.rand(&[*n, *c], -3.0, 3.0)?;
            let zt = g.rand(&[*n, *c], -3.0, 3.0)?;
            let w = g.rand(&[*n], 0.0, 1.0)?;
            let one = bk.full(&[1], 1.0)?;
            let f = t(&mut || {
                bk.weighted_consistency_fwd(&zs, &zt, &w)?;
                Ok(())
            })?;
            let b = t(&mut || {
                bk.weighted_consistency_bwd(&zs, &zt, &w, &one)?;
                Ok(())
            })?;
            (f, Some(b))
        }
        Op::EntropyWeight { n, c } => {
            let z = g.rand(&[*n, *c], -3.0, 3.0)?;
            let f = t(&mut || {
                bk.entropy_weight(&z)?;
                Ok(())
            })?;
            (f, None)
        }
        Op::Pgc { n, e, keys } => {
            // Unit-norm queries and keys, as the model's embeddings.
            let q = bk.l2_normalize_fwd(&g.x(&[*n, *e])?)?;
            let k = bk.l2_normalize_fwd(&g.x(&[*keys, *e])?)?;
            let classes = 7;
            let ql: Vec<usize> = (0..*n).map(|i| i % classes).collect();
            let kl: Vec<usize> = (0..*keys).map(|i| (i * 3) % classes).collect();
            let (ql, kl) = (label_tensor(bk, &ql)?, label_tensor(bk, &kl)?);
            let qw = g.rand(&[*n], 0.0, 1.0)?;
            let kw = g.rand(&[*keys], 0.0, 1.0)?;
            let one = bk.full(&[1], 1.0)?;
            let tau = 0.07;
            let f = t(&mut || {
                bk.pgc_loss_fwd(&q, &ql, &qw, &k, &kl, &kw, tau)?;
                Ok(())
            })?;
            let b = t(&mut || {
                bk.pgc_loss_bwd(&q, &ql, &qw, &k, &kl, &kw, tau, &one)?;
                Ok(())
            })?;
            (f, Some(b))
        }
        Op::Adam { shapes } => {
            let mut state = shapes
                .iter()
                .map(|s| {
                    Ok((
                        g.x(s)?,
                        g.rand(s, -0.01, 0.01)?,
                        bk.full(s, 0.0)?,
                        bk.full(s, 0.0)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            let mut step = 0u64;
            let f = t(&mut || {
                step += 1;
                let p = AdamParams::pytorch(1e-3, 5e-4, step);
                // One multi-tensor call for all parameters, as the trainer's optimiser makes.
                let mut slots: Vec<OptSlot<'_>> = state
                    .iter_mut()
                    .map(|(param, grad, m, v)| OptSlot {
                        param,
                        grad,
                        state: m,
                        state2: Some(v),
                    })
                    .collect();
                bk.adam_step_multi(&mut slots, p)?;
                Ok(())
            })?;
            (f, None)
        }
        Op::Ema { shapes } => {
            let mut pairs = shapes
                .iter()
                .map(|s| Ok((g.x(s)?, g.x(s)?)))
                .collect::<Result<Vec<_>>>()?;
            let f = t(&mut || {
                let mut refs: Vec<(&mut Tensor, &Tensor)> =
                    pairs.iter_mut().map(|(t, s)| (t, &*s)).collect();
                bk.ema_update_multi(&mut refs, 0.99)?;
                Ok(())
            })?;
            (f, None)
        }
    })
}

/// One measured peak: what was timed and its rate (GFLOP/s or GB/s).
#[derive(Clone, Debug)]
struct Peak {
    kind: String,
    value: f64,
}

/// Streaming-copy bandwidth of the host (read + write bytes), over the rayon threads in use.
fn host_copy_gbps(mib: usize, repeats: usize) -> f64 {
    let n = mib * (1 << 20) / 4;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let chunk = 1 << 18; // 1 MiB per task
    let mut copy = || {
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
    };
    copy(); // faults the destination pages in
    let mut t: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let s = Instant::now();
            copy();
            s.elapsed().as_secs_f64()
        })
        .collect();
    2.0 * (n * 4) as f64 / median(&mut t) / 1e9
}

/// Median GFLOP/s of an `n³` SGEMM through the backend's `matmul` (cuBLAS on CUDA).
pub fn device_gemm_gflops(bk: &'static dyn Backend, n: usize) -> Result<f64> {
    let x = bk.full(&[n, n], 0.01)?;
    let y = bk.full(&[n, n], 0.02)?;
    let med = time(bk, 2, 5, 0, None, || {
        bk.matmul(&x, &y, false, false)?;
        Ok(())
    })?
    .median;
    Ok(2.0 * (n as f64).powi(3) / med / 1e9)
}

/// `(compute peak, memory peak)` of the backend, measured now.
fn measure_peaks(bk: &'static dyn Backend, a: &OpsArgs) -> Result<(Option<Peak>, Option<Peak>)> {
    let cpu = bk.device() == Device::Cpu;
    let n = a.peak_gemm.unwrap_or(if cpu { 2048 } else { 4096 });
    let compute = if n == 0 {
        None
    } else if cpu {
        Some(Peak {
            kind: format!("sgemm_{n}"),
            value: gemm_gflops(n, 3),
        })
    } else {
        Some(Peak {
            kind: format!("cublas_sgemm_{n}"),
            value: device_gemm_gflops(bk, n)?,
        })
    };
    let mib = a.peak_copy_mib;
    let memory = if mib == 0 {
        None
    } else if cpu {
        Some(Peak {
            kind: format!("memcpy_{mib}MiB"),
            value: host_copy_gbps(mib, 5),
        })
    } else {
        // The driver's device-to-device copy of `mib` MiB (read + write bytes), the device's copy
        // bandwidth; `scale` (a hand-written streaming kernel) where that copy is not available.
        let len = mib * (1 << 20) / 4;
        let x = bk.full(&[len], 1.0)?;
        let bytes = 2.0 * (len * 4) as f64;
        #[cfg(feature = "cuda")]
        if let Some(cb) = super::cuda_backend(bk.device()) {
            let med = time(bk, 2, 10, 0, None, || {
                cb.copy_tensor(&x)?;
                Ok(())
            })?
            .median;
            let kind = format!("memcpy_dtod_{mib}MiB");
            return Ok((
                compute,
                Some(Peak {
                    kind,
                    value: bytes / med / 1e9,
                }),
            ));
        }
        let med = time(bk, 2, 10, 0, None, || {
            bk.scale(&x, 1.0001)?;
            Ok(())
        })?
        .median;
        Some(Peak {
            kind: format!("scale_{mib}MiB"),
            value: bytes / med / 1e9,
        })
    };
    Ok((compute, memory))
}

/// One result row.
struct Row<'c> {
    case: &'c Case,
    dir: &'static str,
    t: Timing,
    /// `(is_flops, amount)`.
    work: (bool, f64),
    /// The CPU convolution algorithm `--cpu-conv` set for the row (`None`: `MEDSSL_CPU_CONV`).
    algo: Option<Algo>,
    /// The CPU convolution path the row took (`None` on CUDA and for other ops).
    path: Option<&'static str>,
}

/// One timing of several rounds: the median of their medians, the fastest of their samples.
fn combine(rounds: Vec<Timing>) -> Timing {
    let mut medians: Vec<f64> = rounds.iter().map(|t| t.median).collect();
    medians.sort_by(f64::total_cmp);
    Timing {
        median: medians[medians.len() / 2],
        min: rounds.iter().map(|t| t.min).fold(f64::INFINITY, f64::min),
        calls: rounds.iter().map(|t| t.calls).max().unwrap_or(1),
        profile: None,
    }
}

/// The algorithms of `--cpu-conv` (empty without it), checked with its `--rounds` and the device.
pub fn cpu_conv_list(list: Option<&str>, rounds: usize, dev: Device) -> Result<Vec<Algo>> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    if dev != Device::Cpu {
        bail!("--cpu-conv {list}: CPU convolution algorithms need --device cpu");
    }
    if rounds == 0 {
        bail!("--cpu-conv {list}: --rounds must be at least 1");
    }
    list.split(',')
        .map(|v| match v.trim() {
            "" => bail!("--cpu-conv '{list}': an empty algorithm (auto, im2col, winograd, direct)"),
            v => parse_algo(Some(v)).map_err(|e| anyhow::anyhow!("--cpu-conv: {e}")),
        })
        .collect()
}

/// The MedFuseNet (fusion on) that `step` and `ops` measure.
pub fn bench_model(
    channels: usize,
    width: usize,
    fusion_dim: usize,
    emb: usize,
    classes: usize,
    image_size: usize,
) -> ModelConfig {
    ModelConfig {
        in_ch: channels,
        width,
        d: fusion_dim,
        emb,
        classes,
        small_stem: ModelConfig::small_stem_for(image_size),
        fusion: true,
    }
}

/// Says loudly when the device is the CPU emulation of the CUDA backend (its name, which every
/// result file records, says so too).
pub fn warn_if_emulated(bk: &dyn Backend) {
    if bk.name().contains("emulation") {
        eprintln!(
            "medssl-bench: WARNING: {} runs the CUDA kernels on the CPU (MEDSSL_CUDA_EMULATE=1); \
             its timings say nothing about a GPU",
            bk.name()
        );
    }
}

pub fn run(a: &OpsArgs) -> Result<()> {
    let dev = Device::parse(&a.device)?;
    let bk = medssl::backend::get(dev).with_context(|| format!("--device {}", a.device))?;
    warn_if_emulated(bk);
    if a.batch == 0 || a.width == 0 || a.image_size == 0 {
        bail!("--batch, --width and --image-size must be positive");
    }
    if a.profile && dev == Device::Cpu {
        bail!("--profile needs a CUDA device (--device cuda)");
    }
    let cfg = bench_model(
        a.channels,
        a.width,
        a.fusion_dim,
        a.emb,
        a.classes,
        a.image_size,
    );
    let all = model_cases(&cfg, a.image_size, a.batch, a.queue);
    let wanted: Vec<&str> =
        a.op.as_deref()
            .map(|f| f.split(',').filter(|p| !p.is_empty()).collect())
            .unwrap_or_default();
    let references = if wanted.contains(&READ_REFERENCE) {
        read_references(&all, dev != Device::Cpu)
    } else {
        Vec::new()
    };
    let cases: Vec<Case> = all
        .into_iter()
        .filter(|c| a.op.is_none() || wanted.iter().any(|p| c.name.contains(p)))
        .chain(references)
        .collect();
    if cases.is_empty() {
        bail!(
            "--op {}: no op matches (ops: conv2d, batch_norm_train, relu, max_pool2d, \
             global_avg_pool, linear, cross_entropy, softmax, l2_normalize, projected_fusion, \
             weighted_consistency, entropy_weight, pgc_loss, adam_step, ema_update, and \
             {READ_REFERENCE} when named)",
            a.op.as_deref().unwrap_or("")
        );
    }
    let (compute, memory) = measure_peaks(bk, a)?;
    let threads = rayon::current_num_threads();
    let mut g = Gen {
        bk,
        rng: medssl::rng::stream(0, "bench-ops"),
    };
    if !a.json {
        print_header(bk, a, threads, &compute, &memory);
    }
    let prof = a.profile.then_some(Prof {
        dev,
        top: a.profile_top,
    });
    let algos = cpu_conv_list(a.cpu_conv.as_deref(), a.rounds, dev)?;
    let cpu = dev == Device::Cpu;
    let mut rows = Vec::new();
    for c in &cases {
        let run = |g: &mut Gen| {
            run_case(c, g, a.warmup, a.repeats, a.calls, prof)
                .with_context(|| format!("{} {}", c.name, c.op.shape()))
        };
        // (algorithm, forward, backward) per row pair.
        let timed: Vec<(Option<Algo>, Timing, Option<Timing>)> =
            if algos.is_empty() || cpu_path(&c.op).is_none() {
                let (f, b) = run(&mut g)?;
                vec![(None, f, b)]
            } else {
                let mut got: Vec<Vec<(Timing, Option<Timing>)>> =
                    algos.iter().map(|_| Vec::new()).collect();
                for _ in 0..a.rounds {
                    for (al, got) in algos.iter().zip(&mut got) {
                        set_algo(Some(*al));
                        let r = run(&mut g);
                        set_algo(None);
                        got.push(r?);
                    }
                }
                algos
                    .iter()
                    .zip(got)
                    .map(|(al, got)| {
                        let (f, b): (Vec<Timing>, Vec<Option<Timing>>) = got.into_iter().unzip();
                        let b = b.into_iter().collect::<Option<Vec<Timing>>>().map(combine);
                        (Some(*al), combine(f), b)
                    })
                    .collect()
            };
        let measured = timed
            .iter()
            .map(|t| 1 + usize::from(t.2.is_some()))
            .sum::<usize>();
        let work = |flops: Option<f64>, bytes: Option<f64>| match (flops, bytes) {
            (Some(f), _) => (true, f),
            (None, Some(b)) => (false, b),
            (None, None) => (false, 0.0),
        };
        for (algo, f, b) in timed {
            set_algo(algo);
            let path = cpu_path(&c.op).filter(|_| cpu);
            set_algo(None);
            rows.push(Row {
                case: c,
                dir: c.op.fwd_dir(),
                t: f,
                work: work(c.op.fwd_flops(), c.op.fwd_bytes()),
                algo,
                path,
            });
            if let Some(b) = b {
                rows.push(Row {
                    case: c,
                    dir: "bwd",
                    t: b,
                    work: work(c.op.bwd_flops(), c.op.bwd_bytes()),
                    algo,
                    path,
                });
            }
        }
        if !a.json {
            // Rows appear as they are measured.
            for r in &rows[rows.len() - measured..] {
                print_row(r, &compute, &memory);
                if let Some(p) = &r.t.profile {
                    super::print_profile(p, "call");
                }
            }
        }
    }
    if a.json {
        let choices = super::choices_fields(dev);
        for r in &rows {
            let peak = if r.work.0 { &compute } else { &memory };
            let rate = r.work.1 / r.t.median / 1e9;
            let mut o = serde_json::json!({
                "bench": "ops",
                "engine": "medssl",
                "device": bk.name(),
                "op": r.case.name,
                "dir": r.dir,
                "shape": r.case.op.shape(),
                "uses": r.case.layers.len(),
                "layers": r.case.layers.join(","),
                "width": a.width,
                "image_size": a.image_size,
                "batch": a.batch,
                "repeats": a.repeats.max(1),
                "calls_per_sample": r.t.calls,
                "median_ms": r.t.median * 1e3,
                "min_ms": r.t.min * 1e3,
                "peak_kind": peak.as_ref().map(|p| p.kind.clone()),
                "peak_value": peak.as_ref().map(|p| p.value),
                "pct_of_peak": peak.as_ref().map(|p| 100.0 * rate / p.value),
                "threads": threads,
            });
            let m = o.as_object_mut().expect("object");
            // The CUDA backend's switches (null on CPU): rows of runs with different
            // MEDSSL_CUDA_BN_* settings are told apart by them.
            m.extend(choices.clone());
            if let Some(p) = &r.t.profile {
                m.insert("profile".into(), p.clone());
            }
            // The CPU convolution path the row took (null on CUDA and for other ops), and the
            // algorithm `--cpu-conv` set for it.
            m.insert("cpu_path".into(), r.path.into());
            if let Some(al) = r.algo {
                m.insert("cpu_conv".into(), al.name().into());
            }
            if r.work.0 {
                m.insert("gflop".into(), (r.work.1 / 1e9).into());
                m.insert("gflops".into(), rate.into());
            } else {
                m.insert("mbytes".into(), (r.work.1 / 1e6).into());
                m.insert("gbps".into(), rate.into());
            }
            println!("{o}");
        }
    } else {
        // Per batch: each case's median times the number of layers that call it (with
        // --cpu-conv, per algorithm: its convolution rows and every other row).
        let sum = |dir: &str, algo: Option<Algo>| -> f64 {
            rows.iter()
                // The model's ops only: not the read references and probes.
                .filter(|r| {
                    !r.case.name.starts_with(READ_REFERENCE) && !READ_PROBE.contains(&r.case.name)
                })
                .filter(|r| r.dir == dir && (r.algo.is_none() || r.algo == algo))
                .map(|r| r.t.median * r.case.layers.len() as f64)
                .fold(0.0, |a, b| a + b)
                * 1e3
        };
        let lines: Vec<Option<Algo>> = match algos.is_empty() {
            true => vec![None],
            false => algos.iter().copied().map(Some).collect(),
        };
        for al in lines {
            let with = al.map_or(String::new(), |al| {
                format!(", convolutions on {}", al.name())
            });
            println!(
                "Σ median × uses (one pass over the listed ops at batch {}{with}): fwd {:.2} ms, bwd {:.2} ms, upd {:.2} ms",
                a.batch,
                sum("fwd", al),
                sum("bwd", al),
                sum("upd", al)
            );
        }
    }
    Ok(())
}

fn print_header(
    bk: &dyn Backend,
    a: &OpsArgs,
    threads: usize,
    compute: &Option<Peak>,
    memory: &Option<Peak>,
) {
    let p = |p: &Option<Peak>, unit: &str| {
        p.as_ref()
            .map(|p| format!("{} = {:.1} {unit}", p.kind, p.value))
            .unwrap_or_else(|| "not measured".into())
    };
    println!(
        "ops on {} ({threads} threads), width {}, {} px, batch {}, queue {}; peaks: compute {}, memory {}",
        bk.name(),
        a.width,
        a.image_size,
        a.batch,
        a.queue,
        p(compute, "GFLOP/s"),
        p(memory, "GB/s")
    );
    println!(
        "{:<21} {:<3} {:<52} {:>4} {:>10} {:>10} {:>16} {:>7}",
        "op", "dir", "shape", "uses", "median ms", "min ms", "rate", "% peak"
    );
}

/// The CPU backend's path for a convolution case (`None` for other ops).
fn cpu_path(op: &Op) -> Option<&'static str> {
    match op {
        Op::Conv {
            x,
            cout,
            k,
            stride,
            pad,
            ..
        } => Some(medssl::backend::cpu::conv::path_name(
            &medssl::backend::shapes::ConvGeom {
                n: x[0],
                cin: x[1],
                h: x[2],
                w: x[3],
                cout: *cout,
                k: *k,
                stride: *stride,
                pad: *pad,
            },
        )),
        _ => None,
    }
}

fn print_row(r: &Row, compute: &Option<Peak>, memory: &Option<Peak>) {
    let rate = r.work.1 / r.t.median / 1e9;
    let peak = if r.work.0 { compute } else { memory };
    let shape = match (r.algo, r.path) {
        (Some(al), Some(p)) if al.name() != p => {
            format!("{} [{}: {p}]", r.case.op.shape(), al.name())
        }
        (_, Some(p)) => format!("{} [{p}]", r.case.op.shape()),
        _ => r.case.op.shape(),
    };
    println!(
        "{:<21} {:<3} {:<52} {:>4} {:>10.3} {:>10.3} {:>16} {:>7}",
        r.case.name,
        r.dir,
        shape,
        r.case.layers.len(),
        r.t.median * 1e3,
        r.t.min * 1e3,
        format!("{rate:.2} {}", if r.work.0 { "GFLOP/s" } else { "GB/s" }),
        peak.as_ref()
            .map(|p| format!("{:.1}", 100.0 * rate / p.value))
            .unwrap_or_else(|| "-".into())
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn cfg(width: usize, image: usize, fusion: bool) -> ModelConfig {
        ModelConfig {
            in_ch: 3,
            width,
            d: 32,
            emb: 16,
            classes: 7,
            small_stem: ModelConfig::small_stem_for(image),
            fusion,
        }
    }

    const CONFIGS: [(usize, usize, bool); 5] = [
        (16, 28, true),
        (4, 28, true),
        (8, 112, true),
        (4, 224, true),
        (8, 28, false),
    ];

    /// Σ uses × forward FLOPs of the conv, fusion and linear cases equals the model's own count
    /// (`MedFuseNet::forward_flops`), so every spatial size, channel count and stride is right.
    #[test]
    fn case_flops_match_the_model() {
        for (w, img, fusion) in CONFIGS {
            let c = cfg(w, img, fusion);
            for n in [1, 3] {
                let total: f64 = model_cases(&c, img, n, 64)
                    .iter()
                    .filter(|k| k.name != "pgc_loss")
                    .filter_map(|k| k.op.fwd_flops().map(|f| f * k.layers.len() as f64))
                    .sum();
                let want = n as f64 * MedFuseNet::new(c, 0).forward_flops(img, img);
                assert_eq!(
                    total, want,
                    "width {w}, {img} px, fusion {fusion}, batch {n}"
                );
            }
        }
    }

    /// The conv and linear cases, counted with their uses, have exactly the model's weight
    /// shapes; batch-norm cases cover every BatchNorm layer; the max pool appears only with the
    /// large stem; the optimiser cases cover every parameter.
    #[test]
    fn cases_cover_the_model_parameters() {
        for (w, img, fusion) in CONFIGS {
            let c = cfg(w, img, fusion);
            let model = MedFuseNet::new(c, 0);
            let cases = model_cases(&c, img, 2, 64);
            let mut want: BTreeMap<Vec<usize>, usize> = BTreeMap::new();
            let mut n_bn = 0;
            let mut n_params = 0;
            for e in model.store.entries() {
                if e.kind == ParamKind::Param {
                    n_params += 1;
                    if e.value.dims() >= 2 {
                        *want.entry(e.value.shape().to_vec()).or_default() += 1;
                    }
                }
                if e.name.ends_with("running_mean") {
                    n_bn += 1;
                }
            }
            let mut got: BTreeMap<Vec<usize>, usize> = BTreeMap::new();
            for k in &cases {
                let shape = match &k.op {
                    Op::Conv { x, cout, k, .. } => vec![*cout, x[1], *k, *k],
                    Op::Linear { din, dout, .. } => vec![*dout, *din],
                    Op::Fusion { c, d, .. } => vec![*d, *c, 1, 1],
                    _ => continue,
                };
                *got.entry(shape).or_default() += k.layers.len();
            }
            assert_eq!(got, want, "width {w}, {img} px");
            let bn: usize = cases
                .iter()
                .filter(|k| k.name == "batch_norm_train")
                .map(|k| k.layers.len())
                .sum();
            assert_eq!(bn, n_bn);
            assert_eq!(
                cases.iter().any(|k| k.name == "max_pool2d"),
                img > 64,
                "{img} px"
            );
            assert_eq!(cases.iter().any(|k| k.name == "projected_fusion"), fusion);
            for k in &cases {
                if let Op::Adam { shapes } | Op::Ema { shapes } = &k.op {
                    assert_eq!(shapes.len(), n_params);
                }
            }
        }
    }

    /// `--op read_reference`: one global average pool per distinct batch-norm activation, over
    /// the same shape, listing the norms' layers; none among the model's own cases.
    #[test]
    fn read_references_follow_the_batch_norms() {
        let c = cfg(64, 28, true);
        let cases = model_cases(&c, 28, 256, 4096);
        assert!(cases.iter().all(|k| k.name != READ_REFERENCE));
        let bn: Vec<&Case> = cases
            .iter()
            .filter(|k| k.name == "batch_norm_train")
            .collect();
        let refs = read_references(&cases, false);
        assert_eq!(refs.len(), bn.len());
        for (r, b) in refs.iter().zip(&bn) {
            assert_eq!(r.name, READ_REFERENCE);
            let (Op::GlobalAvgPool { x: rx }, Op::BatchNorm { x: bx }) = (&r.op, &b.op) else {
                panic!("{:?} / {:?}", r.op, b.op);
            };
            assert_eq!(rx, bx);
            assert_eq!(r.layers, vec![b.layers.join(", ")]);
        }
        // With the probes (on CUDA): after each pool, the one-float probe and, where the length
        // is a multiple of 4 (every activation here), the float4 one, over the same shape.
        let with = read_references(&cases, true);
        assert_eq!(with.len(), 3 * bn.len());
        for (k, b) in with.chunks(3).zip(&bn) {
            let Op::BatchNorm { x } = b.op else {
                unreachable!()
            };
            assert_eq!(k[0].op, Op::GlobalAvgPool { x });
            for (r, (name, wide)) in k[1..].iter().zip(READ_PROBE.into_iter().zip([false, true])) {
                assert_eq!((r.name, &r.op), (name, &Op::ReadProbe { x, wide }));
                assert_eq!(r.layers, vec![b.layers.join(", ")]);
            }
        }
        assert!(refs.iter().any(|r| r.op
            == Op::GlobalAvgPool {
                x: [256, 64, 28, 28]
            }));
    }

    /// Distinct conv shapes are listed once each; the stem alone skips the data gradient.
    #[test]
    fn conv_cases_are_distinct() {
        let c = cfg(16, 28, true);
        let cases = model_cases(&c, 28, 36, 4096);
        let convs: Vec<&Case> = cases.iter().filter(|k| k.name == "conv2d").collect();
        // Stem, layer1 3×3, then conv1 s2 + conv2 + 1×1 downsample for layers 2-4, conv_q (conv_p
        // is inside the projected fusion).
        assert_eq!(convs.len(), 12);
        for (i, a) in convs.iter().enumerate() {
            for b in &convs[i + 1..] {
                assert_ne!(a.op.shape(), b.op.shape());
            }
        }
        let no_dx: Vec<&str> = convs
            .iter()
            .filter(|k| matches!(k.op, Op::Conv { need_x: false, .. }))
            .map(|k| k.layers[0].as_str())
            .collect();
        assert_eq!(no_dx, ["conv1"]);
        let l1 = convs
            .iter()
            .find(|k| k.layers[0] == "layer1.0.conv1")
            .unwrap();
        assert_eq!(l1.layers.len(), 4);
        assert_eq!(l1.op.shape(), "x=[36,16,28,28] w=[16,16,3,3] s=1 p=1");
    }
}
