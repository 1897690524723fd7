//! The PyTorch golden cases (SPEC §5) on the CPU backend, and the runner's refusal to pass cases
//! it cannot check.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use medssl::golden::{case_files, run_case, write_safetensors, CaseReport};
use medssl::Device;

/// The golden cases: `MEDSSL_GOLDEN` when set (packed GPU runs), else `../shared/golden`.
fn golden_dir() -> String {
    std::env::var("MEDSSL_GOLDEN").unwrap_or_else(|_| "../shared/golden".to_string())
}

fn summary(r: &CaseReport) -> String {
    let mut s = format!(
        "{} {:<28} op {:<28}",
        if r.pass { "PASS" } else { "FAIL" },
        Path::new(&r.file)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        r.op
    );
    if let Some(e) = &r.error {
        s += &format!(" error: {e}");
    }
    // Worst absolute and relative errors over the case, and any failing tensors.
    let worst_abs = r
        .checks
        .iter()
        .max_by(|a, b| a.max_abs.total_cmp(&b.max_abs));
    let worst_rel = r
        .checks
        .iter()
        .max_by(|a, b| a.max_rel.total_cmp(&b.max_rel));
    if let (Some(a), Some(b)) = (worst_abs, worst_rel) {
        s += &format!(
            " {} tensors; worst abs {:.2e} ({}), worst rel {:.2e} ({})",
            r.checks.len(),
            a.max_abs,
            a.name,
            b.max_rel,
            b.name
        );
    }
    for c in r.checks.iter().filter(|c| !c.pass) {
        s += &format!(
            "\n     {}: max abs {:.3e}, max rel {:.3e}{}",
            c.name,
            c.max_abs,
            c.max_rel,
            c.problem
                .as_ref()
                .map(|p| format!(" ({p})"))
                .unwrap_or_default()
        );
    }
    s
}

#[test]
fn golden_cases_pass_on_cpu() {
    let dir = golden_dir();
    let files = case_files(Path::new(&dir)).expect("golden directory");
    assert!(!files.is_empty(), "no golden cases found in {dir}");
    let mut failed = Vec::new();
    for f in &files {
        let t0 = std::time::Instant::now();
        let r = run_case(f, Device::Cpu);
        println!("{} [{:.2}s]", summary(&r), t0.elapsed().as_secs_f64());
        if !r.pass {
            failed.push(summary(&r));
        }
        // A passing case checked something, and everything it checked passed.
        if r.pass {
            assert!(r.error.is_none() && !r.checks.is_empty() && r.checks.iter().all(|c| c.pass));
        }
    }
    println!(
        "{} / {} golden cases pass",
        files.len() - failed.len(),
        files.len()
    );
    assert!(
        files.len() >= 25,
        "expected at least 25 golden cases, found {}",
        files.len()
    );
    assert!(
        failed.is_empty(),
        "failing golden cases:\n{}",
        failed.join("\n")
    );
}

/// The golden cases through the `medssl` binary with each CPU convolution algorithm forced
/// (`MEDSSL_CPU_CONV`, read once per process): the Winograd path, which the default picks only
/// for layers with at least 64 channels (none in the golden cases), and the direct kernel, which
/// it picks only for 8 to 32 channels on maps at least 14 wide, on every 3×3 stride-1 layer of
/// the convolution, MedFuseNet and DSRPGC cases; im2col on all of them; and a misspelt value
/// refused with its name.
#[test]
fn golden_cases_pass_with_each_convolution_algorithm() {
    let dir = golden_dir();
    let cases = case_files(Path::new(&dir)).expect("golden directory").len();
    for algo in ["winograd", "direct", "im2col"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_medssl"))
            .args(["conformance", "--golden", &dir])
            .env("MEDSSL_CPU_CONV", algo)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(&format!("{cases} passed, 0 failed")),
            "MEDSSL_CPU_CONV={algo}:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_medssl"))
        .args(["conformance", "--golden", &dir])
        .env("MEDSSL_CPU_CONV", "Winograd")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("MEDSSL_CPU_CONV='Winograd' is not a CPU convolution"),
        "{err}"
    );
}

/// A scratch directory unique to this test process and `name`.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("medssl-conformance-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

type Named = (String, Vec<f32>, Vec<usize>);

fn write_case(dir: &Path, file: &str, op: &str, tensors: &[Named]) -> PathBuf {
    let mut md = HashMap::new();
    md.insert("op".to_string(), op.to_string());
    md.insert("params".to_string(), "{}".to_string());
    md.insert("tol".to_string(), r#"{"rel":1e-4,"abs":1e-5}"#.to_string());
    let p = dir.join(file);
    write_safetensors(&p, tensors, &md).unwrap();
    p
}

fn named(n: &str, d: &[f32]) -> Named {
    (n.to_string(), d.to_vec(), vec![d.len()])
}

/// A correct relu case: `in.x`, `grad_out.y`, `out.y`, `grad.x`.
fn relu_case() -> Vec<Named> {
    let x = [-1.5f32, 0.5, 2.0, -0.25, 3.0];
    let gy = [0.1f32, -0.2, 0.3, 0.4, -0.5];
    let y: Vec<f32> = x.iter().map(|v| v.max(0.0)).collect();
    let gx: Vec<f32> = x
        .iter()
        .zip(&gy)
        .map(|(&x, &g)| if x > 0.0 { g } else { 0.0 })
        .collect();
    vec![
        named("in.x", &x),
        named("grad_out.y", &gy),
        named("out.y", &y),
        named("grad.x", &gx),
    ]
}

#[test]
fn unknown_op_is_a_failure() {
    let dir = scratch("unknown-op");
    let p = write_case(&dir, "bad.safetensors", "no_such_op", &relu_case());
    let r = run_case(&p, Device::Cpu);
    println!("{}", summary(&r));
    assert!(!r.pass, "a case with an unknown op passed");
    let e = r.error.as_deref().unwrap_or("");
    assert!(e.contains("no_such_op"), "error should name the op: {e:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn unproduced_expected_tensor_is_a_failure() {
    let dir = scratch("bogus-out");
    // Control: the same case without the extra tensor passes, so the failure below is due to it.
    let good = write_case(&dir, "relu_ok.safetensors", "relu", &relu_case());
    let r = run_case(&good, Device::Cpu);
    println!("{}", summary(&r));
    assert!(r.pass, "the control relu case failed: {}", summary(&r));
    assert_eq!(r.checks.len(), 2);

    let mut tensors = relu_case();
    tensors.push(named("out.bogus", &[1.0, 2.0]));
    let bad = write_case(&dir, "relu_bogus.safetensors", "relu", &tensors);
    let r = run_case(&bad, Device::Cpu);
    println!("{}", summary(&r));
    assert!(!r.pass, "a case expecting an unproduced tensor passed");
    let c = r
        .checks
        .iter()
        .find(|c| c.name == "out.bogus")
        .expect("out.bogus is reported");
    assert!(!c.pass && c.problem.is_some());
    assert!(r
        .checks
        .iter()
        .filter(|c| c.name != "out.bogus")
        .all(|c| c.pass));

    // A wrong expected value fails too (the comparison is live).
    let mut tensors = relu_case();
    tensors[2].1[2] += 1e-3;
    let wrong = write_case(&dir, "relu_wrong.safetensors", "relu", &tensors);
    let r = run_case(&wrong, Device::Cpu);
    println!("{}", summary(&r));
    assert!(!r.pass, "a case with a wrong expected value passed");
    std::fs::remove_dir_all(&dir).ok();
}
