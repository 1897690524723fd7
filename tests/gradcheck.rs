//! Finite-difference gradient checks of every differentiable op through the autograd tape, of the
//! whole MedFuseNet, and value checks of the optimiser / EMA / DSR primitives.
//!
//! Method: for inputs `x` and a fixed random `r`, `f(x) = Σ r ⊙ op(x)` (summed in f64). The
//! analytic gradient comes from `backward_with(y, r)`. For each differentiable input separately,
//! the directional derivative `⟨∇f, v⟩` along random directions `v` (and along a few coordinate
//! vectors) is compared with a central difference of `f` along `v` (fourth order, step `h`).
//! The perturbed inputs are rounded to f32, so the analytic side is dotted with the direction
//! actually taken. Pass when `|dd − fd| ≤ rtol · max(|dd|, |fd|) + noise`, where `noise` bounds
//! the effect of the f32 rounding of the outputs (`noise_ulps · ε · ‖r ⊙ y‖₂` per evaluation,
//! through the stencil). A random-direction probe whose derivative is not well above `noise`
//! is a failure (it could not detect a wrong gradient). Kinks (ReLU at 0, max-pool ties) are
//! kept out of reach of the step by construction of the inputs; for the whole network, BN
//! shifts keep every ReLU input positive and the step shrinks until differences at `h`, `h/2`
//! and `h/4` agree. `negative_controls_are_rejected` shows the checker failing on wrong
//! gradients.

use std::cell::Cell;

use medssl::autograd::{Act, Graph, Var};
use medssl::backend::{self, label_tensor, AdamParams, Backend, ConvParams, PoolParams, SgdParams};
use medssl::nn::{Binding, Kind, MedFuseNet, ModelConfig};
use medssl::rng::stream;
use medssl::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------- helpers

fn cpu() -> &'static dyn Backend {
    backend::get(Device::Cpu).unwrap()
}

fn t(data: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(data, shape).unwrap()
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn normal(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(1e-300);
            let u2: f64 = rng.random::<f64>();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

fn rand_t(rng: &mut ChaCha8Rng, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    t(uniform(rng, numel(shape), lo, hi), shape)
}

fn normal_t(rng: &mut ChaCha8Rng, shape: &[usize], s: f32) -> Tensor {
    t(
        normal(rng, numel(shape))
            .into_iter()
            .map(|v| v * s)
            .collect(),
        shape,
    )
}

/// Values bounded away from 0 (|x| ∈ [0.1, 1]): ReLU kinks are out of reach of `h = 1e-2`.
fn away_from_zero(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let v = (0..numel(shape))
        .map(|_| {
            let m = rng.random_range(0.1f32..1.0);
            if rng.random::<bool>() {
                m
            } else {
                -m
            }
        })
        .collect();
    t(v, shape)
}

/// All values distinct and at least 0.05 apart: no max-pool window has a near-tie that a
/// perturbation of size `h ≤ 1e-2` could flip.
fn well_separated(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n = numel(shape);
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(rng);
    let v = perm
        .into_iter()
        .map(|k| (k as f32 - n as f32 / 2.0) * 0.05)
        .collect();
    t(v, shape)
}

/// Rows rescaled to unit L2 norm (last dimension `d`).
fn unit_rows(rng: &mut ChaCha8Rng, rows: usize, d: usize) -> Tensor {
    let mut v = normal(rng, rows * d);
    for r in v.chunks_mut(d) {
        let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
        r.iter_mut().for_each(|x| *x /= n);
    }
    t(v, &[rows, d])
}

fn labels(rng: &mut ChaCha8Rng, n: usize, c: usize) -> Vec<usize> {
    (0..n).map(|_| rng.random_range(0..c)).collect()
}

// ---------------------------------------------------------------- the checker

/// Step size, tolerance and how many probes per input.
#[derive(Clone, Copy)]
struct Opts {
    h: f64,
    rtol: f64,
    /// Random directions per input.
    dirs: usize,
    /// Coordinate directions per input (the largest |gradient| entry, then random ones).
    coords: usize,
    /// Fourth-order central difference (4 evaluations) instead of the plain one (2).
    five_point: bool,
    /// Random directions of unit L2 norm, half along the analytic gradient (`h` is then the
    /// length of the step, not a per-element size): for functions with many kinks (the whole
    /// network), where the step must be short but the derivative well above rounding noise.
    unit_dirs: bool,
    /// Assumed rounding error of each output, in ulps of its magnitude.
    noise_ulps: f64,
    /// Shrink the step (from `h`, by 4× at a time) until the central differences with `h`, `h/2`
    /// and `h/4` agree, i.e. no kink lies within reach; then compare with the `h/4` one.
    /// For the whole network, whose ReLU/max-pool kinks cannot all be kept away by construction.
    adaptive: bool,
    /// Count (instead of failing) random probes whose derivative is not well above the noise.
    allow_uninformative: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            h: 1e-2,
            rtol: 1e-2,
            dirs: 3,
            coords: 4,
            five_point: true,
            unit_dirs: false,
            noise_ulps: 4.0,
            adaptive: false,
            allow_uninformative: false,
        }
    }
}

/// Summary of a passing check.
#[derive(Debug)]
struct Stats {
    probes: usize,
    /// Largest `err / bound` seen (< 1 means pass).
    worst: f64,
    /// Inputs checked, and those with at least one informative random-direction probe.
    inputs: usize,
    informative_inputs: usize,
    /// Random-direction probes whose derivative was not well above the noise (only counted
    /// when `Opts::allow_uninformative`; otherwise such a probe is a failure).
    uninformative: usize,
}

/// Forward: all inputs → flattened outputs.
type EvalFn<'a> = dyn Fn(&[Tensor]) -> Vec<f32> + 'a;
/// Analytic: inputs and upstream gradient `r` → one gradient per input (None when not checked).
type GradFn<'a> = dyn Fn(&[Tensor], &[f32]) -> Vec<Option<Vec<f32>>> + 'a;
/// Changes the analytic gradient of one input (negative controls).
type Tamper<'a> = dyn Fn(&mut [f32]) + 'a;

/// `Σ r y` and `‖r ⊙ y‖₂` in f64 (the rounding errors of the outputs, a few ulps each, add up
/// like a random walk).
fn dot_r(r: &[f32], y: &[f32]) -> (f64, f64) {
    assert_eq!(r.len(), y.len(), "output size changed under perturbation");
    let (s, q) = r.iter().zip(y).fold((0.0, 0.0), |(s, q), (&r, &y)| {
        let p = r as f64 * y as f64;
        (s + p, q + p * p)
    });
    (s, q.sqrt())
}

#[allow(clippy::too_many_arguments)]
fn check_grads(
    name: &str,
    inputs: &[Tensor],
    diff: &[bool],
    eval: &EvalFn<'_>,
    grads: &GradFn<'_>,
    o: Opts,
    tamper: Option<&Tamper<'_>>,
) -> Result<Stats, String> {
    assert_eq!(inputs.len(), diff.len());
    let mut rng = stream(0x6ead, name);
    let y0 = eval(inputs);
    let r = normal(&mut rng, y0.len());
    let mut g = grads(inputs, &r);
    let mut stats = Stats {
        probes: 0,
        worst: 0.0,
        inputs: 0,
        informative_inputs: 0,
        uninformative: 0,
    };
    for (i, x) in inputs.iter().enumerate() {
        if !diff[i] {
            continue;
        }
        let xv = x.to_vec().unwrap();
        let n = xv.len();
        let gi = g[i]
            .as_mut()
            .ok_or_else(|| format!("{name}: no gradient for input {i}"))?;
        if gi.len() != n {
            return Err(format!(
                "{name}: gradient of input {i} has {} elements, the input {n}",
                gi.len()
            ));
        }
        if let Some(f) = tamper {
            f(gi);
        }
        let gi: &[f32] = gi;
        if let Some(k) = gi.iter().position(|v| !v.is_finite()) {
            return Err(format!("{name}: input {i}: gradient[{k}] = {}", gi[k]));
        }
        // Probe directions: random ones, then coordinates (largest |g| first).
        let mut probes: Vec<(Vec<f32>, bool)> = (0..o.dirs)
            .map(|_| {
                let u = uniform(&mut rng, n, -1.0, 1.0);
                if !o.unit_dirs {
                    return (u, true);
                }
                let norm = |w: &[f32]| w.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt();
                let (nu, ng) = (norm(&u), norm(gi).max(1e-30));
                let w: Vec<f64> = u
                    .iter()
                    .zip(gi)
                    .map(|(&a, &b)| a as f64 / nu + b as f64 / ng)
                    .collect();
                let nw = w.iter().map(|a| a * a).sum::<f64>().sqrt();
                (w.into_iter().map(|a| (a / nw) as f32).collect(), true)
            })
            .collect();
        let argmax = (0..n)
            .max_by(|&a, &b| gi[a].abs().total_cmp(&gi[b].abs()))
            .unwrap_or(0);
        let mut coords = vec![argmax];
        let mut tries = 0;
        while coords.len() < o.coords.min(n) && tries < 100 {
            let k = rng.random_range(0..n);
            if !coords.contains(&k) {
                coords.push(k);
            }
            tries += 1;
        }
        for &k in coords.iter().take(o.coords) {
            let mut v = vec![0.0f32; n];
            v[k] = 1.0;
            probes.push((v, false));
        }
        let mut informative = false;
        for (pi, (v, random)) in probes.into_iter().enumerate() {
            // One finite difference with step `h`: (analytic along the direction actually
            // taken after rounding to f32, finite difference, rounding-noise bound).
            let mut at = inputs.to_vec();
            let mut fd_at = |h: f64, five_point: bool| -> (f64, f64, f64) {
                let at_offset = |s: f64| -> Vec<f32> {
                    xv.iter()
                        .zip(&v)
                        .map(|(&a, &d)| (a as f64 + s * h * d as f64) as f32)
                        .collect()
                };
                let (xp, xm) = (at_offset(1.0), at_offset(-1.0));
                let dd: f64 = xp
                    .iter()
                    .zip(&xm)
                    .zip(gi)
                    .map(|((&p, &m), &gk)| (p as f64 - m as f64) / (2.0 * h) * gk as f64)
                    .sum();
                let mut f_at = |xs: Vec<f32>| {
                    at[i] = t(xs, x.shape());
                    dot_r(&r, &eval(&at))
                };
                let (fp, np) = f_at(xp);
                let (fm, nm) = f_at(xm);
                let (fd, noise) = if five_point {
                    // (8 (f₁ − f₋₁) − (f₂ − f₋₂)) / 12h: truncation error O(h⁴).
                    let (fp2, np2) = f_at(at_offset(2.0));
                    let (fm2, nm2) = f_at(at_offset(-2.0));
                    (
                        (8.0 * (fp - fm) - (fp2 - fm2)) / (12.0 * h),
                        (8.0 * (np + nm) + np2 + nm2) / (12.0 * h),
                    )
                } else {
                    ((fp - fm) / (2.0 * h), (np + nm) / (2.0 * h))
                };
                (dd, fd, o.noise_ulps * f32::EPSILON as f64 * noise + 1e-12)
            };
            let (dd, fd, noise) = if !o.adaptive {
                fd_at(o.h, o.five_point)
            } else {
                // Accept a step only where the function is smooth along it: the differences
                // with h, h/2 and h/4 agree (a kink crossed by one and not the next breaks
                // that; for a smooth function they differ by O(h²)). Otherwise shrink h.
                let mut h = o.h;
                let mut found = None;
                let mut tried = Vec::new();
                let agree = |(f1, n1): (f64, f64), (f2, n2): (f64, f64)| {
                    (f1 - f2).abs() <= 0.25 * o.rtol * f1.abs().max(f2.abs()) + n1 + n2
                };
                for _ in 0..6 {
                    let (_, f1, n1) = fd_at(h, o.five_point);
                    let (_, f2, n2) = fd_at(h / 2.0, o.five_point);
                    let (d3, f3, n3) = fd_at(h / 4.0, o.five_point);
                    tried.push((h, f1, f2, f3));
                    if agree((f1, n1), (f2, n2)) && agree((f2, n2), (f3, n3)) {
                        found = Some((d3, f3, n3));
                        break;
                    }
                    h /= 4.0;
                }
                found.ok_or_else(|| {
                    format!(
                        "{name}: input {i}, probe {pi}: no step h where the function is                          smooth (h, fd(h), fd(h/2), fd(h/4)): {tried:?}"
                    )
                })?
            };
            let err = (dd - fd).abs();
            let bound = o.rtol * dd.abs().max(fd.abs()) + noise;
            stats.probes += 1;
            let what = if random {
                "random direction".to_string()
            } else {
                format!("coordinate {}", v.iter().position(|&e| e == 1.0).unwrap())
            };
            if err.is_nan() || err > bound {
                if std::env::var("GC_DEBUG").is_ok() {
                    for hh in [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5] {
                        let (d, f, nn) = fd_at(hh, false);
                        eprintln!("DEBUG h {hh:e}: dd {d:.6} fd {f:.6} noise {nn:.2e}");
                    }
                }
                return Err(format!(
                    "{name}: input {i} (shape {:?}), probe {pi} ({what}): analytic {dd:.6e} vs \
                     finite difference {fd:.6e} (|diff| {err:.3e} > bound {bound:.3e})",
                    x.shape()
                ));
            }
            if random && dd.abs().max(fd.abs()) < 20.0 * noise {
                if o.allow_uninformative {
                    stats.uninformative += 1;
                    stats.worst = stats.worst.max(err / bound);
                    continue;
                }
                return Err(format!(
                    "{name}: input {i}, probe {pi}: derivative {dd:.3e} is not well above the \
                     rounding noise {noise:.3e}: the check would be vacuous"
                ));
            }
            stats.worst = stats.worst.max(err / bound);
            if random {
                informative = true;
            }
        }
        stats.inputs += 1;
        stats.informative_inputs += informative as usize;
    }
    Ok(stats)
}

/// Builds an op from leaves; returns the output whose gradient `backward_with` seeds.
type Build<'a> = dyn Fn(&mut Graph, &[Var]) -> Var + 'a;

fn op_eval(build: &Build<'_>, xs: &[Tensor]) -> Vec<f32> {
    let mut g = Graph::new();
    let vs: Vec<Var> = xs.iter().map(|x| g.leaf(x.clone(), false)).collect();
    let y = build(&mut g, &vs);
    g.value(y).to_vec().unwrap()
}

fn op_grads(build: &Build<'_>, diff: &[bool], xs: &[Tensor], r: &[f32]) -> Vec<Option<Vec<f32>>> {
    let mut g = Graph::new();
    let vs: Vec<Var> = xs
        .iter()
        .zip(diff)
        .map(|(x, &d)| g.leaf(x.clone(), d))
        .collect();
    let y = build(&mut g, &vs);
    let shape = g.value(y).shape().to_vec();
    g.backward_with(y, t(r.to_vec(), &shape)).unwrap();
    vs.iter()
        .zip(diff)
        .map(|(v, &d)| {
            if d {
                g.grad(*v).map(|t| t.to_vec().unwrap())
            } else {
                None
            }
        })
        .collect()
}

/// Checks an op built by `build`; returns the checker's verdict.
fn try_op(
    name: &str,
    inputs: &[Tensor],
    diff: &[bool],
    build: &Build<'_>,
    o: Opts,
    tamper: Option<&Tamper<'_>>,
) -> Result<Stats, String> {
    check_grads(
        name,
        inputs,
        diff,
        &|xs| op_eval(build, xs),
        &|xs, r| op_grads(build, diff, xs, r),
        o,
        tamper,
    )
}

/// Checks an op and panics with the checker's message on failure.
fn check_op(name: &str, inputs: &[Tensor], diff: &[bool], build: &Build<'_>, o: Opts) {
    match try_op(name, inputs, diff, build, o, None) {
        Ok(s) => println!(
            "ok   {name}: {} probes, worst err/bound {:.3}",
            s.probes, s.worst
        ),
        Err(e) => panic!("gradient check failed: {e}"),
    }
}

// ---------------------------------------------------------------- the checker can fail

#[test]
fn negative_controls_are_rejected() {
    let mut rng = stream(1, "negative");
    let x = normal_t(&mut rng, &[1, 2, 7, 6], 1.0);
    let w = normal_t(&mut rng, &[3, 2, 3, 3], 0.4);
    let b = normal_t(&mut rng, &[3], 0.5);
    let p = ConvParams {
        stride: 2,
        padding: 1,
    };
    let conv = move |g: &mut Graph, v: &[Var]| g.conv2d(v[0], v[1], Some(v[2]), p).unwrap();
    let inputs = [x, w, b];
    let all = [true, true, true];
    // The untampered gradient passes ...
    try_op("neg.conv", &inputs, &all, &conv, Opts::default(), None).unwrap();
    // ... a gradient 10 % too large fails, for each input separately ...
    let scale = |g: &mut [f32]| g.iter_mut().for_each(|v| *v *= 1.1);
    for i in 0..3 {
        let mut only = [false; 3];
        only[i] = true;
        let r = try_op(
            "neg.conv",
            &inputs,
            &only,
            &conv,
            Opts::default(),
            Some(&scale),
        );
        assert!(r.is_err(), "input {i}: gradient ×1.1 was accepted: {r:?}");
        println!("rejected as expected: {}", r.unwrap_err());
    }
    // ... and so does a permuted one, and a sign flip.
    let rev = |g: &mut [f32]| g.reverse();
    let r = try_op(
        "neg.conv",
        &inputs,
        &all,
        &conv,
        Opts::default(),
        Some(&rev),
    );
    assert!(r.is_err(), "reversed gradient accepted");
    let neg = |g: &mut [f32]| g.iter_mut().for_each(|v| *v = -*v);
    assert!(try_op(
        "neg.conv",
        &inputs,
        &all,
        &conv,
        Opts::default(),
        Some(&neg)
    )
    .is_err());

    // A wrong formula: softmax's analytic gradient checked against log-softmax's values.
    let z = normal_t(&mut rng, &[4, 5], 1.5);
    let sm = |g: &mut Graph, v: &[Var]| g.softmax(v[0]).unwrap();
    let lsm = |g: &mut Graph, v: &[Var]| g.log_softmax(v[0]).unwrap();
    let r = check_grads(
        "neg.softmax",
        std::slice::from_ref(&z),
        &[true],
        &|xs| op_eval(&lsm, xs),
        &|xs, r| op_grads(&sm, &[true], xs, r),
        Opts::default(),
        None,
    );
    assert!(r.is_err(), "softmax gradient accepted for log_softmax");

    // A smooth op scaled by 1.1 with the smallest rtol headroom still fails (pgc, tau 0.1).
    let q = unit_rows(&mut rng, 3, 4);
    let k = unit_rows(&mut rng, 5, 4);
    let (ql, kl) = (t(vec![0., 1., 0.], &[3]), t(vec![0., 1., 1., 0., 2.], &[5]));
    let (qw, kw) = (t(vec![1.0, 0.7, 0.4], &[3]), t(vec![1.0; 5], &[5]));
    let pgc = |g: &mut Graph, v: &[Var]| g.pgc_loss(v[0], &ql, &qw, &k, &kl, &kw, 0.1).unwrap();
    let o = Opts {
        h: 5e-3,
        ..Opts::default()
    };
    try_op("neg.pgc", std::slice::from_ref(&q), &[true], &pgc, o, None).unwrap();
    let s = |g: &mut [f32]| g.iter_mut().for_each(|v| *v *= 1.05);
    assert!(try_op("neg.pgc", &[q], &[true], &pgc, o, Some(&s)).is_err());
}

// ---------------------------------------------------------------- ops

#[test]
fn conv2d_gradients() {
    let mut rng = stream(2, "conv2d");
    // (n, cin, h, w, cout, k, stride, pad, bias)
    let cases = [
        (1, 3, 7, 9, 4, 1, 1, 0, true),
        (2, 2, 8, 7, 3, 1, 2, 0, false),
        (1, 3, 9, 9, 5, 3, 1, 1, false),
        (2, 3, 7, 8, 4, 3, 2, 1, true),
        (1, 2, 9, 7, 3, 3, 2, 0, true),
        (1, 3, 6, 5, 2, 3, 1, 0, false),
        (2, 3, 11, 13, 4, 7, 2, 3, false),
        (1, 2, 9, 9, 3, 7, 1, 3, true),
        (1, 1, 7, 7, 1, 7, 1, 0, true),
    ];
    for (n, cin, h, w, cout, k, s, p, bias) in cases {
        let x = rand_t(&mut rng, &[n, cin, h, w], -1.0, 1.0);
        let wt = normal_t(
            &mut rng,
            &[cout, cin, k, k],
            1.0 / ((cin * k * k) as f32).sqrt(),
        );
        let b = rand_t(&mut rng, &[cout], -0.5, 0.5);
        let cp = ConvParams {
            stride: s,
            padding: p,
        };
        let name = format!("conv2d n{n} c{cin}->{cout} {h}x{w} k{k} s{s} p{p} bias {bias}");
        if bias {
            let f = move |g: &mut Graph, v: &[Var]| g.conv2d(v[0], v[1], Some(v[2]), cp).unwrap();
            check_op(&name, &[x, wt, b], &[true; 3], &f, Opts::default());
        } else {
            let f = move |g: &mut Graph, v: &[Var]| g.conv2d(v[0], v[1], None, cp).unwrap();
            check_op(
                &name,
                &[x.clone(), wt.clone()],
                &[true; 2],
                &f,
                Opts::default(),
            );
            // Weight gradient alone (input a constant: the backward skips gx).
            check_op(
                &format!("{name} (x const)"),
                &[x, wt],
                &[false, true],
                &f,
                Opts::default(),
            );
        }
    }
}

#[test]
fn linear_gradients() {
    let mut rng = stream(3, "linear");
    for (n, din, dout, bias) in [
        (1, 5, 3, true),
        (4, 7, 2, false),
        (3, 1, 4, true),
        (5, 3, 3, false),
    ] {
        let x = rand_t(&mut rng, &[n, din], -1.0, 1.0);
        let w = normal_t(&mut rng, &[dout, din], 0.7);
        let b = rand_t(&mut rng, &[dout], -1.0, 1.0);
        let name = format!("linear n{n} {din}->{dout} bias {bias}");
        if bias {
            let f = |g: &mut Graph, v: &[Var]| g.linear(v[0], v[1], Some(v[2])).unwrap();
            check_op(&name, &[x, w, b], &[true; 3], &f, Opts::default());
        } else {
            let f = |g: &mut Graph, v: &[Var]| g.linear(v[0], v[1], None).unwrap();
            check_op(&name, &[x, w], &[true; 2], &f, Opts::default());
        }
    }
}

#[test]
fn matmul_gradients() {
    let mut rng = stream(4, "matmul");
    let (m, k, n) = (3, 5, 4);
    for batch in [None, Some(2), Some(1)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let sa = if ta { [k, m] } else { [m, k] };
            let sb = if tb { [n, k] } else { [k, n] };
            let (sa, sb): (Vec<usize>, Vec<usize>) = match batch {
                None => (sa.to_vec(), sb.to_vec()),
                Some(b) => ([&[b][..], &sa].concat(), [&[b][..], &sb].concat()),
            };
            let a = normal_t(&mut rng, &sa, 1.0);
            let b = normal_t(&mut rng, &sb, 1.0);
            let f = move |g: &mut Graph, v: &[Var]| g.matmul(v[0], v[1], ta, tb).unwrap();
            let name = format!("matmul {sa:?} {sb:?} ta {ta} tb {tb}");
            check_op(&name, &[a, b], &[true, true], &f, Opts::default());
        }
    }
}

#[test]
fn batch_norm_gradients() {
    let mut rng = stream(5, "bn");
    for shape in [[2, 3, 3, 5], [1, 4, 3, 3], [3, 2, 1, 1], [1, 1, 2, 3]] {
        let c = shape[1];
        // Per-channel offsets and scales so the batch statistics matter.
        let mut xv = normal(&mut rng, numel(&shape));
        let hw = shape[2] * shape[3];
        for (j, v) in xv.iter_mut().enumerate() {
            let ch = (j / hw) % c;
            *v = *v * (0.5 + ch as f32) + ch as f32 * 0.7 - 0.5;
        }
        let x = t(xv, &shape);
        let gamma = rand_t(&mut rng, &[c], -1.5, 1.5);
        let beta = rand_t(&mut rng, &[c], -1.0, 1.0);
        let train =
            |g: &mut Graph, v: &[Var]| g.batch_norm_train(v[0], v[1], v[2], 1e-5).unwrap().0;
        check_op(
            &format!("batch_norm_train {shape:?}"),
            &[x.clone(), gamma.clone(), beta.clone()],
            &[true; 3],
            &train,
            Opts::default(),
        );
        let rm = rand_t(&mut rng, &[c], -1.0, 1.0);
        let rv = rand_t(&mut rng, &[c], 0.3, 2.0);
        let eval = |g: &mut Graph, v: &[Var]| {
            g.batch_norm_eval(v[0], v[1], v[2], &rm, &rv, 1e-5, Act::None)
                .unwrap()
        };
        check_op(
            &format!("batch_norm_eval {shape:?}"),
            &[x, gamma, beta],
            &[true; 3],
            &eval,
            Opts::default(),
        );
    }
}

/// `batch_norm_train_running` and `batch_norm_eval` with a fused activation (one node) give the
/// same values, running statistics and gradients as the separate nodes (the norm, then `relu` /
/// `add_relu`). On CPU the arithmetic is the same, so the comparison is exact; finite differences
/// at the ReLU's kink would be unreliable (the batch norm puts many outputs near 0). The separate
/// ops have their own gradient checks above.
#[test]
fn fused_batch_norm_activation_matches_separate_nodes() {
    let mut rng = stream(5, "bn_act");
    for shape in [[2, 3, 3, 5], [1, 4, 3, 3], [3, 2, 1, 1]] {
        let c = shape[1];
        let x = normal_t(&mut rng, &shape, 1.5);
        let gamma = rand_t(&mut rng, &[c], -1.5, 1.5);
        let beta = rand_t(&mut rng, &[c], -1.0, 1.0);
        let r = normal_t(&mut rng, &shape, 1.0);
        let gy = normal_t(&mut rng, &shape, 1.0);
        let (rm, rv) = (
            rand_t(&mut rng, &[c], -1.0, 1.0),
            rand_t(&mut rng, &[c], 0.3, 2.0),
        );
        for (train, join) in [(true, false), (true, true), (false, false), (false, true)] {
            let run = |fused: bool| {
                let mut g = Graph::new();
                let v: Vec<Var> = [&x, &gamma, &beta, &r]
                    .iter()
                    .map(|t| g.leaf((*t).clone(), true))
                    .collect();
                // Updated in place: copies, so that both runs start from the same statistics.
                let (mut nrm, mut nrv) = (rm.clone(), rv.clone());
                let mut norm = |g: &mut Graph, act: Act| {
                    if train {
                        g.batch_norm_train_running(
                            v[0], v[1], v[2], 1e-5, &mut nrm, &mut nrv, 0.1, act,
                        )
                    } else {
                        g.batch_norm_eval(v[0], v[1], v[2], &rm, &rv, 1e-5, act)
                    }
                    .unwrap()
                };
                let y = if fused {
                    norm(&mut g, if join { Act::AddRelu(v[3]) } else { Act::Relu })
                } else {
                    let h = norm(&mut g, Act::None);
                    if join {
                        g.add_relu(h, v[3]).unwrap()
                    } else {
                        g.relu(h).unwrap()
                    }
                };
                g.backward_with(y, gy.clone()).unwrap();
                let mut out = vec![g.value(y).to_vec().unwrap(), nrm.to_vec().unwrap()];
                out.push(nrv.to_vec().unwrap());
                for (i, &var) in v.iter().enumerate() {
                    match g.grad(var) {
                        Some(t) => out.push(t.to_vec().unwrap()),
                        None => assert!(i == 3 && !join, "input {i} got no gradient"),
                    }
                }
                out
            };
            let (fused, separate) = (run(true), run(false));
            assert_eq!(fused.len(), if join { 7 } else { 6 });
            assert_eq!(fused, separate, "{shape:?} train {train} join {join}");
            let zeros = fused[0].iter().filter(|v| **v == 0.0).count();
            assert!(
                zeros > 0 && zeros < fused[0].len(),
                "{shape:?} train {train}: ReLU clips none or all"
            );
        }
    }
}

#[test]
fn relu_and_pool_gradients() {
    let mut rng = stream(6, "relu_pool");
    for shape in [vec![2, 3, 5, 7], vec![1, 9], vec![4]] {
        let x = away_from_zero(&mut rng, &shape);
        let f = |g: &mut Graph, v: &[Var]| g.relu(v[0]).unwrap();
        check_op(
            &format!("relu {shape:?}"),
            std::slice::from_ref(&x),
            &[true],
            &f,
            Opts::default(),
        );
        // relu(a + b) with a + b = 1.5·x, as far from the kink as x.
        let half = x.backend().unwrap().scale(&x, 0.5).unwrap();
        let f = |g: &mut Graph, v: &[Var]| g.add_relu(v[0], v[1]).unwrap();
        check_op(
            &format!("add_relu {shape:?}"),
            &[x, half],
            &[true, true],
            &f,
            Opts::default(),
        );
    }
    for (shape, k, s, p) in [
        ([2, 3, 9, 7], 3, 2, 1),
        ([1, 2, 8, 8], 3, 2, 1),
        ([1, 2, 7, 9], 2, 2, 0),
        ([2, 1, 6, 6], 2, 2, 0),
        ([1, 1, 5, 5], 3, 1, 1),
    ] {
        let x = well_separated(&mut rng, &shape);
        let pp = PoolParams {
            kernel: k,
            stride: s,
            padding: p,
        };
        let f = move |g: &mut Graph, v: &[Var]| g.max_pool2d(v[0], pp).unwrap();
        check_op(
            &format!("max_pool2d {shape:?} k{k} s{s} p{p}"),
            &[x],
            &[true],
            &f,
            Opts::default(),
        );
    }
    for shape in [[2, 3, 5, 7], [1, 1, 1, 1], [1, 4, 2, 3]] {
        let x = normal_t(&mut rng, &shape, 1.0);
        let f = |g: &mut Graph, v: &[Var]| g.global_avg_pool(v[0]).unwrap();
        check_op(
            &format!("global_avg_pool {shape:?}"),
            &[x],
            &[true],
            &f,
            Opts::default(),
        );
    }
}

#[test]
fn softmax_family_gradients() {
    let mut rng = stream(7, "softmax");
    for shape in [vec![5, 7], vec![2, 3, 4], vec![1, 6], vec![3, 2]] {
        let x = normal_t(&mut rng, &shape, 2.0);
        let f = |g: &mut Graph, v: &[Var]| g.softmax(v[0]).unwrap();
        check_op(
            &format!("softmax {shape:?}"),
            std::slice::from_ref(&x),
            &[true],
            &f,
            Opts::default(),
        );
        let f = |g: &mut Graph, v: &[Var]| g.log_softmax(v[0]).unwrap();
        check_op(
            &format!("log_softmax {shape:?}"),
            &[x],
            &[true],
            &f,
            Opts::default(),
        );
    }
    for (rows, d) in [(4, 6), (1, 3), (6, 5), (2, 1)] {
        // Row norms in [0.5, 2]: away from the 1e-12 clamp, moderate curvature.
        let mut x = unit_rows(&mut rng, rows, d).to_vec().unwrap();
        for r in x.chunks_mut(d) {
            let s = rng.random_range(0.5f32..2.0);
            r.iter_mut().for_each(|v| *v *= s);
        }
        let f = |g: &mut Graph, v: &[Var]| g.l2_normalize(v[0]).unwrap();
        if d == 1 {
            // The gradient of x/|x| is 0 in one dimension: check the coordinates only.
            let o = Opts {
                dirs: 0,
                ..Opts::default()
            };
            check_op("l2_normalize d1", &[t(x, &[rows, d])], &[true], &f, o);
            continue;
        }
        check_op(
            &format!("l2_normalize [{rows}, {d}]"),
            &[t(x, &[rows, d])],
            &[true],
            &f,
            Opts::default(),
        );
    }
}

#[test]
fn loss_gradients() {
    let mut rng = stream(8, "losses");
    for (b, c) in [(1, 3), (5, 4), (7, 10), (2, 2)] {
        let z = normal_t(&mut rng, &[b, c], 2.0);
        let y = labels(&mut rng, b, c);
        let f = |g: &mut Graph, v: &[Var]| g.cross_entropy(v[0], &y).unwrap();
        check_op(
            &format!("cross_entropy [{b}, {c}]"),
            &[z],
            &[true],
            &f,
            Opts::default(),
        );
    }
    for (b, c) in [(1, 3), (6, 4), (9, 7)] {
        let zs = normal_t(&mut rng, &[b, c], 2.0);
        let zt = normal_t(&mut rng, &[b, c], 2.0);
        let mut w = uniform(&mut rng, b, 0.0, 1.0);
        if b > 2 {
            w[1] = 0.0;
        }
        let w = t(w, &[b]);
        let f = |g: &mut Graph, v: &[Var]| g.weighted_consistency(v[0], &zt, &w).unwrap();
        check_op(
            &format!("weighted_consistency [{b}, {c}]"),
            &[zs],
            &[true],
            &f,
            Opts::default(),
        );
    }
}

#[test]
fn pgc_loss_gradients() {
    let mut rng = stream(9, "pgc");
    // Query labels use classes 0..=2 and 5 (5 appears in no key); key labels use 0..=2 and 4
    // (4 appears in no query).
    for (tau, bq, nk, e) in [(0.1f32, 6, 11, 8), (0.5, 4, 7, 5), (0.1, 1, 5, 3)] {
        let q = unit_rows(&mut rng, bq, e);
        let k = unit_rows(&mut rng, nk, e);
        let mut ql: Vec<usize> = (0..bq).map(|i| i % 3).collect();
        if bq > 1 {
            ql[bq - 1] = 5;
        }
        let mut kl: Vec<usize> = (0..nk).map(|a| a % 3).collect();
        kl[nk - 1] = 4;
        let mut qw = uniform(&mut rng, bq, 0.2, 1.0);
        if bq > 3 {
            qw[1] = 0.0;
        }
        let qw = t(qw, &[bq]);
        let kw = rand_t(&mut rng, &[nk], 0.2, 1.0);
        let (qlt, klt) = (
            label_tensor(cpu(), &ql).unwrap(),
            label_tensor(cpu(), &kl).unwrap(),
        );
        let f = |g: &mut Graph, v: &[Var]| g.pgc_loss(v[0], &qlt, &qw, &k, &klt, &kw, tau).unwrap();
        let o = Opts {
            h: if tau < 0.2 { 5e-3 } else { 1e-2 },
            ..Opts::default()
        };
        let name = format!("pgc_loss tau {tau} B {bq} K {nk} E {e}");
        check_op(&name, std::slice::from_ref(&q), &[true], &f, o);
        // Queries with no positive key, and zero-weight queries, get exactly zero gradient.
        let gq = op_grads(&f, &[true], std::slice::from_ref(&q), &[1.0])[0]
            .clone()
            .unwrap();
        for i in 0..bq {
            let has_pos = kl.contains(&ql[i]);
            let zero = gq[i * e..(i + 1) * e].iter().all(|&v| v == 0.0);
            let w0 = qw.to_vec().unwrap()[i] == 0.0;
            assert_eq!(
                zero,
                !has_pos || w0,
                "{name}: query {i} (label {}, positives {has_pos}, zero weight {w0})",
                ql[i]
            );
        }
    }
}

#[test]
fn similarity_fusion_gradients() {
    let mut rng = stream(10, "fusion");
    for (b, d, lo, hi) in [
        (1, 4, (5, 3), (2, 3)),
        (2, 3, (4, 4), (1, 3)),
        (2, 4, (3, 3), (1, 1)),
        (1, 2, (6, 5), (3, 2)),
        // Rows of 35 pixels: the softmax's 16-lane maximum and the 8-lane sums with tails.
        (2, 3, (5, 7), (2, 2)),
    ] {
        let low = normal_t(&mut rng, &[b, d, lo.0, lo.1], 0.8);
        let high = normal_t(&mut rng, &[b, d, hi.0, hi.1], 0.8);
        let f = |g: &mut Graph, v: &[Var]| g.similarity_fusion(v[0], v[1]).unwrap();
        check_op(
            &format!("similarity_fusion B{b} d{d} low {lo:?} high {hi:?}"),
            &[low, high],
            &[true, true],
            &f,
            Opts::default(),
        );
    }
}

#[test]
fn elementwise_and_reshape_gradients() {
    let mut rng = stream(11, "elementwise");
    let shape = [2, 3, 5];
    let a = normal_t(&mut rng, &shape, 1.0);
    let b = normal_t(&mut rng, &shape, 1.0);
    let o = Opts::default();
    let ab = [a.clone(), b.clone()];
    check_op(
        "add",
        &ab,
        &[true, true],
        &|g, v| g.add(v[0], v[1]).unwrap(),
        o,
    );
    check_op(
        "axpby",
        &ab,
        &[true, true],
        &|g, v| g.axpby(0.7, v[0], -1.3, v[1]).unwrap(),
        o,
    );
    check_op(
        "axpby (b const)",
        &ab,
        &[true, false],
        &|g, v| g.axpby(-2.0, v[0], 0.5, v[1]).unwrap(),
        o,
    );
    check_op(
        "scale",
        std::slice::from_ref(&a),
        &[true],
        &|g, v| g.scale(v[0], -2.5).unwrap(),
        o,
    );
    check_op(
        "reshape",
        std::slice::from_ref(&a),
        &[true],
        &|g, v| g.reshape(v[0], &[5, 6]).unwrap(),
        o,
    );
    // A composite with a shared subgraph: both uses of `a` must add up.
    check_op(
        "composite",
        &ab,
        &[true, true],
        &|g, v| {
            let y = g.axpby(0.7, v[0], -1.3, v[1]).unwrap();
            let z = g.add(y, v[0]).unwrap();
            let s = g.scale(z, 2.5).unwrap();
            let r = g.reshape(s, &[6, 5]).unwrap();
            let sm = g.softmax(r).unwrap();
            let r2 = g.reshape(v[0], &[6, 5]).unwrap();
            g.add(sm, r2).unwrap()
        },
        o,
    );
}

// ---------------------------------------------------------------- the whole model

/// Checks d(Σ r ⊙ [logits, embedding]) with respect to the image and to every parameter tensor.
fn check_model(cfg: ModelConfig, n: usize, hw: usize, train: bool, seed: u64) {
    let mut model = MedFuseNet::new(cfg, seed);
    // Kinks out of reach by construction: every BatchNorm shift starts at +4 and the projection
    // head's hidden bias at +20, so (with |x̂| < 4 for the normalised activations) every ReLU
    // input stays well above 0. Everything else keeps its random init.
    let shifted: Vec<usize> = model
        .store
        .entries()
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            e.name == "proj.0.bias"
                || e.name
                    .strip_suffix(".bias")
                    .is_some_and(|stem| model.store.find(&format!("{stem}.running_mean")).is_some())
        })
        .map(|(i, _)| i)
        .collect();
    for &i in &shifted {
        let sh = model.store.value(i).shape().to_vec();
        // proj.0 reads the (≈ 4 + N(0,1)) pooled features through a dense layer: ±20 covers it.
        let v = if model.store.entries()[i].name == "proj.0.bias" {
            20.0
        } else {
            4.0
        };
        model.store.set(i, t(vec![v; numel(&sh)], &sh));
    }
    let model = model;
    let params: Vec<usize> = model
        .store
        .entries()
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == Kind::Param)
        .map(|(i, _)| i)
        .collect();
    let mut rng = stream(seed, "model-x");
    let x = normal_t(&mut rng, &[n, cfg.in_ch, hw, hw], 1.0);
    let mut inputs = vec![x];
    inputs.extend(params.iter().map(|&i| model.store.value(i).clone()));
    let with = |xs: &[Tensor]| {
        let mut m = model.clone();
        for (k, &i) in params.iter().enumerate() {
            m.store.set(i, xs[k + 1].clone());
        }
        m
    };
    let forwards = Cell::new(0usize);
    let eval = |xs: &[Tensor]| {
        forwards.set(forwards.get() + 1);
        let mut m = with(xs);
        let mut g = Graph::new();
        let mut bind = Binding::new(false);
        let xv = g.leaf(xs[0].clone(), false);
        let out = m.forward(&mut g, &mut bind, xv, train).unwrap();
        let mut y = g.value(out.logits).to_vec().unwrap();
        y.extend(g.value(out.embedding).to_vec().unwrap());
        y
    };
    let grads = |xs: &[Tensor], r: &[f32]| {
        let mut m = with(xs);
        let mut g = Graph::new();
        let mut bind = Binding::new(true);
        let xv = g.leaf(xs[0].clone(), true);
        let out = m.forward(&mut g, &mut bind, xv, train).unwrap();
        let nl = n * cfg.classes;
        assert_eq!(r.len(), nl + n * cfg.emb);
        g.backward_with(out.logits, t(r[..nl].to_vec(), &[n, cfg.classes]))
            .unwrap();
        g.backward_with(out.embedding, t(r[nl..].to_vec(), &[n, cfg.emb]))
            .unwrap();
        let mut res = vec![Some(g.grad(xv).unwrap().to_vec().unwrap())];
        let got = bind.take_grads(&mut g);
        for &i in &params {
            res.push(
                got.iter()
                    .find(|(j, _)| *j == i)
                    .map(|(_, t)| t.to_vec().unwrap()),
            );
        }
        res
    };
    let name = format!(
        "medfusenet w{} d{} e{} c{} small_stem {} fusion {} {}x{}x{hw}x{hw} {}",
        cfg.width,
        cfg.d,
        cfg.emb,
        cfg.classes,
        cfg.small_stem,
        cfg.fusion,
        n,
        cfg.in_ch,
        if train { "train" } else { "eval" }
    );
    // With the shifted BN biases the network is smooth except for max-pool near-ties (large
    // stem), so the steps (unit-length directions, half along the gradient so the derivative is
    // well above rounding noise) start long and shrink until the function is smooth along them.
    let o = Opts {
        h: 0.2,
        rtol: 2e-2,
        dirs: 1,
        coords: 1,
        five_point: true,
        unit_dirs: true,
        // Measured: the network's f32 outputs carry ~20 ulps of rounding error.
        noise_ulps: 32.0,
        adaptive: true,
        // Some parameter tensors barely move the outputs; their probes are counted, and at
        // least a third of the tensors must have had an informative one.
        allow_uninformative: true,
    };
    let diff = vec![true; inputs.len()];
    let s = match check_grads(&name, &inputs, &diff, &eval, &grads, o, None) {
        Ok(s) => s,
        Err(e) => panic!("gradient check failed: {e}"),
    };
    println!(
        "ok   {name}: {} tensors ({} with an informative probe, {} uninformative probes), \
         {} probes, {} forwards, worst err/bound {:.3}",
        s.inputs,
        s.informative_inputs,
        s.uninformative,
        s.probes,
        forwards.get(),
        s.worst
    );
    // The image (input 0) is always informative (checked by the first probes); many early-layer
    // parameters move the outputs by less than 20× the rounding noise.
    assert!(
        s.informative_inputs * 3 >= s.inputs,
        "{name}: only {} of {} tensors had an informative probe",
        s.informative_inputs,
        s.inputs
    );
}

fn tiny(width: usize, small_stem: bool, fusion: bool) -> ModelConfig {
    ModelConfig {
        in_ch: 3,
        width,
        d: 4,
        emb: 4,
        classes: 3,
        small_stem,
        fusion,
    }
}

// Train mode (the mode gradients are taken in). Eval mode is not checked at this level: without
// batch statistics the BN shift cannot keep every ReLU input away from 0, and the many kinks
// make finite differences of the whole network unreliable at f32 (batch_norm_eval is checked
// as an op above).

#[test]
fn medfusenet_small_stem_gradients() {
    // 12 px: layer1 12×12, layer3 3×3 (odd), layer4 2×2.
    check_model(tiny(2, true, true), 2, 12, true, 21);
    check_model(tiny(3, true, false), 3, 12, true, 22);
    // 9 px, batch 2: odd sizes all the way (9 → 5 → 3 → 2).
    check_model(tiny(2, true, true), 2, 9, true, 23);
}

#[test]
fn medfusenet_large_stem_gradients() {
    // 32 px: 7×7 s2 stem → 16, max-pool 3/2/1 → 8, layer4 1×1 (batch 4: 4 values per channel
    // in its batch statistics).
    check_model(tiny(4, false, true), 4, 32, true, 31);
    check_model(tiny(2, false, false), 4, 32, true, 32);
}

// ---------------------------------------------------------------- optimisers and EMA

fn close(got: &[f32], want: &[f64], rel: f64, abs: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= abs + rel * w.abs(),
            "{what}[{k}]: got {g}, want {w}"
        );
    }
}

#[test]
fn sgd_matches_hand_computed_steps() {
    let bk = cpu();
    // Hand-computed, one element: p = 1, g = 0.5 each step, lr 0.1, μ 0.9, wd 0.1.
    // step 1: d = 0.5 + 0.1·1 = 0.6, buf = 0.6, p = 1 − 0.06 = 0.94
    // step 2: d = 0.5 + 0.094 = 0.594, buf = 0.54 + 0.594 = 1.134, p = 0.94 − 0.1134 = 0.8266
    // step 3: d = 0.5 + 0.08266 = 0.58266, buf = 1.0206 + 0.58266 = 1.60326,
    //         p = 0.8266 − 0.160326 = 0.666274
    let mut p = t(vec![1.0], &[1]);
    let mut buf = t(vec![0.0], &[1]);
    let g = t(vec![0.5], &[1]);
    let want = [(0.94, 0.6), (0.8266, 1.134), (0.666274, 1.60326)];
    for (s, (wp, wb)) in want.iter().enumerate() {
        let h = SgdParams {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.1,
            first_step: s == 0,
        };
        bk.sgd_step(&mut p, &g, &mut buf, h).unwrap();
        close(&p.to_vec().unwrap(), &[*wp], 1e-6, 1e-7, "sgd param");
        close(&buf.to_vec().unwrap(), &[*wb], 1e-6, 1e-7, "sgd buf");
    }

    // Reference loop (PyTorch semantics) on vectors, for every momentum / weight-decay combo.
    let mut rng = stream(12, "sgd");
    for (mom, wd) in [(0.0, 0.0), (0.9, 0.0), (0.0, 0.05), (0.9, 0.01)] {
        let p0 = uniform(&mut rng, 7, -2.0, 2.0);
        let gs: Vec<Vec<f32>> = (0..3).map(|_| uniform(&mut rng, 7, -1.0, 1.0)).collect();
        let mut p = t(p0.clone(), &[7]);
        let mut buf = t(vec![0.0; 7], &[7]);
        let mut rp: Vec<f64> = p0.iter().map(|&v| v as f64).collect();
        let mut rb = vec![0.0f64; 7];
        for (s, gv) in gs.iter().enumerate() {
            let h = SgdParams {
                lr: 0.05,
                momentum: mom,
                weight_decay: wd,
                first_step: s == 0,
            };
            bk.sgd_step(&mut p, &t(gv.clone(), &[7]), &mut buf, h)
                .unwrap();
            for k in 0..7 {
                let d = gv[k] as f64 + wd as f64 * rp[k];
                rb[k] = if s == 0 || mom == 0.0 {
                    d
                } else {
                    mom as f64 * rb[k] + d
                };
                rp[k] -= 0.05 * rb[k];
            }
            let what = format!("sgd μ {mom} wd {wd} step {}", s + 1);
            close(&p.to_vec().unwrap(), &rp, 1e-5, 1e-6, &what);
            if mom != 0.0 {
                close(&buf.to_vec().unwrap(), &rb, 1e-5, 1e-6, &what);
            }
        }
    }
}

#[test]
fn adam_matches_hand_computed_steps() {
    let bk = cpu();
    // Hand-computed first step, p = 1, g = 0.5, wd 0.1 → g' = 0.6; m = 0.06, v = 3.6e-4;
    // m̂ = 0.6, √v̂ = 0.6, p = 1 − 0.01·0.6/(0.6 + 1e-8) = 0.99 (to 1e-10).
    let mut p = t(vec![1.0, -3.0], &[2]);
    let mut m = t(vec![0.0; 2], &[2]);
    let mut v = t(vec![0.0; 2], &[2]);
    let hp = |step| AdamParams::pytorch(0.01, 0.1, step);
    bk.adam_step(&mut p, &t(vec![0.5, 0.2], &[2]), &mut m, &mut v, hp(1))
        .unwrap();
    // Second element: g' = 0.2 − 0.3 = −0.1 → p = −3 + 0.01.
    close(
        &p.to_vec().unwrap(),
        &[0.99, -2.99],
        1e-6,
        1e-7,
        "adam step 1",
    );
    close(&m.to_vec().unwrap(), &[0.06, -0.01], 1e-5, 1e-8, "adam m 1");
    // (1 − β2 rounds to 0.00099998713 in f32: 1.3e-5 relative.)
    close(
        &v.to_vec().unwrap(),
        &[3.6e-4, 1e-5],
        1e-4,
        1e-10,
        "adam v 1",
    );

    // Three steps against a reference loop on random vectors.
    let mut rng = stream(13, "adam");
    for (wd, beta1, beta2) in [
        (0.0f32, 0.9f32, 0.999f32),
        (5e-4, 0.9, 0.999),
        (0.1, 0.8, 0.99),
    ] {
        let n = 9;
        let p0 = uniform(&mut rng, n, -2.0, 2.0);
        let mut p = t(p0.clone(), &[n]);
        let mut m = t(vec![0.0; n], &[n]);
        let mut v = t(vec![0.0; n], &[n]);
        let mut rp: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let (mut rm, mut rv) = (vec![0.0f64; n], vec![0.0f64; n]);
        let (lr, eps) = (1e-2f64, 1e-8f64);
        for step in 1..=3u64 {
            let gv = uniform(&mut rng, n, -1.0, 1.0);
            let h = AdamParams {
                lr: lr as f32,
                beta1,
                beta2,
                eps: eps as f32,
                weight_decay: wd,
                step,
            };
            bk.adam_step(&mut p, &t(gv.clone(), &[n]), &mut m, &mut v, h)
                .unwrap();
            let (b1, b2) = (beta1 as f64, beta2 as f64);
            for k in 0..n {
                let g = gv[k] as f64 + wd as f64 * rp[k];
                rm[k] = b1 * rm[k] + (1.0 - b1) * g;
                rv[k] = b2 * rv[k] + (1.0 - b2) * g * g;
                let mh = rm[k] / (1.0 - b1.powi(step as i32));
                let vh = rv[k] / (1.0 - b2.powi(step as i32));
                rp[k] -= lr * mh / (vh.sqrt() + eps);
            }
            let what = format!("adam wd {wd} β ({beta1}, {beta2}) step {step}");
            close(&p.to_vec().unwrap(), &rp, 1e-5, 1e-6, &what);
            close(&m.to_vec().unwrap(), &rm, 1e-4, 1e-7, &what);
            close(&v.to_vec().unwrap(), &rv, 1e-4, 1e-9, &what);
        }
    }
}

#[test]
fn ema_matches_hand_computed_steps() {
    let bk = cpu();
    // α = 0.9, teacher 1, student 0 then 2 then 2:
    // 0.9·1 + 0.1·0 = 0.9; 0.9·0.9 + 0.1·2 = 1.01; 0.9·1.01 + 0.1·2 = 1.109.
    let mut te = t(vec![1.0, -1.0, 0.0], &[3]);
    let students = [[0.0, 0.0, 4.0], [2.0, -1.0, 4.0], [2.0, 1.0, 0.0]];
    let want = [
        [0.9, -0.9, 0.4],
        [1.01, -0.91, 0.76],
        [1.109, -0.719, 0.684],
    ];
    for (s, w) in students.iter().zip(want) {
        bk.ema_update(&mut te, &t(s.to_vec(), &[3]), 0.9).unwrap();
        close(&te.to_vec().unwrap(), &w, 1e-6, 1e-7, "ema");
    }
    // α = 0.99 on a larger random tensor (parallel chunks), against a reference loop.
    let mut rng = stream(14, "ema");
    let n = 10_007;
    let t0 = uniform(&mut rng, n, -1.0, 1.0);
    let mut te = t(t0.clone(), &[n]);
    let mut rt: Vec<f64> = t0.iter().map(|&x| x as f64).collect();
    for _ in 0..3 {
        let s = uniform(&mut rng, n, -1.0, 1.0);
        bk.ema_update(&mut te, &t(s.clone(), &[n]), 0.99).unwrap();
        for k in 0..n {
            rt[k] = 0.99 * rt[k] + 0.01 * s[k] as f64;
        }
        close(&te.to_vec().unwrap(), &rt, 1e-5, 1e-6, "ema 0.99");
    }
}

// ---------------------------------------------------------------- DSR primitives

fn softmax64(z: &[f64]) -> Vec<f64> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

#[test]
fn entropy_weight_matches_reference() {
    let bk = cpu();
    let mut rng = stream(15, "entropy");
    for (b, c, scale) in [
        (1, 3, 1.0),
        (5, 2, 2.0),
        (7, 10, 3.0),
        (4, 4, 0.0),
        (3, 5, 40.0),
    ] {
        let z = normal(&mut rng, b * c)
            .into_iter()
            .map(|v| v * scale)
            .collect::<Vec<_>>();
        let got = bk.entropy_weight(&t(z.clone(), &[b, c])).unwrap();
        assert_eq!(got.shape(), &[b]);
        let want: Vec<f64> = z
            .chunks(c)
            .map(|r| {
                let p = softmax64(&r.iter().map(|&v| v as f64).collect::<Vec<_>>());
                let h: f64 = p
                    .iter()
                    .map(|&v| if v > 0.0 { -v * v.ln() } else { 0.0 })
                    .sum();
                1.0 - h / (c as f64).ln()
            })
            .collect();
        let gv = got.to_vec().unwrap();
        close(
            &gv,
            &want,
            1e-4,
            2e-6,
            &format!("entropy_weight [{b}, {c}] ×{scale}"),
        );
        assert!(gv.iter().all(|&v| (-1e-6..=1.0 + 1e-6).contains(&v)));
        if scale == 0.0 {
            // Uniform predictions carry no confidence.
            assert!(gv.iter().all(|v| v.abs() < 1e-6), "{gv:?}");
        }
    }
}

#[test]
fn dsr_alignment_matches_reference_and_gradient_inner_product() {
    let bk = cpu();
    let mut rng = stream(16, "dsr");
    for (bl, bu, d, c) in [(1, 1, 3, 2), (4, 6, 8, 5), (3, 7, 5, 3), (12, 2, 4, 4)] {
        let fl = normal(&mut rng, bl * d);
        let fu = normal(&mut rng, bu * d);
        let yl = labels(&mut rng, bl, c);
        let yu = labels(&mut rng, bu, c);
        let w = normal(&mut rng, c * d)
            .into_iter()
            .map(|v| v * 0.5)
            .collect::<Vec<_>>();
        let b = uniform(&mut rng, c, -0.5, 0.5);
        let got = bk
            .dsr_alignment(
                &t(fl.clone(), &[bl, d]),
                &yl,
                &t(fu.clone(), &[bu, d]),
                &label_tensor(bk, &yu).unwrap(),
                &t(w.clone(), &[c, d]),
                &t(b.clone(), &[c]),
            )
            .unwrap();
        assert_eq!(got.shape(), &[bu]);
        let got = got.to_vec().unwrap();

        // Closed form in f64.
        let resid = |f: &[f32], y: usize| -> Vec<f64> {
            let z: Vec<f64> = (0..c)
                .map(|k| {
                    b[k] as f64
                        + (0..d)
                            .map(|j| w[k * d + j] as f64 * f[j] as f64)
                            .sum::<f64>()
                })
                .collect();
            let mut p = softmax64(&z);
            p[y] -= 1.0;
            p
        };
        let dot = |a: &[f32], b: &[f32]| -> f64 {
            a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
        };
        let want: Vec<f64> = (0..bu)
            .map(|i| {
                let fi = &fu[i * d..(i + 1) * d];
                let ri = resid(fi, yu[i]);
                (0..bl)
                    .map(|j| {
                        let fj = &fl[j * d..(j + 1) * d];
                        let rj = resid(fj, yl[j]);
                        let rr: f64 = rj.iter().zip(&ri).map(|(a, b)| a * b).sum();
                        rr * (dot(fj, fi) + 1.0)
                    })
                    .sum::<f64>()
                    / bl as f64
            })
            .collect();
        let what = format!("dsr_alignment Bl {bl} Bu {bu} d {d} C {c}");
        close(&got, &want, 1e-4, 1e-5, &what);

        // The definition: ⟨∇_{W,b} CE(fc(f_lab), y), ∇_{W,b} CE(fc(f_i), ŷ_i)⟩ through the tape.
        let fc_grads = |f: &[f32], n: usize, y: &[usize]| -> Vec<f32> {
            let mut g = Graph::new();
            let x = g.constant(t(f.to_vec(), &[n, d]));
            let wv = g.leaf(t(w.clone(), &[c, d]), true);
            let bv = g.leaf(t(b.clone(), &[c]), true);
            let z = g.linear(x, wv, Some(bv)).unwrap();
            let l = g.cross_entropy(z, y).unwrap();
            g.backward(l).unwrap();
            let mut v = g.grad(wv).unwrap().to_vec().unwrap();
            v.extend(g.grad(bv).unwrap().to_vec().unwrap());
            v
        };
        let gl = fc_grads(&fl, bl, &yl);
        let via_tape: Vec<f64> = (0..bu)
            .map(|i| dot(&gl, &fc_grads(&fu[i * d..(i + 1) * d], 1, &yu[i..i + 1])))
            .collect();
        close(&got, &via_tape, 1e-4, 1e-5, &format!("{what} (tape)"));
    }
}

/// Zero-sized dimensions on the CPU reference: empty outputs where PyTorch gives them, the NaN
/// of a mean over no rows, and a clear error where there is nothing to average (never a panic).
/// (`tests/cuda_parity.rs`'s `empty_tensors` holds the CUDA backend to the same results.)
#[test]
fn empty_tensors_on_the_cpu() {
    let b = cpu();
    let y = b
        .matmul(
            &t(vec![], &[0, 3]),
            &t(vec![1.0; 15], &[3, 5]),
            false,
            false,
        )
        .unwrap();
    assert_eq!(y.shape(), &[0, 5]);
    let y = b
        .matmul(&t(vec![], &[2, 0]), &t(vec![], &[0, 5]), false, false)
        .unwrap();
    assert_eq!(b.to_host(&y).unwrap(), vec![0.0; 10]);
    let e = b
        .global_avg_pool_fwd(&t(vec![], &[2, 3, 0, 4]))
        .unwrap_err();
    assert!(e.to_string().contains("no spatial positions"), "{e}");
    let e = b
        .global_avg_pool_bwd(&t(vec![0.0; 6], &[2, 3]), &[2, 3, 4, 0])
        .unwrap_err();
    assert!(e.to_string().contains("no spatial positions"), "{e}");
    assert_eq!(
        b.global_avg_pool_fwd(&t(vec![], &[0, 3, 2, 2]))
            .unwrap()
            .shape(),
        &[0, 3]
    );
    let l = b.cross_entropy_fwd(&t(vec![], &[0, 7]), &[]).unwrap();
    assert!(b.to_host(&l).unwrap()[0].is_nan());
}
