//! `medssl report`: grouping by seed, mean and spread, row labels, errors on bad run directories;
//! on run directories in the trainer's exact format and on two real (tiny) training runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use medssl::report::{self, ReportOptions, Spread};
use medssl::train::config::TrainConfig;

const DATA: &str = "../shared/data/pneumoniamnist";

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("medssl-report-tests-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Test metrics as the trainer writes them (a real `Metrics`, values then set by hand).
fn test_metrics(acc: f64, bal: f64, f1: f64, auc: f64, srcmt_acc: f64) -> serde_json::Value {
    let probs = [0.9f32, 0.1, 0.2, 0.8, 0.6, 0.4];
    let m = medssl::train::metrics::compute(&probs, &[0, 1, 1], 2, 0.18).unwrap();
    let mut v = serde_json::to_value(&m).unwrap();
    v["accuracy"] = acc.into();
    v["balanced_accuracy"] = bal.into();
    v["macro_f1"] = f1.into();
    v["macro_auc"] = auc.into();
    v["srcmt"]["accuracy"] = srcmt_acc.into();
    v
}

/// A finished run directory in the trainer's format: `config.toml` from a resolved
/// [`TrainConfig`], `summary.json` with the fields `train::run::train` writes.
fn fake_run(
    root: &Path,
    name: &str,
    sets: &[&str],
    acc: f64,
    wall: f64,
    labeled: (u64, u64),
) -> PathBuf {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let cfg = TrainConfig::resolve("fast", None, &sets).unwrap();
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("config.toml"), cfg.to_toml()).unwrap();
    let summary = serde_json::json!({
        "outcome": "finished",
        "method": cfg.method,
        "data": cfg.data,
        "epochs": cfg.epochs,
        "epochs_done": cfg.epochs,
        "steps": cfg.epochs * 155,
        "steps_per_epoch": 155,
        "seed": cfg.seed,
        "device": "cpu",
        "wall_seconds": wall,
        "labeled": labeled.0,
        "unlabeled": labeled.1,
        "best_epoch": 7,
        "best_val_macro_auc": 0.9,
        "test": test_metrics(acc, acc - 0.1, acc - 0.2, acc + 0.1, acc + 0.05),
    });
    std::fs::write(
        d.join("summary.json"),
        serde_json::to_string_pretty(&summary).unwrap(),
    )
    .unwrap();
    d
}

const HAM: &str = "data=../shared/data/ham10000";
const SRCMT: &str = "labeled_protocol=srcmt";
const SRCMT_COUNTS: (u64, u64) = (1400, 5600);

/// The README table's HAM10000 rows plus two PneumoniaMNIST rows, in scrambled order.
fn table_runs(root: &Path) -> Vec<PathBuf> {
    let r = |name: &str, sets: &[&str], acc: f64, wall: f64, counts: (u64, u64)| {
        fake_run(root, name, sets, acc, wall, counts)
    };
    vec![
        r(
            "dsrpgc-s1",
            &[HAM, SRCMT, "seed=1", "epochs=100"],
            0.80,
            200.0,
            SRCMT_COUNTS,
        ),
        r(
            "sup20-s0",
            &[HAM, SRCMT, "method=supervised", "epochs=100"],
            0.70,
            50.0,
            SRCMT_COUNTS,
        ),
        r(
            "nofusion",
            &[HAM, SRCMT, "fusion=false", "epochs=100"],
            0.76,
            150.0,
            SRCMT_COUNTS,
        ),
        r(
            "sup100",
            &[HAM, "method=supervised", "labeled_ratio=1.0", "epochs=100"],
            0.85,
            400.0,
            (7000, 0),
        ),
        r(
            "dsrpgc-s0",
            &[HAM, SRCMT, "seed=0", "epochs=100"],
            0.78,
            100.0,
            SRCMT_COUNTS,
        ),
        r(
            "nodsr",
            &[HAM, SRCMT, "dsr=off", "epochs=100"],
            0.75,
            150.0,
            SRCMT_COUNTS,
        ),
        r(
            "mt",
            &[HAM, SRCMT, "method=mean-teacher", "epochs=100"],
            0.74,
            150.0,
            SRCMT_COUNTS,
        ),
        r(
            "nopgc",
            &[HAM, SRCMT, "pgc=false", "epochs=100"],
            0.77,
            150.0,
            SRCMT_COUNTS,
        ),
        r(
            "sup20-s1",
            &[
                HAM,
                SRCMT,
                "method=supervised",
                "seed=1",
                "epochs=100",
                // Settings that cannot change the result do not split a group.
                "device=cuda",
                "workers=4",
                "eval_batch=128",
            ],
            0.74,
            70.0,
            SRCMT_COUNTS,
        ),
        r(
            "pn-dsrpgc-s0",
            &[&format!("data={DATA}"), "labeled_ratio=0.2", "epochs=100"],
            0.90,
            80.0,
            (942, 3766),
        ),
        r(
            "pn-sup-s0",
            &[
                &format!("data={DATA}/"),
                "labeled_ratio=0.2",
                "method=supervised",
                "epochs=100",
            ],
            0.85,
            40.0,
            (942, 3766),
        ),
    ]
}

#[test]
fn groups_by_seed_with_labels_order_mean_and_spread() {
    let root = tmp("table");
    let dirs = table_runs(&root);
    let r = report::build(&dirs, ReportOptions::default()).unwrap();
    let labels: Vec<(&str, &str)> = r
        .rows
        .iter()
        .map(|r| (r.dataset.as_str(), r.label.as_str()))
        .collect();
    assert_eq!(
        labels,
        [
            ("ham10000", "Supervised 20 %"),
            ("ham10000", "Supervised 100 %"),
            ("ham10000", "Mean Teacher"),
            ("ham10000", "DSRPGC"),
            ("ham10000", "DSRPGC − DSR"),
            ("ham10000", "DSRPGC − fusion"),
            ("ham10000", "DSRPGC − PGC"),
            ("pneumoniamnist", "Supervised 20 %"),
            ("pneumoniamnist", "DSRPGC"),
        ]
    );
    let sup = &r.rows[0];
    assert_eq!(sup.seeds, [0, 1]);
    assert_eq!(sup.labels, "20 % (srcmt split)");
    assert_eq!(sup.epochs, 100);
    assert_eq!(sup.runs, [root.join("sup20-s0"), root.join("sup20-s1")]);
    assert_eq!(sup.devices, ["cpu"]);
    let acc = sup.metric("accuracy").unwrap();
    assert!((acc.mean - 0.72).abs() < 1e-12, "{acc:?}");
    // Sample standard deviation of two values: |a − b| / √2.
    assert!(
        (acc.spread.unwrap() - 0.04 / 2f64.sqrt()).abs() < 1e-12,
        "{acc:?}"
    );
    assert_eq!(acc.values, [0.70, 0.74]);
    let auc = sup.metric("macro_auc").unwrap();
    assert!((auc.mean - 0.82).abs() < 1e-12);
    let srcmt = sup.metric("srcmt_accuracy").unwrap();
    assert!((srcmt.mean - 0.77).abs() < 1e-12);
    assert!((sup.wall_mean() - 60.0).abs() < 1e-9);
    assert_eq!(r.rows[1].labels, "100 % (dataset split)");
    assert_eq!(r.rows[1].seeds, [0]);
    assert_eq!(r.rows[1].metric("accuracy").unwrap().spread, None);
    assert_eq!(r.rows[3].seeds, [0, 1]);
    assert_eq!(r.rows[7].labels, "20 % (dataset split)");

    let md = r.markdown();
    assert!(
        md.contains("| method | labels | top-1 | bal. acc. | macro-F1 | macro-AUC | SRC-MT acc. | seeds | epochs | wall time |"),
        "{md}"
    );
    assert!(
        md.contains("| Supervised 20 % | 20 % (srcmt split) | 72.00 ± 2.83 | 62.00 ± 2.83 | 52.00 ± 2.83 | 82.00 ± 2.83 | 77.00 ± 2.83 | 0, 1 | 100 | 60 s |"),
        "{md}"
    );
    assert!(
        md.contains(
            "| Supervised 100 % | 100 % (dataset split) | 85.00 | 75.00 | 65.00 | 95.00 | 90.00 | 0 | 100 | 6.7 min |"
        ),
        "{md}"
    );
    assert!(md.contains("**HAM10000 (28 px): test split"), "{md}");
    assert!(md.contains("**PneumoniaMNIST (28 px)"), "{md}");
    assert!(md.contains("sample standard deviation"), "{md}");
    assert!(!md.contains("Left out"), "{md}");
    let text = r.text();
    assert!(text.contains("DSRPGC − PGC"), "{text}");

    let j = r.json();
    assert_eq!(j["spread"], "std");
    assert_eq!(j["rows"][3]["label"], "DSRPGC");
    assert_eq!(j["rows"][3]["seeds"], serde_json::json!([0, 1]));
    assert_eq!(
        j["rows"][3]["metrics"]["accuracy"]["values"],
        serde_json::json!([0.78, 0.80])
    );
    assert!(
        (j["rows"][3]["metrics"]["accuracy"]["mean"]
            .as_f64()
            .unwrap()
            - 0.79)
            .abs()
            < 1e-12
    );
    assert_eq!(j["skipped"], serde_json::json!([]));

    // Half the range instead of the standard deviation.
    let r = report::build(
        &dirs,
        ReportOptions {
            spread: Spread::HalfRange,
            skip_bad: false,
        },
    )
    .unwrap();
    let acc = r.rows[0].metric("accuracy").unwrap();
    assert!((acc.spread.unwrap() - 0.02).abs() < 1e-12);
    assert!(r.markdown().contains("half the range"));
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn other_combinations_get_readable_labels_and_differing_settings_are_named() {
    let root = tmp("labels");
    let r = |name: &str, sets: &[&str]| fake_run(&root, name, sets, 0.5, 10.0, SRCMT_COUNTS);
    let dirs = vec![
        r("a", &[HAM, SRCMT, "dsr=entropy", "pgc=false"]),
        r("b", &[HAM, SRCMT, "dsr_balance=align"]),
        r("c", &[HAM, SRCMT, "method=mean-teacher", "fusion=false"]),
        r("d", &[HAM, SRCMT, "lr=0.0001"]),
        r("e", &[HAM, SRCMT]),
        r("f", &[HAM, SRCMT, "epochs=5"]),
        // With the srcmt protocol the ratio is ignored by the trainer, so it does not split groups.
        r("g", &[HAM, SRCMT, "seed=3", "labeled_ratio=0.5"]),
    ];
    let rep = report::build(&dirs, ReportOptions::default()).unwrap();
    let labels: Vec<&str> = rep.rows.iter().map(|r| r.label.as_str()).collect();
    assert!(
        labels.contains(&"DSRPGC (DSR: entropy only) − PGC"),
        "{labels:?}"
    );
    assert!(
        labels.contains(&"DSRPGC + DSR balance (align)"),
        "{labels:?}"
    );
    assert!(labels.contains(&"Mean Teacher − fusion"), "{labels:?}");
    // Three DSRPGC groups: default (seeds 0 and 3), lr 1e-4, 5 epochs.
    let dsrpgc: Vec<_> = rep
        .rows
        .iter()
        .filter(|r| r.label.starts_with("DSRPGC ["))
        .collect();
    assert_eq!(dsrpgc.len(), 3, "{labels:?}");
    assert!(
        dsrpgc
            .iter()
            .any(|r| r.label == "DSRPGC [epochs=30, lr=0.001]" && r.seeds == [0, 3]),
        "{labels:?}"
    );
    assert!(
        dsrpgc
            .iter()
            .any(|r| r.label == "DSRPGC [epochs=5, lr=0.001]"),
        "{labels:?}"
    );
    assert!(
        dsrpgc
            .iter()
            .any(|r| r.label.starts_with("DSRPGC [epochs=30, lr=0.0001")),
        "{labels:?}"
    );
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn bad_run_directories_are_errors_naming_the_file_or_listed_skips() {
    let root = tmp("bad");
    let good = fake_run(&root, "good", &[HAM, SRCMT], 0.7, 10.0, SRCMT_COUNTS);
    let corrupt = fake_run(&root, "corrupt", &[HAM, SRCMT], 0.7, 10.0, SRCMT_COUNTS);
    std::fs::write(corrupt.join("summary.json"), "{\"outcome\": \"fini").unwrap();
    let missing = root.join("missing");
    std::fs::create_dir_all(&missing).unwrap();
    let unfinished = fake_run(&root, "unfinished", &[HAM, SRCMT], 0.7, 10.0, SRCMT_COUNTS);
    let mut s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(unfinished.join("summary.json")).unwrap())
            .unwrap();
    s["outcome"] = "interrupted".into();
    s["epochs_done"] = 3.into();
    s.as_object_mut().unwrap().remove("test");
    std::fs::write(unfinished.join("summary.json"), s.to_string()).unwrap();
    let no_config = fake_run(&root, "noconfig", &[HAM, SRCMT], 0.7, 10.0, SRCMT_COUNTS);
    std::fs::remove_file(no_config.join("config.toml")).unwrap();
    let no_field = fake_run(&root, "nofield", &[HAM, SRCMT], 0.7, 10.0, SRCMT_COUNTS);
    let mut s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(no_field.join("summary.json")).unwrap())
            .unwrap();
    s["test"].as_object_mut().unwrap().remove("macro_f1");
    std::fs::write(no_field.join("summary.json"), s.to_string()).unwrap();

    let err = |d: &Path| {
        report::build(&[good.clone(), d.to_path_buf()], ReportOptions::default())
            .unwrap_err()
            .to_string()
    };
    let e = err(&corrupt);
    assert!(
        e.contains(&corrupt.join("summary.json").display().to_string())
            && e.contains("not valid JSON"),
        "{e}"
    );
    let e = err(&missing);
    assert!(
        e.contains(&missing.join("summary.json").display().to_string()),
        "{e}"
    );
    let e = err(&unfinished);
    assert!(
        e.contains("summary.json") && e.contains("did not finish") && e.contains("3/30"),
        "{e}"
    );
    let e = err(&no_config);
    assert!(
        e.contains(&no_config.join("config.toml").display().to_string()),
        "{e}"
    );
    let e = err(&no_field);
    assert!(e.contains("test.macro_f1"), "{e}");
    // The same directory twice, and another directory with the same settings and seed.
    let e = err(&good);
    assert!(e.contains("named twice"), "{e}");
    let copy = fake_run(&root, "copy", &[HAM, SRCMT], 0.9, 10.0, SRCMT_COUNTS);
    let e = err(&copy);
    assert!(e.contains("same settings and seed 0"), "{e}");

    // --skip-bad: the good run is reported, every other one is listed with its reason.
    let all = [
        good.clone(),
        corrupt.clone(),
        missing.clone(),
        unfinished.clone(),
        no_config.clone(),
        no_field.clone(),
    ];
    let r = report::build(
        &all,
        ReportOptions {
            skip_bad: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.rows.len(), 1);
    assert_eq!(r.rows[0].runs, std::slice::from_ref(&good));
    assert_eq!(r.skipped.len(), 5);
    assert!(r
        .skipped
        .iter()
        .any(|(d, why)| *d == corrupt && why.contains("not valid JSON")));
    let md = r.markdown();
    assert!(md.contains("Left out: 5 run directories"), "{md}");
    assert!(md.contains(&unfinished.display().to_string()), "{md}");
    assert_eq!(r.json()["skipped"].as_array().unwrap().len(), 5);
    let _ = std::fs::remove_dir_all(root);
}

fn medssl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_medssl"))
}

/// Two real runs (supervised, PneumoniaMNIST 20 % labels, 1 epoch of a width-4 model, seeds 0 and
/// 1; a few seconds each) through the CLI, then `medssl report` on them: one row, the values of
/// the runs' own summary.json.
#[test]
fn report_on_two_real_tiny_trainings() {
    let root = tmp("real");
    let t0 = std::time::Instant::now();
    let mut dirs = Vec::new();
    for seed in ["0", "1"] {
        let d = root.join(format!("supervised-s{seed}"));
        let out = medssl()
            .args(["train", "--data", DATA, "--epochs", "1", "--seed", seed])
            .args(["--method", "supervised"])
            .args(["--out", d.to_str().unwrap()])
            .args([
                "--set",
                "width=4",
                "--set",
                "fusion_dim=8",
                "--set",
                "emb=8",
            ])
            .args(["--set", "batch_labeled=16", "--set", "batch_unlabeled=512"])
            .args(["--set", "workers=1"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dirs.push(d);
    }
    eprintln!("two tiny trainings: {:.1} s", t0.elapsed().as_secs_f64());
    let args: Vec<&str> = dirs.iter().map(|d| d.to_str().unwrap()).collect();
    let out = medssl()
        .args(["report", "--json"])
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = j["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{j}");
    assert_eq!(rows[0]["label"], "Supervised 20 %");
    assert_eq!(rows[0]["dataset"], "pneumoniamnist");
    assert_eq!(rows[0]["labels"], "20 % (dataset split)");
    assert_eq!(rows[0]["seeds"], serde_json::json!([0, 1]));
    assert_eq!(rows[0]["epochs"], 1);
    let accs: Vec<f64> = dirs
        .iter()
        .map(|d| {
            let s: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap())
                    .unwrap();
            s["test"]["accuracy"].as_f64().unwrap()
        })
        .collect();
    assert_eq!(
        rows[0]["metrics"]["accuracy"]["values"],
        serde_json::json!(accs)
    );

    let out = medssl()
        .args(["report", "--markdown"])
        .args(&args)
        .output()
        .unwrap();
    let md = String::from_utf8(out.stdout).unwrap();
    assert!(
        md.contains("| Supervised 20 % | 20 % (dataset split) |"),
        "{md}"
    );

    // A corrupt run directory: an error naming the file, or with --skip-bad a note on stderr.
    let bad = root.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("summary.json"), "not json").unwrap();
    let out = medssl()
        .arg("report")
        .args(&args)
        .arg(bad.to_str().unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&bad.join("summary.json").display().to_string()),
        "{err}"
    );
    let out = medssl()
        .args(["report", "--skip-bad"])
        .args(&args)
        .arg(bad.to_str().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("skipped") && err.contains("summary.json"),
        "{err}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Left out: 1 run directory"), "{text}");
    let _ = std::fs::remove_dir_all(root);
}
