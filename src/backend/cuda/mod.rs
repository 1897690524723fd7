//! The CUDA backend: hand-written kernels (`kernels/*.cu`, compiled by `build.rs` into fatbins
//! embedded in the binary), cuBLAS for products and cuDNN for convolutions (with an im2col +
//! cuBLAS fallback), all on one stream per device.
//!
//! Layers: this file owns every `unsafe` driver interaction (context, stream, module loading,
//! kernel launch, the caching allocator, raw device pointers); the op-family files
//! (`elementwise.rs`, `reduce.rs`, ... named like their CPU twins and their `.cu` files) only
//! validate shapes and call `CudaBackend::launch` / `gemm` / `conv` helpers.
//!
//! Libraries are loaded at run time (cudarc `dynamic-loading`): `libcuda.so` comes from the
//! driver, `libcublas.so*` / `libcublasLt.so*` / `libcudnn.so*` are searched by the dynamic loader
//! (`LD_LIBRARY_PATH`, e.g. the `nvidia/*/lib` folders of a PyTorch pip environment, which
//! `tools/gpu-run.sh` exports). A machine without a driver gets an error, never a panic.
//!
//! Without a GPU, `MEDSSL_CUDA_EMULATE=1` makes `cuda:0` a CPU emulation of the device that runs
//! these same kernels (see [`emu`]); the CUDA parity tests use it in CI.
//!
//! Memory: one stream per device, so stream order alone makes buffer reuse safe. Dropping a
//! [`CudaStorage`] returns its buffer to a per-size free list; the next allocation of the same
//! size reuses it, so a steady-state training loop never calls `cuMemAlloc`.

mod conv;
mod elementwise;
pub mod emu;
mod fusion;
mod gemm;
mod graph;
pub use graph::GraphStats;
mod norm;
pub use conv::deterministic_first as cudnn_deterministic_first;
pub use fusion::{fusion_projected, set_fusion_projected};
pub use norm::{
    bn_apply_chunks, bn_fused_max_m, bn_inflight, bn_keep, bn_l2_hint, bn_pipe, bn_resident,
    bn_resident_bwd, bn_split, bn_vec, bn_welford, set_bn_apply_chunks, set_bn_fused_max_m,
    set_bn_inflight, set_bn_l2_hint, set_bn_pipe, set_bn_resident, set_bn_resident_bwd,
    set_bn_resident_keep, set_bn_split, set_bn_vec, set_bn_welford, OneLaunch, Resident,
    BN_SPLIT_WAVE,
};
mod optim;
mod pool;
pub mod profile;
mod reduce;
mod softmax_xent;
mod ssl_losses;
pub mod switches;
pub use switches::{CudnnAlgo, Switches};

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PinnedHostSlice, PushKernelArg,
};

use crate::backend::shapes;
/// The shared validation, re-exported for the op-family files.
pub(crate) use crate::backend::shapes::{nchw, rows2, rows_last, same_shape, scalar_grad};
use crate::backend::{
    AdamParams, Backend, BnAct, BnTrainOut, ConvGrads, ConvParams, DsrFactors, HostRead,
    PendingRead, PoolParams, SgdParams,
};
use crate::error::{Error, Result};
use crate::tensor::{numel, Device, Storage, Tensor};

mod images {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Turns any displayable CUDA-side failure into [`Error::Cuda`] with context.
pub(crate) fn cuda_err<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::Cuda(format!("{what}: {e:?}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Caching allocator
// ---------------------------------------------------------------------------------------------

/// Per-size free lists of device buffers (f32 elements). Buffers are only ever used on the
/// owning device's single stream, so a buffer released while kernels that read it are still
/// queued can be handed out again at once: its next use is ordered after them.
pub(crate) struct Pool {
    ordinal: usize,
    /// `None` on the emulated device (buffers are host memory).
    stream: Option<Arc<CudaStream>>,
    free: Mutex<HashMap<usize, Vec<Buf>>>,
    allocs: AtomicUsize,
    reuses: AtomicUsize,
    /// Bytes handed out and not yet given back, and the most seen since the last reset.
    in_use: AtomicUsize,
    peak: AtomicUsize,
    /// Times the cached buffers were freed ([`Pool::trim`]), by any thread.
    trims: AtomicUsize,
}

thread_local! {
    /// Per-thread `(fresh allocations, cache reuses)` by device ordinal: ops allocate on the
    /// calling thread, so these count exactly one thread's requests even while other threads
    /// use the same device (e.g. tests running in parallel).
    static THREAD_STATS: std::cell::RefCell<Vec<(usize, usize)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl Pool {
    /// Counts one request on this thread: `fresh` for a new device allocation, else a reuse.
    fn count(&self, fresh: bool) {
        let c = if fresh { &self.allocs } else { &self.reuses };
        c.fetch_add(1, Ordering::Relaxed);
        THREAD_STATS.with(|t| {
            let mut t = t.borrow_mut();
            if t.len() <= self.ordinal {
                t.resize(self.ordinal + 1, (0, 0));
            }
            let e = &mut t[self.ordinal];
            if fresh {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        });
    }

    fn take(&self, len: usize) -> Result<Buf> {
        let s = self.take_untracked(len)?;
        let bytes = s.len() * 4;
        let now = self.in_use.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
        Ok(s)
    }

    fn take_untracked(&self, len: usize) -> Result<Buf> {
        let len = len.max(1);
        if let Some(mut s) = lock(&self.free).get_mut(&len).and_then(|v| v.pop()) {
            self.count(false);
            if let Buf::Emu(h) = &mut s {
                h.poison();
            }
            return Ok(s);
        }
        self.count(true);
        let Some(stream) = &self.stream else {
            return Ok(Buf::Emu(emu::HostBuf::new(len)));
        };
        // SAFETY: the buffer is uninitialised f32 memory; every op writes its outputs fully
        // before they are read (or zero-fills them explicitly).
        match unsafe { stream.alloc::<f32>(len) } {
            Ok(s) => Ok(Buf::Dev(s)),
            Err(_) => {
                // Out of memory (or fragmentation): give the cached buffers back and retry once.
                self.trim();
                unsafe { stream.alloc::<f32>(len) }
                    .map(Buf::Dev)
                    .map_err(cuda_err(&format!(
                        "allocating {} bytes of device memory",
                        len * 4
                    )))
            }
        }
    }

    /// Device address of a buffer of this pool.
    fn addr(&self, b: &Buf) -> u64 {
        match b {
            Buf::Dev(s) => {
                let stream = self.stream.as_ref().expect("device buffers have a stream");
                // Event tracking is disabled for our contexts (single stream), so the returned
                // guard records nothing.
                let (p, _guard) = s.device_ptr(stream);
                p
            }
            Buf::Emu(h) => h.addr(),
        }
    }

    fn give(&self, s: Buf) {
        self.in_use.fetch_sub(s.len() * 4, Ordering::Relaxed);
        lock(&self.free).entry(s.len()).or_default().push(s);
    }

    /// Frees every cached buffer.
    fn trim(&self) {
        self.trims.fetch_add(1, Ordering::Relaxed);
        let drained: Vec<Buf> = lock(&self.free).drain().flat_map(|(_, v)| v).collect();
        if let Some(stream) = &self.stream {
            let _ = stream.context().bind_to_thread();
        }
        drop(drained);
    }
}

/// One buffer: device memory, or host memory standing in for it on the emulated device.
pub(crate) enum Buf {
    Dev(CudaSlice<f32>),
    Emu(emu::HostBuf),
}

impl Buf {
    fn len(&self) -> usize {
        match self {
            Buf::Dev(s) => s.len(),
            Buf::Emu(h) => h.len(),
        }
    }
}

/// Device memory of a CUDA tensor: a pooled `f32` buffer on one device. Dropping it returns the
/// buffer to the device's caching allocator.
pub struct CudaStorage {
    slice: Option<Buf>,
    len: usize,
    ordinal: usize,
    pool: Arc<Pool>,
    /// The step-graph arena the buffer came from, and its address (see [`graph`]).
    home: Option<(Arc<graph::Arena>, u64)>,
}

impl CudaStorage {
    /// The CUDA device ordinal this storage lives on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// Number of f32 elements (the buffer may be one element longer for empty tensors).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Raw device address, for kernel arguments and library calls on the owning stream.
    pub(crate) fn ptr(&self) -> u64 {
        if let Some((_, a)) = &self.home {
            return *a;
        }
        self.pool
            .addr(self.slice.as_ref().expect("live CudaStorage has a buffer"))
    }

    /// Swaps in another buffer of the same length from a step arena (the old one goes back where
    /// it came from). Only for a fresh storage whose address no work has seen yet.
    fn replace_buffer(&mut self, b: Buf, arena: Arc<graph::Arena>, addr: u64) {
        let old = self.slice.replace(b);
        let old_home = self.home.replace((arena, addr));
        if let Some(o) = old {
            match old_home {
                Some((a, p)) => a.give(o, p),
                None => self.pool.give(o),
            }
        }
    }
}

impl Drop for CudaStorage {
    fn drop(&mut self) {
        if let Some(s) = self.slice.take() {
            match self.home.take() {
                Some((arena, addr)) => arena.give(s, addr),
                None => self.pool.give(s),
            }
        }
    }
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaStorage(cuda:{}, {} f32)", self.ordinal, self.len)
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel arguments and launch geometry
// ---------------------------------------------------------------------------------------------

/// One kernel argument: a device pointer, an `int` or a `float`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum A {
    P(u64),
    I(i32),
    F(f32),
}

impl A {
    /// The argument's bytes in an 8-byte parameter slot: a pointer whole, an `int` or `float` in
    /// the low 4 bytes (little-endian), which is what a kernel reads from a 4-byte parameter.
    pub(crate) fn slot(&self) -> u64 {
        match *self {
            A::P(p) => p,
            A::I(i) => u64::from(i as u32),
            A::F(x) => u64::from(x.to_bits()),
        }
    }
}

/// Appends `args` to a kernel launch, in order.
fn push_args<'a>(b: &mut cudarc::driver::LaunchArgs<'a>, args: &'a [A]) {
    for a in args {
        match a {
            A::P(p) => b.arg(p),
            A::I(i) => b.arg(i),
            A::F(x) => b.arg(x),
        };
    }
}

/// Kernels whose blocks wait for one another, so that all of them must be resident at once:
/// launched as cooperative kernels (the driver refuses a grid larger than one wave), and run
/// with every block at once on the emulated device.
const COOPERATIVE: [&str; 11] = [
    "bn_fwd_resident",
    "bn_fwd_resident_g1",
    "bn_fwd_resident_g4",
    "bn_bwd_resident",
    "bn_bwd_resident_l2",
    "bn_fwd_resident4_g1",
    "bn_fwd_resident4_g2",
    "bn_fwd_resident4_g4",
    "bn_bwd_resident4",
    "bn_fwd_pipe4",
    "bn_bwd_pipe4",
];

/// Whether kernel `name` is launched cooperatively (see [`COOPERATIVE`]).
pub(crate) fn cooperative(name: &str) -> bool {
    COOPERATIVE.contains(&name)
}

thread_local! {
    /// [`CudaBackend::launch_counts_here`]: the work items the thread issued, by name.
    static HERE_COUNTS: std::cell::RefCell<HashMap<&'static str, u64>> =
        std::cell::RefCell::new(HashMap::new());
}

/// Threads per block of elementwise and warp-per-row kernels.
pub(crate) const BLOCK: u32 = 256;

/// One thread per element (grid-stride kernels accept any grid).
pub(crate) fn cfg_lin(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// [`cfg_lin`] for the kernels that take four elements per thread (`EW4_LOOP` in
/// `kernels/common.cuh`): `ceil(n / 4)` threads.
pub(crate) fn cfg_lin4(n: usize) -> LaunchConfig {
    cfg_lin(n.div_ceil(4))
}

/// One warp per row, 8 rows per block.
pub(crate) fn cfg_rows(rows: usize) -> LaunchConfig {
    let per = (BLOCK / 32) as usize;
    LaunchConfig {
        grid_dim: (rows.div_ceil(per).max(1) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `blocks` blocks of `threads` threads.
pub(crate) fn cfg_blocks(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A size as a kernel `int` (tensors are limited to 2^31 − 1 elements).
pub(crate) fn ci(n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| {
        Error::msg(format!(
            "CUDA kernels index with 32-bit ints: size {n} is too large"
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// The backend
// ---------------------------------------------------------------------------------------------

/// The CUDA backend of one device (created once per ordinal and kept for the process).
pub struct CudaBackend {
    ordinal: usize,
    /// The driver objects; `None` on the emulated device ([`emu`]).
    drv: Option<Driver>,
    pool: Arc<Pool>,
    conv: conv::ConvEngine,
    /// Device work items issued, by kernel or library call (see [`CudaBackend::launch_counts`]).
    counts: Mutex<HashMap<&'static str, u64>>,
    /// Streaming multiprocessors of the device ([`EMULATED_SMS`] on the emulated one).
    sms: usize,
    /// Arrival counters of the split reductions (see [`CudaBackend::counters`]): the buffer in
    /// use last, and every earlier, smaller one (kept, never reused: a kernel already queued
    /// may still count in it). One set for the device's stream; on the emulated device one per
    /// host thread (see [`CudaBackend::counters`]).
    counters: Mutex<HashMap<Option<std::thread::ThreadId>, Vec<CudaStorage>>>,
    /// The host thread that has the stream to itself for a step graph's capture (its
    /// [`graph::thread_key`]; 0: none), and the host threads issuing device work now (each
    /// counted once, see [`CudaBackend::turn`]).
    capture_thread: Arc<AtomicU64>,
    in_flight: AtomicUsize,
    /// Blocks of the split batch-norm reductions the device holds at once (read once, see
    /// [`CudaBackend::split_resident_blocks`]).
    /// One per statistics kernel (`bn_stats_split`, `_g2`, `_g4`).
    split_resident: [std::sync::OnceLock<usize>; 3],
    /// Launch limits of the resident batch-norm kernels, forward and backward (each read once,
    /// see [`CudaBackend::resident_limits`]).
    resident: [std::sync::OnceLock<Option<norm::ResidentLimits>>; 11],
    /// Bytes of L2 set aside for evict-last lines (`MEDSSL_CUDA_BN_L2=hint`, done once; see
    /// [`CudaBackend::l2_set_aside`]).
    l2_aside: std::sync::OnceLock<usize>,
    /// Page-locked host buffers of finished [`Backend::to_host_many_later`] reads, for reuse
    /// (a training loop has one or two in flight).
    pinned: Arc<Mutex<Vec<PinnedHostSlice<f32>>>>,
}

/// The error of an op that met buffers of both the emulated and a real device.
fn mixed_buffers() -> Error {
    Error::Cuda("a buffer of the emulated device met a real one (or the reverse)".into())
}

/// Splits packed values into one vector per tensor of the given sizes.
fn unpack(all: &[f32], sizes: &[usize]) -> Vec<Vec<f32>> {
    let mut rest = all;
    sizes
        .iter()
        .map(|&n| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head.to_vec()
        })
        .collect()
}

/// A [`Backend::to_host_many_later`] copy into a page-locked buffer, queued on the stream.
struct PinnedRead {
    /// `Some` until the values are taken.
    host: Option<PinnedHostSlice<f32>>,
    /// Recorded on the stream right after the copy. `PinnedHostSlice`'s own event is not: cudarc
    /// records it only where it manages stream synchronisation, which this backend turns off
    /// (`disable_event_tracking`), so `as_slice` alone would not wait for the copy (on an H100 a
    /// step from a graph then read the buffer's previous contents).
    copied: cudarc::driver::CudaEvent,
    sizes: Vec<usize>,
    /// Where the buffer goes back for reuse.
    free: Arc<Mutex<Vec<PinnedHostSlice<f32>>>>,
}

impl PendingRead for PinnedRead {
    fn wait(mut self: Box<Self>) -> Result<Vec<Vec<f32>>> {
        let host = self.host.take().expect("read once");
        // Waits for the copy (not for the work queued since).
        self.copied
            .synchronize()
            .map_err(cuda_err("waiting for a device-to-host copy"))?;
        let out = unpack(
            host.as_slice()
                .map_err(cuda_err("reading a page-locked buffer"))?,
            &self.sizes,
        );
        let mut free = lock(&self.free);
        free.push(host);
        if free.len() > PINNED_KEEP {
            // The oldest first: a training loop reads one size, step after step.
            free.remove(0);
        }
        Ok(out)
    }
}

/// Page-locked buffers kept for reuse at most (a training loop has one or two reads in flight).
const PINNED_KEEP: usize = 4;

/// Which of the free page-locked buffers (their lengths, in order) a read of `total` elements
/// reuses: the first of exactly that length (cudarc copies a destination's whole length).
fn pinned_reuse(lens: impl Iterator<Item = usize>, total: usize) -> Option<usize> {
    lens.into_iter().position(|n| n == total)
}

impl Drop for PinnedRead {
    /// A read dropped unread (an error on the way) still waits for its copy before the buffer
    /// is freed: the device would otherwise write into freed memory.
    fn drop(&mut self) {
        if self.host.is_some() {
            let _ = self.copied.synchronize();
        }
    }
}

/// The emulated device's [`Backend::to_host_many_later`]: copied when issued.
struct DoneRead(Vec<Vec<f32>>);

impl PendingRead for DoneRead {
    fn wait(self: Box<Self>) -> Result<Vec<Vec<f32>>> {
        Ok(self.0)
    }
}

thread_local! {
    /// [`set_step_read_later`]'s setting.
    static READ_LATER_HERE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Whether [`Backend::to_host_many_later`] leaves the copy queued (a training step then returns
/// before its device work is done, and the next step's host work overlaps it):
/// [`set_step_read_later`]'s setting, else `MEDSSL_CUDA_STEP_READ` (see [`switches`]; `later`
/// by default: on an H100, steps issued back to back ran 1.05-1.25× faster than with `wait`,
/// bench/results/2026-11-28-h100.md).
pub fn step_read_later() -> bool {
    READ_LATER_HERE
        .with(|s| s.get())
        .unwrap_or_else(|| switches::current().step_read_later)
}

/// Sets [`step_read_later`] for the reads the calling thread issues (`None`: back to
/// `MEDSSL_CUDA_STEP_READ`); returns the previous setting.
pub fn set_step_read_later(on: Option<bool>) -> Option<bool> {
    READ_LATER_HERE.with(|s| s.replace(on))
}

/// The streaming-multiprocessor count the emulated device reports (small, so that the parity
/// tests reach the split reductions at modest sizes).
pub const EMULATED_SMS: usize = 8;

/// What a real device needs: context, stream, kernel modules, cuBLAS.
struct Driver {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Vec<(&'static str, Arc<CudaModule>)>,
    funcs: Mutex<HashMap<&'static str, CudaFunction>>,
    blas: Mutex<cudarc::cublas::CudaBlas>,
    /// cuBLAS's workspace, set explicitly so that cuBLAS allocates nothing while a step graph is
    /// being captured (kept alive here for the handle's lifetime).
    _blas_workspace: CudaSlice<u8>,
}

/// Bytes of the cuBLAS workspace (cuBLAS's own recommendation for Hopper GPUs).
const BLAS_WORKSPACE: usize = 32 << 20;

static BACKENDS: OnceLock<Mutex<HashMap<usize, &'static CudaBackend>>> = OnceLock::new();

/// True when a CUDA driver library is present and reports at least one device, or when the
/// emulation is on (`MEDSSL_CUDA_EMULATE=1`). Never panics.
pub fn is_available() -> bool {
    device_count().map(|n| n > 0).unwrap_or(false)
}

/// Whether `cuda:N` is the CPU emulation of the device (`MEDSSL_CUDA_EMULATE=1`).
pub fn is_emulated() -> bool {
    emu::enabled()
}

/// Number of CUDA devices (1 under the emulation), or an error naming what is missing.
pub fn device_count() -> Result<usize> {
    if switches::get()?.emulate {
        return Ok(1);
    }
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::Cuda(
            "no CUDA driver library (libcuda.so) could be loaded: this machine has no NVIDIA \
             driver, or it is not on the loader path"
                .into(),
        ));
    }
    match catch_unwind(CudaContext::device_count) {
        Ok(Ok(n)) => Ok(n.max(0) as usize),
        Ok(Err(e)) => Err(Error::Cuda(format!(
            "cuInit/cuDeviceGetCount failed: {e:?}"
        ))),
        Err(_) => Err(Error::Cuda(
            "the CUDA driver library is missing required entry points".into(),
        )),
    }
}

impl CudaBackend {
    /// The backend for device `ordinal`, created on first use.
    pub fn get(ordinal: usize) -> Result<&'static dyn Backend> {
        Ok(Self::get_concrete(ordinal)?)
    }

    /// Like [`CudaBackend::get`] but returns the concrete type (allocator statistics, engine
    /// names).
    pub fn get_concrete(ordinal: usize) -> Result<&'static CudaBackend> {
        let map = BACKENDS.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = lock(map);
        if let Some(b) = map.get(&ordinal) {
            return Ok(b);
        }
        let b: &'static CudaBackend = Box::leak(Box::new(Self::create(ordinal)?));
        map.insert(ordinal, b);
        Ok(b)
    }

    fn create(ordinal: usize) -> Result<CudaBackend> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::Cuda(format!(
                "device cuda:{ordinal} requested but {count} CUDA device(s) are visible"
            )));
        }
        if switches::get()?.emulate {
            return Ok(Self::create_emulated(ordinal));
        }
        // cudarc panics when a library or symbol cannot be loaded; turn that into an error.
        match catch_unwind(AssertUnwindSafe(|| Self::create_inner(ordinal))) {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(Error::Cuda(format!(
                    "initialising cuda:{ordinal} failed: {msg}. cuBLAS/cuDNN are loaded from \
                     LD_LIBRARY_PATH (e.g. the nvidia/*/lib folders of a PyTorch pip install; \
                     tools/gpu-run.sh sets this up)"
                )))
            }
        }
    }

    fn create_emulated(ordinal: usize) -> CudaBackend {
        CudaBackend {
            ordinal,
            drv: None,
            pool: Arc::new(Pool {
                ordinal,
                stream: None,
                free: Mutex::new(HashMap::new()),
                allocs: AtomicUsize::new(0),
                reuses: AtomicUsize::new(0),
                in_use: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                trims: AtomicUsize::new(0),
            }),
            conv: conv::ConvEngine::without_cudnn("CPU emulation: cuDNN is not emulated"),
            counts: Mutex::new(HashMap::new()),
            sms: EMULATED_SMS,
            counters: Mutex::new(HashMap::new()),
            capture_thread: Arc::new(AtomicU64::new(0)),
            in_flight: AtomicUsize::new(0),
            split_resident: Default::default(),
            resident: Default::default(),
            l2_aside: Default::default(),
            pinned: Default::default(),
        }
    }

    fn create_inner(ordinal: usize) -> Result<CudaBackend> {
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("creating the CUDA context"))?;
        // One stream per device: no cross-stream events needed on every buffer.
        // SAFETY: no buffer is ever used on another stream of this context.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(cuda_err("creating the CUDA stream"))?;
        let mut modules = Vec::new();
        for (name, image) in images::KERNEL_IMAGES {
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))
                .map_err(|e| {
                    Error::Cuda(format!(
                        "loading kernels/{name}.cu (fatbin for sm_80/sm_90 + compute_80 PTX) \
                         failed: {e:?}; the driver may be older than CUDA 13.0"
                    ))
                })?;
            modules.push((*name, m));
        }
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "libcublas.so could not be loaded: add the folder holding libcublas.so.* and \
                 libcublasLt.so.* (e.g. site-packages/nvidia/cublas/lib or nvidia/cu13/lib) to \
                 LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let blas = cudarc::cublas::CudaBlas::new(stream.clone())
            .map_err(cuda_err("creating the cuBLAS handle"))?;
        // Keep FP32 GEMMs in full precision (no TF32) unless asked, so parity with the CPU
        // reference holds; MEDSSL_TF32=1 trades that for speed.
        let math = if switches::current().tf32 {
            cudarc::cublas::sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            cudarc::cublas::sys::cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        // SAFETY: valid handle created above.
        unsafe { cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), math) }
            .result()
            .map_err(cuda_err("setting the cuBLAS math mode"))?;
        // SAFETY: raw device memory that only cuBLAS uses, as its scratch space.
        let ws = unsafe { stream.alloc::<u8>(BLAS_WORKSPACE) }
            .map_err(cuda_err("allocating the cuBLAS workspace"))?;
        {
            let (p, _g) = ws.device_ptr(&stream);
            // SAFETY: valid handle; the workspace outlives it (both live in `Driver`).
            unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    p as *mut std::ffi::c_void,
                    BLAS_WORKSPACE,
                )
            }
            .result()
            .map_err(cuda_err("setting the cuBLAS workspace"))?;
        }
        let pool = Arc::new(Pool {
            ordinal,
            stream: Some(stream.clone()),
            free: Mutex::new(HashMap::new()),
            allocs: AtomicUsize::new(0),
            reuses: AtomicUsize::new(0),
            in_use: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            trims: AtomicUsize::new(0),
        });
        let conv = conv::ConvEngine::new(&stream);
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(cuda_err("reading the multiprocessor count"))?;
        Ok(CudaBackend {
            ordinal,
            drv: Some(Driver {
                ctx,
                stream,
                modules,
                funcs: Mutex::new(HashMap::new()),
                blas: Mutex::new(blas),
                _blas_workspace: ws,
            }),
            pool,
            conv,
            counts: Mutex::new(HashMap::new()),
            sms: usize::try_from(sms).unwrap_or(1).max(1),
            counters: Mutex::new(HashMap::new()),
            capture_thread: Arc::new(AtomicU64::new(0)),
            in_flight: AtomicUsize::new(0),
            split_resident: Default::default(),
            resident: Default::default(),
            l2_aside: Default::default(),
            pinned: Default::default(),
        })
    }

    /// `(fresh device allocations, allocations served from the cache)` since start-up, over all
    /// threads. Every pooled buffer request counts exactly once, in one of the two.
    pub fn alloc_stats(&self) -> (usize, usize) {
        (
            self.pool.allocs.load(Ordering::Relaxed),
            self.pool.reuses.load(Ordering::Relaxed),
        )
    }

    /// Like [`CudaBackend::alloc_stats`] but only the requests made by the calling thread on
    /// this device, so a caller can measure its own ops while other threads use the device.
    pub fn thread_alloc_stats(&self) -> (usize, usize) {
        THREAD_STATS.with(|t| t.borrow().get(self.ordinal).copied().unwrap_or((0, 0)))
    }

    /// How many times any thread has freed the caching allocator's cached buffers (a step graph
    /// taking over the working set, or an allocation that ran out of memory): a caller counting
    /// its own fresh allocations with [`CudaBackend::thread_alloc_stats`] sees one after a trim
    /// even when its own requests are all of sizes it gave back.
    pub fn pool_trims(&self) -> usize {
        self.pool.trims.load(Ordering::Relaxed)
    }

    /// Device work issued since start-up (or the last [`CudaBackend::reset_launch_counts`]), over
    /// all threads: every hand-written kernel launch by kernel name, every cuBLAS product
    /// (`cublas_sgemm`, `cublas_sgemm_strided_batched`) and cuDNN convolution pass
    /// (`cudnn_conv_fwd`, `cudnn_conv_bwd_data`, `cudnn_conv_bwd_filter`) and every copy or fill
    /// (`memcpy_htod`, `memcpy_dtoh`, `memcpy_dtod`, `memset_zeros`), sorted by name. In a
    /// latency-bound step the total is what the GPU time follows.
    pub fn launch_counts(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<_> = lock(&self.counts).iter().map(|(k, n)| (*k, *n)).collect();
        v.sort();
        v
    }

    pub fn reset_launch_counts(&self) {
        lock(&self.counts).clear();
    }

    /// The work items of [`CudaBackend::launch_counts`] that the calling thread issued, on any
    /// device, since it started: what a test counts to see which kernels its own calls ran while
    /// other tests issue work beside it.
    pub fn launch_counts_here() -> Vec<(&'static str, u64)> {
        let mut v: Vec<_> =
            HERE_COUNTS.with(|c| c.borrow().iter().map(|(k, n)| (*k, *n)).collect());
        v.sort();
        v
    }

    /// Counts one work item (see [`CudaBackend::launch_counts`]).
    pub(crate) fn count(&self, what: &'static str) {
        *lock(&self.counts).entry(what).or_insert(0) += 1;
        HERE_COUNTS.with(|c| *c.borrow_mut().entry(what).or_insert(0) += 1);
    }

    /// Reads `t` once with a read-bandwidth probe (four loads in flight per thread, of one
    /// float each, or with `wide` of one float4 each: `t`'s length a multiple of 4) and returns
    /// the probe's per-block partial sums: `medssl-bench ops --op read_reference` times it beside
    /// the batch norms' read-only statistics pass. An error where `wide` does not fit `t`.
    pub fn read_probe(&self, t: &Tensor, wide: bool) -> Result<Tensor> {
        reduce::read_probe(self, t, wide)
    }

    /// A copy of `t` made by the driver's device-to-device copy (`cuMemcpyDtoDAsync`), stream
    /// ordered: `medssl-bench ops` times it as the device's copy bandwidth, the peak against which
    /// memory-bound kernels are rated.
    pub fn copy_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let src = self.storage_of(t)?;
        let n = t.numel();
        let _turn = self.graph_before_read()?;
        let mut dst = self.buffer(n)?;
        if n > 0 {
            self.count("memcpy_dtod");
            let out = dst.slice.as_mut().expect("fresh buffer");
            match (src.slice.as_ref().expect("live buffer"), out, &self.drv) {
                (Buf::Dev(a), Buf::Dev(b), Some(d)) => d
                    .stream
                    .memcpy_dtod(&a.slice(0..n), &mut b.slice_mut(0..n))
                    .map_err(cuda_err("device-to-device copy"))?,
                (Buf::Emu(a), Buf::Emu(b), None) => {
                    let mut tmp = vec![0.0f32; n];
                    a.read(&mut tmp);
                    b.write(0, &tmp);
                }
                _ => return Err(mixed_buffers()),
            }
        }
        Ok(Tensor::from_storage(Storage::Cuda(dst), t.shape()))
    }

    /// Frees all cached (unused) device buffers.
    pub fn empty_cache(&self) {
        let _turn = self.turn();
        self.pool.trim();
    }

    /// Which convolution engine is in use: `cudnn` or `im2col+cublas` (and why).
    pub fn conv_engine(&self) -> String {
        self.conv.describe()
    }

    /// The GPU's name as the driver reports it.
    pub fn device_name(&self) -> String {
        match &self.drv {
            Some(d) => d.ctx.name().unwrap_or_else(|_| "unknown".into()),
            None => "CPU emulation of the CUDA kernels (MEDSSL_CUDA_EMULATE=1)".into(),
        }
    }

    /// Whether this backend is the CPU emulation rather than a GPU.
    pub fn is_emulated(&self) -> bool {
        self.drv.is_none()
    }

    // ---- helpers for the op families ----

    pub(crate) fn bind(&self) -> Result<()> {
        match &self.drv {
            Some(d) => d
                .ctx
                .bind_to_thread()
                .map_err(cuda_err("binding the CUDA context")),
            None => Ok(()),
        }
    }

    fn func(d: &Driver, name: &'static str) -> Result<CudaFunction> {
        let mut funcs = lock(&d.funcs);
        if let Some(f) = funcs.get(name) {
            return Ok(f.clone());
        }
        for (_, m) in &d.modules {
            if let Ok(f) = m.load_function(name) {
                funcs.insert(name, f.clone());
                return Ok(f);
            }
        }
        Err(Error::Cuda(format!(
            "kernel `{name}` is not in any embedded module"
        )))
    }

    /// Launches kernel `name` on this device's stream.
    pub(crate) fn launch(&self, name: &'static str, cfg: LaunchConfig, args: &[A]) -> Result<()> {
        let _turn = self.turn();
        self.count(name);
        let hook = self.graph_kernel(name, &cfg, args, None)?;
        if hook == graph::Hook::Skip {
            return Ok(());
        }
        let Some(d) = &self.drv else {
            return profile::host_timed(name, || emu::launch(name, &cfg, args, None));
        };
        let f = Self::func(d, name)?;
        let mut b = d.stream.launch_builder(&f);
        push_args(&mut b, args);
        // SAFETY: every kernel's argument list is matched by its single call site in the
        // op-family files, and buffers are sized by the shapes validated there. A cooperative
        // kernel's grid is sized by the device's occupancy for it (one wave), which the driver
        // checks.
        unsafe {
            if cooperative(name) {
                b.launch_cooperative(cfg)
            } else {
                b.launch(cfg)
            }
        }
        .map_err(|e| Error::Cuda(format!("launching {name}: {e:?}")))?;
        if hook == graph::Hook::Capture {
            self.graph_node_captured()?;
        }
        Ok(())
    }

    /// [`CudaBackend::launch`] with one more, by-value struct parameter after `args` (the
    /// multi-tensor tables of optim.rs).
    pub(crate) fn launch_table<T: cudarc::driver::DeviceRepr>(
        &self,
        name: &'static str,
        cfg: LaunchConfig,
        args: &[A],
        table: &T,
    ) -> Result<()> {
        let _turn = self.turn();
        self.count(name);
        let p = (table as *const T).cast::<u8>();
        // SAFETY: `T` is a `#[repr(C)]` plain-data table of `size_of::<T>()` bytes.
        let bytes = unsafe { std::slice::from_raw_parts(p, std::mem::size_of::<T>()) };
        let hook = self.graph_kernel(name, &cfg, args, Some(bytes))?;
        if hook == graph::Hook::Skip {
            return Ok(());
        }
        let Some(d) = &self.drv else {
            let table = Some((p.cast::<std::ffi::c_void>(), bytes.len()));
            return profile::host_timed(name, || emu::launch(name, &cfg, args, table));
        };
        let f = Self::func(d, name)?;
        let mut b = d.stream.launch_builder(&f);
        push_args(&mut b, args);
        b.arg(table);
        // SAFETY: as in `launch`; `T` is `#[repr(C)]` and mirrors the kernel's struct parameter.
        unsafe { b.launch(cfg) }.map_err(|e| Error::Cuda(format!("launching {name}: {e:?}")))?;
        if hook == graph::Hook::Capture {
            self.graph_node_captured()?;
        }
        Ok(())
    }

    /// Holds the stream for `us` microseconds (`timing_hold`, one thread): work issued behind
    /// it queues up meanwhile and then runs back to back, so events around that work time the
    /// device alone, not the host issuing it.
    pub(crate) fn hold(&self, us: u32) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch("timing_hold", cfg, &[A::I(ci(us as usize)?)])
    }

    /// Streaming multiprocessors of the device (the emulated one reports [`EMULATED_SMS`]).
    pub fn sm_count(&self) -> usize {
        self.sms
    }

    /// Device address of at least `n` unsigned 32-bit arrival counters, all zero. A kernel that
    /// counts in them sets every counter it used back to zero before it ends, so one zero-filled
    /// buffer serves every launch on the stream. Grows (a new zero-filled buffer) when `n` is
    /// larger than any before.
    ///
    /// On a device every launch runs in the order of the one stream, so one set of counters is
    /// never used by two kernels at once. The emulated device runs each host thread's launches
    /// on that thread as they are made (the parity tests run in parallel), so there each thread
    /// gets its own set.
    pub(crate) fn counters(&self, n: usize) -> Result<u64> {
        // The turn before the lock: a thread that waits for another's capture must not hold a
        // lock that the capturing thread takes.
        let _turn = self.turn();
        let key = self.drv.is_none().then(|| std::thread::current().id());
        let mut all = lock(&self.counters);
        let kept = all.entry(key).or_default();
        if let Some(b) = kept.last() {
            if b.len >= n {
                return Ok(b.ptr());
            }
        }
        let mut b = self.buffer_outside_step(n.max(1024))?;
        self.write(&mut b, &[])?;
        let p = b.ptr();
        kept.push(b);
        Ok(p)
    }

    /// A pooled, uninitialised buffer of `len` f32 (inside a step-graph step: from the step's
    /// arena, see [`graph`]).
    pub(crate) fn buffer(&self, len: usize) -> Result<CudaStorage> {
        // A new buffer is allocated on the stream (stream-ordered allocation).
        let _turn = self.turn();
        if let Some((arena, strict)) = graph::step_arena(self.ordinal) {
            let (b, addr) = arena.take(len, strict)?;
            return Ok(CudaStorage {
                slice: Some(b),
                len,
                ordinal: self.ordinal,
                pool: self.pool.clone(),
                home: Some((arena, addr)),
            });
        }
        self.buffer_outside_step(len)
    }

    /// A pooled buffer that may outlive the step that asks for it (never from a step arena).
    pub(crate) fn buffer_outside_step(&self, len: usize) -> Result<CudaStorage> {
        let _turn = self.turn();
        Ok(CudaStorage {
            slice: Some(self.pool.take(len)?),
            len,
            ordinal: self.ordinal,
            pool: self.pool.clone(),
            home: None,
        })
    }

    /// A new uninitialised tensor (every caller writes all of it).
    pub(crate) fn empty(&self, shape: &[usize]) -> Result<Tensor> {
        Ok(Tensor::from_storage(
            Storage::Cuda(self.buffer(numel(shape))?),
            shape,
        ))
    }

    /// A new zero-filled tensor.
    pub(crate) fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        let n = numel(shape);
        let mut s = self.buffer(n)?;
        self.write(&mut s, &[])?;
        Ok(Tensor::from_storage(Storage::Cuda(s), shape))
    }

    /// The tensors packed one after another into one new tensor by one multi-tensor copy
    /// launch (`None` when they hold no element; each is still checked to be on this device).
    fn pack(&self, ts: &[&Tensor]) -> Result<Option<Tensor>> {
        let total: usize = ts.iter().map(|t| t.numel()).sum();
        if total == 0 {
            for t in ts {
                self.storage_of(t)?;
            }
            return Ok(None);
        }
        let packed = self.buffer(total)?;
        let mut copies = Vec::with_capacity(ts.len());
        let mut at = packed.ptr();
        for t in ts {
            copies.push((at, self.p(t)?, t.numel()));
            at += 4 * t.numel() as u64;
        }
        optim::copy_multi(self, &copies)?;
        Ok(Some(Tensor::from_storage(Storage::Cuda(packed), &[total])))
    }

    fn storage_of<'t>(&self, t: &'t Tensor) -> Result<&'t CudaStorage> {
        match t.storage() {
            Storage::Cuda(s) if s.ordinal == self.ordinal => Ok(s),
            Storage::Cuda(s) => Err(Error::msg(format!(
                "tensor {:?} is on cuda:{} but the op runs on cuda:{}",
                t.shape(),
                s.ordinal,
                self.ordinal
            ))),
            Storage::Cpu(_) => Err(Error::msg(format!(
                "tensor {:?} is on the cpu but the op runs on cuda:{}: move it with to_device",
                t.shape(),
                self.ordinal
            ))),
        }
    }

    /// Device address of a tensor on this device.
    pub(crate) fn p(&self, t: &Tensor) -> Result<u64> {
        Ok(self.storage_of(t)?.ptr())
    }

    /// Device address of a uniquely owned tensor, for in-place updates.
    pub(crate) fn p_mut(&self, t: &mut Tensor) -> Result<u64> {
        self.storage_of(t)?;
        match t.storage_mut()? {
            Storage::Cuda(s) => Ok(s.ptr()),
            Storage::Cpu(_) => unreachable!("checked above"),
        }
    }

    /// Uploads integer labels (validated `< classes`) as int32 into a pooled buffer.
    pub(crate) fn labels(
        &self,
        labels: &[usize],
        rows: usize,
        classes: usize,
        op: &str,
    ) -> Result<CudaStorage> {
        shapes::labels(labels, rows, classes, op)?;
        self.upload_ints(labels)
    }

    /// Uploads arbitrary non-negative integers (< 2^31) as int32.
    pub(crate) fn upload_ints(&self, v: &[usize]) -> Result<CudaStorage> {
        let ints: Vec<i32> = v.iter().map(|&l| ci(l)).collect::<Result<Vec<i32>>>()?;
        // The buffer is typed f32 on the Rust side; kernels read it as int32 (same size). The
        // copy is a byte copy, no float conversion happens.
        let bits: &[f32] = bytemuck::cast_slice(&ints);
        let mut s = self.buffer(bits.len())?;
        self.write(&mut s, bits)?;
        Ok(s)
    }

    /// Copies `data` into the start of `s`, or zero-fills all of `s` when `data` is empty (stream
    /// ordered).
    fn write(&self, s: &mut CudaStorage, data: &[f32]) -> Result<()> {
        let _turn = self.turn();
        self.count(if data.is_empty() {
            "memset_zeros"
        } else {
            "memcpy_htod"
        });
        let hook = if data.is_empty() {
            self.graph_memset(s.ptr(), s.len)?
        } else {
            self.graph_upload(s, data)?
        };
        if hook == graph::Hook::Skip {
            return Ok(());
        }
        let buf = s.slice.as_mut().expect("fresh buffer");
        match (buf, &self.drv) {
            (Buf::Dev(slice), Some(d)) if data.is_empty() => d
                .stream
                .memset_zeros(slice)
                .map_err(cuda_err("zero-filling a buffer")),
            (Buf::Dev(slice), Some(d)) => d
                .stream
                .memcpy_htod(data, slice)
                .map_err(cuda_err("host-to-device copy")),
            (Buf::Emu(h), None) if data.is_empty() => {
                h.fill(0.0);
                Ok(())
            }
            (Buf::Emu(h), None) => {
                h.write(0, data);
                Ok(())
            }
            _ => Err(mixed_buffers()),
        }
    }

    /// The cuBLAS handle (real devices only; the emulation runs GEMMs on the CPU).
    pub(crate) fn blas(&self) -> Result<MutexGuard<'_, cudarc::cublas::CudaBlas>> {
        match &self.drv {
            Some(d) => Ok(lock(&d.blas)),
            None => Err(Error::Cuda(
                "cuBLAS is not available on the emulated device".into(),
            )),
        }
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        if self.is_emulated() {
            // Reports and benchmark files must never pass emulated timings off as a GPU's.
            format!("cuda:{} (CPU emulation)", self.ordinal)
        } else {
            format!("cuda:{}", self.ordinal)
        }
    }
    fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    fn from_host(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        if data.len() != numel(shape) {
            return Err(Error::msg(format!(
                "from_host: {} values for shape {shape:?}",
                data.len()
            )));
        }
        let mut s = self.buffer(data.len())?;
        if !data.is_empty() {
            self.write(&mut s, data)?;
        }
        Ok(Tensor::from_storage(Storage::Cuda(s), shape))
    }
    fn to_host(&self, t: &Tensor) -> Result<Vec<f32>> {
        let s = self.storage_of(t)?;
        let n = t.numel();
        let mut out = vec![0.0f32; n];
        let _turn = self.graph_before_read()?;
        if n > 0 {
            self.count("memcpy_dtoh");
            match (s.slice.as_ref().expect("live buffer"), &self.drv) {
                (Buf::Dev(slice), Some(d)) => d
                    .stream
                    .memcpy_dtoh(&slice.slice(0..n), &mut out)
                    .map_err(cuda_err("device-to-host copy"))?,
                (Buf::Emu(h), None) => h.read(&mut out),
                _ => return Err(mixed_buffers()),
            }
        }
        self.synchronize()?;
        Ok(out)
    }
    fn to_host_many(&self, ts: &[&Tensor]) -> Result<Vec<Vec<f32>>> {
        if ts.len() < 2 {
            return ts.iter().map(|t| self.to_host(t)).collect();
        }
        // Packed on the device by one multi-tensor copy launch, then one transfer: the host
        // waits for the device once.
        let Some(packed) = self.pack(ts)? else {
            return Ok(vec![Vec::new(); ts.len()]);
        };
        let sizes: Vec<usize> = ts.iter().map(|t| t.numel()).collect();
        let all = self.to_host(&packed)?;
        Ok(unpack(&all, &sizes))
    }
    fn to_host_many_later(&self, ts: &[&Tensor]) -> Result<HostRead> {
        if !step_read_later() || ts.len() < 2 {
            return self.to_host_many(ts).map(HostRead::Ready);
        }
        let Some(d) = &self.drv else {
            // The emulated device has run everything issued so far: the copy is done now, and
            // the caller still collects it later, as from a GPU.
            return Ok(HostRead::Later(Box::new(DoneRead(self.to_host_many(ts)?))));
        };
        let Some(packed) = self.pack(ts)? else {
            return Ok(HostRead::Ready(vec![Vec::new(); ts.len()]));
        };
        let sizes: Vec<usize> = ts.iter().map(|t| t.numel()).collect();
        let total = packed.numel();
        let Buf::Dev(slice) = self
            .storage_of(&packed)?
            .slice
            .as_ref()
            .expect("live buffer")
        else {
            return Err(mixed_buffers());
        };
        // Ends (launches) an open step graph: the copy below is issued after the step's work.
        let _turn = self.graph_before_read()?;
        self.count("memcpy_dtoh");
        // A page-locked buffer (the copy is asynchronous only into one), reused: one of exactly
        // `total` elements, since cudarc's `memcpy_dtoh` copies the destination's whole length
        // (a larger buffer made it read past the packed values: CUDA_ERROR_INVALID_VALUE on an
        // H200, run 10, where one process trained several models with different read sizes).
        let reuse = {
            let mut free = lock(&self.pinned);
            let at = pinned_reuse(free.iter().map(|b| b.len()), total);
            // `remove`, not `swap_remove`: the list stays oldest first, as `PinnedRead::wait`
            // evicts it.
            at.map(|i| free.remove(i))
        };
        let mut host = match reuse {
            Some(b) => b,
            // SAFETY: the copy below writes the first `total` elements before they are read
            // (`PinnedRead::wait` waits for the event recorded after it); no flags: cached host
            // memory, which the host reads fast (write-combined memory it does not).
            None => unsafe { d.ctx.alloc_pinned_with_flags::<f32>(total, 0) }
                .map_err(cuda_err("allocating page-locked host memory"))?,
        };
        // Queued on the stream, then an event behind it that `PinnedRead::wait` waits on.
        d.stream
            .memcpy_dtoh(&slice.slice(0..total), &mut host)
            .map_err(cuda_err("device-to-host copy"))?;
        let copied = d
            .stream
            .record_event(Some(
                cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING,
            ))
            .map_err(cuda_err("recording the copy's event"))?;
        let read = Box::new(PinnedRead {
            host: Some(host),
            copied,
            sizes,
            free: self.pinned.clone(),
        });
        // `packed` is dropped here: its buffer is reused only by work issued after the copy.
        Ok(HostRead::Later(read))
    }
    fn full(&self, shape: &[usize], value: f32) -> Result<Tensor> {
        if value == 0.0 && value.is_sign_positive() {
            return self.zeros(shape);
        }
        let y = self.empty(shape)?;
        elementwise::fill(self, &y, value)?;
        Ok(y)
    }
    fn synchronize(&self) -> Result<()> {
        let _turn = self.graph_before_read()?;
        match &self.drv {
            Some(d) => d
                .stream
                .synchronize()
                .map_err(cuda_err("synchronising the stream")),
            None => Ok(()),
        }
    }
    fn memory_peak(&self) -> Option<usize> {
        Some(self.pool.peak.load(Ordering::Relaxed))
    }
    fn reset_memory_peak(&self) {
        let now = self.pool.in_use.load(Ordering::Relaxed);
        self.pool.peak.store(now, Ordering::Relaxed);
    }
    fn step_graph_begin(&self, owner: u64, stable: bool) -> Result<bool> {
        self.graph_step_begin(owner, stable)
    }
    fn step_graph_end(&self) -> Result<()> {
        self.graph_step_end()
    }
    fn step_graph_abort(&self, diverged: bool) -> bool {
        self.graph_step_abort(diverged)
    }
    fn step_graph_stats(&self) -> Option<GraphStats> {
        Some(self.graph_stats())
    }

    fn axpby(&self, a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
        elementwise::axpby(self, a, x, b, y)
    }
    fn scale(&self, x: &Tensor, s: f32) -> Result<Tensor> {
        elementwise::scale(self, x, s)
    }
    fn mul(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        elementwise::mul(self, x, y)
    }
    fn relu_fwd(&self, x: &Tensor) -> Result<Tensor> {
        elementwise::relu_fwd(self, x)
    }
    fn relu_bwd(&self, y: &Tensor, gy: &Tensor) -> Result<Tensor> {
        elementwise::relu_bwd(self, y, gy)
    }
    fn add_relu_fwd(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        elementwise::add_relu_fwd(self, a, b)
    }
    fn add_assign(&self, acc: &mut Tensor, x: &Tensor) -> Result<()> {
        elementwise::add_assign(self, acc, x)
    }
    fn sum_all(&self, x: &Tensor) -> Result<Tensor> {
        reduce::sum_all(self, x)
    }

    fn sum_rows(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        reduce::sum_rows(self, x, n)
    }
    fn global_avg_pool_fwd(&self, x: &Tensor) -> Result<Tensor> {
        reduce::global_avg_pool_fwd(self, x)
    }
    fn global_avg_pool_bwd(&self, gy: &Tensor, x_shape: &[usize]) -> Result<Tensor> {
        reduce::global_avg_pool_bwd(self, gy, x_shape)
    }

    fn matmul(&self, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
        gemm::matmul(self, a, b, trans_a, trans_b)
    }
    fn linear_fwd(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        gemm::linear_fwd(self, x, w, b)
    }

    fn conv2d_fwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        p: ConvParams,
    ) -> Result<Tensor> {
        conv::conv2d_fwd(self, x, w, b, p)
    }
    fn conv2d_bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        gy: &Tensor,
        p: ConvParams,
        need_x: bool,
        has_bias: bool,
    ) -> Result<ConvGrads> {
        conv::conv2d_bwd(self, x, w, gy, p, need_x, has_bias)
    }

    fn batch_norm_train_fwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<BnTrainOut> {
        norm::batch_norm_train_fwd(self, x, gamma, beta, eps)
    }
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_train_fwd_running(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
        running_mean: &mut Tensor,
        running_var: &mut Tensor,
        momentum: f32,
        act: BnAct<'_>,
    ) -> Result<BnTrainOut> {
        norm::batch_norm_train_fwd_running(
            self,
            x,
            gamma,
            beta,
            eps,
            (running_mean, running_var, momentum),
            act,
        )
    }
    fn batch_norm_train_bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        mean: &Tensor,
        invstd: &Tensor,
        gy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (gx, gg, gb, _) =
            norm::batch_norm_train_bwd(self, x, gamma, mean, invstd, gy, None, false)?;
        Ok((gx, gg, gb))
    }
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_train_relu_bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        mean: &Tensor,
        invstd: &Tensor,
        y: &Tensor,
        gy: &Tensor,
        keep_masked: bool,
    ) -> Result<(Tensor, Tensor, Tensor, Option<Tensor>)> {
        norm::batch_norm_train_bwd(self, x, gamma, mean, invstd, gy, Some(y), keep_masked)
    }
    fn batch_norm_eval_fwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        running_mean: &Tensor,
        running_var: &Tensor,
        eps: f32,
        act: BnAct<'_>,
    ) -> Result<Tensor> {
        let (rm, rv) = (running_mean, running_var);
        norm::batch_norm_eval_fwd(self, x, gamma, beta, rm, rv, eps, act)
    }
    fn batch_norm_eval_bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        running_mean: &Tensor,
        running_var: &Tensor,
        eps: f32,
        gy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        norm::batch_norm_eval_bwd(self, x, gamma, running_mean, running_var, eps, gy)
    }
    fn l2_normalize_fwd(&self, x: &Tensor) -> Result<Tensor> {
        norm::l2_normalize_fwd(self, x)
    }
    fn l2_normalize_bwd(&self, x: &Tensor, gy: &Tensor) -> Result<Tensor> {
        norm::l2_normalize_bwd(self, x, gy)
    }

    fn max_pool2d_fwd(&self, x: &Tensor, p: PoolParams) -> Result<Tensor> {
        pool::max_pool2d_fwd(self, x, p)
    }
    fn max_pool2d_bwd(&self, x: &Tensor, gy: &Tensor, p: PoolParams) -> Result<Tensor> {
        pool::max_pool2d_bwd(self, x, gy, p)
    }

    fn softmax_fwd(&self, x: &Tensor) -> Result<Tensor> {
        softmax_xent::softmax_fwd(self, x)
    }
    fn softmax_bwd(&self, y: &Tensor, gy: &Tensor) -> Result<Tensor> {
        softmax_xent::softmax_bwd(self, y, gy)
    }
    fn log_softmax_fwd(&self, x: &Tensor) -> Result<Tensor> {
        softmax_xent::log_softmax_fwd(self, x)
    }
    fn log_softmax_bwd(&self, y: &Tensor, gy: &Tensor) -> Result<Tensor> {
        softmax_xent::log_softmax_bwd(self, y, gy)
    }
    fn cross_entropy_fwd(&self, logits: &Tensor, labels: &[usize]) -> Result<Tensor> {
        softmax_xent::cross_entropy_fwd(self, logits, labels)
    }
    fn cross_entropy_bwd(&self, logits: &Tensor, labels: &[usize], g: &Tensor) -> Result<Tensor> {
        softmax_xent::cross_entropy_bwd(self, logits, labels, g)
    }

    fn entropy_weight(&self, logits: &Tensor) -> Result<Tensor> {
        ssl_losses::entropy_weight(self, logits)
    }
    fn weighted_consistency_fwd(&self, zs: &Tensor, zt: &Tensor, w: &Tensor) -> Result<Tensor> {
        ssl_losses::weighted_consistency_fwd(self, zs, zt, w)
    }
    fn weighted_consistency_bwd(
        &self,
        zs: &Tensor,
        zt: &Tensor,
        w: &Tensor,
        g: &Tensor,
    ) -> Result<Tensor> {
        ssl_losses::weighted_consistency_bwd(self, zs, zt, w, g)
    }
    fn argmax_rows(&self, z: &Tensor) -> Result<Tensor> {
        ssl_losses::argmax_rows(self, z)
    }
    fn pgc_loss_fwd(
        &self,
        q: &Tensor,
        q_labels: &Tensor,
        q_w: &Tensor,
        keys: &Tensor,
        k_labels: &Tensor,
        k_w: &Tensor,
        tau: f32,
    ) -> Result<Tensor> {
        ssl_losses::pgc_loss_fwd(self, q, q_labels, q_w, keys, k_labels, k_w, tau)
    }
    fn pgc_loss_bwd(
        &self,
        q: &Tensor,
        q_labels: &Tensor,
        q_w: &Tensor,
        keys: &Tensor,
        k_labels: &Tensor,
        k_w: &Tensor,
        tau: f32,
        g: &Tensor,
    ) -> Result<Tensor> {
        ssl_losses::pgc_loss_bwd(self, q, q_labels, q_w, keys, k_labels, k_w, tau, g)
    }
    fn concat_rows(&self, a: &Tensor, b: &Tensor, b_rows: usize) -> Result<Tensor> {
        ssl_losses::concat_rows(self, a, b, b_rows)
    }
    fn dsr_weights(&self, f: &DsrFactors<'_>) -> Result<(Tensor, Option<Tensor>)> {
        ssl_losses::dsr_weights(self, f)
    }
    fn ring_write_rows(&self, dst: &mut Tensor, src: &Tensor, start: usize) -> Result<()> {
        ssl_losses::ring_write_rows(self, dst, src, start)
    }
    fn dsr_alignment(
        &self,
        feat_lab: &Tensor,
        y_lab: &[usize],
        feat_unl: &Tensor,
        pseudo: &Tensor,
        fc_w: &Tensor,
        fc_b: &Tensor,
    ) -> Result<Tensor> {
        ssl_losses::dsr_alignment(self, feat_lab, y_lab, feat_unl, pseudo, fc_w, fc_b)
    }

    fn similarity_fusion_fwd(&self, low: &Tensor, high: &Tensor) -> Result<(Tensor, Tensor)> {
        fusion::similarity_fusion_fwd(self, low, high)
    }
    fn projected_fusion_fwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        high: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        if fusion::fusion_projected() {
            return fusion::projected_fusion_fwd(self, x, w, b, high);
        }
        crate::backend::projected_fusion_two_ops_fwd(self, x, w, b, high)
    }
    fn projected_fusion_bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        has_bias: bool,
        high: &Tensor,
        saved: &[Tensor],
        gy: &Tensor,
    ) -> Result<(ConvGrads, Tensor)> {
        // The forward's saved tensors say which form ran: [Sᵀ, M, Z] or [P̂, Sᵀ].
        if saved.len() == 3 {
            return fusion::projected_fusion_bwd(self, x, w, has_bias, high, saved, gy);
        }
        crate::backend::projected_fusion_two_ops_bwd(self, x, w, has_bias, high, saved, gy)
    }
    fn similarity_fusion_bwd(
        &self,
        low: &Tensor,
        high: &Tensor,
        st: &Tensor,
        gy: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        fusion::similarity_fusion_bwd(self, low, high, st, gy)
    }

    fn ema_update(&self, teacher: &mut Tensor, student: &Tensor, alpha: f32) -> Result<()> {
        optim::ema_update(self, teacher, student, alpha)
    }
    fn sgd_step(
        &self,
        param: &mut Tensor,
        grad: &Tensor,
        buf: &mut Tensor,
        p: SgdParams,
    ) -> Result<()> {
        optim::sgd_step(self, param, grad, buf, p)
    }
    fn adam_step(
        &self,
        param: &mut Tensor,
        grad: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        p: AdamParams,
    ) -> Result<()> {
        optim::adam_step(self, param, grad, m, v, p)
    }
    fn add_assign_multi(&self, pairs: &mut [(&mut Tensor, &Tensor)]) -> Result<()> {
        optim::add_assign_multi(self, pairs)
    }
    fn ema_update_multi(&self, pairs: &mut [(&mut Tensor, &Tensor)], alpha: f32) -> Result<()> {
        optim::ema_update_multi(self, pairs, alpha)
    }
    fn adam_step_multi(
        &self,
        slots: &mut [crate::backend::OptSlot<'_>],
        p: AdamParams,
    ) -> Result<()> {
        optim::adam_step_multi(self, slots, p)
    }
    fn sgd_step_multi(
        &self,
        slots: &mut [crate::backend::OptSlot<'_>],
        p: SgdParams,
    ) -> Result<()> {
        optim::sgd_step_multi(self, slots, p)
    }
}

#[cfg(test)]
mod tests {
    use super::pinned_reuse;

    /// A queued read reuses a page-locked buffer of exactly its length, never a larger one
    /// (cudarc's copy fills the destination's whole length).
    #[test]
    fn pinned_buffers_are_reused_at_their_exact_length() {
        let lens = [96usize, 40, 64, 40];
        assert_eq!(pinned_reuse(lens.iter().copied(), 40), Some(1));
        assert_eq!(pinned_reuse(lens.iter().copied(), 64), Some(2));
        assert_eq!(
            pinned_reuse(lens.iter().copied(), 50),
            None,
            "not the 64 or the 96"
        );
        assert_eq!(pinned_reuse(std::iter::empty(), 8), None);
    }
}
