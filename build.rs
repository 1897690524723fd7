//! Build script. Without feature `cuda` it does nothing. With it, every `kernels/*.cu` is compiled
//! by nvcc into a fatbin (SASS for sm_80 and sm_90 plus compute_80 PTX for newer GPUs) and
//! embedded into the library through `$OUT_DIR/kernels.rs` (`include_bytes!`). The same sources are
//! also compiled by the host C++ compiler against `kernels/emu/` into a CPU emulation of the
//! kernels (`MEDSSL_CUDA_EMULATE=1`), which is how the CUDA backend is tested without a GPU.

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

    build_emulator(&sources, &out_dir);
}

/// Tokens that make a kernel need fibers in the emulation (barriers and warp shuffles).
const SYNC_TOKENS: &[&str] = &["__syncthreads", "__shfl"];

/// The text from `open` (an index of `{`) to its matching `}`.
fn braced(text: &str, open: usize) -> &str {
    let mut depth = 0usize;
    for (i, ch) in text[open..].char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &text[open..open + i + 1];
                }
            }
            _ => {}
        }
    }
    &text[open..]
}

/// `(name, body)` of every function whose definition starts with `marker` (e.g. `__global__`),
/// named by the identifier right before the first `(` after the marker.
fn functions<'a>(text: &'a str, marker: &str) -> Vec<(String, &'a str)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(pos) = text[from..].find(marker) {
        let start = from + pos;
        from = start + marker.len();
        let Some(paren) = text[from..].find('(') else {
            break;
        };
        let head = text[from..from + paren].trim_end();
        let name: String = head
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let Some(open) = text[from..].find('{') else {
            break;
        };
        let body = braced(text, from + open);
        if !name.is_empty() {
            out.push((name, body));
        }
    }
    out
}

/// Whether `body` mentions `name` as a whole identifier.
fn mentions(body: &str, name: &str) -> bool {
    body.match_indices(name).any(|(i, _)| {
        let before = body[..i].chars().next_back();
        let after = body[i + name.len()..].chars().next();
        let ident = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        !ident(before) && !ident(after)
    })
}

/// Compiles every kernel file with the host C++ compiler against `kernels/emu/cuda_emu.h` into a
/// static library with a registry of its kernels (name, typed trampoline, and whether the kernel
/// needs fibers because it, or a device function it calls, uses a barrier or a warp shuffle).
fn build_emulator(sources: &[PathBuf], out_dir: &Path) {
    println!("cargo:rerun-if-changed=kernels/emu");
    let emu_dir = Path::new("kernels/emu");
    let common = std::fs::read_to_string("kernels/common.cuh")
        .unwrap_or_else(|e| panic!("medssl build: cannot read kernels/common.cuh: {e}"));
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .debug(false)
        .warnings(false)
        .extra_warnings(false)
        .include(emu_dir)
        .include("kernels")
        .file(emu_dir.join("runtime.cpp"));
    let mut all = String::new();
    let mut calls = String::new();
    // The emulation's own test kernels come after the real ones.
    let selftest = emu_dir.join("selftest.cu");
    for src in sources.iter().chain(std::iter::once(&selftest)) {
        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(src)
            .unwrap_or_else(|e| panic!("medssl build: cannot read {}: {e}", src.display()));
        // Device functions that synchronise, directly or through another one (to a fixpoint).
        let helpers: Vec<(String, String)> = functions(&common, "__device__")
            .into_iter()
            .chain(functions(&text, "__device__"))
            .map(|(n, b)| (n, b.to_string()))
            .collect();
        let mut syncing: Vec<String> = Vec::new();
        loop {
            let before = syncing.len();
            for (name, body) in &helpers {
                if syncing.contains(name) {
                    continue;
                }
                if SYNC_TOKENS.iter().any(|t| body.contains(t))
                    || syncing.iter().any(|s| mentions(body, s))
                {
                    syncing.push(name.clone());
                }
            }
            if syncing.len() == before {
                break;
            }
        }
        let abs = std::fs::canonicalize(src)
            .unwrap_or_else(|e| panic!("medssl build: {}: {e}", src.display()));
        let mut wrapper = format!(
            "// Generated by build.rs: kernels/{stem}.cu for the CPU emulation.\n\
             #include \"cuda_emu.h\"\n#include {:?}\n#include \"registry.h\"\n\
             extern \"C\" void medssl_emu_register_{stem}() {{\n",
            abs.display().to_string()
        );
        for (name, body) in functions(&text, "__global__") {
            let needs_fibers = SYNC_TOKENS.iter().any(|t| body.contains(t))
                || syncing.iter().any(|s| mentions(body, s));
            wrapper.push_str(&format!(
                "    emu::reg({name:?}, &{name}, {});\n",
                !needs_fibers
            ));
        }
        wrapper.push_str("}\n");
        let path = out_dir.join(format!("emu_{stem}.cpp"));
        std::fs::write(&path, wrapper)
            .unwrap_or_else(|e| panic!("medssl build: cannot write {}: {e}", path.display()));
        build.file(&path);
        all.push_str(&format!(
            "extern \"C\" void medssl_emu_register_{stem}();\n"
        ));
        calls.push_str(&format!("    medssl_emu_register_{stem}();\n"));
    }
    all.push_str(&format!(
        "extern \"C\" void medssl_emu_register_all() {{\n{calls}}}\n"
    ));
    let path = out_dir.join("emu_registry.cpp");
    std::fs::write(&path, all)
        .unwrap_or_else(|e| panic!("medssl build: cannot write {}: {e}", path.display()));
    build.file(&path);
    build.compile("medssl_emu");
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
