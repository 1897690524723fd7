//! `medssl-bench ops` and `step` end to end: the op list follows the model's real layers, and
//! every row carries a positive rate and its percentage of the measured peak.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use medssl::nn::{Kind, MedFuseNet, ModelConfig};
use serde_json::Value;

fn bench(args: &[&str]) -> Vec<Value> {
    bench_with(args, &[])
}

/// [`bench`] with extra environment variables.
fn bench_with(args: &[&str], env: &[(&str, &str)]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_medssl-bench"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .envs(env.iter().copied())
        .output()
        .expect("run medssl-bench");
    assert!(
        out.status.success(),
        "medssl-bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

fn list(v: &[usize]) -> String {
    let s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    format!("[{}]", s.join(","))
}

/// The text after `key=` up to the next space.
fn field<'a>(shape: &'a str, key: &str) -> &'a str {
    let start = shape
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key}= in {shape:?}"))
        + key.len()
        + 1;
    shape[start..].split(' ').next().unwrap()
}

fn num(r: &Value, k: &str) -> f64 {
    r[k].as_f64()
        .unwrap_or_else(|| panic!("{k} missing or not a number in {r}"))
}

#[test]
fn ops_rows_follow_the_model() {
    for image in [28usize, 96] {
        let img = image.to_string();
        let rows = bench(&[
            "ops",
            "--json",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--width",
            "4",
            "--batch",
            "2",
            "--image-size",
            &img,
            "--queue",
            "64",
            "--peak-gemm",
            "256",
            "--peak-copy-mib",
            "16",
        ]);
        let cfg = ModelConfig {
            in_ch: 3,
            width: 4,
            d: 128,
            emb: 128,
            classes: 7,
            small_stem: ModelConfig::small_stem_for(image),
            fusion: true,
        };
        let model = MedFuseNet::new(cfg, 0);
        // Conv weights of the model: distinct shapes and how many layers have each.
        let mut want: BTreeMap<String, usize> = BTreeMap::new();
        for e in model.store.entries() {
            if e.kind == Kind::Param && e.value.dims() == 4 {
                *want.entry(list(e.value.shape())).or_default() += 1;
            }
        }
        for dir in ["fwd", "bwd"] {
            let convs: Vec<&Value> = rows
                .iter()
                .filter(|r| {
                    (r["op"] == "conv2d" || r["op"] == "projected_fusion") && r["dir"] == dir
                })
                .collect();
            let mut got: BTreeMap<String, usize> = BTreeMap::new();
            for r in &convs {
                let w = field(r["shape"].as_str().unwrap(), "w").to_string();
                assert!(
                    got.insert(w.clone(), r["uses"].as_u64().unwrap() as usize)
                        .is_none(),
                    "{image} px: conv {dir} weight {w} listed twice"
                );
            }
            assert_eq!(
                convs.len(),
                want.len(),
                "{image} px: one conv {dir} row per distinct conv shape"
            );
            assert_eq!(got, want, "{image} px, conv {dir}");
        }
        // The stem sees the image.
        let stem_k = if image <= 64 { 3 } else { 7 };
        assert!(rows.iter().any(|r| r["op"] == "conv2d"
            && field(r["shape"].as_str().unwrap(), "x") == list(&[2, 3, image, image])
            && field(r["shape"].as_str().unwrap(), "w") == list(&[4, 3, stem_k, stem_k])));

        let names: BTreeSet<(String, String)> = rows
            .iter()
            .map(|r| {
                (
                    r["op"].as_str().unwrap().to_string(),
                    r["dir"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let mut expect: Vec<(&str, &str)> = Vec::new();
        for op in [
            "conv2d",
            "batch_norm_train",
            "relu",
            "global_avg_pool",
            "linear",
            "softmax",
            "cross_entropy",
            "l2_normalize",
            "projected_fusion",
            "weighted_consistency",
            "pgc_loss",
        ] {
            expect.push((op, "fwd"));
            expect.push((op, "bwd"));
        }
        expect.push(("entropy_weight", "fwd"));
        expect.push(("adam_step", "upd"));
        expect.push(("ema_update", "upd"));
        if image > 64 {
            expect.push(("max_pool2d", "fwd"));
            expect.push(("max_pool2d", "bwd"));
        }
        let expect: BTreeSet<(String, String)> = expect
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(names, expect, "{image} px: op list");

        let compute = ["conv2d", "linear", "projected_fusion", "pgc_loss"];
        for r in &rows {
            assert_eq!(r["bench"], "ops");
            assert_eq!(r["device"], "cpu");
            assert_eq!(r["threads"], 2);
            assert!(num(r, "median_ms") > 0.0 && num(r, "min_ms") <= num(r, "median_ms"));
            let op = r["op"].as_str().unwrap();
            let (rate, kind) = if compute.contains(&op) {
                assert!(r.get("gbps").is_none(), "{r}");
                (num(r, "gflops"), "sgemm_256")
            } else {
                assert!(r.get("gflops").is_none(), "{r}");
                (num(r, "gbps"), "memcpy_16MiB")
            };
            assert!(rate > 0.0, "{r}");
            assert_eq!(r["peak_kind"], kind, "{r}");
            let peak = num(r, "peak_value");
            let pct = num(r, "pct_of_peak");
            assert!(peak > 0.0);
            assert!(
                (pct - 100.0 * rate / peak).abs() <= 1e-6 * pct.abs().max(1.0),
                "{r}"
            );
        }
        // Adam covers every parameter tensor.
        let n_params = model
            .store
            .entries()
            .iter()
            .filter(|e| e.kind == Kind::Param)
            .count();
        let adam = rows.iter().find(|r| r["op"] == "adam_step").unwrap();
        assert!(
            adam["shape"].as_str().unwrap().starts_with(&format!(
                "{n_params} tensors, {} params",
                model.store.num_params()
            )),
            "{adam}"
        );
        // PGC keys are the batch plus the queue.
        let pgc = rows.iter().find(|r| r["op"] == "pgc_loss").unwrap();
        assert_eq!(field(pgc["shape"].as_str().unwrap(), "keys"), "[66,128]");
    }
}

#[test]
fn ops_filter_and_bad_filter() {
    let rows = bench(&[
        "ops",
        "--json",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--width",
        "4",
        "--batch",
        "2",
        "--op",
        "relu,softmax",
        "--peak-gemm",
        "0",
        "--peak-copy-mib",
        "0",
    ]);
    // A comma-separated filter keeps the rows of every listed op and nothing else.
    for op in ["relu", "softmax"] {
        assert!(rows.iter().any(|r| r["op"] == op), "no {op} row");
    }
    for r in &rows {
        assert!(r["op"] == "relu" || r["op"] == "softmax", "{r}");
        assert!(
            r["pct_of_peak"].is_null() && r["peak_kind"].is_null(),
            "{r}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_medssl-bench"))
        .args(["ops", "--op", "no_such_op", "--peak-gemm", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_op"));
    // The device profiler is refused on the CPU before anything is measured.
    let out = Command::new(env!("CARGO_BIN_EXE_medssl-bench"))
        .args(["ops", "--profile", "--op", "relu", "--peak-gemm", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--profile needs a CUDA device"));
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `step` on a width-4 model, batches of 2 + 2, one warm-up and one timed step, no calibration.
const TINY_STEP: [&str; 16] = [
    "step",
    "--json",
    "--width",
    "4",
    "--batch-l",
    "2",
    "--batch-u",
    "2",
    "--queue",
    "16",
    "--warmup",
    "1",
    "--repeats",
    "1",
    "--calib",
    "0",
];

#[test]
fn step_reports_peak_memory() {
    let rows = bench(&TINY_STEP);
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    let mb = num(r, "peak_mem_mb");
    // At least the model, far below the machine.
    assert!(mb > 1.0 && mb < 64.0 * 1024.0, "{r}");
    let kind = r["peak_mem_kind"].as_str().unwrap();
    assert!(kind == "rss_hwm" || kind == "rss_hwm_process", "{r}");
    // The CPU convolution algorithm in force (MEDSSL_CPU_CONV unset here: `auto`).
    assert_eq!(r["cpu_conv"], "auto", "{r}");
}

/// `ops` on the ReLUs and convolutions of a width-4 model at batch 2, one sample each, no peaks.
const TINY_CONV_OPS: [&str; 14] = [
    "ops",
    "--json",
    "--op",
    "relu,conv2d",
    "--width",
    "4",
    "--batch",
    "2",
    "--peak-gemm",
    "0",
    "--peak-copy-mib",
    "0",
    "--repeats",
    "1",
];

/// A row names the CPU convolution algorithm that `MEDSSL_CPU_CONV` chose, and a convolution row
/// the path it took: every 3×3 stride-1 layer on the forced one, the pointwise layers on their
/// own GEMM, the other layers on im2col; rows of other ops have none.
#[test]
fn rows_name_the_cpu_convolution_algorithm() {
    for algo in ["im2col", "winograd", "direct"] {
        let rows = bench_with(&TINY_CONV_OPS, &[("MEDSSL_CPU_CONV", algo)]);
        assert!(rows.iter().any(|r| r["op"] == "relu"));
        let mut paths = std::collections::BTreeSet::new();
        for r in rows {
            assert_eq!(r["cpu_conv"], algo, "{r}");
            let path = r["cpu_path"].as_str();
            if r["op"] != "conv2d" {
                assert_eq!(path, None, "{r}");
                continue;
            }
            let shape = r["shape"].as_str().unwrap();
            let want = if shape.contains(",3,3] s=1 p=1") {
                algo
            } else if shape.contains(",1,1] s=1 p=0") {
                "pointwise"
            } else {
                "im2col"
            };
            assert_eq!(path, Some(want), "{r}");
            paths.insert(want);
        }
        assert!(paths.contains(algo) && paths.len() >= 2, "{paths:?}");
    }
}

/// `--cpu-conv im2col,direct`: every convolution timed under both in one process, one row each
/// (the algorithm as `cpu_conv`, its path as `cpu_path`), the other ops once; a misspelt
/// algorithm refused with its name.
#[test]
fn ops_alternate_the_cpu_convolution_algorithms() {
    let args = [&TINY_CONV_OPS[..], &["--rounds", "2", "--cpu-conv"]].concat();
    let rows = bench(&[&args[..], &["im2col,direct"]].concat());
    let mut seen = std::collections::BTreeMap::new();
    for r in &rows {
        let key = (
            r["op"].as_str().unwrap().to_string(),
            r["dir"].to_string(),
            r["shape"].to_string(),
        );
        let algo = r["cpu_conv"].as_str().unwrap().to_string();
        if r["op"] == "relu" {
            assert_eq!(algo, "auto", "{r}");
            assert!(r["cpu_path"].is_null(), "{r}");
        } else {
            let shape = r["shape"].as_str().unwrap();
            let want = match (algo.as_str(), shape) {
                (_, s) if s.contains(",1,1] s=1 p=0") => "pointwise",
                ("direct", s) if s.contains(",3,3] s=1 p=1") => "direct",
                _ => "im2col",
            };
            assert_eq!(r["cpu_path"], want, "{r}");
        }
        seen.entry(key).or_insert_with(Vec::new).push(algo);
    }
    for ((op, _, _), algos) in &seen {
        let want: &[&str] = if op == "conv2d" {
            &["im2col", "direct"]
        } else {
            &["auto"]
        };
        assert_eq!(algos, want, "{op}");
    }
    assert!(seen.keys().any(|k| k.0 == "conv2d") && seen.keys().any(|k| k.0 == "relu"));
    for (list, names) in [
        ("im2col,Direct", "'Direct'"),
        ("im2col,,auto", "empty algorithm"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_medssl-bench"))
            .args([&args[..], &[list]].concat())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("--cpu-conv") && err.contains(names),
            "{list}: {err}"
        );
    }
}

/// `step --cpu-conv im2col,direct --rounds 2`: one result per algorithm, in the order given, each
/// naming it and its rounds.
#[test]
fn step_alternates_the_cpu_convolution_algorithms() {
    let rows = bench(
        &[
            &TINY_STEP[..],
            &["--cpu-conv", "im2col,direct", "--rounds", "2"],
        ]
        .concat(),
    );
    let algos: Vec<&str> = rows
        .iter()
        .map(|r| r["cpu_conv"].as_str().unwrap())
        .collect();
    assert_eq!(algos, ["im2col", "direct"]);
    for r in &rows {
        assert_eq!(r["rounds"], 2, "{r}");
        assert!(num(r, "median_ms") > 0.0, "{r}");
    }
}
