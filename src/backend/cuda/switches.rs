//! The CUDA backend's environment switches, parsed once per process. A value the backend does not
//! understand is an error naming the variable and the values it takes, returned when a CUDA device
//! is first asked for (`--device cuda` fails with it), rather than silently taken as the default.
//!
//! | variable | values | default |
//! |---|---|---|
//! | `MEDSSL_CUDA_EMULATE` | `0`, `1`: CPU emulation of the device | `0` |
//! | `MEDSSL_TF32` | `0`, `1`: TF32 tensor-core math in cuBLAS and cuDNN | `0` |
//! | `MEDSSL_CUDNN_ALGO` | `time` (medssl times Find's algorithms and its im2col engine per direction, on the device alone), `find` (cuDNN times every algorithm), `heuristic` | `time` |
//! | `MEDSSL_CUDNN_DETERMINISTIC` | `1` (deterministic algorithms first), `0` | `1` |
//! | `MEDSSL_CUDNN_LOG` | `0`, `1`: log each shape's chosen algorithm to stderr | `0` |
//! | `MEDSSL_CUDNN_FWD_ALGO`, `MEDSSL_CUDNN_BWD_DATA_ALGO`, `MEDSSL_CUDNN_BWD_FILTER_ALGO` | an algorithm's name (e.g. `IMPLICIT_PRECOMP_GEMM`, `ALGO_0`): taken first wherever it is usable, for experiments | unset |
//! | `MEDSSL_CUDA_CONV` | `cudnn` (cuDNN when it loads), `im2col` (im2col + cuBLAS only) | `cudnn` |
//! | `MEDSSL_CUDA_CONV1X1` | `cublas` (1×1 convolutions as products), `cudnn` | `cublas` |
//! | `MEDSSL_CUDA_FUSION` | `two-ops` (the fusion's 1×1 projection, then the similarity fusion), `projected` (one op without the projected map, as the CPU computes it) | `two-ops` |
//! | `MEDSSL_CUDA_STEP_READ` | `later` (a training step's closing read is queued and collected during the next step, whose host work then overlaps this step's device work), `wait` (a training step waits for its device work and reads its loss) | `later` |
//! | `MEDSSL_CUDA_BN_FUSED_MAX_M` | an integer ≥ 0: largest N·H·W of a one-launch batch norm | 65536 |
//! | `MEDSSL_CUDA_BN_SPLIT` | `wave` (one wave of blocks), `auto` (about two blocks per multiprocessor, rounded up), or an integer ≥ 1: blocks per channel of the batch-norm reductions (1: one) | `wave` |
//! | `MEDSSL_CUDA_BN_STATS` | `welford` (one pass), `two-pass` (mean, then squared deviations) | `welford` |
//! | `MEDSSL_CUDA_BN_INFLIGHT` | `auto`, `4`, `8`, `16`: loads in flight per thread in the one-pass statistics of the split and resident batch-norm forwards (`auto`: 4 split, 8 resident) | `auto` |
//! | `MEDSSL_CUDA_BN_L2` | `plain`, `hint`: L2 eviction priorities in the one-pass forward and in the backward above one launch (statistics and gradient sums load their inputs evict-last; the normalising and input-gradient passes read them and write their outputs evict-first) | `plain` |
//! | `MEDSSL_CUDA_BN_APPLY` | `chunks` (the elementwise pass after a separate reduction on the reduction's grid), `flat` (over the flat tensor) | `chunks` |
//! | `MEDSSL_CUDA_BN_FWD` | `split` (statistics and normalising pass in two launches where one block per channel is too few), `resident` (one cooperative launch that reads x once; see `bn_resident`) | `split` |
//! | `MEDSSL_CUDA_BN_BWD` | `split` (gradient sums and input gradient in two launches, likewise), `resident` (one cooperative launch that reads x and the output gradient once; see `bn_resident_bwd`) | `split` |
//! | `MEDSSL_CUDA_BN_VEC` | `off`, `on`: the train-mode batch norms above one launch per channel access four elements at a time (16-byte loads and stores) where a plane's H·W is a multiple of 4 and the tensors are 16-byte aligned (not under `MEDSSL_CUDA_BN_L2=hint`, nor with two-pass statistics; see `bn_vec`) | `off` |
//! | `MEDSSL_CUDA_BN_KEEP` | `auto`, or a whole number >= 1: at most that many elements of each tensor a block of the resident or pipelined batch norms keeps in shared memory (the pipelined ones: per stage, so their chunks are at most that long; `auto`: as many as the device allows a block; see `bn_keep`) | `auto` |
//! | `MEDSSL_CUDA_BN_PIPE` | `off`, `on`: where the float4 batch norms run (`MEDSSL_CUDA_BN_VEC=on`) above one launch per channel, the forward and the backward each run as one pipelined cooperative launch that takes the channels a few at a time and copies each block's next chunk into shared memory while the current one's blocks meet (see `bn_pipe`; before `MEDSSL_CUDA_BN_FWD` and `MEDSSL_CUDA_BN_BWD`) | `off` |
//!
//! An empty value counts as unset.

use std::sync::OnceLock;

use super::norm::{BN_SPLIT_WAVE, FUSED_MAX_M};
use crate::error::{Error, Result};

/// How cuDNN convolution algorithms are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudnnAlgo {
    /// Time every algorithm cuDNN offers for the shape and take the fastest.
    Find,
    /// cuDNN's heuristic order, nothing run.
    Heuristic,
    /// Find's usable algorithms (deterministic ones only, unless `MEDSSL_CUDNN_DETERMINISTIC=0`)
    /// and medssl's im2col + cuBLAS engine, each timed by medssl with CUDA events on the
    /// device, per direction: the cheapest for the step runs. The default.
    Time,
}

impl CudnnAlgo {
    pub fn name(self) -> &'static str {
        match self {
            CudnnAlgo::Find => "find",
            CudnnAlgo::Heuristic => "heuristic",
            CudnnAlgo::Time => "time",
        }
    }
}

/// cuDNN's forward algorithms, named as after `CUDNN_CONVOLUTION_FWD_ALGO_`.
pub const FWD_ALGOS: [&str; 8] = [
    "IMPLICIT_GEMM",
    "IMPLICIT_PRECOMP_GEMM",
    "GEMM",
    "DIRECT",
    "FFT",
    "FFT_TILING",
    "WINOGRAD",
    "WINOGRAD_NONFUSED",
];
/// cuDNN's data-gradient algorithms, named as after `CUDNN_CONVOLUTION_BWD_DATA_`.
pub const BWD_DATA_ALGOS: [&str; 6] = [
    "ALGO_0",
    "ALGO_1",
    "ALGO_FFT",
    "ALGO_FFT_TILING",
    "ALGO_WINOGRAD",
    "ALGO_WINOGRAD_NONFUSED",
];
/// cuDNN's filter-gradient algorithms, named as after `CUDNN_CONVOLUTION_BWD_FILTER_`.
pub const BWD_FILTER_ALGOS: [&str; 7] = [
    "ALGO_0",
    "ALGO_1",
    "ALGO_FFT",
    "ALGO_3",
    "ALGO_WINOGRAD",
    "ALGO_WINOGRAD_NONFUSED",
    "ALGO_FFT_TILING",
];

/// Every switch, as parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct Switches {
    pub emulate: bool,
    pub tf32: bool,
    pub cudnn_algo: CudnnAlgo,
    pub cudnn_deterministic_first: bool,
    pub cudnn_log: bool,
    /// `MEDSSL_CUDNN_FWD_ALGO`: a forward algorithm to take first where usable (its name after
    /// `CUDNN_CONVOLUTION_FWD_ALGO_`, e.g. `IMPLICIT_PRECOMP_GEMM`).
    pub cudnn_fwd_algo: Option<String>,
    /// `MEDSSL_CUDNN_BWD_DATA_ALGO`: the same for the data gradient (e.g. `ALGO_1`, `FFT`).
    pub cudnn_bwd_data_algo: Option<String>,
    /// `MEDSSL_CUDNN_BWD_FILTER_ALGO`: the same for the filter gradient (e.g. `ALGO_0`).
    pub cudnn_bwd_filter_algo: Option<String>,
    /// `MEDSSL_CUDA_CONV=im2col`: cuDNN is not used for convolutions.
    pub conv_im2col: bool,
    /// 1×1 stride-1 convolutions run as cuBLAS products (`MEDSSL_CUDA_CONV1X1=cublas`).
    pub conv1x1_gemm: bool,
    /// `MEDSSL_CUDA_FUSION=projected`: the projected fusion without the projected map (`two-ops`,
    /// the default: the projection, then the similarity fusion).
    pub fusion_projected: bool,
    /// `MEDSSL_CUDA_STEP_READ=later` (the default): a training step's closing read is queued and
    /// collected during the next step (`wait`: the step waits for it).
    pub step_read_later: bool,
    pub bn_fused_max_m: usize,
    /// Blocks per channel of the batch-norm reductions; [`BN_SPLIT_WAVE`] (the default): one
    /// wave of blocks, 0: `auto`.
    pub bn_split: usize,
    /// `MEDSSL_CUDA_BN_STATS=welford` (the default): batch-norm statistics in one pass over the
    /// data (`two-pass`: the mean, then the squared deviations).
    pub bn_welford: bool,
    /// `MEDSSL_CUDA_BN_INFLIGHT`: loads in flight per thread (4, 8 or 16) in the one-pass
    /// statistics of the split and resident forwards; 0 (`auto`, the default): each kernel's own
    /// (4 in `bn_stats_split`, 8 in `bn_fwd_resident`). The same bits either way.
    pub bn_inflight: usize,
    /// `MEDSSL_CUDA_BN_L2=hint`: the split and resident one-pass forwards and backwards mark their
    /// accesses with L2 eviction priorities (`plain`, the default: none). The same bits either way.
    pub bn_l2_hint: bool,
    /// `MEDSSL_CUDA_BN_APPLY=chunks` (the default): the two-launch batch norm's elementwise pass
    /// runs on its reduction's grid (`flat`: over the flat tensor).
    pub bn_apply_chunks: bool,
    /// `MEDSSL_CUDA_BN_FWD=resident`: the two-launch batch-norm forward runs as one cooperative
    /// launch that reads x once (`split`, the default: two launches).
    pub bn_resident: bool,
    /// `MEDSSL_CUDA_BN_BWD=resident`: the two-launch batch-norm backward runs as one cooperative
    /// launch that reads its inputs once (`split`, the default: two launches).
    pub bn_resident_bwd: bool,
    /// `MEDSSL_CUDA_BN_VEC=on`: the split and resident train-mode batch norms run their float4
    /// kernels where the shape and alignment allow (`off`, the default: one element per access).
    pub bn_vec: bool,
    /// `MEDSSL_CUDA_BN_PIPE=on`: the float4 train-mode batch norms above one launch per channel
    /// run their pipelined one-launch kernels (`off`, the default).
    pub bn_pipe: bool,
    /// `MEDSSL_CUDA_BN_KEEP`: elements of each tensor a block of the resident or pipelined batch
    /// norms keeps in shared memory at most; `usize::MAX` (`auto`, the default): as many as fit.
    pub bn_keep: usize,
}

/// Parses the switches from `get(name)` (the environment, or a test's map).
pub fn parse(get: impl Fn(&str) -> Option<String>) -> std::result::Result<Switches, String> {
    let val = |name: &str| get(name).filter(|v| !v.is_empty());
    let bad = |name: &str, v: &str, takes: &str| {
        format!("environment variable {name}={v:?} is not understood: it takes {takes}")
    };
    let flag = |name: &str, default: bool| -> std::result::Result<bool, String> {
        match val(name).as_deref() {
            None => Ok(default),
            Some("1") => Ok(true),
            Some("0") => Ok(false),
            Some(v) => Err(bad(name, v, "0 or 1")),
        }
    };
    let choice = |name: &str, options: [&str; 2]| -> std::result::Result<bool, String> {
        // true: the first (default) option.
        match val(name) {
            None => Ok(true),
            Some(v) if v == options[0] => Ok(true),
            Some(v) if v == options[1] => Ok(false),
            Some(v) => Err(bad(
                name,
                &v,
                &format!("{} (the default) or {}", options[0], options[1]),
            )),
        }
    };
    // An algorithm name of one direction: the part after `CUDNN_CONVOLUTION_<DIR>_ALGO_` (as
    // in FWD_ALGO_FFT), any case, the full name also accepted; `ALGO_0`-style names of the
    // gradient algorithms keep their `ALGO_`.
    let algo = |name: &str, prefix: &str, names: &[&str]| -> std::result::Result<_, String> {
        let Some(v) = val(name) else { return Ok(None) };
        let up = v.to_ascii_uppercase();
        let short = up.strip_prefix(prefix).unwrap_or(&up).to_string();
        if names.contains(&short.as_str()) {
            Ok(Some(short))
        } else {
            Err(bad(name, &v, &format!("one of {}", names.join(", "))))
        }
    };
    let bn_fused_max_m = match val("MEDSSL_CUDA_BN_FUSED_MAX_M") {
        None => FUSED_MAX_M,
        Some(v) => v.parse().map_err(|_| {
            bad(
                "MEDSSL_CUDA_BN_FUSED_MAX_M",
                &v,
                "a whole number >= 0 (0: always two launches)",
            )
        })?,
    };
    let bn_split =
        match val("MEDSSL_CUDA_BN_SPLIT").as_deref() {
            None | Some("wave") => BN_SPLIT_WAVE,
            Some("auto") => 0,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n >= 1 && n != BN_SPLIT_WAVE => n,
                _ => return Err(bad(
                    "MEDSSL_CUDA_BN_SPLIT",
                    v,
                    "wave (the default), auto or a whole number >= 1 (1: one block per channel)",
                )),
            },
        };
    let bn_keep = match val("MEDSSL_CUDA_BN_KEEP").as_deref() {
        None | Some("auto") => usize::MAX,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n >= 1 && n != usize::MAX => n,
            _ => {
                return Err(bad(
                    "MEDSSL_CUDA_BN_KEEP",
                    v,
                    "auto (the default) or a whole number >= 1 (elements per tensor and block)",
                ))
            }
        },
    };
    let bn_inflight = match val("MEDSSL_CUDA_BN_INFLIGHT").as_deref() {
        None | Some("auto") => 0,
        Some(v @ ("4" | "8" | "16")) => v.parse().expect("a listed number"),
        Some(v) => {
            return Err(bad(
                "MEDSSL_CUDA_BN_INFLIGHT",
                v,
                "auto (the default), 4, 8 or 16",
            ))
        }
    };
    Ok(Switches {
        emulate: flag("MEDSSL_CUDA_EMULATE", false)?,
        tf32: flag("MEDSSL_TF32", false)?,
        cudnn_algo: match val("MEDSSL_CUDNN_ALGO").as_deref() {
            Some("find") => CudnnAlgo::Find,
            Some("heuristic") => CudnnAlgo::Heuristic,
            None | Some("time") => CudnnAlgo::Time,
            Some(v) => {
                return Err(bad(
                    "MEDSSL_CUDNN_ALGO",
                    v,
                    "time (the default), find or heuristic",
                ))
            }
        },
        cudnn_deterministic_first: flag("MEDSSL_CUDNN_DETERMINISTIC", true)?,
        cudnn_log: flag("MEDSSL_CUDNN_LOG", false)?,
        cudnn_fwd_algo: algo(
            "MEDSSL_CUDNN_FWD_ALGO",
            "CUDNN_CONVOLUTION_FWD_ALGO_",
            &FWD_ALGOS,
        )?,
        cudnn_bwd_data_algo: algo(
            "MEDSSL_CUDNN_BWD_DATA_ALGO",
            "CUDNN_CONVOLUTION_BWD_DATA_",
            &BWD_DATA_ALGOS,
        )?,
        cudnn_bwd_filter_algo: algo(
            "MEDSSL_CUDNN_BWD_FILTER_ALGO",
            "CUDNN_CONVOLUTION_BWD_FILTER_",
            &BWD_FILTER_ALGOS,
        )?,
        conv_im2col: !choice("MEDSSL_CUDA_CONV", ["cudnn", "im2col"])?,
        conv1x1_gemm: choice("MEDSSL_CUDA_CONV1X1", ["cublas", "cudnn"])?,
        fusion_projected: !choice("MEDSSL_CUDA_FUSION", ["two-ops", "projected"])?,
        step_read_later: choice("MEDSSL_CUDA_STEP_READ", ["later", "wait"])?,
        bn_fused_max_m,
        bn_split,
        bn_welford: choice("MEDSSL_CUDA_BN_STATS", ["welford", "two-pass"])?,
        bn_inflight,
        bn_l2_hint: !choice("MEDSSL_CUDA_BN_L2", ["plain", "hint"])?,
        bn_apply_chunks: choice("MEDSSL_CUDA_BN_APPLY", ["chunks", "flat"])?,
        bn_resident: !choice("MEDSSL_CUDA_BN_FWD", ["split", "resident"])?,
        bn_resident_bwd: !choice("MEDSSL_CUDA_BN_BWD", ["split", "resident"])?,
        bn_vec: !choice("MEDSSL_CUDA_BN_VEC", ["off", "on"])?,
        bn_pipe: !choice("MEDSSL_CUDA_BN_PIPE", ["off", "on"])?,
        bn_keep,
    })
}

static SWITCHES: OnceLock<std::result::Result<Switches, String>> = OnceLock::new();

/// The switches of this process (read from the environment on first use), or the error naming
/// the first variable that is not understood.
pub fn get() -> Result<&'static Switches> {
    SWITCHES
        .get_or_init(|| parse(|n| std::env::var(n).ok()))
        .as_ref()
        .map_err(|e| Error::Cuda(e.clone()))
}

/// The switches where a CUDA backend already exists: [`get`] succeeded when it was created, so
/// the defaults stand in only for callers that never created one. A reference (the ops read
/// one field each, several times per batch norm).
pub(super) fn current() -> &'static Switches {
    static DEFAULTS: OnceLock<Switches> = OnceLock::new();
    get().unwrap_or_else(|_| DEFAULTS.get_or_init(|| parse(|_| None).expect("the defaults parse")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(pairs: &[(&str, &str)]) -> std::result::Result<Switches, String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(|n| m.get(n).cloned())
    }

    #[test]
    fn defaults_and_values() {
        let d = with(&[]).unwrap();
        assert!(!d.emulate && !d.tf32 && !d.cudnn_log && !d.conv_im2col);
        assert_eq!(
            (
                &d.cudnn_fwd_algo,
                &d.cudnn_bwd_data_algo,
                &d.cudnn_bwd_filter_algo
            ),
            (&None, &None, &None)
        );
        assert!(d.cudnn_deterministic_first && d.conv1x1_gemm && !d.fusion_projected);
        assert!(d.step_read_later);
        assert_eq!(d.cudnn_algo, CudnnAlgo::Time);
        assert_eq!(d.bn_fused_max_m, FUSED_MAX_M);
        assert_eq!(d.bn_split, BN_SPLIT_WAVE);
        assert!(d.bn_welford);
        assert_eq!(d.bn_inflight, 0);
        assert!(!d.bn_l2_hint);
        assert!(d.bn_apply_chunks);
        assert!(!d.bn_resident && !d.bn_resident_bwd);
        assert!(!d.bn_vec);
        assert!(!d.bn_pipe);
        assert_eq!(d.bn_keep, usize::MAX);
        // An empty value is unset.
        assert_eq!(with(&[("MEDSSL_TF32", "")]).unwrap(), d);
        let s = with(&[
            ("MEDSSL_CUDA_EMULATE", "1"),
            ("MEDSSL_TF32", "1"),
            ("MEDSSL_CUDNN_ALGO", "heuristic"),
            ("MEDSSL_CUDNN_DETERMINISTIC", "0"),
            ("MEDSSL_CUDNN_LOG", "1"),
            ("MEDSSL_CUDA_CONV", "im2col"),
            ("MEDSSL_CUDA_CONV1X1", "cudnn"),
            ("MEDSSL_CUDA_FUSION", "projected"),
            ("MEDSSL_CUDA_STEP_READ", "wait"),
            ("MEDSSL_CUDA_BN_FUSED_MAX_M", "0"),
            ("MEDSSL_CUDA_BN_SPLIT", "1"),
            ("MEDSSL_CUDA_BN_STATS", "two-pass"),
            ("MEDSSL_CUDA_BN_INFLIGHT", "16"),
            ("MEDSSL_CUDA_BN_L2", "hint"),
            ("MEDSSL_CUDA_BN_APPLY", "flat"),
            ("MEDSSL_CUDA_BN_FWD", "resident"),
            ("MEDSSL_CUDA_BN_BWD", "resident"),
            ("MEDSSL_CUDA_BN_VEC", "on"),
            ("MEDSSL_CUDA_BN_PIPE", "on"),
            ("MEDSSL_CUDA_BN_KEEP", "4096"),
            ("MEDSSL_CUDNN_FWD_ALGO", "implicit_precomp_gemm"),
            (
                "MEDSSL_CUDNN_BWD_DATA_ALGO",
                "CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT",
            ),
            ("MEDSSL_CUDNN_BWD_FILTER_ALGO", "algo_0"),
        ])
        .unwrap();
        assert!(s.emulate && s.tf32 && s.cudnn_log && s.conv_im2col);
        assert_eq!(s.cudnn_fwd_algo.as_deref(), Some("IMPLICIT_PRECOMP_GEMM"));
        assert_eq!(s.cudnn_bwd_data_algo.as_deref(), Some("ALGO_FFT"));
        assert_eq!(s.cudnn_bwd_filter_algo.as_deref(), Some("ALGO_0"));
        assert!(!s.cudnn_deterministic_first && !s.conv1x1_gemm && s.fusion_projected);
        assert!(!s.step_read_later);
        assert_eq!(s.cudnn_algo, CudnnAlgo::Heuristic);
        assert_eq!(
            with(&[("MEDSSL_CUDNN_ALGO", "find")]).unwrap().cudnn_algo,
            CudnnAlgo::Find
        );
        assert_eq!(s.bn_fused_max_m, 0);
        assert_eq!(s.bn_split, 1);
        assert!(!s.bn_welford);
        assert_eq!(s.bn_inflight, 16);
        assert!(s.bn_l2_hint);
        assert_eq!(
            with(&[("MEDSSL_CUDA_BN_INFLIGHT", "8")])
                .unwrap()
                .bn_inflight,
            8
        );
        assert!(!s.bn_apply_chunks);
        assert!(s.bn_resident && s.bn_resident_bwd);
        assert!(s.bn_vec);
        assert!(s.bn_pipe);
        assert_eq!(s.bn_keep, 4096);
        assert_eq!(with(&[("MEDSSL_CUDA_BN_SPLIT", "7")]).unwrap().bn_split, 7);
        assert_eq!(
            with(&[("MEDSSL_CUDA_BN_SPLIT", "auto")]).unwrap().bn_split,
            0
        );
        // The defaults spelled out parse to the defaults.
        let spelled = with(&[
            ("MEDSSL_CUDA_EMULATE", "0"),
            ("MEDSSL_CUDNN_ALGO", "time"),
            ("MEDSSL_CUDNN_DETERMINISTIC", "1"),
            ("MEDSSL_CUDA_CONV", "cudnn"),
            ("MEDSSL_CUDA_CONV1X1", "cublas"),
            ("MEDSSL_CUDA_FUSION", "two-ops"),
            ("MEDSSL_CUDA_STEP_READ", "later"),
            ("MEDSSL_CUDA_BN_FUSED_MAX_M", "65536"),
            ("MEDSSL_CUDA_BN_SPLIT", "wave"),
            ("MEDSSL_CUDA_BN_STATS", "welford"),
            ("MEDSSL_CUDA_BN_INFLIGHT", "auto"),
            ("MEDSSL_CUDA_BN_L2", "plain"),
            ("MEDSSL_CUDA_BN_APPLY", "chunks"),
            ("MEDSSL_CUDA_BN_FWD", "split"),
            ("MEDSSL_CUDA_BN_BWD", "split"),
            ("MEDSSL_CUDA_BN_VEC", "off"),
            ("MEDSSL_CUDA_BN_PIPE", "off"),
            ("MEDSSL_CUDA_BN_KEEP", "auto"),
        ])
        .unwrap();
        assert_eq!(spelled, d);
    }

    #[test]
    fn unknown_values_are_errors_naming_the_variable() {
        for (k, v, takes) in [
            ("MEDSSL_TF32", "yes", "0 or 1"),
            ("MEDSSL_CUDA_EMULATE", "true", "0 or 1"),
            ("MEDSSL_CUDNN_DETERMINISTIC", "off", "0 or 1"),
            ("MEDSSL_CUDNN_LOG", "2", "0 or 1"),
            (
                "MEDSSL_CUDNN_ALGO",
                "fastest",
                "time (the default), find or heuristic",
            ),
            (
                "MEDSSL_CUDA_CONV",
                "IM2COL",
                "cudnn (the default) or im2col",
            ),
            (
                "MEDSSL_CUDA_CONV1X1",
                "gemm",
                "cublas (the default) or cudnn",
            ),
            (
                "MEDSSL_CUDA_FUSION",
                "fused",
                "two-ops (the default) or projected",
            ),
            (
                "MEDSSL_CUDA_STEP_READ",
                "async",
                "later (the default) or wait",
            ),
            ("MEDSSL_CUDA_BN_FUSED_MAX_M", "-1", "a whole number"),
            ("MEDSSL_CUDA_BN_FUSED_MAX_M", "64k", "a whole number"),
            (
                "MEDSSL_CUDA_BN_SPLIT",
                "0",
                "wave (the default), auto or a whole number >= 1",
            ),
            (
                "MEDSSL_CUDA_BN_SPLIT",
                "many",
                "wave (the default), auto or a whole number >= 1",
            ),
            (
                "MEDSSL_CUDA_BN_STATS",
                "one-pass",
                "welford (the default) or two-pass",
            ),
            (
                "MEDSSL_CUDA_BN_INFLIGHT",
                "12",
                "auto (the default), 4, 8 or 16",
            ),
            ("MEDSSL_CUDA_BN_L2", "evict", "plain (the default) or hint"),
            (
                "MEDSSL_CUDA_BN_APPLY",
                "chunk",
                "chunks (the default) or flat",
            ),
            (
                "MEDSSL_CUDA_BN_FWD",
                "fused",
                "split (the default) or resident",
            ),
            (
                "MEDSSL_CUDA_BN_BWD",
                "one",
                "split (the default) or resident",
            ),
            ("MEDSSL_CUDA_BN_VEC", "4", "off (the default) or on"),
            ("MEDSSL_CUDA_BN_PIPE", "yes", "off (the default) or on"),
            (
                "MEDSSL_CUDA_BN_KEEP",
                "0",
                "auto (the default) or a whole number >= 1",
            ),
            ("MEDSSL_CUDNN_FWD_ALGO", "ALGO_0", "one of IMPLICIT_GEMM, "),
            (
                "MEDSSL_CUDNN_BWD_FILTER_ALGO",
                "ALGO_2",
                "one of ALGO_0, ALGO_1",
            ),
            ("MEDSSL_CUDNN_BWD_DATA_ALGO", "0", "ALGO_WINOGRAD_NONFUSED"),
        ] {
            let e = with(&[(k, v)]).unwrap_err();
            assert!(
                e.contains(&format!("{k}=\"{v}\"")) && e.contains(takes),
                "{k}={v}: {e}"
            );
        }
    }
}
