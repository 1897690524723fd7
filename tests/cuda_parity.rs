//! Every CUDA op against the CPU reference on random shapes (odd sizes, batch 1).
//!
//! Pass rule per element: `|gpu − cpu| ≤ abs + rel·|cpu|`, tolerances stated per op below.
//! Without a CUDA device each test prints `SKIPPED (no CUDA device)` and returns. With
//! `MEDSSL_CUDA_EMULATE=1` they run on the CPU emulation of the device (the same kernel source
//! compiled for the host; cuBLAS and cuDNN replaced by a CPU GEMM and the im2col path), which
//! is how CI checks every kernel; on a GPU node, leave the variable unset.
//! `MEDSSL_CUDA_CONV=im2col` runs the convolution tests on the im2col + cuBLAS fallback.
#![cfg(feature = "cuda")]

use medssl::backend::cpu::CpuBackend;
use medssl::backend::cuda::{self as cu, CudaBackend};
use medssl::backend::{
    label_tensor, AdamParams, Backend, BnAct, ConvParams, DsrFactors, OptSlot, PoolParams,
    SgdParams,
};
use medssl::Tensor;

// ---- harness ----

fn gpu() -> Option<&'static dyn Backend> {
    if !cu::is_available() {
        println!("SKIPPED (no CUDA device)");
        return None;
    }
    match CudaBackend::get(0) {
        Ok(b) => {
            if cu::is_emulated() {
                println!("running on the CPU emulation of the CUDA device (MEDSSL_CUDA_EMULATE=1)");
            }
            Some(b)
        }
        Err(e) => panic!("a CUDA device is visible but the backend failed to start: {e}"),
    }
}

/// `batch_norm_train_fwd_running` (momentum 0.1, eps 1e-5) on copies of `rm` and `rv`: the output
/// and the updated running statistics (the originals stay as they are).
fn bn_running(
    b: &dyn Backend,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    rm: &Tensor,
    rv: &Tensor,
    act: BnAct<'_>,
) -> (medssl::backend::BnTrainOut, Tensor, Tensor) {
    let copy = |t: &Tensor| b.from_host(&t.to_vec().unwrap(), t.shape()).unwrap();
    let (mut m, mut v) = (copy(rm), copy(rv));
    let o = b
        .batch_norm_train_fwd_running(x, gamma, beta, 1e-5, &mut m, &mut v, 0.1, act)
        .unwrap();
    (o, m, v)
}

fn cpu() -> &'static dyn Backend {
    CpuBackend::get()
}

/// xorshift64*: deterministic inputs without depending on the crate's RNG.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn uni(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uni() * scale).collect()
    }
    fn pos(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| 0.05 + 0.95 * (self.uni() * 0.5 + 0.5))
            .collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn labels(&mut self, len: usize, classes: usize) -> Vec<usize> {
        (0..len).map(|_| self.below(classes)).collect()
    }
}

/// The same host data on both backends.
fn pair(g: &dyn Backend, v: &[f32], shape: &[usize]) -> (Tensor, Tensor) {
    (
        cpu().from_host(v, shape).unwrap(),
        g.from_host(v, shape).unwrap(),
    )
}

fn rand_pair(g: &dyn Backend, rng: &mut Rng, shape: &[usize], scale: f32) -> (Tensor, Tensor) {
    let n = shape.iter().product();
    pair(g, &rng.vec(n, scale), shape)
}

fn scalar_pair(g: &dyn Backend, v: f32) -> (Tensor, Tensor) {
    pair(g, &[v], &[1])
}

#[track_caller]
fn close(what: &str, gpu_t: &Tensor, cpu_t: &Tensor, rel: f32, abs: f32) {
    assert_eq!(gpu_t.shape(), cpu_t.shape(), "{what}: shapes differ");
    assert!(
        matches!(gpu_t.device(), medssl::Device::Cuda(_)),
        "{what}: result not on the GPU"
    );
    let got = gpu_t.to_vec().unwrap();
    let want = cpu_t.to_vec().unwrap();
    let mut worst = (0usize, 0.0f32);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let err = (g - w).abs();
        let ok = err <= abs + rel * w.abs() || (g.is_nan() && w.is_nan()) || g == w;
        if !ok {
            panic!(
                "{what}: element {i} of {:?}: gpu {g} vs cpu {w} (|diff| {err} > {abs} + {rel}·|cpu|)",
                cpu_t.shape()
            );
        }
        if err > worst.1 {
            worst = (i, err);
        }
    }
    println!(
        "{what}: {:?} ok, max |diff| {:.3e} at {}",
        cpu_t.shape(),
        worst.1,
        worst.0
    );
}

// ---- start-up ----

#[test]
fn startup_errors_are_errors_not_panics() {
    // Runs everywhere: without a device the backend must refuse cleanly; with one, an ordinal
    // past the last device must.
    if cu::is_available() {
        let n = cu::device_count().unwrap();
        assert!(CudaBackend::get(n).is_err(), "cuda:{n} does not exist");
        let cb = CudaBackend::get_concrete(0).unwrap();
        println!(
            "cuda:0 = {}, conv engine {}",
            cb.device_name(),
            cb.conv_engine()
        );
    } else {
        let e = CudaBackend::get(0)
            .err()
            .expect("no device: get(0) must fail");
        println!("no device: {e}");
        assert!(medssl::backend::get(medssl::Device::Cuda(0)).is_err());
    }
}

// ---- memory ----

#[test]
fn memory_roundtrip_and_fill() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(1);
    for shape in [
        vec![1],
        vec![7, 13],
        vec![3, 5, 7, 9],
        vec![0, 4],
        vec![100_003],
    ] {
        let n: usize = shape.iter().product();
        let v = rng.vec(n, 3.0);
        let t = g.from_host(&v, &shape).unwrap();
        assert_eq!(t.to_vec().unwrap(), v, "roundtrip {shape:?}");
        let back = t.to_device(medssl::Device::Cpu).unwrap();
        assert_eq!(back.to_vec().unwrap(), v);
        for value in [0.0f32, -2.5, 1e-3] {
            let f = g.full(&shape, value).unwrap();
            assert!(
                f.to_vec().unwrap().iter().all(|&x| x == value),
                "full {value}"
            );
        }
    }
    // A CPU tensor handed to the CUDA backend is an error, not a crash.
    let c = cpu().from_host(&[1.0, 2.0], &[2]).unwrap();
    assert!(g.relu_fwd(&c).is_err());
}

/// The driver's device-to-device copy (the bandwidth peak of `medssl-bench ops`) copies exactly.
#[test]
fn device_to_device_copy() {
    let Some(g) = gpu() else { return };
    let cb = cu::CudaBackend::get_concrete(0).unwrap();
    let mut rng = Rng::new(23);
    for shape in [vec![1], vec![3, 5, 7], vec![1 << 16]] {
        let n: usize = shape.iter().product();
        let v = rng.vec(n, 3.0);
        let x = g.from_host(&v, &shape).unwrap();
        let y = cb.copy_tensor(&x).unwrap();
        assert_eq!(y.shape(), &shape[..]);
        assert_eq!(y.to_vec().unwrap(), v, "{shape:?}");
    }
}

/// The read-bandwidth probes of `medssl-bench ops --op read_reference` read every element once:
/// their per-block partial sums add up to the CPU's sum (one float per load, and one float4 per
/// load where the length is a multiple of 4; odd lengths and lengths below one round of four
/// loads per thread included); the float4 probe refuses a length it does not fit.
#[test]
fn read_probes_read_every_element() {
    let Some(g) = gpu() else { return };
    let cb = cu::CudaBackend::get_concrete(0).unwrap();
    let mut rng = Rng::new(29);
    for n in [1usize, 3, 4, 1000, 4099, 1 << 16, 300_004] {
        let v = rng.vec(n, 1.0);
        let want: f64 = v.iter().map(|&a| f64::from(a)).sum();
        let abs: f64 = v.iter().map(|&a| f64::from(a.abs())).sum();
        let x = g.from_host(&v, &[n]).unwrap();
        for wide in [false, true] {
            if wide && n % 4 != 0 {
                let e = cb.read_probe(&x, true).unwrap_err().to_string();
                assert!(e.contains("multiple of 4"), "{n}: {e}");
                continue;
            }
            let got: f64 = cb
                .read_probe(&x, wide)
                .unwrap()
                .to_vec()
                .unwrap()
                .iter()
                .map(|&a| f64::from(a))
                .sum();
            assert!(
                (got - want).abs() <= 1e-5 * abs + 1e-6,
                "{n} (float4 {wide}): {got} vs {want}"
            );
        }
    }
}

#[test]
fn caching_allocator_reuses_buffers() {
    let Some(g) = gpu() else { return };
    let cb = CudaBackend::get_concrete(0).unwrap();
    let mut rng = Rng::new(2);
    let (_, x) = rand_pair(g, &mut rng, &[41, 139], 1.0);
    // Each step requests exactly these pooled buffers: the outputs of relu_fwd [41, 139],
    // softmax_fwd [41, 139], sum_rows [139] and matmul [139, 139] (cuBLAS needs no scratch from
    // the pool). All of them are dropped by the end of the step. The sizes are used by no other
    // test: the free lists are shared by all threads, so a test running in parallel that asks
    // for a buffer of the same size could take one of ours and force a fresh allocation here.
    const BUFFERS_PER_STEP: usize = 4;
    const STEPS: usize = 20;
    let step = || {
        let y = g.relu_fwd(&x).unwrap();
        let z = g.softmax_fwd(&y).unwrap();
        let s = g.sum_rows(&z, 139).unwrap();
        let _ = g.matmul(&z, &y, true, false).unwrap();
        s
    };
    // Warm-up: the first step fills the free lists, the next ones must already hit them.
    // A test on another thread that begins a step graph frees every cached buffer
    // (`Pool::trim`); a measurement during which that happened is taken again.
    let mut tries = 0;
    let (new_allocs, new_reuses) = loop {
        let trims = cb.pool_trims();
        for _ in 0..3 {
            step();
        }
        g.synchronize().unwrap();
        // Per-thread counters: exact even while other tests use the device from other threads.
        let (allocs, reuses) = cb.thread_alloc_stats();
        for _ in 0..STEPS {
            step();
        }
        g.synchronize().unwrap();
        let (allocs2, reuses2) = cb.thread_alloc_stats();
        println!(
            "steady state: {STEPS} steps, {} new device allocations, {} cache reuses (this \
             thread: allocs {allocs} -> {allocs2}, reuses {reuses} -> {reuses2}; process: {:?})",
            allocs2 - allocs,
            reuses2 - reuses,
            cb.alloc_stats()
        );
        tries += 1;
        if cb.pool_trims() == trims || tries == 10 {
            break (allocs2 - allocs, reuses2 - reuses);
        }
        println!("another thread freed the cached buffers meanwhile: measuring again");
    };
    assert_eq!(
        new_allocs, 0,
        "the steady-state loop called cuMemAlloc {new_allocs} times"
    );
    assert_eq!(
        new_reuses,
        STEPS * BUFFERS_PER_STEP,
        "every buffer of the steady-state loop ({BUFFERS_PER_STEP} per step) must come from \
         the cache"
    );
    println!(
        "conv engine: {}, device {}",
        cb.conv_engine(),
        cb.device_name()
    );
}

// ---- elementwise (tol: exact up to 1 ulp-ish: rel 1e-6, abs 1e-7) ----

#[test]
fn elementwise_ops() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(3);
    for shape in [vec![1], vec![7, 13], vec![3, 5, 7, 9], vec![100_003]] {
        let (xc, xg) = rand_pair(g, &mut rng, &shape, 2.0);
        let (yc, yg) = rand_pair(g, &mut rng, &shape, 2.0);
        let (r, a) = (1e-6, 1e-7);
        close(
            "axpby",
            &g.axpby(0.3, &xg, -1.7, &yg).unwrap(),
            &cpu().axpby(0.3, &xc, -1.7, &yc).unwrap(),
            r,
            a,
        );
        close(
            "scale",
            &g.scale(&xg, -0.37).unwrap(),
            &cpu().scale(&xc, -0.37).unwrap(),
            r,
            a,
        );
        close(
            "mul",
            &g.mul(&xg, &yg).unwrap(),
            &cpu().mul(&xc, &yc).unwrap(),
            r,
            a,
        );
        let (rc, rg) = (cpu().relu_fwd(&xc).unwrap(), g.relu_fwd(&xg).unwrap());
        close("relu_fwd", &rg, &rc, 0.0, 0.0);
        close(
            "add_relu_fwd",
            &g.add_relu_fwd(&xg, &yg).unwrap(),
            &cpu().add_relu_fwd(&xc, &yc).unwrap(),
            0.0,
            0.0,
        );
        close(
            "relu_bwd",
            &g.relu_bwd(&rg, &yg).unwrap(),
            &cpu().relu_bwd(&rc, &yc).unwrap(),
            0.0,
            0.0,
        );
        let (mut ac, mut ag) = rand_pair(g, &mut rng, &shape, 1.0);
        cpu().add_assign(&mut ac, &xc).unwrap();
        g.add_assign(&mut ag, &xg).unwrap();
        close("add_assign", &ag, &ac, r, a);
        let n = shape.iter().product::<usize>() as f32;
        close(
            "sum_all",
            &g.sum_all(&xg).unwrap(),
            &cpu().sum_all(&xc).unwrap(),
            1e-5,
            1e-6 * n.sqrt() * 4.0,
        );
    }
}

// ---- reductions (tol: rel 1e-5, abs 1e-5) ----

#[test]
fn reductions() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(4);
    for (rows, n) in [(1, 1), (37, 5), (3, 1000), (1000, 33), (12, 1)] {
        let (xc, xg) = rand_pair(g, &mut rng, &[rows, n], 1.0);
        close(
            "sum_rows",
            &g.sum_rows(&xg, n).unwrap(),
            &cpu().sum_rows(&xc, n).unwrap(),
            1e-5,
            1e-5,
        );
    }
    for shape in [[1, 1, 1, 1], [3, 5, 7, 9], [2, 64, 4, 4], [1, 3, 28, 28]] {
        let (xc, xg) = rand_pair(g, &mut rng, &shape, 1.0);
        close(
            "gap_fwd",
            &g.global_avg_pool_fwd(&xg).unwrap(),
            &cpu().global_avg_pool_fwd(&xc).unwrap(),
            1e-5,
            1e-6,
        );
        let (gc, gg) = rand_pair(g, &mut rng, &shape[..2], 1.0);
        close(
            "gap_bwd",
            &g.global_avg_pool_bwd(&gg, &shape).unwrap(),
            &cpu().global_avg_pool_bwd(&gc, &shape).unwrap(),
            1e-6,
            1e-7,
        );
    }
}

// ---- GEMM (tol: rel 1e-4, abs 1e-4·√k) ----

#[test]
fn matmul_and_linear() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(5);
    for (batch, m, k, n) in [
        (0, 1, 1, 1),
        (0, 17, 33, 9),
        (3, 7, 5, 11),
        (1, 1, 64, 1),
        (0, 128, 70, 129),
        // An empty inner dimension: zeros, also where the output buffer held NaN before.
        (0, 4, 0, 3),
        (2, 3, 0, 5),
    ] {
        for ta in [false, true] {
            for tb in [false, true] {
                let sa = if ta { [k, m] } else { [m, k] };
                let sb = if tb { [n, k] } else { [k, n] };
                let (sa, sb): (Vec<usize>, Vec<usize>) = if batch > 0 {
                    (
                        [&[batch][..], &sa[..]].concat(),
                        [&[batch][..], &sb[..]].concat(),
                    )
                } else {
                    (sa.to_vec(), sb.to_vec())
                };
                let (ac, ag) = rand_pair(g, &mut rng, &sa, 1.0);
                let (bc, bg) = rand_pair(g, &mut rng, &sb, 1.0);
                close(
                    &format!("matmul ta={ta} tb={tb}"),
                    &g.matmul(&ag, &bg, ta, tb).unwrap(),
                    &cpu().matmul(&ac, &bc, ta, tb).unwrap(),
                    1e-4,
                    1e-4 * (k as f32).sqrt(),
                );
            }
        }
    }
    for (nb, i, o) in [(1, 1, 1), (12, 128, 7), (37, 33, 129)] {
        let (xc, xg) = rand_pair(g, &mut rng, &[nb, i], 1.0);
        let (wc, wg) = rand_pair(g, &mut rng, &[o, i], 0.3);
        let (bc, bg) = rand_pair(g, &mut rng, &[o], 0.3);
        let tol = 1e-4 * (i as f32).sqrt();
        close(
            "linear+b",
            &g.linear_fwd(&xg, &wg, Some(&bg)).unwrap(),
            &cpu().linear_fwd(&xc, &wc, Some(&bc)).unwrap(),
            1e-4,
            tol,
        );
        close(
            "linear",
            &g.linear_fwd(&xg, &wg, None).unwrap(),
            &cpu().linear_fwd(&xc, &wc, None).unwrap(),
            1e-4,
            tol,
        );
    }
}

// ---- convolution (tol: rel 1e-3, abs 2e-3 — cuDNN may pick FFT/Winograd algorithms) ----

#[test]
fn conv2d_forward_backward() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(6);
    // (n, cin, h, w, cout, k, stride, pad)
    let cases = [
        (1, 3, 7, 9, 5, 3, 1, 1),
        (2, 4, 9, 9, 6, 3, 2, 1),
        (3, 3, 15, 13, 8, 7, 2, 3),
        (2, 5, 6, 6, 7, 1, 1, 0),
        (1, 1, 5, 5, 1, 5, 1, 0),
        (4, 16, 8, 8, 32, 1, 2, 0),
        (2, 64, 28, 28, 64, 3, 1, 1),
        // No input channels: the output is the bias, its gradient Σ gy.
        (2, 0, 5, 5, 3, 3, 1, 1),
    ];
    for (n, cin, h, w, cout, k, s, p) in cases {
        let prm = ConvParams {
            stride: s,
            padding: p,
        };
        let (xc, xg) = rand_pair(g, &mut rng, &[n, cin, h, w], 1.0);
        let (wc, wg) = rand_pair(
            g,
            &mut rng,
            &[cout, cin, k, k],
            1.0 / ((cin * k * k) as f32).sqrt(),
        );
        let (bc, bg) = rand_pair(g, &mut rng, &[cout], 0.5);
        let what = format!("conv {n}x{cin}x{h}x{w} -> {cout} k{k} s{s} p{p}");
        for bias in [false, true] {
            let yc = cpu()
                .conv2d_fwd(&xc, &wc, bias.then_some(&bc), prm)
                .unwrap();
            let yg = g.conv2d_fwd(&xg, &wg, bias.then_some(&bg), prm).unwrap();
            close(&format!("{what} fwd bias={bias}"), &yg, &yc, 1e-3, 2e-3);
            let (gc, gg) = rand_pair(g, &mut rng, yc.shape(), 1.0);
            for need_x in [true, false] {
                let rc = cpu().conv2d_bwd(&xc, &wc, &gc, prm, need_x, bias).unwrap();
                let rg = g.conv2d_bwd(&xg, &wg, &gg, prm, need_x, bias).unwrap();
                let gw_tol = 2e-3 * ((n * (h * w) / (s * s)) as f32).sqrt().max(1.0);
                close(&format!("{what} gw"), &rg.weight, &rc.weight, 1e-3, gw_tol);
                assert_eq!(rg.x.is_some(), need_x);
                assert_eq!(rg.bias.is_some(), bias);
                if let (Some(a), Some(b)) = (&rg.x, &rc.x) {
                    close(&format!("{what} gx"), a, b, 1e-3, 2e-3);
                }
                if let (Some(a), Some(b)) = (&rg.bias, &rc.bias) {
                    close(
                        &format!("{what} gb"),
                        a,
                        b,
                        1e-4,
                        1e-4 * (a.numel() as f32).sqrt() * 10.0,
                    );
                }
            }
        }
    }
}

// ---- batch norm (tol: rel 1e-4, abs 1e-4) ----

#[test]
fn batch_norm_train_and_eval() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(7);
    for shape in [
        [2, 3, 5, 7],
        [1, 4, 3, 3],
        [8, 16, 1, 1],
        [5, 1, 17, 3],
        [12, 64, 28, 28],
        // N·H·W = 70560: above the one-launch limit, so the two-launch kernels run.
        [40, 3, 42, 42],
        // Large enough that the elementwise kernels' four-per-thread loop runs, with a thread
        // stride (6912) that is no multiple of H·W (437) and whose quotient (15) is no multiple
        // of C: their channel walk crosses planes and wraps channels at every step.
        [9, 7, 23, 19],
    ] {
        let c = shape[1];
        let (xc, xg) = rand_pair(g, &mut rng, &shape, 2.0);
        let (gmc, gmg) = pair(g, &rng.pos(c), &[c]);
        let (btc, btg) = rand_pair(g, &mut rng, &[c], 0.5);
        let oc = cpu().batch_norm_train_fwd(&xc, &gmc, &btc, 1e-5).unwrap();
        let og = g.batch_norm_train_fwd(&xg, &gmg, &btg, 1e-5).unwrap();
        close("bn_train y", &og.y, &oc.y, 1e-4, 1e-4);
        close("bn_train mean", &og.mean, &oc.mean, 1e-4, 1e-5);
        close("bn_train invstd", &og.invstd, &oc.invstd, 1e-4, 1e-5);
        close(
            "bn_train var_unbiased",
            &og.var_unbiased,
            &oc.var_unbiased,
            1e-4,
            1e-5,
        );
        let (gyc, gyg) = rand_pair(g, &mut rng, &shape, 1.0);
        let rc = cpu()
            .batch_norm_train_bwd(&xc, &gmc, &oc.mean, &oc.invstd, &gyc)
            .unwrap();
        let rg = g
            .batch_norm_train_bwd(&xg, &gmg, &og.mean, &og.invstd, &gyg)
            .unwrap();
        let m = (shape[0] * shape[2] * shape[3]) as f32;
        close("bn_train gx", &rg.0, &rc.0, 1e-3, 1e-4);
        close("bn_train ggamma", &rg.1, &rc.1, 1e-4, 1e-5 * m.sqrt() * 4.0);
        close("bn_train gbeta", &rg.2, &rc.2, 1e-4, 1e-5 * m.sqrt() * 4.0);

        let (rmc, rmg) = rand_pair(g, &mut rng, &[c], 0.5);
        let (rvc, rvg) = pair(g, &rng.pos(c), &[c]);
        // The forward pass with the running-statistics update (fused into the statistics kernel
        // on CUDA): same outputs, and the updated running mean and variance.
        let (oc2, rmc2, rvc2) = bn_running(cpu(), &xc, &gmc, &btc, &rmc, &rvc, BnAct::None);
        let (og2, rmg2, rvg2) = bn_running(g, &xg, &gmg, &btg, &rmg, &rvg, BnAct::None);
        close("bn_train_running y", &og2.y, &oc2.y, 1e-4, 1e-4);
        close("bn_train_running y = bn_train y", &og2.y, &og.y, 0.0, 0.0);
        close("bn running_mean", &rmg2, &rmc2, 1e-4, 1e-5);
        close("bn running_var", &rvg2, &rvc2, 1e-4, 1e-5);
        // Running statistics whose storage is shared (here with rmg/rvg) cannot be updated in
        // place: they are replaced by new tensors, and the other holder keeps the old values.
        let (mut sm, mut sv) = (rmg.clone(), rvg.clone());
        g.batch_norm_train_fwd_running(&xg, &gmg, &btg, 1e-5, &mut sm, &mut sv, 0.1, BnAct::None)
            .unwrap();
        close("bn shared running_mean", &sm, &rmc2, 1e-4, 1e-5);
        close("bn shared running_var", &sv, &rvc2, 1e-4, 1e-5);
        close("bn shared running_mean kept", &rmg, &rmc, 0.0, 0.0);
        close("bn shared running_var kept", &rvg, &rvc, 0.0, 0.0);
        close(
            "bn_eval y",
            &g.batch_norm_eval_fwd(&xg, &gmg, &btg, &rmg, &rvg, 1e-5, BnAct::None)
                .unwrap(),
            &cpu()
                .batch_norm_eval_fwd(&xc, &gmc, &btc, &rmc, &rvc, 1e-5, BnAct::None)
                .unwrap(),
            1e-5,
            1e-5,
        );
        let rc = cpu()
            .batch_norm_eval_bwd(&xc, &gmc, &rmc, &rvc, 1e-5, &gyc)
            .unwrap();
        let rg = g
            .batch_norm_eval_bwd(&xg, &gmg, &rmg, &rvg, 1e-5, &gyg)
            .unwrap();
        close("bn_eval gx", &rg.0, &rc.0, 1e-5, 1e-5);
        close("bn_eval ggamma", &rg.1, &rc.1, 1e-4, 1e-5 * m.sqrt() * 4.0);
        close("bn_eval gbeta", &rg.2, &rc.2, 1e-4, 1e-5 * m.sqrt() * 4.0);
    }
}

// ---- batch norm with a fused activation (tol as batch norm; fused = unfused on CUDA exactly) ----

/// `bn → relu` and `relu(bn + r)` in one kernel, and the ReLU mask inside the batch-norm backward:
/// against the CPU reference (which runs them as separate ops), and bit for bit against the
/// unfused CUDA ops.
#[test]
fn batch_norm_fused_activation() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(17);
    // The last shape is above the one-launch limit (N·H·W = 70560): two launches per pass.
    for shape in [
        [2, 3, 5, 7],
        [1, 4, 3, 3],
        [8, 16, 1, 1],
        [12, 64, 14, 14],
        [40, 3, 42, 42],
    ] {
        let c = shape[1];
        let (xc, xg) = rand_pair(g, &mut rng, &shape, 2.0);
        let (gmc, gmg) = pair(g, &rng.pos(c), &[c]);
        let (btc, btg) = rand_pair(g, &mut rng, &[c], 0.5);
        let (rmc, rmg) = rand_pair(g, &mut rng, &[c], 0.5);
        let (rvc, rvg) = pair(g, &rng.pos(c), &[c]);
        let (rc, rg) = rand_pair(g, &mut rng, &shape, 1.0);
        let (gyc, gyg) = rand_pair(g, &mut rng, &shape, 1.0);
        let m = (shape[0] * shape[2] * shape[3]) as f32;
        let plain = bn_running(g, &xg, &gmg, &btg, &rmg, &rvg, BnAct::None);
        for (name, actc, actg) in [
            ("relu", BnAct::Relu, BnAct::Relu),
            ("add_relu", BnAct::AddRelu(&rc), BnAct::AddRelu(&rg)),
        ] {
            let (oc, rmc2, rvc2) = bn_running(cpu(), &xc, &gmc, &btc, &rmc, &rvc, actc);
            let (og, rmg2, rvg2) = bn_running(g, &xg, &gmg, &btg, &rmg, &rvg, actg);
            close(&format!("bn+{name} y"), &og.y, &oc.y, 1e-4, 1e-4);
            close(&format!("bn+{name} running_mean"), &rmg2, &rmc2, 1e-4, 1e-5);
            close(&format!("bn+{name} running_var"), &rvg2, &rvc2, 1e-4, 1e-5);
            let unfused = match actg {
                BnAct::AddRelu(r) => g.add_relu_fwd(&plain.0.y, r).unwrap(),
                _ => g.relu_fwd(&plain.0.y).unwrap(),
            };
            close(&format!("bn+{name} y = unfused"), &og.y, &unfused, 0.0, 0.0);
            // Eval mode: one launch, against the CPU (separate ops there) and bit for bit against
            // the unfused CUDA ops.
            let ec = cpu()
                .batch_norm_eval_fwd(&xc, &gmc, &btc, &rmc, &rvc, 1e-5, actc)
                .unwrap();
            let eg = g
                .batch_norm_eval_fwd(&xg, &gmg, &btg, &rmg, &rvg, 1e-5, actg)
                .unwrap();
            close(&format!("bn_eval+{name} y"), &eg, &ec, 1e-5, 1e-5);
            let eplain = g
                .batch_norm_eval_fwd(&xg, &gmg, &btg, &rmg, &rvg, 1e-5, BnAct::None)
                .unwrap();
            let eunfused = match actg {
                BnAct::AddRelu(r) => g.add_relu_fwd(&eplain, r).unwrap(),
                _ => g.relu_fwd(&eplain).unwrap(),
            };
            close(
                &format!("bn_eval+{name} y = unfused"),
                &eg,
                &eunfused,
                0.0,
                0.0,
            );
            let zeros = eg.to_vec().unwrap().iter().filter(|v| **v == 0.0).count();
            assert!(
                zeros > 0 && zeros < eg.numel(),
                "eval {name} {shape:?}: the ReLU should clip some outputs and pass others"
            );
            let zeros = og.y.to_vec().unwrap().iter().filter(|v| **v == 0.0).count();
            assert!(
                zeros > 0 && zeros < og.y.numel(),
                "{name} {shape:?}: the ReLU should clip some outputs and pass others ({zeros} zeros)"
            );
        }
        // The backward of relu(bn(x)) with the mask inside the batch-norm kernels.
        let (yc, yg) = {
            let yc = cpu().relu_fwd(&plain_cpu(&xc, &gmc, &btc)).unwrap();
            (yc, g.relu_fwd(&plain.0.y).unwrap())
        };
        let oc = cpu().batch_norm_train_fwd(&xc, &gmc, &btc, 1e-5).unwrap();
        let rc2 = cpu()
            .batch_norm_train_relu_bwd(&xc, &gmc, &oc.mean, &oc.invstd, &yc, &gyc, false)
            .unwrap();
        let rg2 = g
            .batch_norm_train_relu_bwd(&xg, &gmg, &plain.0.mean, &plain.0.invstd, &yg, &gyg, false)
            .unwrap();
        assert!(rc2.3.is_none() && rg2.3.is_none());
        // With the masked gradient kept (a residual join): same gradients, and the mask.
        let rg3 = g
            .batch_norm_train_relu_bwd(&xg, &gmg, &plain.0.mean, &plain.0.invstd, &yg, &gyg, true)
            .unwrap();
        close("bn+relu bwd (kept) gx", &rg3.0, &rg2.0, 0.0, 0.0);
        close("bn+relu bwd (kept) ggamma", &rg3.1, &rg2.1, 0.0, 0.0);
        close("bn+relu bwd (kept) gbeta", &rg3.2, &rg2.2, 0.0, 0.0);
        close("bn+relu bwd gx", &rg2.0, &rc2.0, 1e-3, 1e-4);
        close(
            "bn+relu bwd ggamma",
            &rg2.1,
            &rc2.1,
            1e-4,
            1e-5 * m.sqrt() * 4.0,
        );
        close(
            "bn+relu bwd gbeta",
            &rg2.2,
            &rc2.2,
            1e-4,
            1e-5 * m.sqrt() * 4.0,
        );
        let masked = g.relu_bwd(&yg, &gyg).unwrap();
        let unfused = g
            .batch_norm_train_bwd(&xg, &gmg, &plain.0.mean, &plain.0.invstd, &masked)
            .unwrap();
        close("bn+relu bwd gx = unfused", &rg2.0, &unfused.0, 0.0, 0.0);
        close("bn+relu bwd ggamma = unfused", &rg2.1, &unfused.1, 0.0, 0.0);
        close("bn+relu bwd gbeta = unfused", &rg2.2, &unfused.2, 0.0, 0.0);
        close(
            "bn+relu bwd masked = relu_bwd",
            rg3.3.as_ref().unwrap(),
            &masked,
            0.0,
            0.0,
        );
    }
}

/// Device work for a second host thread while `graph_steps_match_eager_steps` runs: a split
/// batch norm (arrival counters), a product (cuBLAS) and reads, repeated until `stop`; every
/// round's results must equal the first round's bit for bit. Returns the number of rounds.
fn other_thread_work(g: &dyn Backend, stop: &std::sync::atomic::AtomicBool) -> usize {
    let mut rng = Rng(99);
    let shape = [4, 3, 48, 48];
    let x = g.from_host(&rng.vec(numel(&shape), 1.0), &shape).unwrap();
    let (gamma, beta) = (
        g.from_host(&rng.pos(3), &[3]).unwrap(),
        g.from_host(&rng.vec(3, 0.5), &[3]).unwrap(),
    );
    let (a, b) = (
        g.from_host(&rng.vec(24 * 40, 1.0), &[24, 40]).unwrap(),
        g.from_host(&rng.vec(40 * 16, 1.0), &[40, 16]).unwrap(),
    );
    let round = || {
        let y = g.batch_norm_train_fwd(&x, &gamma, &beta, 1e-5).unwrap().y;
        let c = g.matmul(&a, &b, false, false).unwrap();
        (y.to_vec().unwrap(), c.to_vec().unwrap())
    };
    let first = round();
    let mut rounds = 1;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            round() == first,
            "round {rounds} of the other thread's work differs"
        );
        rounds += 1;
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    rounds
}

/// The inputs of one batch norm with every option: `x`, `gamma`, `beta`, running mean and
/// variance, the residual of a `relu(bn(x) + r)` join, and the output gradient.
struct BnCase {
    t: [Tensor; 7],
}

impl BnCase {
    /// Random inputs of `shape` on the CPU.
    fn random(rng: &mut Rng, shape: &[usize]) -> BnCase {
        let (n, c) = (numel(shape), shape[1]);
        let t = |v: Vec<f32>, s: &[usize]| Tensor::from_vec(v, s).unwrap();
        BnCase {
            t: [
                t(rng.vec(n, 2.0), shape),
                t(rng.pos(c), &[c]),
                t(rng.vec(c, 0.5), &[c]),
                t(rng.vec(c, 0.5), &[c]),
                t(rng.pos(c), &[c]),
                t(rng.vec(n, 1.0), shape),
                t(rng.vec(n, 1.0), shape),
            ],
        }
    }

    /// The same inputs on `b`'s device.
    fn on(&self, b: &dyn Backend) -> BnCase {
        BnCase {
            t: self
                .t
                .each_ref()
                .map(|x| b.from_host(&x.to_vec().unwrap(), x.shape()).unwrap()),
        }
    }

    /// [`BnCase::outputs`] and the y of the forward's other two epilogues (none, ReLU).
    fn all_outputs(&self, b: &dyn Backend) -> ([Tensor; 16], [Tensor; 2]) {
        let [x, gamma, beta, rm, rv, ..] = &self.t;
        let ys =
            [BnAct::None, BnAct::Relu].map(|act| bn_running(b, x, gamma, beta, rm, rv, act).0.y);
        (self.outputs(b), ys)
    }

    /// Every output, in order: y, mean, invstd, var_unbiased, new running mean and variance
    /// (forward with the running update and the add-ReLU epilogue); gx, gγ, gβ and the masked
    /// gradient of the backward through the ReLU; gx, gγ, gβ of the plain train-mode backward;
    /// gx, gγ, gβ of the eval-mode backward.
    fn outputs(&self, b: &dyn Backend) -> [Tensor; 16] {
        let [x, gamma, beta, rm, rv, r, gy] = &self.t;
        let (o, nrm, nrv) = bn_running(b, x, gamma, beta, rm, rv, BnAct::AddRelu(r));
        let k = b
            .batch_norm_train_relu_bwd(x, gamma, &o.mean, &o.invstd, &o.y, gy, true)
            .unwrap();
        let p = b
            .batch_norm_train_bwd(x, gamma, &o.mean, &o.invstd, gy)
            .unwrap();
        let e = b.batch_norm_eval_bwd(x, gamma, rm, rv, 1e-5, gy).unwrap();
        [
            o.y,
            o.mean,
            o.invstd,
            o.var_unbiased,
            nrm,
            nrv,
            k.0,
            k.1,
            k.2,
            k.3.unwrap(),
            p.0,
            p.1,
            p.2,
            e.0,
            e.1,
            e.2,
        ]
    }
}

/// Small channels run each batch-norm pass as one launch (`bn_train_fused`, `bn_bwd_fused`),
/// large ones as two; forcing the two-launch path on the same small shapes gives the same bits,
/// with its elementwise pass on the reduction's grid (`bn_apply_chunks`, `bn_dx_chunks`, walking
/// forwards or backwards) or over the flat tensor (`bn_apply`, `bn_train_dx`), with two-pass and
/// one-pass statistics. With 3 blocks per channel (other statistics bits) the two elementwise
/// passes agree too.
#[test]
fn batch_norm_one_launch_equals_two_launches() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(19);
    // [9, 7, 23, 19] and [7, 5, 13, 11]: the two-launch elementwise kernels' channel walk
    // (EW4_CH_LOOP) with strides that cross planes and wrap channels (see
    // batch_norm_train_and_eval), through both the loop and its tail.
    for shape in [
        [2, 3, 5, 7],
        [8, 16, 1, 1],
        [12, 64, 14, 14],
        [9, 7, 23, 19],
        [7, 5, 13, 11],
    ] {
        let case = BnCase::random(&mut rng, &shape).on(g);
        // (one-pass statistics, blocks per channel, elementwise pass on the reduction's grid)
        let run = |welford: bool, split: usize, chunks: bool| {
            let old = (
                cu::set_bn_welford(Some(welford)),
                cu::set_bn_split(Some(split)),
                cu::set_bn_apply_chunks(Some(chunks)),
            );
            let out = case.outputs(g).map(|t| t.to_vec().unwrap());
            cu::set_bn_welford(old.0);
            cu::set_bn_split(old.1);
            cu::set_bn_apply_chunks(old.2);
            out
        };
        let same = |a: &[Vec<f32>; 16], b: &[Vec<f32>; 16], what: &str| {
            for (i, (a, b)) in a.iter().zip(b).enumerate() {
                assert_eq!(a, b, "{shape:?}: output {i} differs: {what}");
            }
        };
        for welford in [false, true] {
            let one = run(welford, 1, true);
            let old = cu::set_bn_fused_max_m(0);
            let two = run(welford, 1, true);
            let flat = run(welford, 1, false);
            let split_chunks = run(welford, 3, true);
            let split_flat = run(welford, 3, false);
            cu::set_bn_fused_max_m(old);
            assert!(old >= 14 * 14 * 12, "default one-launch limit {old}");
            same(
                &one,
                &two,
                &format!("one and two launches, welford {welford}"),
            );
            same(
                &two,
                &flat,
                &format!("chunk and flat passes, welford {welford}"),
            );
            same(
                &split_chunks,
                &split_flat,
                &format!("chunk and flat passes, 3 blocks, welford {welford}"),
            );
        }
    }
}

/// Tolerances (name, relative, absolute) of [`BnCase::outputs`] against the CPU reference, for
/// channels of `m` elements (the gradient sums' absolute error grows with their length).
fn bn_tolerances(m: f32) -> [(&'static str, f32, f32); 16] {
    let sum_abs = 1e-5 * m.sqrt() * 4.0;
    [
        ("y", 1e-4, 1e-4),
        ("mean", 1e-4, 1e-5),
        ("invstd", 1e-4, 1e-5),
        ("var_unbiased", 1e-4, 1e-5),
        ("running_mean", 1e-4, 1e-5),
        ("running_var", 1e-4, 1e-5),
        ("relu gx", 1e-3, 1e-4),
        ("relu ggamma", 1e-4, sum_abs),
        ("relu gbeta", 1e-4, sum_abs),
        ("masked gy", 0.0, 0.0),
        ("gx", 1e-3, 1e-4),
        ("ggamma", 1e-4, sum_abs),
        ("gbeta", 1e-4, sum_abs),
        ("eval gx", 1e-5, 1e-5),
        ("eval ggamma", 1e-4, sum_abs),
        ("eval gbeta", 1e-4, sum_abs),
    ]
}

/// One-pass batch-norm statistics (`MEDSSL_CUDA_BN_STATS=welford`, set per thread here) on every
/// statistics kernel: `bn_train_fused` (small channels), `bn_stats` (one block per channel over
/// more than the one-launch limit) and `bn_stats_split` (2-7 blocks per channel), on odd shapes
/// and batch 1, and on data far from zero mean (mean 100, spread 1, where a sum-of-squares
/// formula would lose most digits of the variance): every output against the CPU reference at
/// the batch-norm tolerances, the same bits on a second call, and not the two-pass bits (the
/// switch takes effect).
#[test]
fn batch_norm_one_pass_statistics() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(29);
    let run = |welford: bool, blocks: usize, case: &BnCase| {
        let (old_w, old_s) = (
            cu::set_bn_welford(Some(welford)),
            cu::set_bn_split(Some(blocks)),
        );
        let out = case.outputs(g);
        cu::set_bn_welford(old_w);
        cu::set_bn_split(old_s);
        out
    };
    let mut differs = 0;
    for (shape, blocks, offset) in [
        ([2, 3, 5, 7], 1, 0.0),
        ([1, 4, 3, 3], 1, 0.0),
        ([8, 16, 1, 1], 1, 0.0),
        ([12, 64, 14, 14], 1, 100.0),
        ([2, 3, 200, 200], 1, 0.0),
        ([1, 2, 260, 260], 1, 100.0),
        ([3, 5, 11, 13], 7, 0.0),
        ([1, 2, 64, 80], 5, 100.0),
        ([4, 3, 9, 9], 2, 0.0),
    ] {
        let m = (shape[0] * shape[2] * shape[3]) as f32;
        let mut cpu_case = BnCase::random(&mut rng, &shape);
        if offset != 0.0 {
            let x = &cpu_case.t[0];
            let v: Vec<f32> = x
                .to_vec()
                .unwrap()
                .iter()
                .map(|v| v * 0.5 + offset)
                .collect();
            cpu_case.t[0] = Tensor::from_vec(v, &shape).unwrap();
        }
        let case = cpu_case.on(g);
        let want = cpu_case.outputs(cpu());
        let got = run(true, blocks, &case);
        for ((gt, ct), (name, rel, abs)) in got.iter().zip(&want).zip(bn_tolerances(m)) {
            close(
                &format!("bn one-pass {shape:?} blocks {blocks} offset {offset} {name}"),
                gt,
                ct,
                rel,
                abs,
            );
        }
        let bits = |o: [Tensor; 16]| o.map(|t| t.to_vec().unwrap());
        let got = bits(got);
        assert_eq!(
            got,
            bits(run(true, blocks, &case)),
            "{shape:?}: one-pass outputs differ between two calls"
        );
        differs += usize::from(got != bits(run(false, blocks, &case)));
    }
    assert!(
        differs > 0,
        "one-pass statistics gave the two-pass bits on every shape"
    );
}

/// The split batch-norm reductions (several blocks per channel, partial results combined by the
/// channel's last block): forced to 2-9 blocks per channel on odd shapes (chunks of unequal
/// length, chunks of one element, batch 1), against the CPU reference at the batch-norm
/// tolerances, the same bits on a second call, and the automatic choice where it splits on
/// this device. The setting is per thread, so other tests' ops are not affected.
#[test]
fn batch_norm_split_reductions() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(23);
    let sms = CudaBackend::get_concrete(0).unwrap().sm_count();
    let split = |n: usize, case: &BnCase| {
        let old = cu::set_bn_split(Some(n));
        let out = case.outputs(g);
        cu::set_bn_split(old);
        out
    };
    for (shape, forced) in [
        ([2, 3, 5, 7], 4),
        ([1, 4, 3, 3], 9),
        ([8, 16, 1, 1], 3),
        ([3, 5, 11, 13], 7),
        ([12, 64, 14, 14], 2),
        ([1, 2, 64, 80], 5),
    ] {
        let m = (shape[0] * shape[2] * shape[3]) as f32;
        let cpu_case = BnCase::random(&mut rng, &shape);
        let case = cpu_case.on(g);
        let want = cpu_case.outputs(cpu());
        let got = split(forced, &case);
        for ((gt, ct), (name, rel, abs)) in got.iter().zip(&want).zip(bn_tolerances(m)) {
            close(
                &format!("bn split {forced} {shape:?} {name}"),
                gt,
                ct,
                rel,
                abs,
            );
        }
        let again = split(forced, &case);
        for (i, (a, b)) in got.iter().zip(&again).enumerate() {
            assert_eq!(
                a.to_vec().unwrap(),
                b.to_vec().unwrap(),
                "{shape:?} split {forced}: output {i} differs between two calls"
            );
        }
    }
    // The automatic choice splits a few wide channels on this device (two channels: about
    // `sms` blocks each, at least 4096 elements per block) and gives what forcing that count
    // gives.
    let shape = [4, 2, 48, 48];
    let auto = sms.min(4 * 48 * 48 / 4096);
    assert!(
        auto > 1,
        "{sms} multiprocessors: expected a split of {shape:?}"
    );
    let cpu_case = BnCase::random(&mut rng, &shape);
    let case = cpu_case.on(g);
    let a = split(0, &case).map(|t| t.to_vec().unwrap());
    assert_eq!(a, split(auto, &case).map(|t| t.to_vec().unwrap()));
    let y = g.from_host(&a[0], &shape).unwrap();
    close(
        "bn auto split y",
        &y,
        &cpu_case.outputs(cpu())[0],
        1e-4,
        1e-4,
    );
    // One wave of blocks (MEDSSL_CUDA_BN_SPLIT=wave): the blocks the device runs at once over
    // the channels, rounded down (on the emulation 16 / 3 = 5 where the automatic choice takes
    // ceil(16 / 3) = 6), at least 4096 elements per block, and the bits of forcing that count.
    let shape = [6, 3, 64, 64];
    let m = 6 * 64 * 64;
    let resident = CudaBackend::get_concrete(0)
        .unwrap()
        .split_resident_blocks();
    assert!(
        resident >= sms,
        "{resident} resident blocks on {sms} multiprocessors"
    );
    let wave = (resident / 3).min(m / 4096).max(1);
    let cpu_case = BnCase::random(&mut rng, &shape);
    let case = cpu_case.on(g);
    let w = split(cu::BN_SPLIT_WAVE, &case).map(|t| t.to_vec().unwrap());
    assert_eq!(w, split(wave, &case).map(|t| t.to_vec().unwrap()));
    let want = cpu_case.outputs(cpu());
    for ((gt, ct), (name, rel, abs)) in w.iter().zip(&want).zip(bn_tolerances(m as f32)) {
        let gt = g.from_host(gt, ct.shape()).unwrap();
        close(&format!("bn wave split {name}"), &gt, ct, rel, abs);
    }
}

/// Launches of kernel `name` so far by the calling thread (the tests run side by side, several
/// of them launching the same batch-norm kernels).
fn launches_of(name: &str) -> u64 {
    CudaBackend::launch_counts_here()
        .iter()
        .find(|(k, _)| *k == name)
        .map_or(0, |(_, n)| *n)
}

/// The batch-norm switches a test sets on its thread around some calls (see [`with_bn`]).
#[derive(Clone, Copy)]
struct BnSet {
    /// Resident forward, resident backward.
    resident: (bool, bool),
    /// Blocks per channel of the split kernels.
    split: usize,
    /// Elements a resident block keeps at most (`None`: as much as fits).
    keep: Option<usize>,
    /// The float4 kernels on or off (`None`: left as set).
    vec: Option<bool>,
    /// Loads in flight per thread (`None`: left as set).
    inflight: Option<usize>,
    /// The pipelined float4 kernels (`MEDSSL_CUDA_BN_PIPE`) on or off.
    pipe: bool,
}

/// `f` with `set`, one-pass statistics and no one-launch batch norms on the calling thread, each
/// switch back as it was afterwards.
fn with_bn<T>(set: BnSet, f: impl FnOnce() -> T) -> T {
    let old = (
        (
            cu::set_bn_resident(Some(set.resident.0)),
            cu::set_bn_resident_bwd(Some(set.resident.1)),
        ),
        cu::set_bn_split(Some(set.split)),
        cu::set_bn_welford(Some(true)),
        cu::set_bn_fused_max_m(0),
        cu::set_bn_resident_keep(set.keep),
        set.vec.map(|v| cu::set_bn_vec(Some(v))),
        set.inflight.map(|n| cu::set_bn_inflight(Some(n))),
        cu::set_bn_pipe(Some(set.pipe)),
    );
    let out = f();
    cu::set_bn_resident(old.0 .0);
    cu::set_bn_resident_bwd(old.0 .1);
    cu::set_bn_split(old.1);
    cu::set_bn_welford(old.2);
    cu::set_bn_fused_max_m(old.3);
    cu::set_bn_resident_keep(old.4);
    if let Some(v) = old.5 {
        cu::set_bn_vec(v);
    }
    if let Some(n) = old.6 {
        cu::set_bn_inflight(n);
    }
    cu::set_bn_pipe(old.7);
    out
}

/// Every batch-norm output of a case ([`BnCase::all_outputs`]) on the host.
type BnOut = ([Vec<f32>; 16], [Vec<f32>; 2]);

/// [`BnCase::all_outputs`] on `g` under `set`, on the host.
fn bn_host_outputs(g: &dyn Backend, case: &BnCase, set: BnSet) -> BnOut {
    let (out, ys) = with_bn(set, || case.all_outputs(g));
    (
        out.map(|t| t.to_vec().unwrap()),
        ys.map(|t| t.to_vec().unwrap()),
    )
}

/// `f`'s result and the launches of each named kernel during it.
fn counted_launches<T>(names: &[&str], f: impl FnOnce() -> T) -> (T, Vec<u64>) {
    let before: Vec<u64> = names.iter().map(|k| launches_of(k)).collect();
    let out = f();
    let after = names.iter().map(|k| launches_of(k));
    (out, after.zip(before).map(|(a, b)| a - b).collect())
}

/// A random batch-norm case of `shape` on the device, with the CPU reference's outputs to check
/// the device's against.
struct BnChecked {
    shape: [usize; 4],
    case: BnCase,
    want: [Tensor; 16],
    want_ys: [Tensor; 2],
}

impl BnChecked {
    fn new(rng: &mut Rng, g: &dyn Backend, shape: [usize; 4]) -> BnChecked {
        let cpu_case = BnCase::random(rng, &shape);
        let want = cpu_case.outputs(cpu());
        let [x, gamma, beta, rm, rv, ..] = &cpu_case.t;
        let want_ys = [BnAct::None, BnAct::Relu]
            .map(|act| bn_running(cpu(), x, gamma, beta, rm, rv, act).0.y);
        BnChecked {
            shape,
            case: cpu_case.on(g),
            want,
            want_ys,
        }
    }

    /// Every output in `got` against the CPU's at the batch-norm tolerances (the y's at 1e-4).
    fn check(&self, g: &dyn Backend, what: &str, (got, ys): &BnOut) {
        let shape = self.shape;
        let tol = bn_tolerances((shape[0] * shape[2] * shape[3]) as f32);
        for ((gt, ct), (name, rel, abs)) in got.iter().zip(&self.want).zip(tol) {
            let gt = g.from_host(gt, ct.shape()).unwrap();
            close(&format!("{what} {shape:?} {name}"), &gt, ct, rel, abs);
        }
        for (y, want) in ys.iter().zip(&self.want_ys) {
            let y = g.from_host(y, want.shape()).unwrap();
            close(&format!("{what} {shape:?} y"), &y, want, 1e-4, 1e-4);
        }
    }
}

/// The one-launch resident batch-norm kernels (`MEDSSL_CUDA_BN_FWD=resident` /
/// `MEDSSL_CUDA_BN_BWD=resident`, set per thread here; `bn_fwd_resident`, `bn_bwd_resident`:
/// cooperative launches whose blocks wait for the other blocks of their channel): on odd shapes,
/// batch 1 and a channel count above what the emulated device holds at once (which must fall back
/// to two launches), with each block keeping all, part or none of its chunk in shared memory, and
/// chunks long enough for their eight-load groups. Every output against the CPU reference at the
/// batch-norm tolerances (forward with running statistics and each epilogue; backward plain and
/// through the fused ReLU with the masked gradient kept), and bit for bit the two-launch kernels
/// with as many blocks per channel; counted launches show which path ran.
#[test]
fn batch_norm_resident_kernels() {
    let Some(g) = gpu() else { return };
    let be = CudaBackend::get_concrete(0).unwrap();
    let mut rng = Rng::new(41);
    // Every output, with the forward (fwd) or backward (bwd) resident, `split` blocks per
    // channel for the two-launch kernels.
    let outputs = |case: &BnCase, resident: (bool, bool), split: usize, keep: Option<usize>| {
        let set = BnSet {
            resident,
            split,
            keep,
            vec: None,
            inflight: None,
            pipe: false,
        };
        bn_host_outputs(g, case, set)
    };
    let mut ran = [0; 2];
    for shape in [
        [2, 3, 5, 7],
        [1, 4, 3, 3],
        [3, 5, 11, 13],
        [9, 7, 23, 19],
        [1, 2, 64, 80],
        [4, 16, 9, 9],
        // 12-13 elements per thread: a group of eight loads, one of four, then single ones.
        [2, 2, 160, 160],
        [2, 300, 2, 3],
    ] {
        let (c, m) = (shape[1], shape[0] * shape[2] * shape[3]);
        let checked = BnChecked::new(&mut rng, g, shape);
        let case = &checked.case;
        // (kind, kernel, the switches, launches per output set: the forward with each of its
        // three epilogues; the backward through the ReLU and the plain one)
        for (kind, kernel, on, per_set, r) in [
            (cu::Resident::Fwd, "bn_fwd_resident", (true, false), 3, 0),
            (cu::Resident::Bwd, "bn_bwd_resident", (false, true), 2, 1),
        ] {
            let plan = be.bn_resident_split(kind, c, m);
            let s = plan.unwrap_or(1);
            let (got, n) = counted_launches(&[kernel], || outputs(case, on, s, None));
            match plan {
                Some(_) => assert_eq!(n, [per_set], "{shape:?}: {kernel} launches"),
                None => assert_eq!(n, [0], "{shape:?}: {c} channels cannot be resident"),
            }
            ran[r] += usize::from(plan.is_some());
            checked.check(g, &format!("{kernel} ({s} blocks per channel)"), &got);
            // The two-launch kernels with as many blocks per channel give the same bits, and so
            // does the resident one keeping none or an odd part of each chunk, or called again
            // (its arrival counters are back to zero).
            assert!(
                got == outputs(case, (false, false), s, None),
                "{shape:?}: {kernel} and the two-launch kernels differ ({s} blocks per channel)"
            );
            for keep in [Some(0), Some(37), None] {
                assert!(
                    got == outputs(case, on, s, keep),
                    "{shape:?}: {kernel} keeping {keep:?} differs"
                );
            }
            // The forward with 4, 8 (its own) and 16 loads in flight per thread
            // (MEDSSL_CUDA_BN_INFLIGHT), each with and without L2 eviction priorities
            // (MEDSSL_CUDA_BN_L2=hint), and the backward with and without them (its hinted
            // kernel is bn_bwd_resident_l2): their other kernels, the same bits.
            let variants: &[(usize, [&str; 2])] = match kind {
                cu::Resident::Fwd => &[
                    (4, ["bn_fwd_resident_g1"; 2]),
                    (8, ["bn_fwd_resident"; 2]),
                    (16, ["bn_fwd_resident_g4"; 2]),
                ],
                _ => &[(0, ["bn_bwd_resident", "bn_bwd_resident_l2"])],
            };
            for (&(inflight, names), hint) in
                variants.iter().flat_map(|v| [false, true].map(|h| (v, h)))
            {
                let variant = names[usize::from(hint)];
                let old = (
                    cu::set_bn_inflight(Some(inflight)),
                    cu::set_bn_l2_hint(Some(hint)),
                );
                let (out, n) = counted_launches(&[variant], || outputs(case, on, s, Some(37)));
                cu::set_bn_inflight(old.0);
                cu::set_bn_l2_hint(old.1);
                if plan.is_some() {
                    assert_eq!(n, [per_set], "{shape:?}: {variant} launches");
                }
                assert!(
                    got == out,
                    "{shape:?}: {variant} ({inflight} loads in flight, L2 hints {hint}) differs"
                );
            }
        }
    }
    assert!(
        ran.iter().all(|&n| n >= 7),
        "the resident kernels ran on only {ran:?} shapes"
    );
}

/// `MEDSSL_CUDA_BN_VEC=on` (set per thread here): the float4 batch-norm kernels (16-byte loads
/// and stores where a plane's H·W is a multiple of 4): the split path (`bn_stats_split4_*`,
/// `bn_apply_chunks4`, `bn_bwd_split4`, `bn_dx_chunks4`) and the resident one
/// (`bn_fwd_resident4_*`, `bn_bwd_resident4`) on shapes from one float4 per channel to chunks
/// of many groups with a remainder, batch 1, and more channels than the emulated device holds
/// resident at once. Every output against the CPU reference at the batch-norm tolerances; the
/// resident kernels bit for bit the split ones with as many blocks per channel, keeping all,
/// part or none of each chunk; 4, 8 and 16 elements in flight per thread the same bits; counted
/// launches show which kernels ran, and a plane whose H·W is not a multiple of 4 runs the
/// one-element kernels with their bits.
#[test]
fn batch_norm_float4_kernels() {
    let Some(g) = gpu() else { return };
    let be = CudaBackend::get_concrete(0).unwrap();
    let mut rng = Rng::new(43);
    // Every output with the float4 kernels on or off, the forward and backward resident or not,
    // `split` blocks per channel for the split kernels, `keep` elements kept per block and
    // `inflight` elements in flight per thread (0: each kernel's own).
    let outputs = |case: &BnCase,
                   vec: bool,
                   resident: (bool, bool),
                   split: usize,
                   keep: Option<usize>,
                   inflight: usize| {
        let set = BnSet {
            resident,
            split,
            keep,
            vec: Some(vec),
            inflight: Some(inflight),
            pipe: false,
        };
        bn_host_outputs(g, case, set)
    };
    // The blocks per channel a split path of `m` elements (`m4` units) runs for a setting of `s`.
    let norm = |m: usize, s: usize| m.div_ceil(m.div_ceil(s.clamp(1, m)));
    let split_names = [
        "bn_stats_split4_g1",
        "bn_apply_chunks4",
        "bn_bwd_split4",
        "bn_dx_chunks4",
    ];
    let (mut same_split, mut resident_ran) = (0, [0; 2]);
    for shape in [
        [2, 3, 4, 6],
        [1, 4, 2, 2],
        [3, 5, 8, 12],
        [9, 7, 20, 20],
        [1, 2, 64, 80],
        [4, 16, 12, 12],
        // 12-13 units per thread: a group of four, one of two, then single ones.
        [2, 2, 160, 160],
        [2, 300, 2, 2],
    ] {
        let (c, m) = (shape[1], shape[0] * shape[2] * shape[3]);
        let m4 = m / 4;
        let checked = BnChecked::new(&mut rng, g, shape);
        let case = &checked.case;
        let check = |what: &str, out: &BnOut| checked.check(g, what, out);
        // The split path, three blocks per channel: each float4 kernel per output set (the
        // forward thrice, the train-mode backward twice plus the eval-mode one).
        let (split, n) = counted_launches(&split_names, || {
            outputs(case, true, (false, false), 3, None, 0)
        });
        assert_eq!(n, [3, 3, 3, 2], "{shape:?}: float4 split launches");
        check("float4 split", &split);
        // 8 and 16 elements in flight: their kernels, the same bits.
        for (inflight, name) in [(8, "bn_stats_split4_g2"), (16, "bn_stats_split4_g4")] {
            let (out, n) = counted_launches(&[name], || {
                outputs(case, true, (false, false), 3, None, inflight)
            });
            assert_eq!(n, [3], "{shape:?}: {name} launches");
            assert!(out == split, "{shape:?}: {name} differs");
        }
        // The resident kernels, bit for bit the split ones with as many blocks per channel.
        for (kind, names, on, per_set, r) in [
            (
                cu::Resident::Fwd4V2,
                [
                    "bn_fwd_resident4_g2",
                    "bn_fwd_resident4_g1",
                    "bn_fwd_resident4_g4",
                ],
                (true, false),
                3,
                0,
            ),
            (
                cu::Resident::Bwd4V,
                ["bn_bwd_resident4"; 3],
                (false, true),
                2,
                1,
            ),
        ] {
            let plan = be.bn_resident_split(kind, c, m4);
            let s = plan.unwrap_or(1);
            let (got, n) = counted_launches(&names[..1], || outputs(case, true, on, s, None, 0));
            match plan {
                Some(_) => assert_eq!(n, [per_set], "{shape:?}: {} launches", names[0]),
                None => assert_eq!(n, [0], "{shape:?}: {c} channels cannot be resident"),
            }
            resident_ran[r] += usize::from(plan.is_some());
            check(names[0], &got);
            // (One block per channel takes bn_stats / bn_bwd_reduce, which have no float4 form.)
            if norm(m, s) > 1 && norm(m4, norm(m, s)) == s {
                same_split += 1;
                assert!(
                    got == outputs(case, true, (false, false), s, None, 0),
                    "{shape:?}: {} and the float4 split kernels differ ({s} blocks)",
                    names[0]
                );
            }
            for keep in [Some(0), Some(37), None] {
                assert!(
                    got == outputs(case, true, on, s, keep, 0),
                    "{shape:?}: {} keeping {keep:?} elements differs",
                    names[0]
                );
            }
            if plan.is_some() && kind == cu::Resident::Fwd4V2 {
                for (inflight, name) in [(4, names[1]), (16, names[2])] {
                    let (out, n) = counted_launches(&[name], || {
                        outputs(case, true, on, s, Some(37), inflight)
                    });
                    assert_eq!(n, [per_set], "{shape:?}: {name} launches");
                    assert!(out == got, "{shape:?}: {name} differs");
                }
            }
        }
    }
    assert!(
        resident_ran.iter().all(|&n| n >= 7) && same_split >= 10,
        "resident float4 kernels ran on {resident_ran:?} shapes, {same_split} compared with split"
    );
    // Planes of H·W not a multiple of 4: the one-element kernels, their bits.
    for shape in [[3, 5, 11, 13], [2, 3, 5, 7], [2, 4, 6, 3]] {
        let case = BnCase::random(&mut rng, &shape).on(g);
        let every: Vec<&str> = split_names
            .iter()
            .copied()
            .chain(["bn_fwd_resident4_g2", "bn_bwd_resident4"])
            .collect();
        for on in [(false, false), (true, true)] {
            let (got, n) = counted_launches(&every, || outputs(&case, true, on, 3, None, 0));
            assert!(
                n.iter().all(|&k| k == 0),
                "{shape:?}: float4 launches {n:?}"
            );
            assert!(
                got == outputs(&case, false, on, 3, None, 0),
                "{shape:?}: MEDSSL_CUDA_BN_VEC=on changed the one-element kernels' bits"
            );
        }
    }
}

/// `MEDSSL_CUDA_BN_PIPE=on` (set per thread here): the pipelined float4 batch norms
/// (`bn_fwd_pipe4`, `bn_bwd_pipe4`: one wave of blocks taking the channels' chunks in turn, each
/// block's next chunk copied into shared memory asynchronously while the current one's blocks
/// meet). Every output against the CPU reference at the batch-norm tolerances, and bit for bit
/// the float4 split kernels with as many chunks per channel, on shapes from one round of items
/// to many (chunks limited to a few units, so that each block takes item after item and reuses
/// both of its stages), with and without the fused ReLU's output copied beside x and the
/// gradient. The emulation lands each asynchronous copy only when its thread waits for it, so
/// a read of a stage before its wait reads NaN and fails here. Counted launches show which
/// kernels ran; a shape whose channel needs more chunks than the grid has blocks, or whose
/// planes are not whole float4s, runs the non-pipelined kernels with their bits.
#[test]
fn batch_norm_pipelined_kernels() {
    let Some(g) = gpu() else { return };
    let be = CudaBackend::get_concrete(0).unwrap();
    let mut rng = Rng::new(47);
    let outputs = |case: &BnCase, pipe: bool, split: usize, keep: Option<usize>| {
        let set = BnSet {
            resident: (false, false),
            split,
            keep,
            vec: Some(true),
            inflight: None,
            pipe,
        };
        bn_host_outputs(g, case, set)
    };
    // The pipelined plans (forward; backward without and with the ReLU's output) under `keep`.
    let plans = |c: usize, m4: usize, keep: Option<usize>| {
        let old = cu::set_bn_resident_keep(keep);
        let p = [
            (cu::Resident::FwdPipe4, 1),
            (cu::Resident::BwdPipe4, 2),
            (cu::Resident::BwdPipe4, 3),
        ]
        .map(|(kind, arrays)| be.bn_pipe_plan(kind, c, m4, arrays));
        cu::set_bn_resident_keep(old);
        p
    };
    let norm = |m: usize, s: usize| m.div_ceil(m.div_ceil(s.clamp(1, m)));
    let names = ["bn_fwd_pipe4", "bn_bwd_pipe4"];
    let (mut ran, mut rounds, mut same_split) = (0, 0, 0);
    for shape in [
        [2, 3, 4, 6],
        [1, 4, 2, 2],
        [3, 5, 8, 12],
        [9, 7, 20, 20],
        [4, 16, 12, 12],
        [2, 2, 160, 160],
        [2, 40, 4, 4],
    ] {
        let (c, m) = (shape[1], shape[0] * shape[2] * shape[3]);
        let m4 = m / 4;
        let checked = BnChecked::new(&mut rng, g, shape);
        let case = &checked.case;
        let check = |what: &str, out: &BnOut| checked.check(g, what, out);
        // As much shared memory as the emulated device allows, then chunks of 8 and of 2 units
        // (where the grid has blocks for them): items of a few units, many per block.
        for keep in [None, Some(32), Some(8)] {
            let p = plans(c, m4, keep);
            // The eval-mode backward's sums take the split path: as many blocks as the plan's
            // chunks, so that the whole set compares with the split kernels' below.
            let split = p[0].map_or(3, |f| f.s);
            let (got, n) = counted_launches(&names, || outputs(case, true, split, keep));
            // Forward thrice per output set (add-ReLU, plain, ReLU), backward twice (through the
            // ReLU, plain).
            let want_n = [
                3 * u64::from(p[0].is_some()),
                u64::from(p[1].is_some()) + u64::from(p[2].is_some()),
            ];
            assert_eq!(
                n, want_n,
                "{shape:?} keep {keep:?}: pipelined launches ({p:?})"
            );
            check(&format!("pipelined keep {keep:?}"), &got);
            let Some(f) = p[0] else { continue };
            ran += 1;
            let grid = f.cfg.grid_dim.0 as usize;
            assert!(
                f.s <= grid && f.keep * f.s >= m4 && f.keep * (f.s - 1) < m4,
                "{f:?}"
            );
            rounds += usize::from(c * f.s > grid);
            // Bit for bit the float4 split kernels with as many chunks (one chunk takes
            // bn_stats / bn_bwd_reduce, which have no float4 form); both backwards planned alike.
            if f.s > 1
                && norm(m4, norm(m, f.s)) == f.s
                && p[1..].iter().all(|b| b.is_some_and(|b| b.s == f.s))
            {
                same_split += 1;
                assert!(
                    got == outputs(case, false, f.s, keep),
                    "{shape:?} keep {keep:?}: pipelined and float4 split kernels differ ({} chunks)",
                    f.s
                );
            }
        }
    }
    // (13, 6 and 9 on the emulated device's 16 blocks; 18, 3 and 14 on an H100's 264.)
    assert!(
        ran >= 13 && rounds >= 3 && same_split >= 9,
        "pipelined kernels ran {ran} times, {rounds} over several rounds, {same_split} compared \
         with split"
    );
    // Planes of H·W not a multiple of 4: no float4 kernel, the one-element kernels' bits.
    for shape in [[3, 5, 11, 13], [2, 4, 6, 3]] {
        let case = BnCase::random(&mut rng, &shape).on(g);
        let (got, n) = counted_launches(&names, || outputs(&case, true, 3, None));
        assert_eq!(n, [0, 0], "{shape:?}: pipelined launches");
        assert!(
            got == outputs(&case, false, 3, None),
            "{shape:?}: MEDSSL_CUDA_BN_PIPE=on changed the one-element kernels' bits"
        );
    }
}

/// `MEDSSL_CUDA_BN_INFLIGHT` and `MEDSSL_CUDA_BN_L2` (set per thread here): the split statistics
/// kernel with 4, 8 and 16 loads in flight per thread, with and without L2 eviction priorities
/// (there and in the normalising pass after it, and in the backward's gradient sums and
/// input-gradient pass), gives the bits of its default (every thread
/// still merges its elements four at a time in the same order; the emulation has no caches, so
/// this checks the hinted paths' arithmetic, walks and argument lists), on shapes whose chunks
/// hold from under one group of loads to many with a remainder, and each named kernel runs (the
/// resident forward's variants: `batch_norm_resident_kernels`, which counts that kernel's
/// launches exactly).
#[test]
fn batch_norm_loads_in_flight_keep_the_bits() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(37);
    let run = |case: &BnCase, inflight: usize, l2: bool| {
        let old = (
            cu::set_bn_inflight(Some(inflight)),
            cu::set_bn_l2_hint(Some(l2)),
            cu::set_bn_resident(Some(false)),
            cu::set_bn_split(Some(3)),
            cu::set_bn_welford(Some(true)),
            cu::set_bn_fused_max_m(0),
        );
        let out = case.outputs(g);
        cu::set_bn_inflight(old.0);
        cu::set_bn_l2_hint(old.1);
        cu::set_bn_resident(old.2);
        cu::set_bn_split(old.3);
        cu::set_bn_welford(old.4);
        cu::set_bn_fused_max_m(old.5);
        out
    };
    for shape in [
        [2, 3, 5, 7],
        [3, 5, 11, 13],
        [1, 2, 64, 80],
        [9, 7, 23, 19],
        [2, 2, 160, 160],
    ] {
        let cpu_case = BnCase::random(&mut rng, &shape);
        let case = cpu_case.on(g);
        let want_cpu = cpu_case.outputs(cpu());
        let want = run(&case, 0, false);
        let m = (shape[0] * shape[2] * shape[3]) as f32;
        for ((gt, ct), (name, rel, abs)) in want.iter().zip(&want_cpu).zip(bn_tolerances(m)) {
            close(&format!("{shape:?} {name}"), gt, ct, rel, abs);
        }
        let bits = |o: [Tensor; 16]| o.map(|t| t.to_vec().unwrap());
        let want = bits(want);
        let kernels = ["bn_stats_split", "bn_stats_split_g2", "bn_stats_split_g4"];
        for (inflight, kernel) in [4, 8, 16].into_iter().zip(kernels) {
            for l2 in [false, true] {
                // The backward's input-gradient pass: its hinted kernel under the L2 hints.
                let dx = ["bn_dx_chunks", "bn_dx_chunks_l2"][usize::from(l2)];
                let before = (launches_of(kernel), launches_of(dx));
                let got = bits(run(&case, inflight, l2));
                assert!(
                    launches_of(kernel) > before.0,
                    "{shape:?}: {inflight} loads in flight did not launch {kernel}"
                );
                assert!(
                    launches_of(dx) > before.1,
                    "{shape:?}: L2 hints {l2} did not launch {dx}"
                );
                assert!(
                    got == want,
                    "{shape:?}: {kernel} ({inflight} loads in flight, L2 hints {l2}) changed the \
                     bits"
                );
            }
        }
    }
}

/// Every batch-norm kernel reads only its own channel: inputs whose neighbouring channels lie
/// 4 to 12 apart (channel c around 4·(c mod 4), spread ±1), so that a single element read from
/// another channel moves that channel's variance by far more than the tolerance. On shapes whose
/// walks (forward and backward over a channel, the elementwise channel walk) cross sample planes
/// mid-walk: one launch per pass, one block per channel over more than the one-launch limit, 3
/// blocks per channel; two-pass and one-pass statistics.
#[test]
fn batch_norm_reads_only_its_channel() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(31);
    for (shape, blocks) in [
        ([12, 64, 28, 28], 1),
        ([9, 7, 23, 19], 1),
        ([40, 3, 42, 42], 1),
        ([7, 5, 13, 11], 3),
        ([12, 64, 14, 14], 3),
    ] {
        let m = (shape[0] * shape[2] * shape[3]) as f32;
        let hw = shape[2] * shape[3];
        let mut cpu_case = BnCase::random(&mut rng, &shape);
        let x = cpu_case.t[0].to_vec().unwrap();
        let v: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(k, v)| v * 0.5 + 4.0 * ((k / hw % shape[1]) % 4) as f32)
            .collect();
        cpu_case.t[0] = Tensor::from_vec(v, &shape).unwrap();
        let case = cpu_case.on(g);
        let want = cpu_case.outputs(cpu());
        for welford in [false, true] {
            let old = (
                cu::set_bn_welford(Some(welford)),
                cu::set_bn_split(Some(blocks)),
            );
            let got = case.outputs(g);
            cu::set_bn_welford(old.0);
            cu::set_bn_split(old.1);
            for ((gt, ct), (name, rel, abs)) in got.iter().zip(&want).zip(bn_tolerances(m)) {
                close(
                    &format!(
                        "bn channels apart {shape:?} blocks {blocks} welford {welford} {name}"
                    ),
                    gt,
                    ct,
                    rel,
                    abs,
                );
            }
        }
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn plain_cpu(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Tensor {
    cpu().batch_norm_train_fwd(x, gamma, beta, 1e-5).unwrap().y
}

// ---- L2 normalise (tol: rel 1e-5, abs 1e-6; zero rows exercise the 1e-12 floor) ----

#[test]
fn l2_normalize() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(8);
    for shape in [vec![1, 1], vec![7, 128], vec![3, 33], vec![2, 3, 40]] {
        let n: usize = shape.iter().product();
        let mut v = rng.vec(n, 1.0);
        let d = *shape.last().unwrap();
        v[..d].iter_mut().for_each(|x| *x = 0.0); // a zero row
        let (xc, xg) = pair(g, &v, &shape);
        close(
            "l2n fwd",
            &g.l2_normalize_fwd(&xg).unwrap(),
            &cpu().l2_normalize_fwd(&xc).unwrap(),
            1e-5,
            1e-6,
        );
        let (gc, gg) = rand_pair(g, &mut rng, &shape, 1.0);
        close(
            "l2n bwd",
            &g.l2_normalize_bwd(&xg, &gg).unwrap(),
            &cpu().l2_normalize_bwd(&xc, &gc).unwrap(),
            1e-4,
            1e-5,
        );
    }
}

// ---- max pool (exact: tol 0; inputs quantised to force ties and test first-max routing) ----

#[test]
fn max_pool() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(9);
    let cases = [
        ([2, 3, 9, 9], 3, 2, 1),
        ([1, 1, 8, 7], 3, 2, 1),
        ([3, 2, 6, 5], 2, 2, 0),
        ([2, 4, 7, 7], 3, 1, 1),
        ([1, 64, 112, 112], 3, 2, 1),
    ];
    for (shape, k, s, p) in cases {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = rng
            .vec(n, 2.0)
            .iter()
            .map(|x| (x * 2.0).round() / 2.0)
            .collect();
        let (xc, xg) = pair(g, &v, &shape);
        let prm = PoolParams {
            kernel: k,
            stride: s,
            padding: p,
        };
        let yc = cpu().max_pool2d_fwd(&xc, prm).unwrap();
        close(
            "maxpool fwd",
            &g.max_pool2d_fwd(&xg, prm).unwrap(),
            &yc,
            0.0,
            0.0,
        );
        let (gc, gg) = rand_pair(g, &mut rng, yc.shape(), 1.0);
        close(
            "maxpool bwd",
            &g.max_pool2d_bwd(&xg, &gg, prm).unwrap(),
            &cpu().max_pool2d_bwd(&xc, &gc, prm).unwrap(),
            1e-6,
            1e-6,
        );
    }
}

// ---- softmax / log-softmax / cross-entropy (tol: rel 1e-5, abs 1e-6) ----

#[test]
fn softmax_family() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(10);
    for shape in [vec![1, 1], vec![5, 7], vec![3, 4, 33], vec![2, 1000]] {
        let (xc, xg) = rand_pair(g, &mut rng, &shape, 4.0);
        let (gc, gg) = rand_pair(g, &mut rng, &shape, 1.0);
        let (yc, yg) = (cpu().softmax_fwd(&xc).unwrap(), g.softmax_fwd(&xg).unwrap());
        close("softmax", &yg, &yc, 1e-5, 1e-6);
        close(
            "softmax bwd",
            &g.softmax_bwd(&yg, &gg).unwrap(),
            &cpu().softmax_bwd(&yc, &gc).unwrap(),
            1e-4,
            1e-6,
        );
        let (lc, lg) = (
            cpu().log_softmax_fwd(&xc).unwrap(),
            g.log_softmax_fwd(&xg).unwrap(),
        );
        close("log_softmax", &lg, &lc, 1e-5, 1e-5);
        close(
            "log_softmax bwd",
            &g.log_softmax_bwd(&lg, &gg).unwrap(),
            &cpu().log_softmax_bwd(&lc, &gc).unwrap(),
            1e-4,
            1e-5,
        );
    }
    for (b, c) in [(1, 2), (12, 7), (37, 100), (300, 3)] {
        let (zc, zg) = rand_pair(g, &mut rng, &[b, c], 3.0);
        let y = rng.labels(b, c);
        let (sc, sg) = scalar_pair(g, 0.7);
        close(
            "cross_entropy",
            &g.cross_entropy_fwd(&zg, &y).unwrap(),
            &cpu().cross_entropy_fwd(&zc, &y).unwrap(),
            1e-5,
            1e-6,
        );
        close(
            "cross_entropy bwd",
            &g.cross_entropy_bwd(&zg, &y, &sg).unwrap(),
            &cpu().cross_entropy_bwd(&zc, &y, &sc).unwrap(),
            1e-5,
            5e-7,
        );
        let mut bad = y.clone();
        bad[0] = c;
        assert!(
            g.cross_entropy_fwd(&zg, &bad).is_err(),
            "out-of-range label must be an error"
        );
    }
}

// ---- SSL losses (tol: rel 1e-4, abs 1e-5) ----

#[test]
fn entropy_weight_and_consistency() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(11);
    for (b, c) in [(1, 1), (1, 2), (36, 7), (5, 33)] {
        let (zc, zg) = rand_pair(g, &mut rng, &[b, c], 3.0);
        close(
            "entropy_weight",
            &g.entropy_weight(&zg).unwrap(),
            &cpu().entropy_weight(&zc).unwrap(),
            1e-4,
            1e-5,
        );
        let (tc, tg) = rand_pair(g, &mut rng, &[b, c], 3.0);
        let (wc, wg) = pair(g, &rng.pos(b), &[b]);
        close(
            "weighted_consistency",
            &g.weighted_consistency_fwd(&zg, &tg, &wg).unwrap(),
            &cpu().weighted_consistency_fwd(&zc, &tc, &wc).unwrap(),
            1e-4,
            1e-6,
        );
        let (sc, sg) = scalar_pair(g, 1.3);
        close(
            "weighted_consistency bwd",
            &g.weighted_consistency_bwd(&zg, &tg, &wg, &sg).unwrap(),
            &cpu().weighted_consistency_bwd(&zc, &tc, &wc, &sc).unwrap(),
            1e-4,
            1e-6,
        );
    }
}

#[test]
fn pgc_loss() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(12);
    for (b, nk, e, classes) in [
        (1, 1, 4, 2),
        (36, 36 + 100, 128, 7),
        (5, 257, 33, 3),
        (12, 4096, 128, 7),
    ] {
        let qc = cpu()
            .l2_normalize_fwd(&cpu().from_host(&rng.vec(b * e, 1.0), &[b, e]).unwrap())
            .unwrap();
        let kc = cpu()
            .l2_normalize_fwd(&cpu().from_host(&rng.vec(nk * e, 1.0), &[nk, e]).unwrap())
            .unwrap();
        let (qv, kv) = (qc.to_vec().unwrap(), kc.to_vec().unwrap());
        let (qc, qg) = pair(g, &qv, &[b, e]);
        let (kc, kg) = pair(g, &kv, &[nk, e]);
        let ql = rng.labels(b, classes + 1); // label `classes` may have no positive key
        let kl = rng.labels(nk, classes);
        let (qlc, qlg) = (
            label_tensor(cpu(), &ql).unwrap(),
            label_tensor(g, &ql).unwrap(),
        );
        let (klc, klg) = (
            label_tensor(cpu(), &kl).unwrap(),
            label_tensor(g, &kl).unwrap(),
        );
        let (qwc, qwg) = pair(g, &rng.pos(b), &[b]);
        let (kwc, kwg) = pair(g, &rng.pos(nk), &[nk]);
        let what = format!("pgc B={b} Nk={nk} E={e}");
        close(
            &what,
            &g.pgc_loss_fwd(&qg, &qlg, &qwg, &kg, &klg, &kwg, 0.1)
                .unwrap(),
            &cpu()
                .pgc_loss_fwd(&qc, &qlc, &qwc, &kc, &klc, &kwc, 0.1)
                .unwrap(),
            1e-4,
            1e-5,
        );
        let (sc, sg) = scalar_pair(g, 0.5);
        close(
            &format!("{what} bwd"),
            &g.pgc_loss_bwd(&qg, &qlg, &qwg, &kg, &klg, &kwg, 0.1, &sg)
                .unwrap(),
            &cpu()
                .pgc_loss_bwd(&qc, &qlc, &qwc, &kc, &klc, &kwc, 0.1, &sc)
                .unwrap(),
            1e-3,
            1e-5,
        );
    }
}

#[test]
fn dsr_alignment() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(13);
    for (bl, bu, d, c) in [(1, 1, 1, 2), (12, 36, 128, 7), (5, 3, 33, 2)] {
        let (flc, flg) = rand_pair(g, &mut rng, &[bl, d], 1.0);
        let (fuc, fug) = rand_pair(g, &mut rng, &[bu, d], 1.0);
        let (wc, wg) = rand_pair(g, &mut rng, &[c, d], 0.3);
        let (bc, bg) = rand_pair(g, &mut rng, &[c], 0.3);
        let (yl, yu) = (rng.labels(bl, c), rng.labels(bu, c));
        close(
            "dsr_alignment",
            &g.dsr_alignment(&flg, &yl, &fug, &label_tensor(g, &yu).unwrap(), &wg, &bg)
                .unwrap(),
            &cpu()
                .dsr_alignment(
                    &flc,
                    &yl,
                    &fuc,
                    &label_tensor(cpu(), &yu).unwrap(),
                    &wc,
                    &bc,
                )
                .unwrap(),
            1e-3,
            1e-4 * (d as f32).sqrt(),
        );
    }
}

/// Pseudo-labels on the device (tol: none, equal labels): ties (the first index wins), NaN (never
/// wins), rows of −∞ or NaN (label 0), one class, no rows, and a grid past one block.
#[test]
fn argmax_rows_labels() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(16);
    for (rows, c) in [(0usize, 7usize), (1, 1), (5, 7), (36, 7), (1029, 3)] {
        let mut z = rng.vec(rows * c, 3.0);
        if rows >= 5 && c >= 3 {
            z[..2 * c].fill(-5.0);
            (z[0], z[1], z[2]) = (2.0, 5.0, 5.0); // tie: 1
            (z[c], z[c + 1], z[c + 2]) = (f32::NAN, 1.0, 0.5); // NaN skipped: 1
            z[2 * c..3 * c].fill(f32::NEG_INFINITY); // 0
            z[3 * c..4 * c].fill(f32::NAN); // 0
            (z[4 * c], z[4 * c + 1]) = (f32::INFINITY, f32::INFINITY); // 0
        }
        let (zc, zg) = pair(g, &z, &[rows, c]);
        let got = g.argmax_rows(&zg).unwrap();
        assert_eq!(got.shape(), &[rows]);
        let (got, want) = (
            got.to_vec().unwrap(),
            cpu().argmax_rows(&zc).unwrap().to_vec().unwrap(),
        );
        assert_eq!(got, want, "argmax_rows [{rows}, {c}]");
        if rows >= 5 && c >= 3 {
            assert_eq!(&got[..5], &[1.0, 1.0, 0.0, 0.0, 0.0]);
        }
    }
}

/// DSR weights and the meta-weight update (tol: none, bit-equal: single rounded operations; any
/// NaN equals any NaN) for every combination of factors, with clamped, NaN and boundary values,
/// and a size past one block; then `to_host_many` against one read per tensor.
#[test]
fn dsr_weights_and_packed_reads() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(15);
    for n in [0usize, 1, 36, 1029] {
        let mut m = rng.pos(n);
        let mut a = rng.vec(n, 8.0);
        if n > 4 {
            // A NaN alignment score stays NaN through the clamp; 0 and 1 exactly.
            (a[0], a[1], a[2]) = (f32::NAN, 0.0, 0.0);
            (m[1], m[2]) = (0.0, 1.0);
        }
        let c = rng.pos(n);
        let b = rng.pos(n).iter().map(|v| v * 3.0).collect::<Vec<_>>();
        // (cpu, gpu) copies of c, m, a, b.
        let f = [&c, &m, &a, &b].map(|v| pair(g, v, &[n]));
        for mask in 0..16usize {
            let on = |k: usize| mask & (1 << k) != 0;
            let run = |be: &dyn Backend, gpu_side: bool| {
                let x = |k: usize| on(k).then(|| if gpu_side { &f[k].1 } else { &f[k].0 });
                let (w, mn) = be
                    .dsr_weights(&DsrFactors {
                        n,
                        conf: x(0),
                        meta: x(1),
                        align: x(2).map(|a| (a, 0.1)),
                        balance: x(3),
                    })
                    .unwrap();
                (w.to_vec().unwrap(), mn.map(|m| m.to_vec().unwrap()))
            };
            let (wg, mg2) = run(g, true);
            let (wc, mc2) = run(cpu(), false);
            // Bit-equal, except that every NaN reads as one value: a NaN's payload is not
            // specified (the GPU's arithmetic gives 0x7FFFFFFF where the CPU's gives 0x7FC00000).
            let bits = |v: &[f32]| {
                v.iter()
                    .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                bits(&wg),
                bits(&wc),
                "dsr_weights n {n} factors {mask:04b}: w"
            );
            assert_eq!(mg2.is_some(), on(1), "n {n} factors {mask:04b}: m' present");
            if let (Some(x), Some(y)) = (&mg2, &mc2) {
                assert_eq!(bits(x), bits(y), "dsr_weights n {n} factors {mask:04b}: m'");
            }
        }
        if n > 4 {
            let (w, mn) = g
                .dsr_weights(&DsrFactors {
                    n,
                    conf: None,
                    meta: Some(&f[1].1),
                    align: Some((&f[2].1, 0.1)),
                    balance: None,
                })
                .unwrap();
            let (w, mn) = (w.to_vec().unwrap(), mn.unwrap().to_vec().unwrap());
            assert!(mn[0].is_nan() && w[0].is_nan(), "NaN score kept");
            assert_eq!((mn[1], mn[2]), (0.0, 1.0));
            assert!(mn.iter().skip(1).all(|v| (0.0..=1.0).contains(v)));
        }
    }
    // Packed reads: shapes of every size, an empty tensor among them, one tensor alone.
    let ts: Vec<Tensor> = [vec![1usize], vec![0], vec![37, 3], vec![5]]
        .iter()
        .map(|s| rand_pair(g, &mut rng, s, 1.0).1)
        .collect();
    let refs: Vec<&Tensor> = ts.iter().collect();
    let many = g.to_host_many(&refs).unwrap();
    let one: Vec<Vec<f32>> = ts.iter().map(|t| t.to_vec().unwrap()).collect();
    assert_eq!(many, one);
    assert_eq!(g.to_host_many(&refs[2..3]).unwrap(), one[2..3].to_vec());
    assert!(g.to_host_many(&[]).unwrap().is_empty());
    let empty = [&ts[1], &ts[1]];
    assert_eq!(g.to_host_many(&empty).unwrap(), vec![Vec::<f32>::new(); 2]);
}

// ---- fusion (tol: rel 1e-4, abs 1e-4) ----

#[test]
fn similarity_fusion() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(14);
    for (b, d, hp, wp, hq, wq) in [
        (2, 8, 6, 5, 3, 2),
        (1, 4, 7, 7, 1, 1),
        (3, 16, 8, 8, 2, 2),
        (2, 128, 28, 28, 4, 4),
    ] {
        let (lc, lg) = rand_pair(g, &mut rng, &[b, d, hp, wp], 1.0);
        let (hc, hg) = rand_pair(g, &mut rng, &[b, d, hq, wq], 1.0);
        let what = format!("fusion low {:?} high {:?}", lc.shape(), hc.shape());
        let (yg, stg) = g.similarity_fusion_fwd(&lg, &hg).unwrap();
        let (yc, stc) = cpu().similarity_fusion_fwd(&lc, &hc).unwrap();
        close(&what, &yg, &yc, 1e-4, 1e-4);
        close(&format!("{what} S"), &stg, &stc, 1e-4, 1e-6);
        let (gc, gg) = rand_pair(g, &mut rng, &[b, d, hq, wq], 1.0);
        let (a, bb) = g.similarity_fusion_bwd(&lg, &hg, &stg, &gg).unwrap();
        let (ac, bc) = cpu().similarity_fusion_bwd(&lc, &hc, &stc, &gc).unwrap();
        close(&format!("{what} glow"), &a, &ac, 1e-3, 1e-4);
        close(&format!("{what} ghigh"), &bb, &bc, 1e-3, 1e-4);
    }
}

/// The projected fusion: on CUDA the two ops in turn (the default) and as one op without the
/// projected map (`MEDSSL_CUDA_FUSION=projected`, set per thread here), on the CPU without the
/// projected map; the output and every gradient against each other (tol as the fusion's), on
/// odd sizes, batch 1, no bias, no low channels, one low position, and the model's own size.
#[test]
fn projected_fusion() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(16);
    for (b, c, d, hp, wp, hq, wq, bias) in [
        (2, 5, 8, 6, 5, 3, 2, true),
        (1, 3, 4, 7, 7, 1, 1, false),
        (3, 0, 6, 4, 5, 2, 3, true),
        (2, 4, 6, 1, 1, 2, 2, true),
        (2, 16, 128, 28, 28, 4, 4, true),
    ] {
        let (xc, xg) = rand_pair(g, &mut rng, &[b, c, hp, wp], 1.0);
        let (wc, wg) = rand_pair(g, &mut rng, &[d, c, 1, 1], 0.5);
        let (bc, bg) = rand_pair(g, &mut rng, &[d], 0.5);
        let (qc, qg) = rand_pair(g, &mut rng, &[b, d, hq, wq], 1.0);
        let (gc, gg) = rand_pair(g, &mut rng, &[b, d, hq, wq], 1.0);
        let (yc, sc) = cpu()
            .projected_fusion_fwd(&xc, &wc, bias.then_some(&bc), &qc)
            .unwrap();
        let (rc, hc) = cpu()
            .projected_fusion_bwd(&xc, &wc, bias, &qc, &sc, &gc)
            .unwrap();
        for projected in [false, true] {
            let what = format!(
                "projected fusion low {:?} high {:?} bias {bias} one op {projected}",
                xc.shape(),
                qc.shape()
            );
            let old = cu::set_fusion_projected(Some(projected));
            let (yg, sg) = g
                .projected_fusion_fwd(&xg, &wg, bias.then_some(&bg), &qg)
                .unwrap();
            // Which form ran: [Sᵀ, M, Z] without the projected map, else [P̂, Sᵀ].
            assert_eq!(sg.len(), if projected { 3 } else { 2 }, "{what}");
            let (rg, hg) = g
                .projected_fusion_bwd(&xg, &wg, bias, &qg, &sg, &gg)
                .unwrap();
            cu::set_fusion_projected(old);
            close(&what, &yg, &yc, 1e-4, 1e-4);
            if projected {
                // The one-op form saves what the CPU's saves.
                for (k, name) in ["S", "M", "Z"].iter().enumerate() {
                    close(&format!("{what} saved {name}"), &sg[k], &sc[k], 1e-4, 1e-4);
                }
            }
            close(
                &format!("{what} gx"),
                rg.x.as_ref().unwrap(),
                rc.x.as_ref().unwrap(),
                1e-3,
                1e-4,
            );
            close(&format!("{what} gw"), &rg.weight, &rc.weight, 1e-3, 1e-3);
            close(&format!("{what} ghigh"), &hg, &hc, 1e-3, 1e-4);
            if bias {
                close(
                    &format!("{what} gb"),
                    rg.bias.as_ref().unwrap(),
                    rc.bias.as_ref().unwrap(),
                    1e-3,
                    1e-3,
                );
            }
        }
    }
}

// ---- optimisers (tol: rel 1e-6, abs 1e-7 per step) ----

#[test]
fn optimisers_and_ema() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(15);
    for n in [1usize, 7, 1000, 65_537] {
        let shape = [n];
        let (sc, sg) = rand_pair(g, &mut rng, &shape, 1.0);
        let (mut tc, mut tg) = rand_pair(g, &mut rng, &shape, 1.0);
        cpu().ema_update(&mut tc, &sc, 0.99).unwrap();
        g.ema_update(&mut tg, &sg, 0.99).unwrap();
        close("ema", &tg, &tc, 1e-6, 1e-7);

        for momentum in [0.0f32, 0.9] {
            let (mut pc, mut pg) = rand_pair(g, &mut rng, &shape, 1.0);
            let (mut bc, mut bg) = pair(g, &vec![0.0; n], &shape);
            for step in 0..3 {
                let (gc, gg) = rand_pair(g, &mut rng, &shape, 1.0);
                let p = SgdParams {
                    lr: 0.05,
                    momentum,
                    weight_decay: 5e-4,
                    first_step: step == 0,
                };
                cpu().sgd_step(&mut pc, &gc, &mut bc, p).unwrap();
                g.sgd_step(&mut pg, &gg, &mut bg, p).unwrap();
            }
            close("sgd param", &pg, &pc, 1e-5, 1e-6);
            close("sgd buf", &bg, &bc, 1e-5, 1e-6);
        }

        let (mut pc, mut pg) = rand_pair(g, &mut rng, &shape, 1.0);
        let (mut mc, mut mg) = pair(g, &vec![0.0; n], &shape);
        let (mut vc, mut vg) = pair(g, &vec![0.0; n], &shape);
        for step in 1..=3 {
            let (gc, gg) = rand_pair(g, &mut rng, &shape, 1.0);
            let p = AdamParams::pytorch(1e-3, 5e-4, step);
            cpu().adam_step(&mut pc, &gc, &mut mc, &mut vc, p).unwrap();
            g.adam_step(&mut pg, &gg, &mut mg, &mut vg, p).unwrap();
        }
        close("adam param", &pg, &pc, 1e-5, 1e-6);
        close("adam m", &mg, &mc, 1e-5, 1e-6);
        close("adam v", &vg, &vc, 1e-5, 1e-7);
    }
    // In-place updates refuse shared storage.
    let (_, s) = rand_pair(g, &mut rng, &[4], 1.0);
    let mut t = s.clone();
    assert!(g.ema_update(&mut t, &s, 0.5).is_err());
}

// ---- multi-tensor optimisers and EMA (tol as above): 53 tensors, so two launches of at most 48,
// sizes around the 2048-element tile, an empty tensor, against the CPU's single-tensor steps ----

#[test]
fn multi_tensor_optimisers_and_ema() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(16);
    let mut sizes = vec![0usize, 1, 7, 2047, 2048, 2049, 4096, 5000, 65_537];
    while sizes.len() < 53 {
        sizes.push(1 + (rng.vec(1, 1.0)[0].abs() * 3000.0) as usize);
    }
    let fresh = |rng: &mut Rng, scale: f32| -> Vec<(Tensor, Tensor)> {
        sizes
            .iter()
            .map(|&n| rand_pair(g, rng, &[n], scale))
            .collect()
    };
    let zeros = || -> Vec<(Tensor, Tensor)> {
        sizes
            .iter()
            .map(|&n| pair(g, &vec![0.0; n], &[n]))
            .collect()
    };

    // EMA: CPU one tensor at a time, GPU all at once.
    let students = fresh(&mut rng, 1.0);
    let mut teachers = fresh(&mut rng, 1.0);
    for ((tc, _), (sc, _)) in teachers.iter_mut().zip(&students) {
        cpu().ema_update(tc, sc, 0.99).unwrap();
    }
    {
        let mut pairs: Vec<(&mut Tensor, &Tensor)> = teachers
            .iter_mut()
            .zip(&students)
            .map(|((_, tg), (_, sg))| (tg, sg))
            .collect();
        g.ema_update_multi(&mut pairs, 0.99).unwrap();
    }
    for (i, (tc, tg)) in teachers.iter().enumerate() {
        close(&format!("ema_multi tensor {i}"), tg, tc, 1e-6, 1e-7);
    }

    // Gradient accumulation: acc += x, exact (one rounding either way).
    let xs = fresh(&mut rng, 1.0);
    let mut accs = fresh(&mut rng, 1.0);
    for ((ac, _), (xc, _)) in accs.iter_mut().zip(&xs) {
        cpu().add_assign(ac, xc).unwrap();
    }
    {
        let mut pairs: Vec<(&mut Tensor, &Tensor)> = accs
            .iter_mut()
            .zip(&xs)
            .map(|((_, ag), (_, xg))| (ag, xg))
            .collect();
        g.add_assign_multi(&mut pairs).unwrap();
    }
    for (i, (ac, ag)) in accs.iter().enumerate() {
        close(&format!("add_assign_multi tensor {i}"), ag, ac, 0.0, 0.0);
    }

    // Adam, three steps.
    let mut params = fresh(&mut rng, 1.0);
    let mut ms = zeros();
    let mut vs = zeros();
    for step in 1..=3u64 {
        let grads = fresh(&mut rng, 1.0);
        let p = AdamParams::pytorch(1e-3, 5e-4, step);
        for (((pc, _), (gc, _)), ((mc, _), (vc, _))) in params
            .iter_mut()
            .zip(&grads)
            .zip(ms.iter_mut().zip(vs.iter_mut()))
        {
            cpu().adam_step(pc, gc, mc, vc, p).unwrap();
        }
        let mut slots: Vec<OptSlot<'_>> = params
            .iter_mut()
            .zip(&grads)
            .zip(ms.iter_mut().zip(vs.iter_mut()))
            .map(|(((_, pg), (_, gg)), ((_, mg), (_, vg)))| OptSlot {
                param: pg,
                grad: gg,
                state: mg,
                state2: Some(vg),
            })
            .collect();
        g.adam_step_multi(&mut slots, p).unwrap();
    }
    for (i, ((pc, pg), ((mc, mg), (vc, vg)))) in
        params.iter().zip(ms.iter().zip(vs.iter())).enumerate()
    {
        close(&format!("adam_multi param {i}"), pg, pc, 1e-5, 1e-6);
        close(&format!("adam_multi m {i}"), mg, mc, 1e-5, 1e-6);
        close(&format!("adam_multi v {i}"), vg, vc, 1e-5, 1e-7);
    }

    // SGD with momentum, three steps (the first one differs).
    let mut params = fresh(&mut rng, 1.0);
    let mut bufs = zeros();
    for step in 0..3 {
        let grads = fresh(&mut rng, 1.0);
        let p = SgdParams {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 5e-4,
            first_step: step == 0,
        };
        for (((pc, _), (gc, _)), (bc, _)) in params.iter_mut().zip(&grads).zip(bufs.iter_mut()) {
            cpu().sgd_step(pc, gc, bc, p).unwrap();
        }
        let mut slots: Vec<OptSlot<'_>> = params
            .iter_mut()
            .zip(&grads)
            .zip(bufs.iter_mut())
            .map(|(((_, pg), (_, gg)), (_, bg))| OptSlot {
                param: pg,
                grad: gg,
                state: bg,
                state2: None,
            })
            .collect();
        g.sgd_step_multi(&mut slots, p).unwrap();
    }
    for (i, ((pc, pg), (bc, bg))) in params.iter().zip(bufs.iter()).enumerate() {
        close(&format!("sgd_multi param {i}"), pg, pc, 1e-5, 1e-6);
        close(&format!("sgd_multi buf {i}"), bg, bc, 1e-5, 1e-6);
    }
}

// ---- key queue on the device (exact: tol 0; pure copies) ----

#[test]
fn queue_concat_and_ring_write() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(17);
    for (ra, rb, b_rows, e) in [
        (36, 4096, 4096, 128),
        (1, 5, 3, 7),
        (4, 6, 0, 3),
        (0, 3, 2, 5),
    ] {
        let (ac, ag) = rand_pair(g, &mut rng, &[ra, e], 1.0);
        let (bc, bg) = rand_pair(g, &mut rng, &[rb, e], 1.0);
        let what = format!("concat_rows [{ra},{e}] + {b_rows} of [{rb},{e}]");
        close(
            &what,
            &g.concat_rows(&ag, &bg, b_rows).unwrap(),
            &cpu().concat_rows(&ac, &bc, b_rows).unwrap(),
            0.0,
            0.0,
        );
    }
    // Ring writes that wrap around the end, a full-ring write, a single row.
    for (k, r, start, e) in [
        (10, 4, 8, 3),
        (4096, 36, 4080, 128),
        (5, 5, 2, 2),
        (3, 1, 2, 1),
    ] {
        let (mut dc, mut dg) = rand_pair(g, &mut rng, &[k, e], 1.0);
        let (sc, sg) = rand_pair(g, &mut rng, &[r, e], 1.0);
        cpu().ring_write_rows(&mut dc, &sc, start).unwrap();
        g.ring_write_rows(&mut dg, &sg, start).unwrap();
        close(
            &format!("ring_write_rows {r} rows at {start} of [{k},{e}]"),
            &dg,
            &dc,
            0.0,
            0.0,
        );
    }
    // Shapes are checked before any launch.
    let (_, a) = rand_pair(g, &mut rng, &[2, 3], 1.0);
    let (_, b) = rand_pair(g, &mut rng, &[4, 2], 1.0);
    assert!(g.concat_rows(&a, &b, 1).is_err());
    let (_, mut ring) = rand_pair(g, &mut rng, &[2, 3], 1.0);
    let (_, src) = rand_pair(g, &mut rng, &[3, 3], 1.0);
    assert!(g.ring_write_rows(&mut ring, &src, 0).is_err());
}

/// Whole training steps (forward, losses, backward, multi-tensor Adam, EMA, queue, DSR meta
/// weights) on both backends from the same initialisation and batches: every loss term, the mean
/// DSR weight and the pseudo-labels agree step by step, for each method and DSR balancing mode.
#[test]
fn training_steps_match_cpu() {
    use medssl::nn::ModelConfig;
    use medssl::optim::OptimKind;
    use medssl::ssl::{Batch, DsrBalance, DsrMode};
    use medssl::tensor::Device;
    use medssl::train::step::{train_step, Method, StepConfig, TrainState};

    let Some(g) = gpu() else { return };
    let model = ModelConfig {
        in_ch: 3,
        width: 8,
        d: 16,
        emb: 16,
        classes: 7,
        small_stem: true,
        fusion: true,
    };
    let (bl, bu, hw, steps) = (4usize, 8usize, 20usize, 3);
    let mut rng = Rng::new(11);
    // (labelled images, labels, weak views, strong views) per step.
    type HostBatch = (Vec<f32>, Vec<usize>, Vec<f32>, Vec<f32>);
    let batches: Vec<HostBatch> = (0..steps)
        .map(|_| {
            (
                rng.vec(bl * 3 * hw * hw, 1.0),
                rng.labels(bl, 7),
                rng.vec(bu * 3 * hw * hw, 1.0),
                rng.vec(bu * 3 * hw * hw, 1.0),
            )
        })
        .collect();
    let unl_idx: Vec<usize> = (0..bu).collect();
    let cases = [
        (Method::Dsrpgc, DsrBalance::Off),
        (Method::Dsrpgc, DsrBalance::Align),
        (Method::Dsrpgc, DsrBalance::Class),
        (Method::MeanTeacher, DsrBalance::Off),
        (Method::Supervised, DsrBalance::Off),
    ];
    for (method, balance) in cases {
        let scfg = StepConfig {
            method,
            dsr: DsrMode::Both,
            balance,
            ramp_steps: 2,
            ..Default::default()
        };
        let run = |bk: &dyn Backend, dev: Device| {
            let mut st = TrainState::new(model, 3, dev, OptimKind::adam(), 5e-4, 16, bu).unwrap();
            let mut out = Vec::new();
            for (xl, yl, uw, us) in &batches {
                let batch = Batch {
                    x_lab: bk.from_host(xl, &[bl, 3, hw, hw]).unwrap(),
                    y_lab: yl.clone(),
                    u_weak: bk.from_host(uw, &[bu, 3, hw, hw]).unwrap(),
                    u_strong: bk.from_host(us, &[bu, 3, hw, hw]).unwrap(),
                };
                out.push(train_step(&mut st, &batch, &unl_idx, &scfg, 1e-3).unwrap());
            }
            out
        };
        let want = run(cpu(), Device::Cpu);
        let got = run(g, g.device());
        for (s, (c, d)) in want.iter().zip(&got).enumerate() {
            let what = format!("{method:?}/{balance:?} step {s}");
            for (name, a, b) in [
                ("loss", c.loss, d.loss),
                ("loss_sup", c.loss_sup, d.loss_sup),
                ("loss_cons", c.loss_cons, d.loss_cons),
                ("loss_pgc", c.loss_pgc, d.loss_pgc),
                ("mean_weight", c.mean_weight, d.mean_weight),
            ] {
                assert!(
                    (a - b).abs() <= 1e-5 + 2e-3 * a.abs(),
                    "{what}: {name} cpu {a} cuda {b}"
                );
            }
            assert_eq!(c.pseudo_labels, d.pseudo_labels, "{what}: pseudo-labels");
            println!(
                "{what}: loss cpu {} cuda {} (sup {} cons {} pgc {})",
                c.loss, d.loss, d.loss_sup, d.loss_cons, d.loss_pgc
            );
        }
    }
}

/// A training run on CUDA (the library's run loop: loader, steps, checkpoints on the device):
/// by default (`cuda_graph = auto`) its steps replay from a CUDA graph once the key queue is full
/// and give the bits of a `cuda_graph = off` run, across an epoch's end with its validation (last
/// and best checkpoints compared); resuming it (a new graph after the resume)
/// reproduces the uninterrupted run, and its checkpoint gives the same test metrics and class
/// probabilities with `medssl eval` / `medssl predict` on the CPU as on CUDA.
#[test]
fn a_cuda_run_resumes_exactly_and_its_checkpoint_evaluates_the_same_on_cpu() {
    use medssl::train::checkpoint;
    use medssl::train::config::TrainConfig;
    use medssl::train::run::{train, Outcome, RunOptions};
    use std::path::Path;
    use std::process::Command;

    let Some(g) = gpu() else { return };
    // Packed for a GPU node (tools/gpu-pack.sh), this executable finds the data and the medssl
    // binary through these variables, which tools/gpu-run.sh sets.
    let root = std::env::var("MEDSSL_TEST_DATA").unwrap_or_else(|_| "../shared/data".into());
    let data = format!("{root}/pneumoniamnist");
    // A 16-key queue is full after 2 steps of 8 unlabelled images, so that the default
    // (cuda_graph = auto: on for CUDA) replays steps from a graph within the 9 steps.
    let cfg = |graph: &str| {
        let sets: Vec<String> = [
            format!("data={data}"),
            "device=cuda".into(),
            "width=4".into(),
            "fusion_dim=8".into(),
            "emb=8".into(),
            "batch_labeled=4".into(),
            "batch_unlabeled=8".into(),
            "queue=16".into(),
            // 99 % labelled: 47 unlabelled images, 5 steps per epoch, so that the 9 steps cross
            // an epoch's end (validation, best checkpoint) with the graph in use.
            "labeled_ratio=0.99".into(),
            "epochs=2".into(),
            "workers=1".into(),
            format!("cuda_graph={graph}"),
        ]
        .to_vec();
        TrainConfig::resolve("fast", None, &sets).unwrap()
    };
    let opts = |out: &Path, resume: bool, max_steps: u64| RunOptions {
        out: out.to_path_buf(),
        resume,
        max_steps,
        no_eval: false,
        quiet: true,
    };
    let tmp = |name: &str| {
        let d = std::env::temp_dir().join(format!("medssl-cuda-run-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    };
    let (a, b, c) = (tmp("straight"), tmp("resumed"), tmp("plain"));
    let before = g.step_graph_stats().unwrap_or_default();
    assert_eq!(
        train(cfg("auto"), &opts(&a, false, 9)).unwrap().0,
        Outcome::StepLimit
    );
    let graph = g.step_graph_stats().unwrap_or_default().since(&before);
    println!("straight run, cuda_graph = auto: {graph:?}");
    assert!(
        graph.captures >= 1 && graph.replays >= 3 && graph.divergences == 0,
        "the default run did not replay its steps from a graph: {graph:?}"
    );
    assert_eq!(
        train(cfg("auto"), &opts(&b, false, 3)).unwrap().0,
        Outcome::StepLimit
    );
    assert_eq!(
        train(cfg("auto"), &opts(&b, true, 9)).unwrap().0,
        Outcome::StepLimit
    );
    let before = g.step_graph_stats().unwrap_or_default();
    assert_eq!(
        train(cfg("off"), &opts(&c, false, 9)).unwrap().0,
        Outcome::StepLimit
    );
    let plain = g.step_graph_stats().unwrap_or_default().since(&before);
    assert_eq!(
        (plain.captures, plain.replays),
        (0, 0),
        "cuda_graph = off: {plain:?}"
    );
    let load_file = |d: &Path, file: &str| {
        let mut v: Vec<(String, Vec<f32>)> = checkpoint::load(&d.join(file))
            .unwrap()
            .tensors
            .into_iter()
            .map(|(k, (v, _))| (k, v))
            .collect();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    let load = |d: &Path| load_file(d, "last.safetensors");
    let (ta, tb) = (load(&a), load(&b));
    // The graph's steps are the plain steps, bit for bit: the last checkpoint, and the best one
    // (after the first epoch's validation, which ran between graph steps).
    for file in ["last.safetensors", "best.safetensors"] {
        let (ga, gc) = (load_file(&a, file), load_file(&c, file));
        assert_eq!(ga.len(), gc.len());
        for ((ka, va), (kc, vc)) in ga.iter().zip(&gc) {
            assert_eq!(ka, kc);
            let same = va.iter().zip(vc).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "{file} {ka}: the run from a CUDA graph differs from the plain run"
            );
        }
    }
    assert_eq!(ta.len(), tb.len());
    let mut worst = 0.0f32;
    for ((ka, va), (kb, vb)) in ta.iter().zip(&tb) {
        assert_eq!(ka, kb);
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs());
        }
    }
    println!(
        "straight vs resumed CUDA run: max |difference| {worst:e} over {} tensors",
        ta.len()
    );
    // The emulation is deterministic to the bit; on a GPU every kernel and the chosen cuDNN
    // algorithms are deterministic too, and all three trainings run in this process, so they
    // share each shape's chosen algorithms (a resume in a new process may choose others under
    // the timed default or MEDSSL_CUDNN_ALGO=find; see the README).
    assert_eq!(worst, 0.0, "resuming a CUDA run changed the result");

    let bin = std::env::var("MEDSSL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_medssl").into());
    let ck = a.join("last.safetensors");
    let run = |args: &[&str]| -> serde_json::Value {
        let out = Command::new(&bin).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let eval = |device: &str| {
        run(&[
            "eval",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--split",
            "test",
            "--json",
            "--device",
            device,
        ])
    };
    let (ec, eg) = (eval("cpu"), eval("cuda"));
    // AUC follows the probabilities continuously; the thresholded metrics may move by one image
    // whose two logits are within rounding of each other (about 2e-3 each on 624 test images).
    for (m, tol) in [
        ("macro_auc", 1e-4),
        ("balanced_accuracy", 5e-3),
        ("accuracy", 5e-3),
        ("macro_f1", 5e-3),
    ] {
        let (x, y) = (
            ec["metrics"][m].as_f64().unwrap(),
            eg["metrics"][m].as_f64().unwrap(),
        );
        assert!((x - y).abs() <= tol, "test {m}: cpu {x} cuda {y}");
    }
    println!(
        "test macro-AUC of the CUDA-trained checkpoint: cpu {} cuda {}",
        ec["metrics"]["macro_auc"], eg["metrics"]["macro_auc"]
    );
    let png = a.join("x.png");
    image::GrayImage::from_fn(28, 28, |x, y| image::Luma([((x * 9 + y * 3) % 256) as u8]))
        .save(&png)
        .unwrap();
    let predict = |device: &str| {
        run(&[
            "predict",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--device",
            device,
            png.to_str().unwrap(),
        ])
    };
    let (pc, pg) = (predict("cpu"), predict("cuda"));
    let (pc, pg) = (
        pc[0]["probabilities"].as_object().unwrap().clone(),
        pg[0]["probabilities"].as_object().unwrap().clone(),
    );
    assert_eq!(pc.len(), 2);
    for (k, v) in &pc {
        let (x, y) = (v.as_f64().unwrap(), pg[k].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-5, "predict {k}: cpu {x} cuda {y}");
    }
    let _ = std::fs::remove_dir_all(a);
    let _ = std::fs::remove_dir_all(b);
}

#[test]
fn device_profile_records_what_ran() {
    use medssl::backend::cuda::profile;
    let Some(g) = gpu() else { return };
    let emulated = cu::is_emulated();
    let mut rng = Rng::new(77);
    let (_, x) = rand_pair(g, &mut rng, &[3, 5, 7], 1.0);
    g.synchronize().unwrap();
    match profile::start() {
        Ok(()) => {}
        Err(e) if e.to_string().contains("libcupti.so could not be loaded") => {
            println!("SKIPPED (no libcupti.so on the loader path: {e})");
            return;
        }
        Err(e) => panic!("starting the device profile: {e}"),
    }
    // A second start while recording is refused.
    assert!(profile::start().is_err());
    let y = g.relu_fwd(&x).unwrap();
    let z = g.matmul(
        &y.reshape(&[15, 7]).unwrap(),
        &y.reshape(&[7, 15]).unwrap(),
        false,
        false,
    );
    g.synchronize().unwrap();
    let p = profile::stop().unwrap();
    z.unwrap();
    assert!(profile::stop().is_err(), "stop without a profile");
    // Other tests run alongside in this process, so what they ran may be recorded too.
    let relu = p.entries.iter().find(|e| e.name == "ew_relu_fwd");
    assert!(
        relu.is_some_and(|e| e.calls >= 1),
        "no ew_relu_fwd in {:?}",
        p.entries.iter().map(|e| &e.name).collect::<Vec<_>>()
    );
    assert_eq!(p.dropped, 0);
    // The product ran too (a cuBLAS kernel on a GPU, the emulated product here).
    assert!(p.entries.len() >= 2, "{:?}", p.entries);
    // Timestamps read from the wrong place would rarely give a plausible window.
    assert!(p.busy_ns > 0 && p.busy_ns <= p.span_ns);
    assert!(p.span_ns < 10_000_000_000, "span {} ns", p.span_ns);
    let sum: u64 = p.entries.iter().map(|e| e.ns).sum();
    assert!(sum >= p.busy_ns, "items {sum} ns, busy {} ns", p.busy_ns);
    assert!(p.entries.windows(2).all(|w| w[0].ns >= w[1].ns));
    assert_eq!(
        p.source,
        if emulated {
            "emulation host time"
        } else {
            "cupti"
        }
    );
    println!(
        "profile ({}): {} items, busy {} ns of {} ns",
        p.source,
        p.entries.len(),
        p.busy_ns,
        p.span_ns
    );

    // `medssl-bench ops --profile` on the same device (MEDSSL_BENCH_BIN where the binary is not
    // where this test was built): every batch-norm row's profile lists the kernels of one call.
    let bench = std::env::var("MEDSSL_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_medssl-bench").into());
    // `medssl-bench ops` on width 4, batch 4, one call per sample, with `env` and `extra` flags.
    let ops = |env: &[(&str, &str)], extra: &[&str]| -> Vec<serde_json::Value> {
        let mut cmd = std::process::Command::new(&bench);
        cmd.envs(env.iter().copied()).args([
            "ops",
            "--device",
            "cuda",
            "--width",
            "4",
            "--batch",
            "4",
            "--repeats",
            "1",
            "--calls",
            "1",
            "--peak-gemm",
            "0",
            "--peak-copy-mib",
            "1",
            "--json",
        ]);
        let out = cmd
            .args(extra)
            .output()
            .unwrap_or_else(|e| panic!("running {bench}: {e}"));
        assert!(
            out.status.success(),
            "{bench} ops {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let rows = ops(&[], &["--op", "batch_norm", "--profile", "--warmup", "1"]);
    assert_eq!(rows.len(), 8, "4 batch-norm shapes, forward and backward");
    for r in &rows {
        let p = &r["profile"];
        assert_eq!(p["steps"], 1, "{r}");
        let top = p["top"].as_array().unwrap();
        // Small channels: one launch per call and pass (bn_train_fused, bn_bwd_fused), or the
        // split path's two.
        let items = p["items_per_step"].as_f64().unwrap();
        assert!((1.0..=2.0).contains(&items), "{r}");
        if emulated {
            // The emulated kernels take most of a call's time, and the profile times the same
            // calls as the row (the first call of a profile included).
            let busy = p["busy_ms_per_step"].as_f64().unwrap();
            assert!(busy >= 0.2 * r["median_ms"].as_f64().unwrap(), "{r}");
        }
        assert!(
            top.iter()
                .all(|e| e["name"].as_str().unwrap().starts_with("bn_")
                    && e["us_per_step"].as_f64().unwrap() > 0.0),
            "{r}"
        );
        // A default run's switches are its build's defaults (tools/ops-table.py relies on it).
        let d = r["defaults"].as_object().unwrap();
        assert_eq!(d.len(), 21, "{r}");
        assert!(d.iter().all(|(k, v)| &r[k] == v), "{r}");
    }
    // Switches set through the environment show in the row, beside the unchanged defaults.
    let env = [
        ("MEDSSL_CUDA_CONV", "im2col"),
        ("MEDSSL_CUDA_BN_SPLIT", "auto"),
        ("MEDSSL_CUDA_BN_APPLY", "flat"),
        ("MEDSSL_CUDA_BN_FWD", "resident"),
        ("MEDSSL_CUDA_BN_BWD", "resident"),
        ("MEDSSL_CUDNN_FWD_ALGO", "implicit_precomp_gemm"),
        ("MEDSSL_CUDA_BN_INFLIGHT", "16"),
        ("MEDSSL_CUDA_BN_VEC", "on"),
        ("MEDSSL_CUDA_BN_PIPE", "on"),
        ("MEDSSL_CUDA_BN_KEEP", "4096"),
    ];
    let r = &ops(&env, &["--op", "relu", "--warmup", "0"])[0];
    assert_eq!(r["cudnn_fwd_algo"], "IMPLICIT_PRECOMP_GEMM", "{r}");
    assert_eq!(
        (&r["bn_inflight"], &r["defaults"]["bn_inflight"]),
        (&serde_json::json!(16), &serde_json::json!("auto")),
        "{r}"
    );
    assert!(r["defaults"]["cudnn_fwd_algo"].is_null(), "{r}");
    assert_eq!(
        (&r["bn_keep"], &r["defaults"]["bn_keep"]),
        (&serde_json::json!(4096), &serde_json::json!("auto")),
        "{r}"
    );
    for (k, now, default) in [
        ("conv", "im2col", "cudnn"),
        ("bn_split", "auto", "wave"),
        ("bn_apply", "flat", "chunks"),
        ("bn_fwd", "resident", "split"),
        ("bn_bwd", "resident", "split"),
        ("bn_vec", "on", "off"),
        ("bn_pipe", "on", "off"),
        ("conv1x1", "cublas", "cublas"),
    ] {
        assert_eq!(
            (r[k].as_str(), r["defaults"][k].as_str()),
            (Some(now), Some(default)),
            "{r}"
        );
    }
}

/// The model of the graph and overlapped-step tests: width 4, 5 classes.
fn tiny_model() -> medssl::nn::ModelConfig {
    medssl::nn::ModelConfig {
        in_ch: 3,
        width: 4,
        d: 8,
        emb: 8,
        classes: 5,
        small_stem: true,
        fusion: true,
    }
}

/// Every tensor of a training state, by name, on the host: student, teacher, optimiser moments,
/// key queue (keys, weights, labels) and meta weights.
fn training_state(st: &medssl::train::step::TrainState) -> Vec<(String, Vec<f32>)> {
    let mut state: Vec<(String, Vec<f32>)> = Vec::new();
    for (n, v, _) in st.student.store.to_named("student.").unwrap() {
        state.push((n, v));
    }
    for (n, v, _) in st.teacher.store.to_named("teacher.").unwrap() {
        state.push((n, v));
    }
    for (n, v, _) in st.opt.state_named(&st.student.store).unwrap() {
        state.push((n, v));
    }
    state.push(("queue.keys".into(), st.queue.keys_host().unwrap()));
    state.push(("queue.weights".into(), st.queue.weights_host().unwrap()));
    let labels = st.queue.labels_host().unwrap();
    state.push((
        "queue.labels".into(),
        labels.iter().map(|&l| l as f32).collect(),
    ));
    state.push(("meta".into(), st.meta.clone()));
    state
}

/// Training steps replayed from a CUDA graph (`StepConfig::cuda_graph`, `--cuda-graph`) give the
/// results of the same steps run eagerly: every logged value, every pseudo-label and, at the end,
/// every tensor of the training state (student, teacher, Adam moments, key queue, meta weights),
/// over steps whose batch, learning rate and loss ramps all change, for each method and for a
/// DSR balancing mode that reads the device midway through the step (only the part before the
/// read is replayed). The graph must actually be used: captured once, replayed on every step
/// after the warm-up, never abandoned. A last run changes the labelled batch size in one step:
/// that step no longer matches the graph, runs eagerly from its own start, and the run still
/// gives the eager results. Two more train DSRPGC on the float4 batch norms: on two launches and
/// resident ones, then pipelined (`MEDSSL_CUDA_BN_PIPE=on`), whose kernels must each have run.
/// Bitwise on the emulated device (the same kernels in the same order);
/// within 1e-6 relative on a GPU (cuDNN may pick another algorithm per call).
#[test]
fn graph_steps_match_eager_steps() {
    use medssl::optim::OptimKind;
    use medssl::ssl::{Batch, DsrBalance, DsrMode};
    use medssl::train::step::{train_step, Method, StepConfig, StepStats, TrainState};

    let Some(g) = gpu() else { return };
    let exact = g.name().contains("emulation");
    let model = tiny_model();
    // The queue (16 keys) is full after two steps of 8; then 3 steps fill the graph's arena and
    // capture it, and the remaining 4 replay it.
    let (bl, bu, hw, queue, steps) = (4usize, 8usize, 12usize, 16usize, 9usize);
    let n_unl = 24;
    let mut rng = Rng::new(23);
    type HostBatch = (Vec<f32>, Vec<usize>, Vec<f32>, Vec<f32>, Vec<usize>);
    let batches: Vec<HostBatch> = (0..steps)
        .map(|s| {
            (
                rng.vec(bl * 3 * hw * hw, 1.0),
                rng.labels(bl, 5),
                rng.vec(bu * 3 * hw * hw, 1.0),
                rng.vec(bu * 3 * hw * hw, 1.0),
                (0..bu).map(|i| (s * 5 + i * 3) % n_unl).collect(),
            )
        })
        .collect();
    // The float4 batch norms (MEDSSL_CUDA_BN_VEC=on) on two launches or one resident launch
    // wherever one launch per channel would otherwise run, captured in the graph too.
    let float4 = BnSet {
        resident: (true, true),
        split: 3,
        keep: None,
        vec: Some(true),
        inflight: None,
        pipe: false,
    };
    // The same with the pipelined float4 batch norms (MEDSSL_CUDA_BN_PIPE=on), which copy each
    // block's next chunk into shared memory while the current one's blocks meet.
    let pipelined = BnSet {
        pipe: true,
        ..float4
    };
    // (method, balancing, the step whose labelled batch has one image fewer, batch-norm switches)
    let cases = [
        (Method::Dsrpgc, DsrBalance::Off, None, None),
        (Method::Dsrpgc, DsrBalance::Align, None, None),
        (Method::MeanTeacher, DsrBalance::Off, None, None),
        (Method::Supervised, DsrBalance::Off, None, None),
        (Method::Dsrpgc, DsrBalance::Off, Some(6), None),
        (Method::Dsrpgc, DsrBalance::Off, None, Some(float4)),
        (Method::Dsrpgc, DsrBalance::Off, None, Some(pipelined)),
    ];
    type Run = (
        Vec<StepStats>,
        Vec<(String, Vec<f32>)>,
        medssl::backend::GraphStats,
    );
    for (method, balance, short, bn) in cases {
        let run_plain = |graph: bool| -> Run {
            let scfg = StepConfig {
                method,
                dsr: DsrMode::Both,
                balance,
                ramp_steps: 6,
                cuda_graph: graph,
                ..Default::default()
            };
            let mut st =
                TrainState::new(model, 5, g.device(), OptimKind::adam(), 5e-4, queue, n_unl)
                    .unwrap();
            let before = g.step_graph_stats().unwrap_or_default();
            let mut stats = Vec::new();
            for (s, (xl, yl, uw, us, idx)) in batches.iter().enumerate() {
                let nl = if short == Some(s) { bl - 1 } else { bl };
                let batch = Batch {
                    x_lab: g
                        .from_host(&xl[..nl * 3 * hw * hw], &[nl, 3, hw, hw])
                        .unwrap(),
                    y_lab: yl[..nl].to_vec(),
                    u_weak: g.from_host(uw, &[bu, 3, hw, hw]).unwrap(),
                    u_strong: g.from_host(us, &[bu, 3, hw, hw]).unwrap(),
                };
                let lr = 1e-3 * (1.0 - 0.07 * s as f32);
                stats.push(train_step(&mut st, &batch, idx, &scfg, lr).unwrap());
            }
            let gs = g.step_graph_stats().unwrap_or_default().since(&before);
            (stats, training_state(&st), gs)
        };
        let run = |graph: bool| -> Run {
            match bn {
                Some(set) => with_bn(set, || run_plain(graph)),
                None => run_plain(graph),
            }
        };
        // The float4 kernels that must run: the pipelined forward and backward each, or a
        // split or resident float4 forward.
        let pipe = bn.is_some_and(|b| b.pipe);
        let float4_launches = || match pipe {
            true => [launches_of("bn_fwd_pipe4"), launches_of("bn_bwd_pipe4")],
            false => [
                launches_of("bn_stats_split4_g1") + launches_of("bn_fwd_resident4_g2"),
                u64::MAX,
            ],
        };
        let float4_before = float4_launches();
        let what = format!(
            "{method:?}/{balance:?}/short batch at {short:?}/float4 {}/pipelined {pipe}",
            bn.is_some()
        );
        let (se, te, _) = run(false);
        // The graph run with another host thread issuing device work all along (it waits while
        // a capture is open, and a capture waits for its work in progress): neither thread's
        // results may change.
        let stop = std::sync::atomic::AtomicBool::new(false);
        let ((sg, tg, gs), rounds) = std::thread::scope(|s| {
            let other = s.spawn(|| other_thread_work(g, &stop));
            let r = run(true);
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            (r, other.join().expect("the other thread's work"))
        });
        println!("{what}: graph {gs:?}; the other thread ran {rounds} rounds");
        if bn.is_some() {
            let after = float4_launches();
            assert!(
                after
                    .iter()
                    .zip(&float4_before)
                    .all(|(a, b)| a > b || *b == u64::MAX),
                "{what}: no float4 batch norm ran ({float4_before:?} -> {after:?})"
            );
        }
        if let Some(k) = short {
            // Steps 2-3 (from 0) warm up, 4 captures, 5 replays, the short step diverges and
            // runs eagerly, and the steps after it warm up a new graph.
            assert_eq!(gs.divergences, 1, "{what}: {gs:?}");
            assert_eq!(gs.replays, (k - 4) as u64, "{what}: {gs:?}");
        } else {
            assert_eq!(
                gs.captures, 1,
                "{what}: the graph is captured once ({gs:?})"
            );
            assert_eq!(
                gs.divergences, 0,
                "{what}: no step differs from the graph ({gs:?})"
            );
        }
        // DSRPGC's queue is full after 2 steps; then at most 3 eager steps fill the arena (the
        // first also creates the Adam state), the next captures, and every later one replays.
        let unstable = if method == Method::Dsrpgc { 2 } else { 0 };
        if short.is_none() {
            assert!(gs.warm_steps <= 3, "{what}: {gs:?}");
            assert_eq!(
                gs.replays + gs.warm_steps + unstable,
                steps as u64,
                "{what}: every step after the warm-up runs from the graph ({gs:?})"
            );
        }
        assert!(
            gs.node_updates > 0,
            "{what}: the changing scalars update nodes ({gs:?})"
        );
        // Every replay after the capture is a shadow step, each timed on the host.
        assert_eq!(
            gs.shadow_steps,
            gs.replays - gs.captures,
            "{what}: shadow steps ({gs:?})"
        );
        assert!(
            gs.shadow_host_ns >= gs.shadow_steps,
            "{what}: shadow steps' host time ({gs:?})"
        );
        let close = |a: f32, b: f32| {
            if exact {
                a.to_bits() == b.to_bits()
            } else {
                (a - b).abs() <= 1e-6 * a.abs().max(1.0)
            }
        };
        for (s, (e, r)) in se.iter().zip(&sg).enumerate() {
            for (name, a, b) in [
                ("loss", e.loss, r.loss),
                ("loss_sup", e.loss_sup, r.loss_sup),
                ("loss_cons", e.loss_cons, r.loss_cons),
                ("loss_pgc", e.loss_pgc, r.loss_pgc),
                ("mean_weight", e.mean_weight, r.mean_weight),
                ("lambda_cons", e.lambda_cons, r.lambda_cons),
            ] {
                assert!(close(a, b), "{what} step {s}: {name} eager {a} graph {b}");
            }
            assert_eq!(
                e.pseudo_labels, r.pseudo_labels,
                "{what} step {s}: pseudo-labels"
            );
        }
        assert_eq!(te.len(), tg.len());
        for ((n, a), (_, b)) in te.iter().zip(&tg) {
            assert_eq!(a.len(), b.len(), "{what}: {n}");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(close(*x, *y), "{what}: {n}[{i}] eager {x} graph {y}");
            }
        }
    }
}

/// Steps issued with `train_step_overlapped` while reads are queued (`MEDSSL_CUDA_STEP_READ=later`,
/// set per thread here) return the previous step's results one call later, and compute what
/// `train_step` computes (reads waited for), bit for bit on the emulated device: every logged
/// value and, at the end, the whole training state, plain and from a CUDA graph. Some steps take
/// unlabelled samples of the step before them, whose meta weights that step updates: such a
/// step must wait for the pending one first (else it would read stale meta weights and its DSR
/// weights, losses and meta weights would differ). On a real GPU this is the page-locked copy
/// path and its event; within 1e-6 relative there (cuDNN may pick another algorithm per call).
#[test]
fn overlapped_steps_match_waiting_steps() {
    use medssl::optim::OptimKind;
    use medssl::ssl::{Batch, DsrMode};
    use medssl::train::step::{
        train_step, train_step_overlapped, Method, StepConfig, StepStats, TrainState,
    };

    let Some(g) = gpu() else { return };
    let exact = g.name().contains("emulation");
    let model = tiny_model();
    let (bl, bu, hw, queue, steps) = (4usize, 8usize, 12usize, 16usize, 10usize);
    let n_unl = 24;
    let mut rng = Rng::new(29);
    type HostBatch = (Vec<f32>, Vec<usize>, Vec<f32>, Vec<f32>, Vec<usize>);
    // Steps 4 and 8 (from 0) take half their unlabelled samples from the step before.
    let batches: Vec<HostBatch> = (0..steps)
        .map(|s| {
            let idx = if s % 4 == 0 && s > 0 {
                (0..bu)
                    .map(|i| ((s - 1) * bu + i / 2 * 2) % n_unl)
                    .collect()
            } else {
                (0..bu).map(|i| (s * bu + i) % n_unl).collect()
            };
            (
                rng.vec(bl * 3 * hw * hw, 1.0),
                rng.labels(bl, 5),
                rng.vec(bu * 3 * hw * hw, 1.0),
                rng.vec(bu * 3 * hw * hw, 1.0),
                idx,
            )
        })
        .collect();
    type Run = (Vec<StepStats>, Vec<(String, Vec<f32>)>);
    let run = |overlapped: bool, graph: bool| -> Run {
        let scfg = StepConfig {
            method: Method::Dsrpgc,
            dsr: DsrMode::Both,
            ramp_steps: 6,
            cuda_graph: graph,
            ..Default::default()
        };
        let mut st =
            TrainState::new(model, 7, g.device(), OptimKind::adam(), 5e-4, queue, n_unl).unwrap();
        let before = g.step_graph_stats().unwrap_or_default();
        let was = cu::set_step_read_later(Some(overlapped));
        let mut stats = Vec::new();
        for (s, (xl, yl, uw, us, idx)) in batches.iter().enumerate() {
            let batch = Batch {
                x_lab: g.from_host(xl, &[bl, 3, hw, hw]).unwrap(),
                y_lab: yl.clone(),
                u_weak: g.from_host(uw, &[bu, 3, hw, hw]).unwrap(),
                u_strong: g.from_host(us, &[bu, 3, hw, hw]).unwrap(),
            };
            let lr = 1e-3 * (1.0 - 0.05 * s as f32);
            if overlapped {
                let done = train_step_overlapped(&mut st, &batch, idx, &scfg, lr).unwrap();
                // The previous step's results come back during this one, none during the first.
                let want: Vec<u64> = (s > 0).then_some(s as u64).into_iter().collect();
                let got: Vec<u64> = done.iter().map(|d| d.step).collect();
                assert_eq!(got, want, "step {s}: the steps finished during the call");
                assert!(st.has_pending(), "step {s} is left pending");
                assert!(
                    train_step(&mut st, &batch, idx, &scfg, lr).is_err(),
                    "train_step with a pending step is refused"
                );
                stats.extend(done);
            } else {
                stats.push(train_step(&mut st, &batch, idx, &scfg, lr).unwrap());
            }
        }
        stats.extend(st.finish_pending().unwrap());
        assert!(!st.has_pending());
        cu::set_step_read_later(was);
        if graph {
            let gs = g.step_graph_stats().unwrap_or_default().since(&before);
            assert_eq!(gs.divergences, 0, "{gs:?}");
            assert!(gs.replays >= 4, "the graph is replayed ({gs:?})");
        }
        (stats, training_state(&st))
    };
    let close = |a: f32, b: f32| {
        if exact {
            a.to_bits() == b.to_bits()
        } else {
            (a - b).abs() <= 1e-6 * a.abs().max(1.0)
        }
    };
    let (sw, tw) = run(false, false);
    assert_eq!(
        sw.iter().map(|s| s.step).collect::<Vec<_>>(),
        (1..=steps as u64).collect::<Vec<_>>()
    );
    for graph in [false, true] {
        let what = if graph { "graph" } else { "plain" };
        let (so, to) = run(true, graph);
        assert_eq!(so.len(), steps, "{what}: every step is finished once");
        for (e, r) in sw.iter().zip(&so) {
            assert_eq!(e.step, r.step, "{what}: steps in order");
            for (name, a, b) in [
                ("loss", e.loss, r.loss),
                ("loss_sup", e.loss_sup, r.loss_sup),
                ("loss_cons", e.loss_cons, r.loss_cons),
                ("loss_pgc", e.loss_pgc, r.loss_pgc),
                ("mean_weight", e.mean_weight, r.mean_weight),
                ("lr", e.lr, r.lr),
            ] {
                assert!(
                    close(a, b),
                    "{what} step {}: {name} waiting {a} overlapped {b}",
                    e.step
                );
            }
            assert_eq!(e.pseudo_labels, r.pseudo_labels, "{what} step {}", e.step);
        }
        assert_eq!(tw.len(), to.len());
        for ((n, a), (_, b)) in tw.iter().zip(&to) {
            assert_eq!(a.len(), b.len(), "{what}: {n}");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(close(*x, *y), "{what}: {n}[{i}] waiting {x} overlapped {y}");
            }
        }
        println!("{what}: {steps} overlapped steps equal the waiting ones");
    }
    // A non-finite loss still stops the run, one call later, naming its own step: step 2's
    // update with a NaN learning rate makes step 3's loss NaN, which the call issuing step 4
    // finds when it collects step 3.
    let scfg = StepConfig {
        method: Method::Dsrpgc,
        dsr: DsrMode::Both,
        ramp_steps: 6,
        ..Default::default()
    };
    let mut st =
        TrainState::new(model, 7, g.device(), OptimKind::adam(), 5e-4, queue, n_unl).unwrap();
    let was = cu::set_step_read_later(Some(true));
    let mut outcome = Vec::new();
    for (s, (xl, yl, uw, us, idx)) in batches.iter().take(4).enumerate() {
        let batch = Batch {
            x_lab: g.from_host(xl, &[bl, 3, hw, hw]).unwrap(),
            y_lab: yl.clone(),
            u_weak: g.from_host(uw, &[bu, 3, hw, hw]).unwrap(),
            u_strong: g.from_host(us, &[bu, 3, hw, hw]).unwrap(),
        };
        let lr = if s == 1 { f32::NAN } else { 1e-3 };
        outcome.push(
            train_step_overlapped(&mut st, &batch, idx, &scfg, lr)
                .map(|d| d.iter().map(|x| x.step).collect::<Vec<_>>())
                .map_err(|e| e.to_string()),
        );
    }
    cu::set_step_read_later(was);
    assert_eq!(
        outcome[..3],
        [Ok(vec![]), Ok(vec![1]), Ok(vec![2])],
        "{outcome:?}"
    );
    let e = outcome[3].as_ref().expect_err("step 3's loss is NaN");
    assert!(e.contains("non-finite loss at step 3"), "{e}");
}

// ---- empty tensors: every op with a zero-sized dimension gives the CPU's result (an empty
// output, zeros, the NaN of a mean over nothing) or the CPU's error, never a launch error or a
// different value ----

/// `Ok` values (NaN equal to NaN) or `Err` messages of one op on both backends.
fn same_outcome(
    name: &str,
    c: medssl::error::Result<Vec<Vec<f32>>>,
    g: medssl::error::Result<Vec<Vec<f32>>>,
) {
    match (c, g) {
        (Ok(c), Ok(g)) => {
            let same = c.len() == g.len()
                && c.iter().zip(&g).all(|(a, b)| {
                    a.len() == b.len()
                        && a.iter().zip(b).all(|(x, y)| {
                            (x.is_nan() && y.is_nan()) || (x - y).abs() <= 1e-6 * (1.0 + x.abs())
                        })
                });
            assert!(same, "{name}: CPU {c:?}, CUDA {g:?}");
        }
        (Err(c), Err(g)) => assert_eq!(c.to_string(), g.to_string(), "{name}"),
        (c, g) => panic!("{name}: CPU {c:?}, CUDA {g:?}"),
    }
}

#[test]
fn empty_tensors() {
    let Some(gpu) = gpu() else { return };
    let cpu = cpu();
    let run = |name: &str, f: &dyn Fn(&dyn Backend) -> medssl::error::Result<Vec<Tensor>>| {
        let h = |b: &dyn Backend| -> medssl::error::Result<Vec<Vec<f32>>> {
            f(b)?.iter().map(|t| b.to_host(t)).collect()
        };
        same_outcome(name, h(cpu), h(gpu));
    };
    let z = |b: &dyn Backend, s: &[usize]| b.full(s, 0.5).unwrap();
    run("axpby", &|b| {
        Ok(vec![b.axpby(1.0, &z(b, &[0, 3]), 2.0, &z(b, &[0, 3]))?])
    });
    run("scale", &|b| Ok(vec![b.scale(&z(b, &[0]), 2.0)?]));
    run("mul", &|b| Ok(vec![b.mul(&z(b, &[0, 4]), &z(b, &[0, 4]))?]));
    run("relu_fwd", &|b| Ok(vec![b.relu_fwd(&z(b, &[0, 4]))?]));
    run("relu_bwd", &|b| {
        Ok(vec![b.relu_bwd(&z(b, &[0, 4]), &z(b, &[0, 4]))?])
    });
    run("add_relu_fwd", &|b| {
        Ok(vec![b.add_relu_fwd(&z(b, &[0, 4]), &z(b, &[0, 4]))?])
    });
    run("add_assign", &|b| {
        let mut a = z(b, &[0, 4]);
        b.add_assign(&mut a, &z(b, &[0, 4]))?;
        Ok(vec![a])
    });
    run("sum_all", &|b| Ok(vec![b.sum_all(&z(b, &[0, 4]))?]));
    run("sum_rows", &|b| Ok(vec![b.sum_rows(&z(b, &[0, 4]), 4)?]));
    run("gap_fwd n0", &|b| {
        Ok(vec![b.global_avg_pool_fwd(&z(b, &[0, 3, 4, 4]))?])
    });
    run("gap_fwd hw0", &|b| {
        Ok(vec![b.global_avg_pool_fwd(&z(b, &[2, 3, 0, 4]))?])
    });
    run("gap_bwd", &|b| {
        Ok(vec![b.global_avg_pool_bwd(&z(b, &[0, 3]), &[0, 3, 4, 4])?])
    });
    run("matmul m0", &|b| {
        Ok(vec![b.matmul(
            &z(b, &[0, 3]),
            &z(b, &[3, 5]),
            false,
            false,
        )?])
    });
    run("matmul k0", &|b| {
        Ok(vec![b.matmul(
            &z(b, &[2, 0]),
            &z(b, &[0, 5]),
            false,
            false,
        )?])
    });
    run("linear n0", &|b| {
        Ok(vec![b.linear_fwd(
            &z(b, &[0, 3]),
            &z(b, &[4, 3]),
            Some(&z(b, &[4])),
        )?])
    });
    let cp = ConvParams {
        stride: 1,
        padding: 1,
    };
    run("conv fwd n0", &|b| {
        Ok(vec![b.conv2d_fwd(
            &z(b, &[0, 3, 5, 5]),
            &z(b, &[4, 3, 3, 3]),
            Some(&z(b, &[4])),
            cp,
        )?])
    });
    run("conv bwd n0", &|b| {
        let g = b.conv2d_bwd(
            &z(b, &[0, 3, 5, 5]),
            &z(b, &[4, 3, 3, 3]),
            &z(b, &[0, 4, 5, 5]),
            cp,
            true,
            true,
        )?;
        Ok(vec![g.x.unwrap(), g.weight, g.bias.unwrap()])
    });
    run("bn train fwd n0", &|b| {
        let o = b.batch_norm_train_fwd(&z(b, &[0, 3, 4, 4]), &z(b, &[3]), &z(b, &[3]), 1e-5)?;
        Ok(vec![o.y, o.mean, o.invstd])
    });
    run("bn train fwd running n0", &|b| {
        let (mut rm, mut rv) = (z(b, &[3]), z(b, &[3]));
        let o = b.batch_norm_train_fwd_running(
            &z(b, &[0, 3, 4, 4]),
            &z(b, &[3]),
            &z(b, &[3]),
            1e-5,
            &mut rm,
            &mut rv,
            0.1,
            BnAct::Relu,
        )?;
        Ok(vec![o.y, o.mean, o.invstd, rm, rv])
    });
    run("bn train bwd n0", &|b| {
        let (a, c, d) = b.batch_norm_train_bwd(
            &z(b, &[0, 3, 4, 4]),
            &z(b, &[3]),
            &z(b, &[3]),
            &z(b, &[3]),
            &z(b, &[0, 3, 4, 4]),
        )?;
        Ok(vec![a, c, d])
    });
    run("bn eval fwd n0", &|b| {
        Ok(vec![b.batch_norm_eval_fwd(
            &z(b, &[0, 3, 4, 4]),
            &z(b, &[3]),
            &z(b, &[3]),
            &z(b, &[3]),
            &z(b, &[3]),
            1e-5,
            BnAct::None,
        )?])
    });
    run("bn eval bwd n0", &|b| {
        let (a, c, d) = b.batch_norm_eval_bwd(
            &z(b, &[0, 3, 4, 4]),
            &z(b, &[3]),
            &z(b, &[3]),
            &z(b, &[3]),
            1e-5,
            &z(b, &[0, 3, 4, 4]),
        )?;
        Ok(vec![a, c, d])
    });
    run("l2n fwd", &|b| {
        Ok(vec![b.l2_normalize_fwd(&z(b, &[0, 8]))?])
    });
    run("l2n bwd", &|b| {
        Ok(vec![b.l2_normalize_bwd(&z(b, &[0, 8]), &z(b, &[0, 8]))?])
    });
    let pp = PoolParams {
        kernel: 3,
        stride: 2,
        padding: 1,
    };
    run("maxpool fwd", &|b| {
        Ok(vec![b.max_pool2d_fwd(&z(b, &[0, 3, 8, 8]), pp)?])
    });
    run("maxpool bwd", &|b| {
        Ok(vec![b.max_pool2d_bwd(
            &z(b, &[0, 3, 8, 8]),
            &z(b, &[0, 3, 4, 4]),
            pp,
        )?])
    });
    run("softmax fwd", &|b| Ok(vec![b.softmax_fwd(&z(b, &[0, 7]))?]));
    run("softmax bwd", &|b| {
        Ok(vec![b.softmax_bwd(&z(b, &[0, 7]), &z(b, &[0, 7]))?])
    });
    run("logsoftmax fwd", &|b| {
        Ok(vec![b.log_softmax_fwd(&z(b, &[0, 7]))?])
    });
    run("logsoftmax bwd", &|b| {
        Ok(vec![b.log_softmax_bwd(&z(b, &[0, 7]), &z(b, &[0, 7]))?])
    });
    run("xent fwd", &|b| {
        Ok(vec![b.cross_entropy_fwd(&z(b, &[0, 7]), &[])?])
    });
    run("xent bwd", &|b| {
        Ok(vec![b.cross_entropy_bwd(
            &z(b, &[0, 7]),
            &[],
            &z(b, &[]),
        )?])
    });
    run("entropy_weight", &|b| {
        Ok(vec![b.entropy_weight(&z(b, &[0, 7]))?])
    });
    run("wcons fwd", &|b| {
        Ok(vec![b.weighted_consistency_fwd(
            &z(b, &[0, 7]),
            &z(b, &[0, 7]),
            &z(b, &[0]),
        )?])
    });
    run("argmax", &|b| Ok(vec![b.argmax_rows(&z(b, &[0, 7]))?]));
    run("concat_rows", &|b| {
        Ok(vec![b.concat_rows(&z(b, &[2, 4]), &z(b, &[3, 4]), 0)?])
    });
    run("concat_rows both0", &|b| {
        Ok(vec![b.concat_rows(&z(b, &[0, 4]), &z(b, &[3, 4]), 0)?])
    });
    run("pgc fwd no keys", &|b| {
        let q = z(b, &[2, 4]);
        let ql = label_tensor(b, &[0, 1])?;
        Ok(vec![b.pgc_loss_fwd(
            &q,
            &ql,
            &z(b, &[2]),
            &z(b, &[0, 4]),
            &label_tensor(b, &[])?,
            &z(b, &[0]),
            0.1,
        )?])
    });
    run("pgc fwd q0", &|b| {
        let q = z(b, &[0, 4]);
        let ql = label_tensor(b, &[])?;
        Ok(vec![b.pgc_loss_fwd(
            &q,
            &ql,
            &z(b, &[0]),
            &z(b, &[3, 4]),
            &label_tensor(b, &[0, 1, 1])?,
            &z(b, &[3]),
            0.1,
        )?])
    });
    run("ring_write 0 rows", &|b| {
        let mut d = z(b, &[4, 3]);
        b.ring_write_rows(&mut d, &z(b, &[0, 3]), 2)?;
        Ok(vec![d])
    });
    run("simfusion b0", &|b| {
        let (y, st) = b.similarity_fusion_fwd(&z(b, &[0, 4, 4, 4]), &z(b, &[0, 4, 2, 2]))?;
        Ok(vec![y, st])
    });
    run("dsr align bl0", &|b| {
        Ok(vec![b.dsr_alignment(
            &z(b, &[0, 4]),
            &[],
            &z(b, &[3, 4]),
            &label_tensor(b, &[0, 1, 2])?,
            &z(b, &[3, 4]),
            &z(b, &[3]),
        )?])
    });
    run("dsr align bu0", &|b| {
        Ok(vec![b.dsr_alignment(
            &z(b, &[2, 4]),
            &[0, 1],
            &z(b, &[0, 4]),
            &label_tensor(b, &[])?,
            &z(b, &[3, 4]),
            &z(b, &[3]),
        )?])
    });
    run("ema empty", &|b| {
        let mut t = z(b, &[0]);
        b.ema_update(&mut t, &z(b, &[0]), 0.9)?;
        Ok(vec![t])
    });
}
