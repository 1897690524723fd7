//! Criterion benchmarks of the hot `Backend` ops at the shapes MedFuseNet really uses.
//!
//! Model: 28 px input, 3×3 stride-1 stem, layer1..4 with widths w, 2w, 4w, 8w (strides 1,2,2,2 →
//! 28, 14, 7, 4 px maps), similarity fusion of layer1 (28×28) and layer4 (4×4) projected to
//! d = 128, batch 36 (the unlabelled batch), PGC loss of 36 queries against a 4096-key queue plus
//! the batch, Adam over every trainable parameter of the model.
//!
//! Groups: `<dev>/w16` and `<dev>/w64` (width-dependent ops) and `<dev>/shared` (ops whose shapes
//! do not depend on the width), for `dev` = `cpu` and, when built with `--features cuda` and a
//! device is visible, `cuda` (each timed iteration ends with `synchronize()`).
//!
//! Throughput: `Elements` = floating-point operations (GEMM-like ops, 2 per multiply-add), so
//! criterion's "elem/s" reads as FLOP/s; `Bytes` = the minimal DRAM traffic of memory-bound ops
//! (every input read once, every output written once).
//!
//! Run: `cargo bench --bench ops` (all), `cargo bench --bench ops -- cpu/w16` (a filter),
//! `cargo bench --features cuda --bench ops -- cuda`.

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use medssl::backend::{self, label_tensor, AdamParams, Backend, ConvParams};
use medssl::nn::{MedFuseNet, ModelConfig};
use medssl::{Device, Tensor};

const BATCH: usize = 36;
const IMG: usize = 28;
const FUSE_D: usize = 128;
const EMB: usize = 128;
const QUEUE: usize = 4096;
const CLASSES: usize = 7;
const IN_CH: usize = 3;
const TAU: f32 = 0.1;
const WIDTHS: [usize; 2] = [16, 64];
/// Spatial side of the layer4 map (28 → 14 → 7 → 4).
const L4: usize = 4;
/// Spatial side of the layer3 map.
const L3: usize = 7;

/// Deterministic pseudo-random numbers in [-1, 1) (splitmix64), so no RNG crate is needed.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// A random tensor on the backend's device.
fn rand_t(be: &dyn Backend, g: &mut Gen, shape: &[usize], scale: f32) -> Tensor {
    be.from_host(&g.vec(numel(shape), scale), shape)
        .expect("upload")
}

/// `[rows, cols]` with L2-normalised rows (PGC queries and keys are normalised embeddings).
fn rand_unit_rows(be: &dyn Backend, g: &mut Gen, rows: usize, cols: usize) -> Tensor {
    let mut v = g.vec(rows * cols, 1.0);
    for r in v.chunks_mut(cols) {
        let n = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        r.iter_mut().for_each(|x| *x /= n);
    }
    be.from_host(&v, &[rows, cols]).expect("upload")
}

/// Values in [0.1, 1] (confidence weights).
fn rand_weights(be: &dyn Backend, g: &mut Gen, n: usize) -> Tensor {
    let v: Vec<f32> = (0..n).map(|_| 0.55 + 0.45 * g.next()).collect();
    be.from_host(&v, &[n]).expect("upload")
}

fn labels(n: usize, offset: usize) -> Vec<usize> {
    (0..n).map(|i| (i * 5 + offset) % CLASSES).collect()
}

/// Times `f` followed by a device synchronisation.
fn bench<R, F: FnMut() -> R>(
    grp: &mut BenchmarkGroup<'_, WallTime>,
    be: &dyn Backend,
    id: &str,
    tp: Throughput,
    mut f: F,
) {
    grp.throughput(tp);
    grp.bench_function(id, |b| {
        b.iter(|| {
            let r = f();
            be.synchronize().expect("synchronize");
            black_box(r)
        })
    });
}

fn flops(n: f64) -> Throughput {
    Throughput::Elements(n as u64)
}

fn bytes_f32(n: usize) -> Throughput {
    Throughput::Bytes((n * std::mem::size_of::<f32>()) as u64)
}

/// FLOPs of a forward convolution (2 per multiply-add).
fn conv_flops(n: usize, cin: usize, cout: usize, k: usize, ho: usize, wo: usize) -> f64 {
    2.0 * (n * cout * ho * wo * cin * k * k) as f64
}

fn model_config(width: usize) -> ModelConfig {
    ModelConfig {
        in_ch: IN_CH,
        width,
        d: FUSE_D,
        emb: EMB,
        classes: CLASSES,
        small_stem: ModelConfig::small_stem_for(IMG),
        fusion: true,
    }
}

/// Forward and backward (input and weight gradients) of one same-padded convolution.
#[allow(clippy::too_many_arguments)]
fn bench_conv(
    grp: &mut BenchmarkGroup<'_, WallTime>,
    be: &dyn Backend,
    g: &mut Gen,
    name: &str,
    cin: usize,
    cout: usize,
    k: usize,
    side: usize,
) {
    let p = ConvParams {
        stride: 1,
        padding: k / 2,
    };
    let x = rand_t(be, g, &[BATCH, cin, side, side], 1.0);
    let w = rand_t(
        be,
        g,
        &[cout, cin, k, k],
        (1.0 / (cin * k * k) as f32).sqrt(),
    );
    let gy = rand_t(be, g, &[BATCH, cout, side, side], 1.0);
    let fl = conv_flops(BATCH, cin, cout, k, side, side);
    bench(grp, be, &format!("{name}_fwd"), flops(fl), || {
        be.conv2d_fwd(&x, &w, None, p).expect("conv2d_fwd")
    });
    bench(grp, be, &format!("{name}_bwd"), flops(2.0 * fl), || {
        be.conv2d_bwd(&x, &w, &gy, p, true, false)
            .expect("conv2d_bwd")
    });
}

/// Ops whose shapes depend on the model width.
fn bench_width(c: &mut Criterion, dev: &str, be: &dyn Backend, width: usize) {
    let mut grp = c.benchmark_group(format!("{dev}/w{width}"));
    let mut g = Gen(width as u64);
    let w = width;

    // Convolutions: layer1 3×3 w→w at 28×28, layer3 3×3 4w→4w at 7×7, fusion 1×1 w→d at 28×28.
    bench_conv(&mut grp, be, &mut g, "conv3x3_l1", w, w, 3, IMG);
    bench_conv(&mut grp, be, &mut g, "conv3x3_l3", 4 * w, 4 * w, 3, L3);
    bench_conv(&mut grp, be, &mut g, "conv1x1_fuse_p", w, FUSE_D, 1, IMG);

    // Batch norm (train) and ReLU on the layer1 map.
    let shape = [BATCH, w, IMG, IMG];
    let n = numel(&shape);
    let x = rand_t(be, &mut g, &shape, 1.0);
    let gy = rand_t(be, &mut g, &shape, 1.0);
    let gamma = rand_t(be, &mut g, &[w], 1.0);
    let beta = rand_t(be, &mut g, &[w], 0.1);
    // fwd reads x, writes y; bwd reads x and gy, writes gx.
    bench(
        &mut grp,
        be,
        "batch_norm_train_fwd_bwd_l1",
        bytes_f32(5 * n),
        || {
            let o = be
                .batch_norm_train_fwd(&x, &gamma, &beta, 1e-5)
                .expect("batch_norm_train_fwd");
            let grads = be
                .batch_norm_train_bwd(&x, &gamma, &o.mean, &o.invstd, &gy)
                .expect("batch_norm_train_bwd");
            (o, grads)
        },
    );
    bench(&mut grp, be, "relu_fwd_l1", bytes_f32(2 * n), || {
        be.relu_fwd(&x).expect("relu_fwd")
    });
    let y = be.relu_fwd(&x).expect("relu_fwd");
    bench(&mut grp, be, "relu_bwd_l1", bytes_f32(3 * n), || {
        be.relu_bwd(&y, &gy).expect("relu_bwd")
    });

    // Adam over every trainable parameter of the model, as one flat buffer.
    let nparams = MedFuseNet::new(model_config(width), 0).store.num_params();
    let mut param = rand_t(be, &mut g, &[nparams], 0.1);
    let grad = rand_t(be, &mut g, &[nparams], 0.01);
    let mut m = be.full(&[nparams], 0.0).expect("full");
    let mut v = be.full(&[nparams], 0.0).expect("full");
    let hp = AdamParams::pytorch(1e-3, 5e-4, 10);
    // Reads p, g, m, v; writes p, m, v.
    bench(
        &mut grp,
        be,
        &format!("adam_step_{:.2}M", nparams as f64 / 1e6),
        bytes_f32(7 * nparams),
        || {
            be.adam_step(&mut param, &grad, &mut m, &mut v, hp)
                .expect("adam_step")
        },
    );
    grp.finish();
}

/// Ops whose shapes do not depend on the model width (fusion dimension, embedding, queue).
fn bench_shared(c: &mut Criterion, dev: &str, be: &dyn Backend) {
    let mut grp = c.benchmark_group(format!("{dev}/shared"));
    let mut g = Gen(7);

    // Projection head layer: [36,128] · [128,128]ᵀ + b.
    let x = rand_t(be, &mut g, &[BATCH, FUSE_D], 1.0);
    let w = rand_t(be, &mut g, &[FUSE_D, FUSE_D], 0.1);
    let b = rand_t(be, &mut g, &[FUSE_D], 0.1);
    bench(
        &mut grp,
        be,
        "linear_fwd_36x128x128",
        flops(2.0 * (BATCH * FUSE_D * FUSE_D) as f64),
        || be.linear_fwd(&x, &w, Some(&b)).expect("linear_fwd"),
    );

    // PGC logits as a plain GEMM: queries [36,128] · keysᵀ [128, 4132].
    let nk = QUEUE + BATCH;
    let q = rand_unit_rows(be, &mut g, BATCH, EMB);
    let keys = rand_unit_rows(be, &mut g, nk, EMB);
    let pgc_fl = 2.0 * (BATCH * nk * EMB) as f64;
    bench(
        &mut grp,
        be,
        &format!("matmul_nt_{BATCH}x{EMB}x{nk}"),
        flops(pgc_fl),
        || be.matmul(&q, &keys, false, true).expect("matmul"),
    );

    // Similarity fusion: low = layer1 [36,128,28,28], high = layer4 [36,128,4,4].
    let np = IMG * IMG;
    let nq = L4 * L4;
    let low = rand_t(be, &mut g, &[BATCH, FUSE_D, IMG, IMG], 1.0);
    let high = rand_t(be, &mut g, &[BATCH, FUSE_D, L4, L4], 1.0);
    let gyf = rand_t(be, &mut g, &[BATCH, FUSE_D, L4, L4], 1.0);
    let unit = (BATCH * FUSE_D * np * nq) as f64;
    let (_, st) = be
        .similarity_fusion_fwd(&low, &high)
        .expect("similarity_fusion_fwd");
    // fwd: S logits (2) + P̂·S (2); bwd (from the forward's S): gS (2), gP̂ (4), gQ̂ (2).
    bench(
        &mut grp,
        be,
        "similarity_fusion_fwd",
        flops(4.0 * unit),
        || {
            be.similarity_fusion_fwd(&low, &high)
                .expect("similarity_fusion_fwd")
        },
    );
    bench(
        &mut grp,
        be,
        "similarity_fusion_bwd",
        flops(8.0 * unit),
        || {
            be.similarity_fusion_bwd(&low, &high, &st, &gyf)
                .expect("similarity_fusion_bwd")
        },
    );

    // PGC loss: 36 queries against the 4096-key queue plus the batch, dim 128.
    let ql = label_tensor(be, &labels(BATCH, 0)).expect("labels");
    let kl = label_tensor(be, &labels(nk, 3)).expect("labels");
    let qw = rand_weights(be, &mut g, BATCH);
    let kw = rand_weights(be, &mut g, nk);
    let g1 = be.full(&[1], 1.0).expect("full");
    bench(&mut grp, be, "pgc_loss_fwd", flops(pgc_fl), || {
        be.pgc_loss_fwd(&q, &ql, &qw, &keys, &kl, &kw, TAU)
            .expect("pgc_loss_fwd")
    });
    // Logits again (2) + gq = P·keys (2).
    bench(&mut grp, be, "pgc_loss_bwd", flops(2.0 * pgc_fl), || {
        be.pgc_loss_bwd(&q, &ql, &qw, &keys, &kl, &kw, TAU, &g1)
            .expect("pgc_loss_bwd")
    });
    grp.finish();
}

fn bench_backend(c: &mut Criterion, dev: &str, be: &dyn Backend) {
    for w in WIDTHS {
        bench_width(c, dev, be, w);
    }
    bench_shared(c, dev, be);
}

fn cpu(c: &mut Criterion) {
    bench_backend(c, "cpu", backend::cpu::CpuBackend::get());
}

fn cuda(c: &mut Criterion) {
    match backend::get(Device::Cuda(0)) {
        Ok(be) => bench_backend(c, "cuda", be),
        Err(e) => println!("cuda: SKIPPED (no CUDA device): {e}"),
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
}

criterion_group! {
    name = benches;
    config = config();
    targets = cpu, cuda
}
criterion_main!(benches);
