//! Build script. Without feature `cuda` it does nothing. With it, every `kernels/*.cu` is compiled
//! by nvcc into a fatbin (SASS for sm_80 and sm_90 plus compute_80 PTX for newer GPUs) and
//! embedded into the library through `$OUT_DIR/kernels.rs` (`include_bytes!`).

use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALL_HINT: &str = "install the pinned CUDA 13.0 compiler wheels with \
`pip install nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
nvidia-cuda-runtime==13.0.96` (all four pins matter: a newer nvvm emits PTX that a 13.0 \
driver rejects), or point the NVCC environment variable at an nvcc binary";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    println!("cargo:rerun-if-env-changed=MEDSSL_NVCC_FLAGS");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let kernel_dir = Path::new("kernels");
    println!("cargo:rerun-if-changed=kernels");

    let mut sources: Vec<PathBuf> = std::fs::read_dir(kernel_dir)
        .unwrap_or_else(|e| panic!("medssl build: cannot read kernels/: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    for entry in std::fs::read_dir(kernel_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }

    let nvcc = find_nvcc().unwrap_or_else(|| {
        panic!(
            "medssl build: feature `cuda` needs nvcc, which was not found (checked $NVCC, \
             $CUDA_HOME/bin, $CUDA_PATH/bin, PATH and python site-packages \
             nvidia/cu13/bin/nvcc). To fix: {INSTALL_HINT}."
        )
    });

    let extra: Vec<String> = std::env::var("MEDSSL_NVCC_FLAGS")
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();

    let mut table = String::from(
        "/// Embedded kernel fatbins: (family name, image), one per `kernels/*.cu`.\n\
         pub static KERNEL_IMAGES: &[(&str, &[u8])] = &[\n",
    );
    for src in &sources {
        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
        let out = out_dir.join(format!("{stem}.fatbin"));
        let status = Command::new(&nvcc)
            .arg("--fatbin")
            .arg("-O3")
            .arg("-std=c++17")
            .arg("-gencode")
            .arg("arch=compute_80,code=[sm_80,compute_80]")
            .arg("-gencode")
            .arg("arch=compute_90,code=sm_90")
            .args(&extra)
            .arg("-o")
            .arg(&out)
            .arg(src)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "medssl build: failed to run nvcc at {}: {e}. To fix: {INSTALL_HINT}.",
                    nvcc.display()
                )
            });
        if !status.success() {
            panic!(
                "medssl build: nvcc ({}) failed on {} ({status}); see the compiler output above",
                nvcc.display(),
                src.display()
            );
        }
        table.push_str(&format!(
            "    ({stem:?}, include_bytes!({:?})),\n",
            out.display().to_string()
        ));
    }
    table.push_str("];\n");
    std::fs::write(out_dir.join("kernels.rs"), table)
        .unwrap_or_else(|e| panic!("medssl build: cannot write kernels.rs: {e}"));
}

/// `$NVCC`, then `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `PATH`, then the pip wheel location.
fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NVCC") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
        panic!(
            "medssl build: NVCC={} is not a file. To fix: {INSTALL_HINT}.",
            p.display()
        );
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            let p = Path::new(&root).join("bin").join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    for python in ["python3", "python"] {
        let out = Command::new(python)
            .arg("-c")
            .arg(
                "import site,sys; print('\\n'.join(site.getsitepackages() + \
                 [site.getusersitepackages()] + sys.path))",
            )
            .output();
        if let Ok(out) = out {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let p = Path::new(line.trim()).join("nvidia/cu13/bin/nvcc");
                if p.is_file() {
                    return Some(p);
                }
            }
        }
    }
    None
}
