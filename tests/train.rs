//! Training-run tests: resume exactness, checkpoints, signals, non-finite loss, eval/predict.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use medssl::train::checkpoint;
use medssl::train::config::TrainConfig;
use medssl::train::run::{train, Outcome, RunOptions};

const DATA: &str = "../shared/data/pneumoniamnist";

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("medssl-train-tests-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The settings (beyond `data`) of a tiny but complete DSRPGC run on the `fast` preset.
const TINY: [&str; 9] = [
    "width=4",
    "fusion_dim=8",
    "emb=8",
    "batch_labeled=4",
    "batch_unlabeled=8",
    "queue=64",
    "epochs=2",
    "workers=1",
    "eval_batch=512",
];

/// A tiny but complete DSRPGC configuration (fast enough for tests).
fn tiny(extra: &[&str]) -> TrainConfig {
    let mut sets = vec![format!("data={DATA}")];
    sets.extend(TINY.iter().chain(extra).map(|s| s.to_string()));
    TrainConfig::resolve("fast", None, &sets).unwrap()
}

fn opts(out: &Path, resume: bool, max_steps: u64) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        resume,
        max_steps,
        no_eval: true,
        quiet: true,
    }
}

fn student_tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let ck = checkpoint::load(path).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = ck
        .tensors
        .into_iter()
        .filter(|(k, _)| !k.starts_with("norm."))
        .map(|(k, (d, _))| (k, d))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The student tensors of two runs' `last` checkpoints, asserted equal bit for bit (`what` names
/// the comparison in the failure message); returns the first run's.
fn assert_same_last(a: &Path, b: &Path, what: &str) -> Vec<(String, Vec<f32>)> {
    let (ta, tb) = (
        student_tensors(&a.join("last.safetensors")),
        student_tensors(&b.join("last.safetensors")),
    );
    assert_eq!(ta.len(), tb.len());
    for ((ka, va), (kb, vb)) in ta.iter().zip(&tb) {
        assert_eq!(ka, kb);
        assert!(va == vb, "{what}: tensor {ka} differs");
    }
    ta
}

#[test]
fn resume_reproduces_the_uninterrupted_run() {
    let (a, b) = (tmp("straight"), tmp("resumed"));
    let (o, _) = train(tiny(&[]), &opts(&a, false, 7)).unwrap();
    assert_eq!(o, Outcome::StepLimit);
    let (o, _) = train(tiny(&[]), &opts(&b, false, 3)).unwrap();
    assert_eq!(o, Outcome::StepLimit);
    let (o, _) = train(tiny(&[]), &opts(&b, true, 7)).unwrap();
    assert_eq!(o, Outcome::StepLimit);
    let ta = assert_same_last(&a, &b, "straight and resumed");
    assert!(ta.iter().any(|(k, _)| k.starts_with("opt.m.")) && ta.iter().any(|(k, _)| k == "meta"));
    // The straight run really moved away from the initial weights.
    let c = tmp("init");
    train(tiny(&[]), &opts(&c, false, 1)).unwrap();
    let tc = student_tensors(&c.join("last.safetensors"));
    let w = |t: &[(String, Vec<f32>)]| {
        t.iter()
            .find(|(k, _)| k == "student.fc.weight")
            .unwrap()
            .1
            .clone()
    };
    assert_ne!(w(&ta), w(&tc));
    for d in [a, b, c] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// The CPU arithmetic does not depend on the rayon thread count: a run started on one thread and
/// resumed on three writes the checkpoint of a straight run on two, bit for bit.
#[test]
fn resume_on_another_thread_count_continues_exactly() {
    let (a, b) = (tmp("threads-straight"), tmp("threads-resumed"));
    for (threads, out, resume, steps) in [(2, &a, false, 5), (1, &b, false, 2), (3, &b, true, 5)] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let (o, _) = pool
            .install(|| train(tiny(&[]), &opts(out, resume, steps)))
            .unwrap();
        assert_eq!(o, Outcome::StepLimit);
    }
    assert_same_last(&a, &b, "thread counts 2 and 1 + 3");
    for d in [a, b] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// The same through the binary with every 3×3 stride-1 convolution on the Winograd path, then
/// on the direct kernel (`MEDSSL_CPU_CONV=winograd` / `direct`; the default takes Winograd only
/// for wide layers, which the tiny model has none of, and the direct kernel only for its 8-channel
/// layer, on CPUs with AVX-512): one thread then three write the checkpoint of a straight run on
/// two.
#[test]
fn forced_conv_paths_resume_exactly_on_another_thread_count() {
    for algo in ["winograd", "direct"] {
        let a = tmp(&format!("{algo}-straight"));
        let b = tmp(&format!("{algo}-resumed"));
        for (threads, out, resume, steps) in
            [(2, &a, false, 5), (1, &b, false, 2), (3, &b, true, 5)]
        {
            let mut cmd = Command::new(bin());
            cmd.args(["train", "--preset", "fast", "--data", DATA, "--no-eval"])
                .args(["--out", out.to_str().unwrap()])
                .args(["--max-steps", &steps.to_string()]);
            for set in TINY {
                cmd.args(["--set", set]);
            }
            if resume {
                cmd.arg("--resume");
            }
            let out = cmd
                .env("MEDSSL_CPU_CONV", algo)
                .env("RAYON_NUM_THREADS", threads.to_string())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{algo} on {threads} threads: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_same_last(&a, &b, &format!("{algo} runs on thread counts 2 and 1 + 3"));
        for d in [a, b] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// `--dsr-balance align` and `class`: N steps straight equal K steps + resume to N, every tensor
/// (the running class prior included), and the prior really moved.
#[test]
fn resume_is_exact_with_dsr_balance() {
    for mode in ["align", "class"] {
        let set = format!("dsr_balance={mode}");
        let cfg = || tiny(&[&set]);
        let (a, b) = (tmp(&format!("bal-{mode}-a")), tmp(&format!("bal-{mode}-b")));
        assert_eq!(
            train(cfg(), &opts(&a, false, 6)).unwrap().0,
            Outcome::StepLimit
        );
        assert_eq!(
            train(cfg(), &opts(&b, false, 2)).unwrap().0,
            Outcome::StepLimit
        );
        // The balance mode defines the training state: it cannot change on resume.
        let e = train(tiny(&[]), &opts(&b, true, 6))
            .expect_err("changing dsr_balance on resume must be refused")
            .to_string();
        assert!(e.contains("'dsr_balance'"), "{e}");
        assert_eq!(
            train(cfg(), &opts(&b, true, 6)).unwrap().0,
            Outcome::StepLimit
        );
        let ta = assert_same_last(&a, &b, &format!("{mode}, straight and resumed"));
        let get = |k: &str| ta.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert_eq!(get("dsr_balance.updates"), vec![6.0], "{mode}");
        let prior = get("dsr_balance.prior");
        assert_eq!(prior.len(), 2);
        assert!((prior.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{prior:?}");
        assert_ne!(prior, vec![0.5, 0.5], "{mode}: the prior never moved");
        for d in [a, b] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// With `dsr_balance = off` (the default) the prior is not touched, and every epoch's metrics line
/// carries the pseudo-label class fractions (and `dsr_prior` only when the option is on).
#[test]
fn pseudo_label_fractions_are_logged_and_off_leaves_the_prior_alone() {
    for (mode, logs_prior) in [("off", false), ("align", true)] {
        let d = tmp(&format!("plfrac-{mode}"));
        let cfg = tiny(&[
            "batch_unlabeled=256",
            "epochs=1",
            &format!("dsr_balance={mode}"),
        ]);
        let (o, s) = train(cfg, &opts(&d, false, 0)).unwrap();
        assert_eq!(o, Outcome::Finished);
        let steps = s["steps"].as_u64().unwrap();
        let text = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
        let rec: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        let frac: Vec<f64> = rec["train"]["pseudo_label_frac"]
            .as_array()
            .unwrap_or_else(|| panic!("{rec}"))
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(frac.len(), 2);
        assert!((frac.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{frac:?}");
        // Fractions of steps × 256 pseudo-labels.
        for f in &frac {
            let k = f * (steps * 256) as f64;
            assert!((k - k.round()).abs() < 1e-6, "{frac:?}");
        }
        assert_eq!(rec["train"].get("dsr_prior").is_some(), logs_prior, "{rec}");
        let ck = checkpoint::load(&d.join("last.safetensors")).unwrap();
        let updates = ck.tensors["dsr_balance.updates"].0[0];
        if mode == "off" {
            assert_eq!(ck.tensors["dsr_balance.prior"].0, vec![0.5, 0.5]);
            assert_eq!(updates, 0.0);
        } else {
            assert_eq!(updates, steps as f32);
        }
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn corrupt_checkpoint_is_refused_with_a_clear_error() {
    let d = tmp("corrupt");
    train(tiny(&[]), &opts(&d, false, 1)).unwrap();
    let p = d.join("last.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&p, &bytes).unwrap();
    let e = checkpoint::load(&p)
        .err()
        .expect("corrupt checkpoint must not load")
        .to_string();
    assert!(
        e.contains("checksum mismatch") && e.contains("last.safetensors"),
        "{e}"
    );
    std::fs::write(&p, &bytes[..n / 2]).unwrap();
    let e = checkpoint::load(&p)
        .err()
        .expect("truncated checkpoint must not load")
        .to_string();
    assert!(e.contains("last.safetensors"), "{e}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn non_finite_loss_stops_with_step_and_term_and_keeps_last_checkpoint() {
    let d = tmp("nan");
    train(tiny(&[]), &opts(&d, false, 2)).unwrap();
    let before = std::fs::read(d.join("last.safetensors")).unwrap();
    // Resume with an absurd learning rate: the weights overflow and the next loss is not finite.
    let e = train(tiny(&["lr=1e30", "schedule=constant"]), &opts(&d, true, 50))
        .expect_err("training must stop on a non-finite loss")
        .to_string();
    assert!(e.contains("non-finite loss at step"), "{e}");
    assert!(e.contains("term"), "{e}");
    assert!(e.contains("last good checkpoint"), "{e}");
    assert_eq!(std::fs::read(d.join("last.safetensors")).unwrap(), before);
    // What defines the model cannot change on resume.
    let e = train(tiny(&["width=8"]), &opts(&d, true, 50))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("'width'"), "{e}");
    let _ = std::fs::remove_dir_all(d);
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_medssl")
}

/// A `RAYON_NUM_THREADS` that rayon would quietly ignore is an error naming it, in both binaries.
#[test]
fn an_unparsable_thread_count_is_an_error() {
    for (exe, args) in [
        (bin(), &["eval", "--checkpoint", "no-such.safetensors"][..]),
        (
            env!("CARGO_BIN_EXE_medssl-bench"),
            &["gemm", "--n", "8"][..],
        ),
    ] {
        for bad in ["two", "2 "] {
            let out = Command::new(exe)
                .args(args)
                .env("RAYON_NUM_THREADS", bad)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "{exe} ran with RAYON_NUM_THREADS='{bad}'"
            );
            assert!(
                err.contains(&format!(
                    "RAYON_NUM_THREADS='{bad}' is not a number of threads"
                )),
                "{exe}: {err}"
            );
        }
        let ok = Command::new(exe)
            .args(args)
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&ok.stderr);
        assert!(!err.contains("RAYON_NUM_THREADS"), "{exe}: {err}");
    }
}

#[test]
fn sigterm_writes_a_checkpoint_and_exits_cleanly() {
    let d = tmp("sigterm");
    let mut child = Command::new(bin())
        .args([
            "train",
            "--data",
            DATA,
            "--out",
            d.to_str().unwrap(),
            "--no-eval",
        ])
        .args([
            "--set",
            "width=4",
            "--set",
            "fusion_dim=8",
            "--set",
            "emb=8",
            "--set",
            "log_every=1",
        ])
        .args([
            "--set",
            "batch_labeled=4",
            "--set",
            "batch_unlabeled=8",
            "--set",
            "queue=64",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until a step has been logged, then ask the run to stop.
    use std::io::{BufRead, BufReader};
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for l in lines.by_ref() {
        let l = l.unwrap();
        seen.push(l.clone());
        if l.contains(" step ") {
            break;
        }
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    let all = [seen, rest].concat().join("\n");
    assert!(status.success(), "exit {status:?}\n{all}");
    assert!(all.contains("stopped by signal"), "{all}");
    let ck = checkpoint::load(&d.join("last.safetensors")).unwrap();
    assert!(ck.state.step >= 1);
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn eval_and_predict_on_a_trained_checkpoint() {
    let d = tmp("evalpredict");
    let mut cfg = tiny(&[]);
    cfg.epochs = 1;
    let mut o = opts(&d, false, 0);
    o.no_eval = false;
    let (outcome, summary) = train(cfg.clone(), &o).unwrap();
    assert_eq!(outcome, Outcome::Finished);
    let test = &summary["test"];
    assert!(test["macro_auc"].as_f64().unwrap() > 0.5, "{summary}");
    for f in [
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "curves.png",
        "best.safetensors",
        "labeled.txt",
    ] {
        assert!(d.join(f).exists(), "{f} missing");
    }
    let best = d.join("best.safetensors");
    let out = Command::new(bin())
        .args([
            "eval",
            "--checkpoint",
            best.to_str().unwrap(),
            "--split",
            "test",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // `medssl eval` on the best checkpoint reproduces the run's own test metrics.
    let (a, b) = (
        v["metrics"]["macro_auc"].as_f64().unwrap(),
        test["macro_auc"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    // predict: a PNG of the right size, and a bad file named in the error.
    let png = d.join("x.png");
    image::GrayImage::from_fn(28, 28, |x, y| image::Luma([((x * 9 + y * 3) % 256) as u8]))
        .save(&png)
        .unwrap();
    let out = Command::new(bin())
        .args([
            "predict",
            "--checkpoint",
            best.to_str().unwrap(),
            png.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let probs = v[0]["probabilities"].as_object().unwrap();
    assert_eq!(probs.len(), 2);
    let s: f64 = probs.values().map(|p| p.as_f64().unwrap()).sum();
    assert!((s - 1.0).abs() < 1e-5);
    let bad = d.join("bad.png");
    std::fs::write(&bad, b"not an image").unwrap();
    let out = Command::new(bin())
        .args([
            "predict",
            "--checkpoint",
            best.to_str().unwrap(),
            bad.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.png"));
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn dsrpgc_tiny_loss_equals_the_golden_case() {
    let r = medssl::golden::run_case(
        Path::new("../shared/golden/dsrpgc_tiny.safetensors"),
        medssl::Device::Cpu,
    );
    assert!(r.error.is_none(), "{:?}", r.error);
    let names: Vec<&str> = r.checks.iter().map(|c| c.name.as_str()).collect();
    for n in [
        "out.loss",
        "out.loss_sup",
        "out.loss_cons",
        "out.loss_pgc",
        "out.weights",
        "out.pseudo_labels",
    ] {
        assert!(names.contains(&n), "{n} not checked");
    }
    assert!(
        r.pass,
        "{:#?}",
        r.checks.iter().filter(|c| !c.pass).collect::<Vec<_>>()
    );
}

#[test]
fn a_stop_on_the_last_step_of_an_epoch_keeps_that_epochs_record() {
    let d = tmp("boundary");
    let cfg = tiny(&["batch_unlabeled=64"]);
    // 3766 unlabelled PneumoniaMNIST images / 64 = 58 steps per epoch.
    let (o, s) = train(cfg.clone(), &opts(&d, false, 58)).unwrap();
    assert_eq!(o, Outcome::StepLimit);
    assert_eq!(s["steps_per_epoch"], 58);
    let lines = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 1, "{lines}");
    let ck = checkpoint::load(&d.join("last.safetensors")).unwrap();
    assert_eq!((ck.state.step, ck.state.epochs_done), (58, 1));
    // The checkpoint carries the run's wall time; the summary reports this invocation's time.
    let w1 = ck.state.wall_seconds;
    assert!(w1 > 0.0 && w1 <= s["wall_seconds"].as_f64().unwrap());
    assert_eq!(s["resumed"], false);
    let (o, s2) = train(cfg, &opts(&d, true, 60)).unwrap();
    assert_eq!(o, Outcome::StepLimit);
    // After a resume the wall time continues from the checkpoint's total.
    assert_eq!(s2["resumed"], true);
    let (total, this) = (
        s2["wall_seconds"].as_f64().unwrap(),
        s2["wall_seconds_this_invocation"].as_f64().unwrap(),
    );
    assert!(this > 0.0, "{s2}");
    assert!((total - (w1 + this)).abs() < 1e-9, "{s2}");
    let lines = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 1);
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn labeled_ratio_beside_a_protocol_is_refused_and_srcmt_full_has_no_unlabeled_set() {
    let ham = Path::new("../shared/data/ham10000")
        .to_str()
        .unwrap()
        .to_string();
    let mut cfg = TrainConfig::resolve(
        "srcmt-isic2018",
        None,
        &[format!("data={ham}"), "labeled_ratio=0.5".into()],
    )
    .unwrap();
    let e = medssl::train::run::load_data(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("labeled_ratio 0.5") && e.contains("mutually exclusive"),
        "{e}"
    );
    cfg.labeled_ratio = 0.2;
    cfg.labeled_protocol = "srcmt-full".into();
    let (_, part) = medssl::train::run::load_data(&cfg).unwrap();
    assert_eq!((part.labeled.len(), part.unlabeled.len()), (7000, 0));
}

#[test]
fn supervised_teacher_slot_is_an_exact_copy_of_the_student() {
    // A supervised baseline runs no teacher pass: without the copy its teacher would keep the
    // initial BN statistics and every teacher-based evaluation (model selection, test metrics,
    // `eval`, `predict`) would score an untrained normalisation.
    let d = tmp("supervised-teacher");
    let cfg = tiny(&["method=supervised", "epochs=1"]);
    let mut o = opts(&d, false, 0);
    o.no_eval = false;
    let (outcome, s) = train(cfg, &o).unwrap();
    assert_eq!(outcome, Outcome::Finished);
    let ck = checkpoint::load(&d.join("last.safetensors")).unwrap();
    let mut n = 0;
    for (k, (v, _)) in &ck.tensors {
        if let Some(rest) = k.strip_prefix("student.") {
            let t = &ck.tensors[&format!("teacher.{rest}")].0;
            assert_eq!(t, v, "teacher.{rest} differs from {k}");
            n += 1;
        }
    }
    assert!(n > 20, "only {n} student tensors");
    assert!(ck.tensors.keys().any(|k| k.ends_with("bn1.running_var")));
    let line = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
    let rec: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    assert_eq!(rec["val_teacher"], rec["val_student"]);
    assert!(s["test"]["macro_auc"].as_f64().unwrap() > 0.5, "{s}");
    let _ = std::fs::remove_dir_all(d);
}
