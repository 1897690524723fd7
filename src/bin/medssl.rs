//! `medssl`: conformance, data tools, training and evaluation.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use medssl::golden;
use medssl::tensor::Device;

#[derive(Parser)]
#[command(
    name = "medssl",
    version,
    about = "Semi-supervised medical image classification (DSRPGC)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run PyTorch golden cases (SPEC §5) and report the worst errors per output.
    Conformance {
        /// Folder of *.safetensors cases.
        #[arg(long, default_value = "../shared/golden")]
        golden: PathBuf,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// One JSON object per case, then a summary object.
        #[arg(long)]
        json: bool,
    },
}

fn conformance(dir: &PathBuf, device: &str, json: bool) -> Result<bool> {
    let dev = Device::parse(device)?;
    medssl::backend::get(dev).with_context(|| format!("--device {device}"))?;
    let files = golden::case_files(dir)?;
    if files.is_empty() {
        bail!("{}: no *.safetensors case found", dir.display());
    }
    let (mut passed, mut failed) = (0, 0);
    for f in &files {
        let r = golden::run_case(f, dev);
        if r.pass {
            passed += 1;
        } else {
            failed += 1;
        }
        if json {
            println!("{}", serde_json::to_string(&r)?);
            continue;
        }
        let name = f.file_stem().and_then(|s| s.to_str()).unwrap_or("?");
        println!(
            "{} {name} (op {})",
            if r.pass { "PASS" } else { "FAIL" },
            r.op
        );
        if let Some(e) = &r.error {
            println!("    error: {e}");
        }
        for c in &r.checks {
            println!(
                "    {:<44} max_abs {:.3e}  max_rel {:.3e}{}{}",
                c.name,
                c.max_abs,
                c.max_rel,
                if c.pass { "" } else { "  FAIL" },
                c.problem
                    .as_deref()
                    .map(|p| format!(" ({p})"))
                    .unwrap_or_default()
            );
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"summary": true, "device": dev.to_string(), "passed": passed, "failed": failed})
        );
    }
    println!("{passed} passed, {failed} failed");
    Ok(failed == 0)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Conformance {
            golden,
            device,
            json,
        } => {
            if !conformance(&golden, &device, json)? {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
