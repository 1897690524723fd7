//! 2-D convolution: cuDNN (forward, backward data, backward filter; descriptors and algorithms
//! chosen once per shape and cached: by default by medssl's own timing of Find's algorithms and
//! of the im2col engine on the device, per direction, so that one direction of a shape may run
//! on im2col + cuBLAS; with `MEDSSL_CUDNN_ALGO=find` by cuDNN timing every algorithm, like
//! PyTorch's `cudnn.benchmark`; with `MEDSSL_CUDNN_ALGO=heuristic` by cuDNN's heuristic); 1×1 stride-1
//! unpadded convolutions (the fusion projections, most of the small-width model's conv time)
//! as strided-batched cuBLAS products on the tensors in place (`MEDSSL_CUDA_CONV1X1=cudnn` gives
//! them to cuDNN too) with an im2col + cuBLAS fallback (kernels/conv.cu) used when
//! cuDNN cannot be loaded or `MEDSSL_CUDA_CONV=im2col` is set. Bias forward/backward are our own
//! kernels in both engines.
//!
//! cuDNN runs in FP32 FMA math (no TF32) so results stay within the CPU parity tolerances;
//! `MEDSSL_TF32=1` allows tensor-op math.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use cudarc::cudnn::{result as dnn, sys};
use cudarc::driver::CudaStream;

use super::gemm::Gemm;
use super::graph::Hook::Skip;
use super::switches::{self, CudnnAlgo};
use super::{cfg_lin, ci, elementwise, lock, reduce, CudaBackend, A};
use crate::backend::shapes::{self, ConvGeom as Shape};
use crate::backend::{ConvGrads, ConvParams};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Largest cuDNN workspace we accept for one call.
const WORKSPACE_LIMIT: usize = 512 << 20;

// ---------------------------------------------------------------------------------------------
// cuDNN engine
// ---------------------------------------------------------------------------------------------

struct Handle(sys::cudnnHandle_t);
// SAFETY: the handle is only used while holding the engine's mutex, on the owning device's
// stream, with that device's context bound.
unsafe impl Send for Handle {}

/// How one direction of a convolution shape runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pass<A> {
    /// A cuDNN algorithm, with the workspace (bytes) it runs with.
    Dnn(A, usize),
    /// medssl's im2col + cuBLAS engine (deterministic), where `MEDSSL_CUDNN_ALGO=time` timed it
    /// faster than every cuDNN candidate.
    Im2col,
}

type FwdAlgo = sys::cudnnConvolutionFwdAlgo_t;
type DataAlgo = sys::cudnnConvolutionBwdDataAlgo_t;
type FilterAlgo = sys::cudnnConvolutionBwdFilterAlgo_t;

/// Descriptors and algorithms for one convolution shape. Immutable once in the plan cache.
struct Plan {
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
    fwd: Pass<FwdAlgo>,
    bwd_data: Pass<DataAlgo>,
    bwd_filter: Pass<FilterAlgo>,
}

/// The cuDNN algorithms `MEDSSL_CUDNN_ALGO=time` times for one shape, per direction, each with
/// its workspace (see [`timing_candidates`]).
#[derive(Default)]
struct Candidates {
    fwd: Vec<(FwdAlgo, usize)>,
    data: Vec<(DataAlgo, usize)>,
    filter: Vec<(FilterAlgo, usize)>,
}
// SAFETY: descriptors are plain configuration objects, never mutated after `Plan::new`, and only
// passed to cuDNN calls made under the handle mutex.
unsafe impl Send for Plan {}
unsafe impl Sync for Plan {}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created in Plan::new and destroyed once here.
        unsafe {
            let _ = dnn::destroy_tensor_descriptor(self.x);
            let _ = dnn::destroy_tensor_descriptor(self.y);
            let _ = dnn::destroy_filter_descriptor(self.w);
            let _ = dnn::destroy_convolution_descriptor(self.conv);
        }
    }
}

fn dnn_err(what: &str) -> impl FnOnce(dnn::CudnnError) -> Error + '_ {
    move |e| Error::Cuda(format!("cuDNN {what}: {e:?}"))
}

fn c(n: usize) -> Result<std::ffi::c_int> {
    ci(n)
}

/// How the algorithm of each convolution shape is chosen (once, when the shape is first seen).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Search {
    /// Runs and times every algorithm cuDNN offers for the shape (`cudnnFind*Algorithm`, the
    /// equivalent of PyTorch's `cudnn.benchmark = True`) and takes the fastest:
    /// `MEDSSL_CUDNN_ALGO=find`.
    Find,
    /// cuDNN's heuristic order, nothing run (`cudnnGet*Algorithm_v7`): `MEDSSL_CUDNN_ALGO=heuristic`.
    Heuristic,
    /// Find, then medssl times Find's candidates and the im2col engine itself (see
    /// [`time_plan`]). The default.
    Time,
}

impl Search {
    fn from_env() -> Search {
        match switches::current().cudnn_algo {
            CudnnAlgo::Heuristic => Search::Heuristic,
            CudnnAlgo::Find => Search::Find,
            CudnnAlgo::Time => Search::Time,
        }
    }
}

/// The fields of one algorithm-query result that the choice reads.
trait Perf: Copy {
    type Algo: Copy + std::fmt::Debug;
    fn algo(&self) -> Self::Algo;
    fn usable(&self) -> bool;
    fn deterministic(&self) -> bool;
    /// The math type it was timed in, as cuDNN's raw `cudnnMathType_t` value.
    fn math(&self) -> u32;
    fn time_ms(&self) -> f32;
    /// The workspace (bytes) it was timed with (a Find) or would take (the heuristic).
    fn memory(&self) -> usize;
}

/// cuDNN's three `cudnnConvolution*AlgoPerf_t` result structs share this layout. cuDNN writes
/// them, and a newer library may write a status, algorithm or math code that the bindings'
/// Rust enums do not list (reading such a value through the enum type would be undefined
/// behaviour), so the query fills these plain-integer mirrors and each code is checked before
/// it becomes an enum.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RawPerf {
    algo: u32,
    status: u32,
    time: f32,
    memory: usize,
    determinism: u32,
    math_type: u32,
    reserved: [std::ffi::c_int; 3],
}

// The mirror must match each binding field for field.
macro_rules! same_layout {
    ($t:ty) => {
        const _: () = {
            use std::mem::{align_of, offset_of, size_of};
            assert!(size_of::<RawPerf>() == size_of::<$t>());
            assert!(align_of::<RawPerf>() == align_of::<$t>());
            assert!(offset_of!(RawPerf, algo) == offset_of!($t, algo));
            assert!(offset_of!(RawPerf, status) == offset_of!($t, status));
            assert!(offset_of!(RawPerf, time) == offset_of!($t, time));
            assert!(offset_of!(RawPerf, memory) == offset_of!($t, memory));
            assert!(offset_of!(RawPerf, determinism) == offset_of!($t, determinism));
            assert!(offset_of!(RawPerf, math_type) == offset_of!($t, mathType));
            assert!(offset_of!(RawPerf, reserved) == offset_of!($t, reserved));
        };
    };
}
same_layout!(sys::cudnnConvolutionFwdAlgoPerf_t);
same_layout!(sys::cudnnConvolutionBwdDataAlgoPerf_t);
same_layout!(sys::cudnnConvolutionBwdFilterAlgoPerf_t);

/// An algorithm enum of one direction, built from cuDNN's raw code only when the code is one of
/// the listed algorithms (the `*_COUNT` sentinels are not algorithms).
trait AlgoCode: Copy + PartialEq + std::fmt::Debug + 'static {
    const ALL: &'static [Self];
    fn from_raw(code: u32) -> Option<Self>;
}

macro_rules! algo_code {
    ($t:ident, [$($v:ident),* $(,)?]) => {
        impl AlgoCode for sys::$t {
            const ALL: &'static [Self] = &[$(sys::$t::$v),*];
            fn from_raw(code: u32) -> Option<Self> {
                Self::ALL.iter().copied().find(|a| *a as u32 == code)
            }
        }
    };
}
algo_code!(
    cudnnConvolutionFwdAlgo_t,
    [
        CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
        CUDNN_CONVOLUTION_FWD_ALGO_FFT,
        CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
    ]
);
algo_code!(
    cudnnConvolutionBwdDataAlgo_t,
    [
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
    ]
);
algo_code!(
    cudnnConvolutionBwdFilterAlgo_t,
    [
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
    ]
);

/// One query result with its algorithm decoded (`None`: a code these bindings do not know,
/// never used).
#[derive(Clone, Copy, Debug)]
struct Found<A> {
    raw: RawPerf,
    algo: Option<A>,
}

impl<A: AlgoCode> Found<A> {
    fn new(raw: RawPerf) -> Found<A> {
        Found {
            raw,
            algo: A::from_raw(raw.algo),
        }
    }
}

impl<A: AlgoCode> Perf for Found<A> {
    type Algo = A;
    fn algo(&self) -> A {
        // Only usable results are ever asked for their algorithm; the fallback is never used.
        self.algo.unwrap_or(A::ALL[0])
    }
    fn usable(&self) -> bool {
        self.algo.is_some()
            && self.raw.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS as u32
            && self.raw.memory <= WORKSPACE_LIMIT
    }
    fn deterministic(&self) -> bool {
        self.raw.determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC as u32
    }
    fn math(&self) -> u32 {
        self.raw.math_type
    }
    fn time_ms(&self) -> f32 {
        self.raw.time
    }
    fn memory(&self) -> usize {
        self.raw.memory
    }
}

/// Whether `pick` prefers deterministic algorithms: yes unless `MEDSSL_CUDNN_DETERMINISTIC=0`
/// (then the fastest usable one, deterministic or not, as PyTorch's `cudnn.benchmark = True`
/// with `cudnn.deterministic = False` does).
pub fn deterministic_first() -> bool {
    switches::current().cudnn_deterministic_first
}

/// Orders the results in `found` (fastest first after a Find, heuristic order otherwise) as
/// they should be tried, leaving out those that failed or exceed the workspace limit. With
/// `deterministic_first`, deterministic results come before the others, so that one algorithm
/// gives the same bits on every call. In FP32 (FMA) mode results timed in FMA math come first:
/// one timed with tensor ops would not run that fast under the descriptor, and may not exist in
/// FMA math at all (the caller then moves on to the next).
fn ranked<P: Perf>(found: &[P], math: sys::cudnnMathType_t, deterministic_first: bool) -> Vec<P> {
    let fma = sys::cudnnMathType_t::CUDNN_FMA_MATH;
    let usable: Vec<&P> = found.iter().filter(|f| f.usable()).collect();
    // Tiers, best first: right math and deterministic, right math, deterministic, the rest.
    let tier = |f: &P| {
        let math_ok = math != fma || f.math() == fma as u32;
        let det_ok = !deterministic_first || f.deterministic();
        match (math_ok, det_ok) {
            (true, true) => 0,
            (true, false) => 1,
            (false, true) => 2,
            (false, false) => 3,
        }
    };
    let mut order: Vec<(usize, usize)> = usable
        .iter()
        .enumerate()
        .map(|(i, f)| (tier(f), i))
        .collect();
    order.sort_unstable();
    order.into_iter().map(|(_, i)| *usable[i]).collect()
}

/// The first of [`ranked`].
#[cfg(test)]
fn pick<P: Perf>(found: &[P], math: sys::cudnnMathType_t, deterministic_first: bool) -> Option<P> {
    ranked(found, math, deterministic_first).into_iter().next()
}

/// Runs one cuDNN query; cudarc panics when the library lacks the entry point, which counts as
/// "not supported".
fn guarded<P>(
    f: impl FnOnce(&mut [P], &mut std::ffi::c_int) -> sys::cudnnStatus_t,
    buf: &mut [P],
    count: &mut std::ffi::c_int,
) -> sys::cudnnStatus_t {
    catch_unwind(AssertUnwindSafe(|| f(buf, count)))
        .unwrap_or(sys::cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED)
}

/// Ranks the algorithms of one direction (see [`ranked`]): `find` and `heuristic` fill the
/// result array they are given (as many entries as it holds) and return cuDNN's status; `slots`
/// is the most results cuDNN may return (`cudnnGetConvolution*AlgorithmMaxCount`: every algorithm
/// in every math type it tries, so FMA results are not crowded out by faster tensor-op ones). A
/// failing Find (or a library without the entry point) falls back to the heuristic. Returns the
/// candidates, best first (never empty), and how they were found.
fn choose<A: AlgoCode>(
    search: Search,
    math: sys::cudnnMathType_t,
    what: &str,
    slots: usize,
    find: impl FnOnce(&mut [RawPerf], &mut std::ffi::c_int) -> sys::cudnnStatus_t,
    heuristic: impl FnOnce(&mut [RawPerf], &mut std::ffi::c_int) -> sys::cudnnStatus_t,
) -> Result<(Vec<Found<A>>, &'static str)> {
    let mut buf = vec![RawPerf::default(); slots.max(1)];
    let mut count: std::ffi::c_int = 0;
    let filled = |count: std::ffi::c_int, buf: &[RawPerf]| -> Vec<Found<A>> {
        let n = count.clamp(0, buf.len() as i32) as usize;
        buf[..n].iter().map(|r| Found::new(*r)).collect()
    };
    // MEDSSL_CUDNN_LOG=1: what the query returned (how many results, how many usable, how many
    // timed in the descriptor's math type), before the choice itself is logged.
    let slots = buf.len();
    let log = |how: &str, found: &[Found<A>]| {
        if switches::current().cudnn_log {
            let usable = found.iter().filter(|p| p.usable()).count();
            let same_math = found
                .iter()
                .filter(|p| p.usable() && p.math() == math as u32)
                .count();
            eprintln!(
                "cudnn {what} {how}: {} results in {slots} slots, {usable} usable, {same_math} \
                 of them in {math:?}",
                found.len(),
            );
            for f in found {
                eprintln!("cudnn {what} {how}:   {}", describe(f));
            }
        }
    };
    if search != Search::Heuristic
        && guarded(find, &mut buf, &mut count) == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
    {
        let found = filled(count, &buf);
        log("find", &found);
        let c = ranked(&found, math, deterministic_first());
        if !c.is_empty() {
            return Ok((c, "find"));
        }
    }
    count = 0;
    let st = guarded(heuristic, &mut buf, &mut count);
    if st != sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        return Err(Error::Cuda(format!("cuDNN {what} algorithm query: {st:?}")));
    }
    let found = filled(count, &buf);
    log("heuristic", &found);
    let c = ranked(&found, math, deterministic_first());
    if c.is_empty() {
        return Err(Error::Cuda(format!(
            "cuDNN offers no usable {what} algorithm"
        )));
    }
    Ok((c, "heuristic"))
}

/// One query result for `MEDSSL_CUDNN_LOG=1`: algorithm, timed ms (0 from the heuristic),
/// workspace, status, determinism and math type, and whether it may be chosen.
fn describe<A: AlgoCode>(f: &Found<A>) -> String {
    let name = match f.algo {
        Some(a) => format!("{a:?}"),
        None => format!("algorithm code {}", f.raw.algo),
    };
    format!(
        "{} {:.4} ms, workspace {} B, status {}, {}, math {}{}",
        name.trim_start_matches("CUDNN_CONVOLUTION_"),
        f.raw.time,
        f.raw.memory,
        f.raw.status,
        if f.deterministic() {
            "deterministic"
        } else {
            "non-deterministic"
        },
        f.raw.math_type,
        if f.usable() { "" } else { " (not usable)" },
    )
}

/// `candidates` with the one whose algorithm's name is `prefix` + the value of `switch`
/// (`MEDSSL_CUDNN_*_ALGO`, `forced`) moved to the front (`how` becomes "forced"); unchanged when
/// nothing is forced. A forced algorithm that is not among the usable candidates for this shape
/// leaves the order as it is and says so on stderr, naming the shape.
fn prefer<P: Perf>(
    candidates: Vec<P>,
    how: &'static str,
    (switch, forced): (&str, &Option<String>),
    what: &str,
    shape: &Shape,
    prefix: &str,
) -> (Vec<P>, &'static str) {
    let Some(name) = forced else {
        return (candidates, how);
    };
    let full = format!("{prefix}{name}");
    match candidates
        .iter()
        .position(|p| format!("{:?}", p.algo()) == full)
    {
        Some(i) => {
            let mut c = candidates;
            let p = c.remove(i);
            c.insert(0, p);
            (c, "forced")
        }
        None => {
            eprintln!(
                "cudnn {what} {}: {switch}={name} is not usable for this shape; taking the \
                 {how} order",
                shape.describe()
            );
            (candidates, how)
        }
    }
}

/// The first candidate (best first) whose workspace size cuDNN reports under the descriptor's
/// math type, with that size or the workspace its result names, whichever is larger (a Find
/// times an algorithm with the workspace it reports; given less, cuDNN may run the algorithm in
/// another, slower form than the one timed); an algorithm that does not exist in that math type
/// fails the query and the next one is tried. With `MEDSSL_CUDNN_LOG=1` the choice goes to
/// stderr.
fn first_workable<P: Perf>(
    what: &str,
    shape: &Shape,
    candidates: &[P],
    how: &str,
    workspace: impl Fn(P::Algo) -> std::result::Result<usize, dnn::CudnnError>,
) -> Result<(P::Algo, usize)> {
    let mut last = None;
    for (i, p) in candidates.iter().enumerate() {
        match workspace(p.algo()) {
            Ok(ws) => {
                let ws = ws.max(p.memory());
                log_choice(what, shape, p, how, i, ws);
                return Ok((p.algo(), ws));
            }
            Err(e) => last = Some((p.algo(), e)),
        }
    }
    Err(Error::Cuda(format!(
        "cuDNN {what}: no candidate algorithm has a workspace under the descriptor's math type \
         (last: {last:?})"
    )))
}

/// The candidates `MEDSSL_CUDNN_ALGO=time` times for one direction: every algorithm of
/// `candidates` (best first, see [`ranked`]) that has a workspace under the descriptor's math
/// type, once each, with that workspace or the one its result names, whichever is larger (as
/// [`first_workable`]); with `deterministic_only`, only deterministic ones where there are any.
fn timing_candidates<P: Perf>(
    candidates: &[P],
    workspace: impl Fn(P::Algo) -> std::result::Result<usize, dnn::CudnnError>,
    deterministic_only: bool,
) -> Vec<(P::Algo, usize)>
where
    P::Algo: PartialEq,
{
    let any_det = candidates.iter().any(|p| p.deterministic());
    let mut out: Vec<(P::Algo, usize)> = Vec::new();
    for p in candidates {
        if (deterministic_only && any_det && !p.deterministic())
            || out.iter().any(|(a, _)| *a == p.algo())
        {
            continue;
        }
        if let Ok(ws) = workspace(p.algo()) {
            out.push((p.algo(), ws.max(p.memory())));
        }
    }
    out
}

/// The cheapest of the timed candidates of one direction ([`CallTime::cost`] with `graph`;
/// `None`: it failed), the earlier one on a tie; `None` when every one failed.
fn fastest<A: Copy>(timed: &[(Pass<A>, Option<CallTime>)], graph: bool) -> Option<Pass<A>> {
    timed
        .iter()
        .filter_map(|(p, t)| t.map(|t| (*p, t.cost(graph))))
        .fold(None, |best: Option<(Pass<A>, f64)>, (p, t)| match best {
            Some((_, bt)) if bt <= t => best,
            _ => Some((p, t)),
        })
        .map(|(p, _)| p)
}

/// `MEDSSL_CUDNN_LOG=1`: one line per shape and direction on stderr.
fn log_choice<P: Perf>(what: &str, shape: &Shape, p: &P, how: &str, skipped: usize, ws: usize) {
    if switches::current().cudnn_log {
        eprintln!(
            "cudnn {what} {}: {:?} ({how}{}, {}, workspace {ws} B)",
            shape.describe(),
            p.algo(),
            if p.time_ms() > 0.0 {
                format!(" {:.4} ms", p.time_ms())
            } else {
                String::new()
            },
            if p.deterministic() {
                "deterministic"
            } else {
                "non-deterministic"
            }
        );
        if skipped > 0 {
            eprintln!(
                "  ({skipped} better-ranked candidate(s) had no workspace in this math type)"
            );
        }
    }
}

/// The entries a result array holds, as cuDNN's requested count.
fn slots<T>(b: &[T]) -> std::ffi::c_int {
    b.len().min(std::ffi::c_int::MAX as usize) as std::ffi::c_int
}

/// How many results one direction's algorithm query may return
/// (`cudnnGetConvolution*AlgorithmMaxCount`), at least `algos` (that direction's algorithm
/// count); `algos` when the query fails or the entry point is missing.
///
/// SAFETY: `h` is a live cuDNN handle.
unsafe fn max_count(
    query: unsafe fn(sys::cudnnHandle_t, *mut std::ffi::c_int) -> sys::cudnnStatus_t,
    h: sys::cudnnHandle_t,
    algos: usize,
) -> usize {
    let mut n: std::ffi::c_int = 0;
    // SAFETY: per the contract above; cudarc panics on a missing entry point.
    let st = catch_unwind(AssertUnwindSafe(|| unsafe { query(h, &mut n) }))
        .unwrap_or(sys::cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED);
    if st == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        (n.clamp(0, 256) as usize).max(algos)
    } else {
        algos
    }
}

impl Plan {
    /// The plan of shape `s` with the first workable candidate of each direction, and (for
    /// `Search::Time`) every candidate to time.
    ///
    /// SAFETY: `h` is a live cuDNN handle, used under its mutex with the context bound.
    unsafe fn new(h: sys::cudnnHandle_t, s: &Shape) -> Result<(Plan, Candidates)> {
        let f32t = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let x = dnn::create_tensor_descriptor().map_err(dnn_err("tensor descriptor"))?;
        let y = dnn::create_tensor_descriptor().map_err(dnn_err("tensor descriptor"))?;
        let w = dnn::create_filter_descriptor().map_err(dnn_err("filter descriptor"))?;
        let conv = dnn::create_convolution_descriptor().map_err(dnn_err("conv descriptor"))?;
        // From here on Drop cleans up whatever happens.
        let mut plan = Plan {
            x,
            y,
            w,
            conv,
            fwd: Pass::Im2col,
            bwd_data: Pass::Im2col,
            bwd_filter: Pass::Im2col,
        };
        let mut timed = Candidates::default();
        dnn::set_tensor4d_descriptor(x, nchw, f32t, [c(s.n)?, c(s.cin)?, c(s.h)?, c(s.w)?])
            .map_err(dnn_err("input descriptor"))?;
        dnn::set_tensor4d_descriptor(y, nchw, f32t, [c(s.n)?, c(s.cout)?, c(s.ho())?, c(s.wo())?])
            .map_err(dnn_err("output descriptor"))?;
        dnn::set_filter4d_descriptor(w, f32t, nchw, [c(s.cout)?, c(s.cin)?, c(s.k)?, c(s.k)?])
            .map_err(dnn_err("filter descriptor"))?;
        let (pd, st) = (c(s.pad)?, c(s.stride)?);
        dnn::set_convolution2d_descriptor(
            conv,
            pd,
            pd,
            st,
            st,
            1,
            1,
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            f32t,
        )
        .map_err(dnn_err("conv descriptor"))?;
        let math = if switches::current().tf32 {
            sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        };
        dnn::set_convolution_math_type(conv, math).map_err(dnn_err("math type"))?;

        let search = Search::from_env();
        let time = search == Search::Time;
        let (cands, how) = choose(
            search,
            math,
            "forward",
            max_count(sys::cudnnGetConvolutionForwardAlgorithmMaxCount, h, 8),
            |b: &mut [RawPerf], got| {
                sys::cudnnFindConvolutionForwardAlgorithm(
                    h,
                    x,
                    w,
                    conv,
                    y,
                    slots(b),
                    got,
                    b.as_mut_ptr().cast(),
                )
            },
            |b, got| {
                sys::cudnnGetConvolutionForwardAlgorithm_v7(
                    h,
                    x,
                    w,
                    conv,
                    y,
                    slots(b),
                    got,
                    b.as_mut_ptr().cast(),
                )
            },
        )?;
        let sw = switches::current();
        let (cands, how) = prefer(
            cands,
            how,
            ("MEDSSL_CUDNN_FWD_ALGO", &sw.cudnn_fwd_algo),
            "forward",
            s,
            "CUDNN_CONVOLUTION_FWD_ALGO_",
        );
        let ws = |a| dnn::get_convolution_forward_workspace_size(h, x, w, conv, y, a);
        let (a, b) = first_workable("forward", s, &cands, how, ws)?;
        plan.fwd = Pass::Dnn(a, b);
        if time {
            timed.fwd = timing_candidates(&cands, ws, deterministic_first());
        }

        let (cands, how) = choose(
            search,
            math,
            "backward-data",
            max_count(sys::cudnnGetConvolutionBackwardDataAlgorithmMaxCount, h, 6),
            |b: &mut [RawPerf], got| {
                sys::cudnnFindConvolutionBackwardDataAlgorithm(
                    h,
                    w,
                    y,
                    conv,
                    x,
                    slots(b),
                    got,
                    b.as_mut_ptr().cast(),
                )
            },
            |b, got| {
                sys::cudnnGetConvolutionBackwardDataAlgorithm_v7(
                    h,
                    w,
                    y,
                    conv,
                    x,
                    slots(b),
                    got,
                    b.as_mut_ptr().cast(),
                )
            },
        )?;
        let (cands, how) = prefer(
            cands,
            how,
            ("MEDSSL_CUDNN_BWD_DATA_ALGO", &sw.cudnn_bwd_data_algo),
            "backward-data",
            s,
            "CUDNN_CONVOLUTION_BWD_DATA_",
        );
        let ws = |a| dnn::get_convolution_backward_data_workspace_size(h, w, y, conv, x, a);
        let (a, b) = first_workable("backward-data", s, &cands, how, ws)?;
        plan.bwd_data = Pass::Dnn(a, b);
        if time {
            timed.data = timing_candidates(&cands, ws, deterministic_first());
        }

        let (cands, how) = choose(
            search,
            math,
            "backward-filter",
            max_count(
                sys::cudnnGetConvolutionBackwardFilterAlgorithmMaxCount,
                h,
                7,
            ),
            |b: &mut [RawPerf], got| {
                sys::cudnnFindConvolutionBackwardFilterAlgorithm(
                    h,
                    x,
                    y,
                    conv,
                    w,
                    slots(b),
                    got,
                    b.as_mut_ptr().cast(),
                )
            },
            |b, got| {
                sys::cudnnGetConvolutionBackwardFilterAlgorithm_v7(
                    h,
                    x,
                    y,
                    conv,
                    w,
                    slots(b),
                    got,
                    b.as_mut_ptr().cast(),
                )
            },
        )?;
        let (cands, how) = prefer(
            cands,
            how,
            ("MEDSSL_CUDNN_BWD_FILTER_ALGO", &sw.cudnn_bwd_filter_algo),
            "backward-filter",
            s,
            "CUDNN_CONVOLUTION_BWD_FILTER_",
        );
        let ws = |a| dnn::get_convolution_backward_filter_workspace_size(h, x, y, conv, w, a);
        let (a, b) = first_workable("backward-filter", s, &cands, how, ws)?;
        plan.bwd_filter = Pass::Dnn(a, b);
        if time {
            timed.filter = timing_candidates(&cands, ws, deterministic_first());
        }
        Ok((plan, timed))
    }
}

struct Dnn {
    handle: Mutex<Handle>,
    plans: Mutex<HashMap<Shape, Arc<Plan>>>,
    version: usize,
}

/// The convolution engine of one device.
pub(super) struct ConvEngine {
    dnn: Option<Dnn>,
    /// Why the im2col fallback is used (empty with cuDNN).
    reason: String,
    /// 1×1 stride-1 unpadded convolutions run as one strided-batched cuBLAS product on the
    /// tensors in place (no im2col: the input already is the column matrix), also when cuDNN is
    /// loaded; `MEDSSL_CUDA_CONV1X1=cudnn` hands them to cuDNN instead.
    pointwise_gemm: bool,
}

/// A 1×1, stride-1, unpadded convolution: per image a plain product `W [Cout,Cin] · x [Cin,HW]`.
fn is_pointwise(s: &Shape) -> bool {
    s.k == 1 && s.stride == 1 && s.pad == 0
}

impl ConvEngine {
    pub(super) fn new(stream: &Arc<CudaStream>) -> ConvEngine {
        let pointwise_gemm = switches::current().conv1x1_gemm;
        let mut e = ConvEngine::new_engine(stream);
        e.pointwise_gemm = pointwise_gemm;
        e
    }

    /// The im2col + cuBLAS engine only (the emulated device), with the reason.
    pub(super) fn without_cudnn(reason: &str) -> ConvEngine {
        ConvEngine {
            dnn: None,
            reason: reason.into(),
            pointwise_gemm: true,
        }
    }

    fn new_engine(stream: &Arc<CudaStream>) -> ConvEngine {
        if switches::current().conv_im2col {
            return ConvEngine {
                dnn: None,
                reason: "MEDSSL_CUDA_CONV=im2col".into(),
                pointwise_gemm: true,
            };
        }
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { sys::is_culib_present() } {
            return ConvEngine {
                dnn: None,
                reason: "libcudnn.so not found on the loader path".into(),
                pointwise_gemm: true,
            };
        }
        let made = catch_unwind(AssertUnwindSafe(|| -> std::result::Result<Dnn, String> {
            let handle = dnn::create_handle().map_err(|e| format!("cudnnCreate: {e:?}"))?;
            // SAFETY: fresh handle; the stream outlives the backend (both live for the process).
            unsafe { dnn::set_stream(handle, stream.cu_stream() as sys::cudaStream_t) }
                .map_err(|e| format!("cudnnSetStream: {e:?}"))?;
            Ok(Dnn {
                handle: Mutex::new(Handle(handle)),
                plans: Mutex::new(HashMap::new()),
                version: dnn::get_version(),
            })
        }));
        match made {
            Ok(Ok(d)) => ConvEngine {
                dnn: Some(d),
                reason: String::new(),
                pointwise_gemm: true,
            },
            Ok(Err(e)) => ConvEngine {
                dnn: None,
                reason: e,
                pointwise_gemm: true,
            },
            Err(_) => ConvEngine {
                dnn: None,
                reason: "libcudnn lacks required entry points".into(),
                pointwise_gemm: true,
            },
        }
    }

    pub(super) fn describe(&self) -> String {
        let pw = if self.pointwise_gemm {
            "; 1x1 convolutions on cublas"
        } else {
            ""
        };
        match &self.dnn {
            Some(d) => format!("cudnn {}{pw}", d.version),
            None => format!("im2col+cublas ({}){pw}", self.reason),
        }
    }

    /// The cuDNN engine for this shape, or `None` when the cuBLAS paths take it.
    fn dnn_for(&self, s: &Shape) -> Option<&Dnn> {
        if self.pointwise_gemm && is_pointwise(s) {
            None
        } else {
            self.dnn.as_ref()
        }
    }
}

impl Dnn {
    /// The plan of shape `s`, made the first time the shape is seen. With
    /// `MEDSSL_CUDNN_ALGO=time` (the default) its candidates are timed then ([`time_plan`]),
    /// except inside a step that is being captured into (or compared with) a step graph, where
    /// the work would become part of the graph: there Find's choice stands. So it does where the
    /// timing itself fails (say, no memory for its tensors): stderr says so, once per process,
    /// and the convolution goes on with Find's choice.
    fn plan(&self, be: &CudaBackend, h: sys::cudnnHandle_t, s: &Shape) -> Result<Arc<Plan>> {
        if let Some(p) = lock(&self.plans).get(s) {
            return Ok(p.clone());
        }
        // SAFETY: called with the handle lock held and the context bound.
        let (mut p, timed) = unsafe { Plan::new(h, s) }?;
        let strict = super::graph::step_arena(be.ordinal).is_some_and(|(_, strict)| strict);
        if Search::from_env() == Search::Time && !strict {
            if let Err(e) = time_plan(be, h, &mut p, s, &timed) {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    eprintln!(
                        "medssl: timing the convolution algorithms of {} failed ({e}); \
                         Find's choice stands for each shape whose timing fails",
                        s.describe()
                    );
                });
            }
        }
        let p = Arc::new(p);
        lock(&self.plans).insert(*s, p.clone());
        Ok(p)
    }
}

/// Calls per timing round of [`time_call`], and rounds (the fastest round counts).
const TIME_CALLS: usize = 2;
const TIME_ROUNDS: usize = 3;
/// The hold before a timing round (µs) at first, at most, and how often a round whose calls
/// took the host longer to issue than the hold lasted is repeated with a longer hold.
const HOLD_START_US: u64 = 200;
const HOLD_MAX_US: u64 = 100_000;
const HOLD_RETRIES: usize = 4;

/// What one call of a timed candidate costs, in µs: the device's time (calls run back to back
/// behind a hold, see [`time_call`]) and the host's time to issue it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct CallTime {
    pub device: f64,
    pub host: f64,
}

impl CallTime {
    /// What a step pays per call: replayed from a CUDA graph (`graph`), the device time alone,
    /// since the graph issues its work at once; issued call by call, whichever of the device and
    /// host time is longer (a device that finishes a call sooner than the host issues the next
    /// waits for the host).
    fn cost(self, graph: bool) -> f64 {
        if graph {
            self.device
        } else {
            self.device.max(self.host)
        }
    }
}

/// The next hold (µs) after a round whose hold of `hold` µs did not cover the `issued` µs the
/// host took to issue it: at least twice as long, and twice the host's time plus a margin.
fn longer_hold(hold: u64, issued: u64) -> u64 {
    hold.saturating_mul(2)
        .max(issued.saturating_mul(2).saturating_add(20))
        .min(HOLD_MAX_US)
}

/// Whether a round's hold of `hold` µs covered the `issued` µs the host took to launch it, its
/// events and calls (with a tenth to spare: the hold starts a little after its launch).
fn hold_covered(hold: u64, issued: u64) -> bool {
    issued.saturating_mul(10) < hold.saturating_mul(9)
}

/// The time per call of `run` ([`CallTime`]), `None` when a call fails (that candidate is then
/// not chosen). One call to warm up, then [`TIME_ROUNDS`] rounds, each: a hold on the stream
/// ([`CudaBackend::hold`]), an event, [`TIME_CALLS`] calls, an event. The calls queue behind the
/// hold, so the events time the device alone; at the model's small sizes the host takes longer
/// to issue a cuDNN call (20–30 µs on an H100 node, bench/results/2026-11-27-h100.md) than the
/// device to run it (4–30 µs), and events around calls issued as they come would time the host.
/// A round whose calls took the host longer to issue than the hold lasted is run again with a
/// longer hold ([`longer_hold`], at most [`HOLD_RETRIES`] times; after that it counts as it
/// is). The fastest round's device time counts; the host time is the least per call seen.
fn time_call(be: &CudaBackend, mut run: impl FnMut() -> Result<()>) -> Result<Option<CallTime>> {
    let d = be.drv.as_ref().expect("cuDNN runs on a real device");
    if run().is_err() {
        return Ok(None);
    }
    let mut hold = HOLD_START_US;
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (mut device, mut host) = (f64::INFINITY, f64::INFINITY);
    let (mut rounds, mut retries) = (0, 0);
    while rounds < TIME_ROUNDS {
        let started = std::time::Instant::now();
        be.hold(u32::try_from(hold).unwrap_or(u32::MAX))?;
        let a = d
            .stream
            .record_event(flags)
            .map_err(super::cuda_err("recording a timing event"))?;
        let calls = std::time::Instant::now();
        for _ in 0..TIME_CALLS {
            if run().is_err() {
                return Ok(None);
            }
        }
        let per_call = calls.elapsed() / TIME_CALLS as u32;
        let b = d
            .stream
            .record_event(flags)
            .map_err(super::cuda_err("recording a timing event"))?;
        let issued = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let ms = a
            .elapsed_ms(&b)
            .map_err(super::cuda_err("reading a timing event"))?;
        host = host.min(per_call.as_secs_f64() * 1e6);
        if !hold_covered(hold, issued) && retries < HOLD_RETRIES {
            // The hold may have ended before the last call was issued: the events may have
            // timed the host. Again, holding longer.
            retries += 1;
            hold = longer_hold(hold, issued);
            continue;
        }
        device = device.min(f64::from(ms) * 1000.0 / TIME_CALLS as f64);
        rounds += 1;
    }
    Ok(Some(CallTime { device, host }))
}

/// `MEDSSL_CUDNN_ALGO=time`: times each direction's cuDNN candidates (`timed`, from Find) and
/// the im2col + cuBLAS engine on zero-filled tensors of shape `s` ([`time_call`]) and sets each
/// direction of `plan` to the one that costs the step least ([`CallTime::cost`]: the device
/// time where the steps are replayed from CUDA graphs, else the longer of device and host
/// time). Find's own timings at small sizes are several times the kernels' device time and can
/// rank algorithms wrongly (bench/results/2026-11-27-h100.md, run 5); this times what runs, as
/// it runs. With `MEDSSL_CUDNN_LOG=1` every timing goes to stderr.
fn time_plan(
    be: &CudaBackend,
    h: sys::cudnnHandle_t,
    plan: &mut Plan,
    s: &Shape,
    timed: &Candidates,
) -> Result<()> {
    let x = be.zeros(&[s.n, s.cin, s.h, s.w])?;
    let w = be.zeros(&[s.cout, s.cin, s.k, s.k])?;
    let y = be.zeros(&s.out_shape())?;
    let (gx, gw) = (be.zeros(x.shape())?, be.zeros(w.shape())?);
    let most = timed
        .fwd
        .iter()
        .map(|c| c.1)
        .chain(timed.data.iter().map(|c| c.1))
        .chain(timed.filter.iter().map(|c| c.1))
        .max()
        .unwrap_or(0);
    let ws = workspace(be, most)?;
    let wp = ws_ptr(&ws);
    let (px, pw, py, pgx, pgw) = (be.p(&x)?, be.p(&w)?, be.p(&y)?, be.p(&gx)?, be.p(&gw)?);
    let err = |what: &'static str| dnn_err(what);
    // SAFETY (the three cuDNN calls): the descriptors of `plan` match the tensors made above for
    // shape `s` (y stands for the output gradient too); the workspace holds `most` bytes, at
    // least each candidate's.
    let fwd = time_direction(
        be,
        &timed.fwd,
        |a, b| unsafe { run_fwd(h, plan, a, (wp, b), [px, pw, py]) }.map_err(err("timing")),
        || im2col_fwd(be, s, &x, &w, &y),
    )?;
    let data = time_direction(
        be,
        &timed.data,
        |a, b| unsafe { run_bwd_data(h, plan, a, (wp, b), [pw, py, pgx]) }.map_err(err("timing")),
        || im2col_bwd_data(be, s, &w, &y, &gx),
    )?;
    let filter = time_direction(
        be,
        &timed.filter,
        |a, b| unsafe { run_bwd_filter(h, plan, a, (wp, b), [px, py, pgw]) }.map_err(err("timing")),
        || im2col_bwd_filter(be, s, &x, &y, &gw),
    )?;
    let graph = be.graph_steps_requested();
    log_timed("forward", s, &fwd, graph);
    log_timed("backward-data", s, &data, graph);
    log_timed("backward-filter", s, &filter, graph);
    // A direction whose every timing failed (im2col included) keeps Find's choice.
    plan.fwd = fastest(&fwd, graph).unwrap_or(plan.fwd);
    plan.bwd_data = fastest(&data, graph).unwrap_or(plan.bwd_data);
    plan.bwd_filter = fastest(&filter, graph).unwrap_or(plan.bwd_filter);
    Ok(())
}

/// One direction's timings ([`time_call`]): each cuDNN candidate `(algorithm, workspace)` run by
/// `dnn`, then the im2col engine.
fn time_direction<A: Copy>(
    be: &CudaBackend,
    candidates: &[(A, usize)],
    dnn: impl Fn(A, usize) -> Result<()>,
    mut im2col: impl FnMut() -> Result<()>,
) -> Result<Vec<(Pass<A>, Option<CallTime>)>> {
    let mut out = Vec::with_capacity(candidates.len() + 1);
    for &(a, b) in candidates {
        out.push((Pass::Dnn(a, b), time_call(be, || dnn(a, b))?));
    }
    out.push((Pass::Im2col, time_call(be, &mut im2col)?));
    Ok(out)
}

/// `MEDSSL_CUDNN_LOG=1`: the timings of one direction (device / host µs per call), what they
/// were ranked by (`graph`: see [`CallTime::cost`]) and the choice, on stderr.
fn log_timed<A: std::fmt::Debug + Copy>(
    what: &str,
    s: &Shape,
    timed: &[(Pass<A>, Option<CallTime>)],
    graph: bool,
) {
    if !switches::current().cudnn_log {
        return;
    }
    let name = |p: &Pass<A>| match p {
        Pass::Dnn(a, _) => format!("{a:?}")
            .trim_start_matches("CUDNN_CONVOLUTION_")
            .to_string(),
        Pass::Im2col => "im2col+cublas".to_string(),
    };
    let all: Vec<String> = timed
        .iter()
        .map(|(p, t)| match t {
            Some(t) => format!("{} {:.1}/{:.1} us", name(p), t.device, t.host),
            None => format!("{} failed", name(p)),
        })
        .collect();
    let chosen = fastest(timed, graph).map_or("none".to_string(), |p| name(&p));
    let by = if graph {
        "device time (graph steps)"
    } else {
        "the longer of device and host time"
    };
    eprintln!(
        "cudnn {what} {} timed (device/host per call): {} -> {chosen}, by {by}",
        s.describe(),
        all.join(", ")
    );
}

fn workspace(be: &CudaBackend, bytes: usize) -> Result<Option<super::CudaStorage>> {
    if bytes == 0 {
        Ok(None)
    } else {
        Ok(Some(be.buffer(bytes.div_ceil(4))?))
    }
}

fn ws_ptr(ws: &Option<super::CudaStorage>) -> *mut std::ffi::c_void {
    ws.as_ref()
        .map_or(std::ptr::null_mut(), |w| w.ptr() as *mut std::ffi::c_void)
}

/// One cuDNN convolution pass `what` (`desc` in errors) with algorithm `algo` on `tensors`
/// (its three device addresses): takes its workspace, counts it, checks it against a step graph
/// (see `graph.rs`; the plan, one per shape, stands for every descriptor), then issues
/// `call(workspace)` unless the step is being compared with its graph.
fn dnn_pass(
    be: &CudaBackend,
    (what, desc): (&'static str, &str),
    plan: &Arc<Plan>,
    (algo, ws_bytes): (u64, usize),
    tensors: [u64; 3],
    call: impl FnOnce(*mut std::ffi::c_void) -> std::result::Result<(), dnn::CudnnError>,
) -> Result<()> {
    let ws = workspace(be, ws_bytes)?;
    be.count(what);
    let sig = vec![
        Arc::as_ptr(plan) as u64,
        algo,
        tensors[0],
        tensors[1],
        tensors[2],
        ws.as_ref().map_or(0, |w| w.ptr()),
        ws_bytes as u64,
    ];
    if be.graph_lib(what, sig, None)? == Skip {
        return Ok(());
    }
    call(ws_ptr(&ws)).map_err(dnn_err(desc))
}

fn vp(p: u64) -> *const std::ffi::c_void {
    p as *const std::ffi::c_void
}

/// A workspace: its address and size in bytes.
type Ws = (*mut std::ffi::c_void, usize);

/// cuDNN's forward `y = conv(x, w)` with `algo` on `[x, w, y]`.
///
/// SAFETY: `h` is live and bound to the device's stream; the plan's descriptors match the three
/// buffers, which are live, and the workspace holds its stated size.
unsafe fn run_fwd(
    h: sys::cudnnHandle_t,
    plan: &Plan,
    algo: FwdAlgo,
    (ws, ws_bytes): Ws,
    [px, pw, py]: [u64; 3],
) -> std::result::Result<(), dnn::CudnnError> {
    let (alpha, beta) = (1.0f32, 0.0f32);
    dnn::convolution_forward(
        h,
        &alpha as *const f32 as *const _,
        plan.x,
        vp(px),
        plan.w,
        vp(pw),
        plan.conv,
        algo,
        ws,
        ws_bytes,
        &beta as *const f32 as *const _,
        plan.y,
        py as *mut _,
    )
}

/// cuDNN's data gradient `gx` from `[w, gy, gx]` with `algo` (SAFETY: as [`run_fwd`]).
unsafe fn run_bwd_data(
    h: sys::cudnnHandle_t,
    plan: &Plan,
    algo: DataAlgo,
    (ws, ws_bytes): Ws,
    [pw, pgy, pgx]: [u64; 3],
) -> std::result::Result<(), dnn::CudnnError> {
    let (alpha, beta) = (1.0f32, 0.0f32);
    dnn::convolution_backward_data(
        h,
        &alpha as *const f32 as *const _,
        plan.w,
        vp(pw),
        plan.y,
        vp(pgy),
        plan.conv,
        algo,
        ws,
        ws_bytes,
        &beta as *const f32 as *const _,
        plan.x,
        pgx as *mut _,
    )
}

/// cuDNN's filter gradient `gw` from `[x, gy, gw]` with `algo` (SAFETY: as [`run_fwd`]).
unsafe fn run_bwd_filter(
    h: sys::cudnnHandle_t,
    plan: &Plan,
    algo: FilterAlgo,
    (ws, ws_bytes): Ws,
    [px, pgy, pgw]: [u64; 3],
) -> std::result::Result<(), dnn::CudnnError> {
    let (alpha, beta) = (1.0f32, 0.0f32);
    dnn::convolution_backward_filter(
        h,
        &alpha as *const f32 as *const _,
        plan.x,
        vp(px),
        plan.y,
        vp(pgy),
        plan.conv,
        algo,
        ws,
        ws_bytes,
        &beta as *const f32 as *const _,
        plan.w,
        pgw as *mut _,
    )
}

// ---------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------

pub(super) fn conv2d_fwd(
    be: &CudaBackend,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    p: ConvParams,
) -> Result<Tensor> {
    let s = shapes::conv(x, w, p)?;
    shapes::conv_bias(&s, b)?;
    let out = s.out_shape();
    if s.n == 0 || s.cout == 0 || s.cin == 0 {
        // Without input channels the output is the bias alone.
        let y = be.zeros(&out)?;
        if let (Some(b), true) = (b, y.numel() > 0) {
            elementwise::add_bias(be, &y, b, s.cout, s.ho() * s.wo())?;
        }
        return Ok(y);
    }
    let y = be.empty(&out)?;
    let pass = match be.conv.dnn_for(&s) {
        Some(d) => {
            // One turn for the pass and, the first time a shape is seen, the algorithm search
            // (which runs convolutions on the stream).
            let _turn = be.turn();
            be.bind()?;
            let h = lock(&d.handle);
            let plan = d.plan(be, h.0, &s)?;
            match plan.fwd {
                Pass::Dnn(a, ws_bytes) => {
                    let t = [be.p(x)?, be.p(w)?, be.p(&y)?];
                    let pass = ("cudnn_conv_fwd", "convolution forward");
                    dnn_pass(be, pass, &plan, (a as u64, ws_bytes), t, |ws| {
                        // SAFETY: descriptors match the validated shapes of x, w and y; all
                        // buffers are live on the stream the handle is bound to.
                        unsafe { run_fwd(h.0, &plan, a, (ws, ws_bytes), t) }
                    })?;
                    None
                }
                Pass::Im2col => Some(()),
            }
        }
        None => Some(()),
    };
    if pass.is_some() {
        im2col_fwd(be, &s, x, w, &y)?;
    }
    if let Some(b) = b {
        elementwise::add_bias(be, &y, b, s.cout, s.ho() * s.wo())?;
    }
    Ok(y)
}

pub(super) fn conv2d_bwd(
    be: &CudaBackend,
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    p: ConvParams,
    need_x: bool,
    has_bias: bool,
) -> Result<ConvGrads> {
    let s = shapes::conv(x, w, p)?;
    shapes::conv_grad(&s, gy)?;
    let gb = if has_bias {
        let gb = be.empty(&[s.cout])?;
        if s.cout > 0 {
            reduce::channel_sum_raw(be, s.n, s.cout, s.ho() * s.wo(), be.p(gy)?, be.p(&gb)?)?;
        }
        Some(gb)
    } else {
        None
    };
    if s.n == 0 || s.cout == 0 || s.cin == 0 {
        return Ok(ConvGrads {
            x: if need_x {
                Some(be.zeros(x.shape())?)
            } else {
                None
            },
            weight: be.zeros(w.shape())?,
            bias: gb,
        });
    }
    let gw = be.empty(w.shape())?;
    let gx = if need_x {
        Some(be.empty(x.shape())?)
    } else {
        None
    };
    // Which directions run on the im2col engine (all of them without cuDNN).
    let (data_im2col, filter_im2col) = match be.conv.dnn_for(&s) {
        Some(d) => {
            // One turn for the pass and, the first time a shape is seen, the algorithm search
            // (which runs convolutions on the stream).
            let _turn = be.turn();
            be.bind()?;
            let h = lock(&d.handle);
            let plan = d.plan(be, h.0, &s)?;
            if let (Some(gx), Pass::Dnn(a, ws_bytes)) = (&gx, plan.bwd_data) {
                let t = [be.p(w)?, be.p(gy)?, be.p(gx)?];
                let pass = ("cudnn_conv_bwd_data", "convolution backward data");
                dnn_pass(be, pass, &plan, (a as u64, ws_bytes), t, |ws| {
                    // SAFETY: as in the forward pass.
                    unsafe { run_bwd_data(h.0, &plan, a, (ws, ws_bytes), t) }
                })?;
            }
            if let Pass::Dnn(a, ws_bytes) = plan.bwd_filter {
                let t = [be.p(x)?, be.p(gy)?, be.p(&gw)?];
                let pass = ("cudnn_conv_bwd_filter", "convolution backward filter");
                dnn_pass(be, pass, &plan, (a as u64, ws_bytes), t, |ws| {
                    // SAFETY: as in the forward pass.
                    unsafe { run_bwd_filter(h.0, &plan, a, (ws, ws_bytes), t) }
                })?;
            }
            (
                plan.bwd_data == Pass::Im2col,
                plan.bwd_filter == Pass::Im2col,
            )
        }
        None => (true, true),
    };
    if let (Some(gx), true) = (&gx, data_im2col) {
        im2col_bwd_data(be, &s, w, gy, gx)?;
    }
    if filter_im2col {
        im2col_bwd_filter(be, &s, x, gy, &gw)?;
    }
    Ok(ConvGrads {
        x: gx,
        weight: gw,
        bias: gb,
    })
}

// ---------------------------------------------------------------------------------------------
// im2col + cuBLAS fallback
// ---------------------------------------------------------------------------------------------

fn geometry(s: &Shape) -> Result<[A; 8]> {
    Ok([
        A::I(ci(s.cin)?),
        A::I(ci(s.h)?),
        A::I(ci(s.w)?),
        A::I(ci(s.k)?),
        A::I(ci(s.stride)?),
        A::I(ci(s.pad)?),
        A::I(ci(s.ho())?),
        A::I(ci(s.wo())?),
    ])
}

/// The column matrix `col [N, Cin·k·k, OH·OW]` of `x`: for a pointwise convolution `x` itself
/// (no copy; `None` holds no buffer), else a pooled buffer filled by `cv_im2col`.
fn columns(be: &CudaBackend, s: &Shape, x: &Tensor) -> Result<(u64, Option<super::CudaStorage>)> {
    if is_pointwise(s) {
        Ok((be.p(x)?, None))
    } else {
        let col = im2col(be, s, x)?;
        Ok((col.ptr(), Some(col)))
    }
}

/// `col [N, Cin·k·k, OH·OW]` of `x`.
fn im2col(be: &CudaBackend, s: &Shape, x: &Tensor) -> Result<super::CudaStorage> {
    let ckk = s.cin * s.k * s.k;
    let ohw = s.ho() * s.wo();
    let total = s.n * ckk * ohw;
    let col = be.buffer(total)?;
    let mut args = vec![A::I(ci(total)?)];
    args.extend(geometry(s)?);
    args.extend([A::P(be.p(x)?), A::P(col.ptr())]);
    be.launch("cv_im2col", cfg_lin(total), &args)?;
    Ok(col)
}

fn im2col_fwd(be: &CudaBackend, s: &Shape, x: &Tensor, w: &Tensor, y: &Tensor) -> Result<()> {
    let ckk = s.cin * s.k * s.k;
    let ohw = s.ho() * s.wo();
    let (col, _keep) = columns(be, s, x)?;
    // y_n [Cout, OHW] = W [Cout, CKK] · col_n [CKK, OHW]; W broadcast (stride 0).
    Gemm::new(false, false, s.cout, ohw, ckk)
        .batched(s.n)
        .strides(0, ckk * ohw, s.cout * ohw)
        .run(be, be.p(w)?, col, be.p(y)?)
}

/// The data gradient `gx` on the im2col engine.
fn im2col_bwd_data(
    be: &CudaBackend,
    s: &Shape,
    w: &Tensor,
    gy: &Tensor,
    gx: &Tensor,
) -> Result<()> {
    let ckk = s.cin * s.k * s.k;
    let ohw = s.ho() * s.wo();
    if is_pointwise(s) {
        // Pointwise: gx_n [Cin, HW] = Wᵀ · gy_n directly.
        return Gemm::new(true, false, ckk, ohw, s.cout)
            .batched(s.n)
            .strides(0, s.cout * ohw, ckk * ohw)
            .run(be, be.p(w)?, be.p(gy)?, be.p(gx)?);
    }
    // gcol_n [CKK, OHW] = Wᵀ · gy_n, then a gather back to image positions.
    let gcol = be.buffer(s.n * ckk * ohw)?;
    Gemm::new(true, false, ckk, ohw, s.cout)
        .batched(s.n)
        .strides(0, s.cout * ohw, ckk * ohw)
        .run(be, be.p(w)?, be.p(gy)?, gcol.ptr())?;
    let total = gx.numel();
    let mut args = vec![A::I(ci(total)?)];
    args.extend(geometry(s)?);
    args.extend([A::P(gcol.ptr()), A::P(be.p(gx)?)]);
    be.launch("cv_col2im", cfg_lin(total), &args)
}

/// The filter gradient `gw` on the im2col engine.
fn im2col_bwd_filter(
    be: &CudaBackend,
    s: &Shape,
    x: &Tensor,
    gy: &Tensor,
    gw: &Tensor,
) -> Result<()> {
    let ckk = s.cin * s.k * s.k;
    let ohw = s.ho() * s.wo();
    // gW = Σ_n gy_n [Cout, OHW] · col_nᵀ: per-image products, then a fixed-order batch sum.
    let (col, _keep) = columns(be, s, x)?;
    let per = s.cout * ckk;
    if s.n == 1 {
        return Gemm::new(false, true, s.cout, ckk, ohw).run(be, be.p(gy)?, col, be.p(gw)?);
    }
    let parts = be.buffer(s.n * per)?;
    Gemm::new(false, true, s.cout, ckk, ohw)
        .batched(s.n)
        .strides(s.cout * ohw, ckk * ohw, per)
        .run(be, be.p(gy)?, col, parts.ptr())?;
    reduce::sum_rows_raw(be, s.n, per, parts.ptr(), be.p(gw)?)
}

#[cfg(test)]
mod tests {
    use super::{
        describe, dnn, fastest, first_workable, hold_covered, longer_hold, pick, prefer, ranked,
        sys, timing_candidates, AlgoCode, CallTime, Found, Pass, Perf, RawPerf, Shape, HOLD_MAX_US,
        HOLD_RETRIES, HOLD_START_US, WORKSPACE_LIMIT,
    };

    /// A timed result: (algorithm id, succeeded, deterministic, FMA math, workspace bytes).
    #[derive(Clone, Copy, Debug)]
    struct R(u32, bool, bool, bool, usize);

    impl Perf for R {
        type Algo = u32;
        fn algo(&self) -> u32 {
            self.0
        }
        fn usable(&self) -> bool {
            self.1 && self.4 <= WORKSPACE_LIMIT
        }
        fn deterministic(&self) -> bool {
            self.2
        }
        fn math(&self) -> u32 {
            if self.3 {
                sys::cudnnMathType_t::CUDNN_FMA_MATH as u32
            } else {
                sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH as u32
            }
        }
        fn time_ms(&self) -> f32 {
            0.0
        }
        fn memory(&self) -> usize {
            self.4
        }
    }

    #[test]
    fn algorithm_choice_follows_order_determinism_workspace_and_math() {
        let fma = sys::cudnnMathType_t::CUDNN_FMA_MATH;
        let dflt = sys::cudnnMathType_t::CUDNN_DEFAULT_MATH;
        // Fastest first: a failed one, one over the workspace limit, a fast non-deterministic
        // one, a tensor-op one, then the first deterministic FMA one.
        let found = [
            R(9, false, true, true, 0),
            R(8, true, true, true, WORKSPACE_LIMIT + 1),
            R(1, true, false, true, 0),
            R(2, true, true, false, 0),
            R(3, true, true, true, 0),
        ];
        let algo = |m, d| pick(&found, m, d).map(|p| p.algo());
        assert_eq!(algo(fma, true), Some(3), "deterministic FMA result first");
        assert_eq!(algo(fma, false), Some(1), "fastest usable FMA result");
        assert_eq!(algo(dflt, true), Some(2), "any math: first deterministic");
        assert_eq!(algo(dflt, false), Some(1), "any math: fastest");
        // Only non-deterministic results: taken even when determinism is preferred.
        let nd = [R(5, true, false, true, 0), R(6, true, false, true, 0)];
        assert_eq!(pick(&nd, fma, true).map(|p| p.algo()), Some(5));
        // A library reporting only tensor-op math in FMA mode: still a choice, in order.
        let tc = [R(7, true, false, false, 0), R(4, true, true, false, 0)];
        assert_eq!(pick(&tc, fma, true).map(|p| p.algo()), Some(4));
        assert_eq!(pick(&tc, fma, false).map(|p| p.algo()), Some(7));
        // Nothing usable.
        assert!(pick(&found[..2], fma, true).is_none());
        // The whole order: tiers (math, then determinism), each in cuDNN's order.
        let order = |m, d| -> Vec<u32> { ranked(&found, m, d).iter().map(|p| p.0).collect() };
        assert_eq!(order(fma, true), vec![3, 1, 2]);
        assert_eq!(order(fma, false), vec![1, 3, 2]);
        assert_eq!(order(dflt, true), vec![2, 3, 1]);
        assert_eq!(order(dflt, false), vec![1, 2, 3]);
    }

    /// `MEDSSL_CUDNN_ALGO=time` times each algorithm once (a Find lists an algorithm once per math
    /// type), only those with a workspace under the descriptor's math type, each with the larger
    /// of the two workspaces, deterministic ones only unless allowed otherwise (or unless there
    /// are none); then takes the fastest timing, im2col included, the earlier on a tie, never a
    /// failed one.
    #[test]
    fn own_timing_candidates_and_choice() {
        let found = [
            R(1, true, false, true, 64),
            R(3, true, true, true, 128),
            R(3, true, true, false, 0),
            R(2, true, true, true, 0),
            R(5, true, true, true, 0),
        ];
        // Algorithm 5 has no workspace in this math type; 3 reports less than its result.
        let ws = |a: u32| -> Result<usize, dnn::CudnnError> {
            match a {
                5 => Err(dnn::CudnnError(
                    sys::cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED,
                )),
                3 => Ok(16),
                _ => Ok(32),
            }
        };
        assert_eq!(timing_candidates(&found, ws, true), vec![(3, 128), (2, 32)]);
        assert_eq!(
            timing_candidates(&found, ws, false),
            vec![(1, 64), (3, 128), (2, 32)]
        );
        let nd = [R(6, true, false, true, 0), R(7, true, false, true, 8)];
        assert_eq!(timing_candidates(&nd, ws, true), vec![(6, 32), (7, 32)]);

        // Device and host time alike: both rankings agree.
        let same = |us: f64| CallTime {
            device: us,
            host: us,
        };
        let t = |v: &[(Pass<u32>, Option<f64>)]| {
            let v: Vec<_> = v.iter().map(|&(p, us)| (p, us.map(same))).collect();
            let (g, plain) = (fastest(&v, true), fastest(&v, false));
            assert_eq!(g, plain);
            g
        };
        let (a, b, i) = (Pass::Dnn(1, 0), Pass::Dnn(2, 64), Pass::Im2col);
        assert_eq!(
            t(&[(a, Some(20.0)), (b, Some(9.5)), (i, Some(12.0))]),
            Some(b)
        );
        assert_eq!(t(&[(a, Some(20.0)), (b, None), (i, Some(12.0))]), Some(i));
        assert_eq!(t(&[(a, Some(12.0)), (i, Some(12.0))]), Some(a), "a tie");
        assert_eq!(t(&[(a, None), (i, None)]), None);
        assert_eq!(t(&[]), None);

        // The stem's forward on an H100 (run 7's MEDSSL_CUDNN_LOG timings and run 6's device
        // profile): cuDNN's implicit GEMM runs 7.0 µs on the device but takes the host 23.2 µs
        // to issue; im2col + cuBLAS 13.2 µs and 16.8 µs. From a graph only the device time
        // counts; issued call by call, the host's.
        let stem = [
            (
                a,
                Some(CallTime {
                    device: 7.0,
                    host: 23.2,
                }),
            ),
            (
                i,
                Some(CallTime {
                    device: 13.2,
                    host: 16.8,
                }),
            ),
        ];
        assert_eq!(fastest(&stem, true), Some(a));
        assert_eq!(fastest(&stem, false), Some(i));
        assert_eq!(stem[0].1.unwrap().cost(false), 23.2);
        assert_eq!(stem[1].1.unwrap().cost(true), 13.2);
    }

    #[test]
    fn timing_holds_cover_the_host_and_grow() {
        // 200 µs covers a round the host issued in 150 µs, not one of 185 µs (the tenth spared).
        assert!(hold_covered(200, 150));
        assert!(!hold_covered(200, 185));
        assert!(!hold_covered(200, 400));
        // A longer hold: at least doubled, and twice the host's time plus 20 µs.
        assert_eq!(longer_hold(200, 185), 400);
        assert_eq!(longer_hold(200, 900), 1820);
        assert_eq!(longer_hold(HOLD_MAX_US, 10), HOLD_MAX_US);
        assert_eq!(longer_hold(60_000, 70_000), HOLD_MAX_US);
        // From the start, the retries reach the cap for a host that never keeps up.
        let mut h = HOLD_START_US;
        for _ in 0..HOLD_RETRIES {
            h = longer_hold(h, h);
        }
        assert!(h > HOLD_START_US * 8 && h <= HOLD_MAX_US);
        assert!(hold_covered(longer_hold(h, h), h));
    }

    /// A 3×3 convolution of 2 images, 3 → 4 channels at 5×5.
    fn small_shape() -> Shape {
        Shape {
            n: 2,
            cin: 3,
            h: 5,
            w: 5,
            cout: 4,
            k: 3,
            stride: 1,
            pad: 1,
        }
    }

    #[test]
    fn a_candidate_without_a_workspace_in_this_math_type_is_skipped() {
        let shape = small_shape();
        let cands = [
            R(4, true, true, false, 0),
            R(2, true, true, true, 0),
            R(1, true, true, true, 0),
        ];
        let not_supported = || dnn::CudnnError(sys::cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED);
        let ws = |a: u32| {
            if a == 4 {
                Err(not_supported())
            } else {
                Ok(100 * a as usize)
            }
        };
        let got = first_workable("forward", &shape, &cands, "find", ws).unwrap();
        assert_eq!(got, (2, 200));
        // The workspace a result was timed with, where it is larger than the query's.
        let timed_with = [R(3, true, true, true, 1000)];
        let got = first_workable("forward", &shape, &timed_with, "find", ws).unwrap();
        assert_eq!(got, (3, 1000));
        let got = first_workable(
            "forward",
            &shape,
            &[R(3, true, true, true, 100)],
            "find",
            ws,
        );
        assert_eq!(got.unwrap(), (3, 300));
        let e = first_workable("forward", &shape, &cands, "find", |_| Err(not_supported()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no candidate algorithm"), "{e}");
    }

    #[test]
    fn a_forced_algorithm_goes_first_where_it_is_usable() {
        let shape = small_shape();
        let cands = vec![
            R(1, true, true, true, 0),
            R(2, true, true, true, 0),
            R(3, true, true, true, 0),
        ];
        let ids = |c: &[R]| c.iter().map(|p| p.0).collect::<Vec<_>>();
        // Nothing forced: the order and its name as they were.
        let (c, how) = prefer(cands.clone(), "find", ("V", &None), "forward", &shape, "");
        assert_eq!((ids(&c), how), (vec![1, 2, 3], "find"));
        // Forced and usable: first, the rest in their order.
        let three = Some("3".to_string());
        let (c, how) = prefer(cands.clone(), "find", ("V", &three), "forward", &shape, "");
        assert_eq!((ids(&c), how), (vec![3, 1, 2], "forced"));
        // Forced but not among the candidates (not usable for this shape): unchanged.
        let nine = Some("9".to_string());
        let (c, how) = prefer(cands, "heuristic", ("V", &nine), "forward", &shape, "");
        assert_eq!((ids(&c), how), (vec![1, 2, 3], "heuristic"));
        // Every name a switch takes is one of the bindings' algorithms, and every algorithm
        // has a name, once the direction's prefix is put back.
        fn names<A: AlgoCode>(prefix: &str, short: &[&str]) -> (Vec<String>, Vec<String>) {
            let mut all: Vec<String> = A::ALL.iter().map(|a| format!("{a:?}")).collect();
            let mut named: Vec<String> = short.iter().map(|n| format!("{prefix}{n}")).collect();
            all.sort();
            named.sort();
            (all, named)
        }
        use super::switches::{BWD_DATA_ALGOS, BWD_FILTER_ALGOS, FWD_ALGOS};
        let (a, n) =
            names::<sys::cudnnConvolutionFwdAlgo_t>("CUDNN_CONVOLUTION_FWD_ALGO_", &FWD_ALGOS);
        assert_eq!(a, n);
        let (a, n) = names::<sys::cudnnConvolutionBwdDataAlgo_t>(
            "CUDNN_CONVOLUTION_BWD_DATA_",
            &BWD_DATA_ALGOS,
        );
        assert_eq!(a, n);
        let (a, n) = names::<sys::cudnnConvolutionBwdFilterAlgo_t>(
            "CUDNN_CONVOLUTION_BWD_FILTER_",
            &BWD_FILTER_ALGOS,
        );
        assert_eq!(a, n);
    }

    #[test]
    fn raw_results_are_decoded_and_unknown_codes_are_never_used() {
        type Fwd = sys::cudnnConvolutionFwdAlgo_t;
        let ok = RawPerf {
            algo: 7,
            determinism: 1,
            math_type: sys::cudnnMathType_t::CUDNN_FMA_MATH as u32,
            time: 0.25,
            ..RawPerf::default()
        };
        let f = Found::<Fwd>::new(ok);
        assert!(f.usable() && f.deterministic());
        assert_eq!(f.algo(), Fwd::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED);
        assert_eq!(f.math(), 3);
        assert_eq!(f.time_ms(), 0.25);
        // A code past the known algorithms (the COUNT sentinel, or one from a newer library),
        // a status the bindings do not list, an unknown determinism value, an oversized
        // workspace: none of them is usable, and nothing is read through an enum.
        for bad in [
            RawPerf { algo: 8, ..ok },
            RawPerf { algo: 4242, ..ok },
            RawPerf { status: 9999, ..ok },
            RawPerf {
                memory: WORKSPACE_LIMIT + 1,
                ..ok
            },
        ] {
            assert!(!Found::<Fwd>::new(bad).usable(), "{bad:?}");
        }
        assert!(!Found::<Fwd>::new(RawPerf {
            determinism: 77,
            ..ok
        })
        .deterministic());
        // Ranking skips them and keeps the known one.
        let found = [
            Found::<Fwd>::new(RawPerf { algo: 4242, ..ok }),
            Found::<Fwd>::new(RawPerf { algo: 1, ..ok }),
        ];
        let r = ranked(&found, sys::cudnnMathType_t::CUDNN_FMA_MATH, true);
        assert_eq!(r.len(), 1);
        // MEDSSL_CUDNN_LOG=1's line per result, usable or not.
        assert_eq!(
            describe(&f),
            "FWD_ALGO_WINOGRAD_NONFUSED 0.2500 ms, workspace 0 B, status 0, deterministic, math 3"
        );
        assert_eq!(
            describe(&Found::<Fwd>::new(RawPerf {
                algo: 4242,
                determinism: 0,
                ..ok
            })),
            "algorithm code 4242 0.2500 ms, workspace 0 B, status 0, non-deterministic, math 3 \
             (not usable)"
        );
        assert_eq!(
            r[0].algo(),
            Fwd::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM
        );
        // Every direction decodes each of its algorithms and nothing else.
        type Bd = sys::cudnnConvolutionBwdDataAlgo_t;
        type Bf = sys::cudnnConvolutionBwdFilterAlgo_t;
        for (n, count) in [
            (
                Fwd::ALL.len(),
                Fwd::CUDNN_CONVOLUTION_FWD_ALGO_COUNT as usize,
            ),
            (
                Bd::ALL.len(),
                Bd::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT as usize,
            ),
            (
                Bf::ALL.len(),
                Bf::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT as usize,
            ),
        ] {
            assert_eq!(n, count);
        }
        for code in 0..16u32 {
            assert_eq!(
                Fwd::from_raw(code).map(|a| a as u32),
                (code < 8).then_some(code)
            );
            assert_eq!(
                Bd::from_raw(code).map(|a| a as u32),
                (code < 6).then_some(code)
            );
            assert_eq!(
                Bf::from_raw(code).map(|a| a as u32),
                (code < 7).then_some(code)
            );
        }
    }
}
