//! Whole training steps replayed from a CUDA graph (`medssl train --cuda-graph`,
//! `medssl-bench step --cuda-graph`).
//!
//! A training step issues a few hundred small launches; at the model's small sizes the GPU then
//! waits on the host. A CUDA graph launches the whole step at once. The difficulty is that a
//! graph bakes in every launch argument, while a step's learning rate, Adam bias corrections,
//! loss ramps, queue slot and batch change from step to step. This module keeps the step's own
//! Rust code in charge and checks it against the graph every time:
//!
//! 1. **Warm** steps run eagerly while the step's temporaries come from a private arena (see
//!    [`Arena`]), until a step allocates nothing new (cuDNN's algorithm search, the optimiser's
//!    state and every buffer size have been seen).
//! 2. The **capture** step records every device work item in order (the real device captures
//!    its stream; the emulated device records the items), until the step's first read from the
//!    device, which ends the graph: the graph is instantiated, the step's uploads are copied,
//!    the graph is launched, and the read proceeds.
//! 3. Every later step is a **shadow** step: its Rust code runs as usual (the same shape checks,
//!    the same allocations from the arena, so the same addresses), but each work item is only
//!    compared with the recorded one at the same position. A kernel of ours whose arguments
//!    differ (learning rate, bias corrections, ramps, queue slot, the batch's input buffers) gets
//!    its graph node updated; any other difference (another kernel or launch geometry, a cuBLAS
//!    or cuDNN call with other arguments, a zero-fill elsewhere, or a buffer the arena did not
//!    have) is a *divergence*: nothing of the step has run, the caller restores its host state
//!    and runs the step eagerly, and the graph is captured anew.
//!    Uploads (batch labels, meta weights) are copied just before the graph launch, into arena
//!    buffers that are not reused within the step.
//!
//! Work issued after the step's first read runs eagerly in every mode, so a step that reads the
//! device midway (`--dsr-balance class|align`) replays the part before the read.
//!
//! State is per thread and device: one training loop per thread owns one graph. While a capture
//! is open, the other threads' device work waits (it would be captured otherwise), and a capture
//! begins only after the other threads' work in progress has been issued (see
//! [`CudaBackend::turn`]).
//!
//! Which steps can be captured at all is the caller's knowledge (`stable`): the DSRPGC step's
//! key set grows with the queue until the queue is full, so its shapes settle only then.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{sys, LaunchConfig};

use super::gemm::BlasCall;
use super::{cuda_err, emu, lock, Buf, CudaBackend, Pool, A};
pub use crate::backend::GraphStats;
use crate::error::{Error, Result};

/// Steps that must fill the arena without a new allocation before the capture.
const MAX_WARM: u64 = 8;
/// Divergences after which the graph is given up for the rest of the run.
const MAX_DIVERGENCES: u64 = 4;

// ---------------------------------------------------------------------------------------------
// The arena
// ---------------------------------------------------------------------------------------------

/// The step's private buffers. A step takes and returns buffers in the same order every time,
/// so per-size LIFO lists that start each step sorted by address hand out the same addresses
/// every step, which is what lets a recorded graph stand for the step. Uploads get buffers of
/// their own, used for nothing else in the step: all uploads land before the graph runs, so
/// their buffers must not be temporaries of any work before or after them.
pub(crate) struct Arena {
    pool: Arc<Pool>,
    inner: Mutex<ArenaInner>,
}

#[derive(Default)]
struct ArenaInner {
    free: HashMap<usize, Vec<(u64, Buf)>>,
    /// Upload buffers, free and (until the step ends) used.
    up_free: HashMap<usize, Vec<(u64, Buf)>>,
    up_held: Vec<(u64, Buf)>,
    /// Addresses of the upload buffers.
    up_addrs: std::collections::HashSet<u64>,
    /// Buffers handed out and not yet returned.
    out: usize,
    /// `out` when the step began (state created by earlier steps, e.g. the optimiser's, stays
    /// out for good).
    out_at_begin: usize,
    /// Requests this step that the arena could not serve.
    misses: usize,
    /// The graph is gone: buffers returned from now on go to the pool.
    dissolved: bool,
}

impl Arena {
    fn new(pool: Arc<Pool>) -> Arena {
        Arena {
            pool,
            inner: Mutex::new(ArenaInner::default()),
        }
    }

    fn inner(&self) -> MutexGuard<'_, ArenaInner> {
        lock(&self.inner)
    }

    /// A buffer of `len` f32 from the arena (`strict`: a miss is an error instead of a new
    /// allocation) with its address.
    pub(crate) fn take(&self, len: usize, strict: bool) -> Result<(Buf, u64)> {
        self.take_from(len, strict, false)
    }

    /// Like [`Arena::take`], a buffer for an upload (from the upload buffers).
    fn take_upload(&self, len: usize, strict: bool) -> Result<(Buf, u64)> {
        self.take_from(len, strict, true)
    }

    fn take_from(&self, len: usize, strict: bool, upload: bool) -> Result<(Buf, u64)> {
        let len = len.max(1);
        let mut g = self.inner();
        let list = if upload { &mut g.up_free } else { &mut g.free };
        if let Some((addr, mut b)) = list.get_mut(&len).and_then(|v| v.pop()) {
            g.out += 1;
            if let Buf::Emu(h) = &mut b {
                h.poison();
            }
            return Ok((b, addr));
        }
        g.misses += 1;
        if strict {
            return Err(diverged(format!(
                "the step asked for a {len}-element buffer the graph's arena does not have"
            )));
        }
        drop(g);
        let b = self.pool.take(len)?;
        let addr = self.pool.addr(&b);
        let mut g = self.inner();
        g.out += 1;
        if upload {
            g.up_addrs.insert(addr);
        }
        Ok((b, addr))
    }

    /// Returns a buffer taken from this arena.
    pub(crate) fn give(&self, b: Buf, addr: u64) {
        let mut g = self.inner();
        g.out = g.out.saturating_sub(1);
        if g.dissolved {
            drop(g);
            self.pool.give(b);
        } else if g.up_addrs.contains(&addr) {
            g.up_held.push((addr, b));
        } else {
            g.free.entry(b.len()).or_default().push((addr, b));
        }
    }

    /// Starts a step: held buffers back, every list sorted (lowest address handed out first),
    /// counters cleared.
    fn begin_step(&self) {
        let mut g = self.inner();
        let held = std::mem::take(&mut g.up_held);
        for (a, b) in held {
            g.up_free.entry(b.len()).or_default().push((a, b));
        }
        let g = &mut *g;
        for v in g.free.values_mut().chain(g.up_free.values_mut()) {
            v.sort_by_key(|(a, _)| std::cmp::Reverse(*a));
        }
        g.misses = 0;
        g.out_at_begin = g.out;
    }

    /// `(buffers the step took and kept, misses)`.
    fn step_counts(&self) -> (isize, usize) {
        let g = self.inner();
        (g.out as isize - g.out_at_begin as isize, g.misses)
    }

    /// Gives every buffer back to the pool; buffers still out follow when dropped.
    fn dissolve(&self) {
        let mut g = self.inner();
        g.dissolved = true;
        let mut all: Vec<Buf> = g
            .free
            .drain()
            .flat_map(|(_, v)| v)
            .map(|(_, b)| b)
            .collect();
        all.extend(g.up_free.drain().flat_map(|(_, v)| v).map(|(_, b)| b));
        all.extend(g.up_held.drain(..).map(|(_, b)| b));
        drop(g);
        for b in all {
            self.pool.give(b);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Recorded work
// ---------------------------------------------------------------------------------------------

/// One work item of the step, as issued.
enum Rec {
    Kernel {
        name: &'static str,
        cfg: LaunchConfig,
        args: Vec<A>,
        table: Option<Vec<u8>>,
        /// The captured graph node (real device).
        node: sys::CUgraphNode,
    },
    /// A cuBLAS or cuDNN call, by its full argument list (`blas` for the emulated replay).
    Lib {
        what: &'static str,
        sig: Vec<u64>,
        blas: Option<BlasCall>,
    },
    Memset {
        ptr: u64,
        len: usize,
    },
}

impl Rec {
    fn describe(&self) -> String {
        match self {
            Rec::Kernel { name, cfg, .. } => format!(
                "kernel {name} (grid {:?}, block {:?})",
                cfg.grid_dim, cfg.block_dim
            ),
            Rec::Lib { what, .. } => (*what).to_string(),
            Rec::Memset { len, .. } => format!("zero-fill of {len} elements"),
        }
    }
}

fn same_arg(a: &A, b: &A) -> bool {
    match (a, b) {
        (A::P(x), A::P(y)) => x == y,
        (A::I(x), A::I(y)) => x == y,
        (A::F(x), A::F(y)) => x.to_bits() == y.to_bits(),
        _ => false,
    }
}

fn same_cfg(a: &LaunchConfig, b: &LaunchConfig) -> bool {
    a.grid_dim == b.grid_dim
        && a.block_dim == b.block_dim
        && a.shared_mem_bytes == b.shared_mem_bytes
}

/// The error a shadow step returns when it does not match the graph.
fn diverged(what: String) -> Error {
    Error::GraphDiverged(what)
}

// ---------------------------------------------------------------------------------------------
// Per-thread state
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Eager steps from the arena; the count of them so far.
    Warming(u64),
    /// The next step captures.
    Capture,
    /// A graph is ready: steps shadow it.
    Ready,
    /// Given up for this run (eager steps, no arena).
    Disabled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Warm,
    Capture,
    Shadow,
}

struct Active {
    mode: Mode,
    /// Next recorded item to compare (shadow steps).
    pos: usize,
    /// Uploads of the step, copied just before the graph launch.
    uploads: Vec<(u64, Vec<f32>)>,
    /// Recorded kernels whose arguments changed in this step.
    patched: Vec<usize>,
    /// The graph has been launched; later work runs eagerly.
    ended: bool,
    /// When the step began (for [`GraphStats::shadow_host_ns`]).
    started: std::time::Instant,
}

struct StepGraph {
    owner: u64,
    phase: Phase,
    arena: Option<Arc<Arena>>,
    recs: Vec<Rec>,
    exec: Option<cudarc::driver::CudaGraph>,
    active: Option<Active>,
    stats: GraphStats,
}

impl StepGraph {
    fn new(owner: u64) -> StepGraph {
        StepGraph {
            owner,
            phase: Phase::Warming(0),
            arena: None,
            recs: Vec::new(),
            exec: None,
            active: None,
            stats: GraphStats::default(),
        }
    }

    /// Drops the graph and its arena; the next step starts warming again.
    fn discard(&mut self) {
        self.recs.clear();
        self.exec = None;
        self.active = None;
        if let Some(a) = self.arena.take() {
            a.dissolve();
        }
        self.stats.nodes = 0;
    }
}

thread_local! {
    static GRAPHS: RefCell<HashMap<usize, StepGraph>> = RefCell::new(HashMap::new());
    /// The backends this thread holds a turn on (see [`CudaBackend::turn`]), with how deeply
    /// the turns nest.
    static TURNS: RefCell<Vec<(usize, usize)>> = const { RefCell::new(Vec::new()) };
    /// The stream claims this thread holds (see [`CudaBackend::claim_stream`]).
    static CLAIMS: Claims = const { Claims(RefCell::new(Vec::new())) };
}

/// A thread's stream claims: each backend's claim word and the thread's key in it. A thread that
/// ends while it holds a claim (a panic during a capture) releases it as it ends, so that other
/// threads' device work does not wait for it forever.
struct Claims(RefCell<Vec<(Arc<AtomicU64>, u64)>>);

impl Drop for Claims {
    fn drop(&mut self) {
        for (word, key) in self.0.borrow().iter() {
            let _ = word.compare_exchange(*key, 0, Ordering::SeqCst, Ordering::SeqCst);
        }
    }
}

fn with<T>(ordinal: usize, f: impl FnOnce(Option<&mut StepGraph>) -> T) -> T {
    GRAPHS.with(|g| f(g.borrow_mut().get_mut(&ordinal)))
}

/// What the backend does with a work item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hook {
    /// Issue it as usual (no graph step, a warm step, or after the graph's end).
    Eager,
    /// Issue it on the capturing stream (real device, capture step), then call
    /// [`CudaBackend::graph_node_captured`] for a kernel.
    Capture,
    /// Recorded or matched: do not issue it.
    Skip,
}

/// The arena of the step running on this thread, if any (`strict` in shadow and capture
/// steps, where a new allocation would break the graph).
pub(crate) fn step_arena(ordinal: usize) -> Option<(Arc<Arena>, bool)> {
    with(ordinal, |g| {
        let g = g?;
        let a = g.active.as_ref()?;
        if a.ended && a.mode != Mode::Warm {
            // Temporaries after the graph's end are ordinary eager work.
            return None;
        }
        Some((g.arena.clone()?, a.mode != Mode::Warm))
    })
}

impl CudaBackend {
    /// Whether this thread's training loop replays (or tries to replay) its steps from CUDA
    /// graphs on this device: it has begun a step in graph mode ([`CudaBackend::graph_step_begin`],
    /// captured or not, which creates the thread's graph state). What `MEDSSL_CUDNN_ALGO=time`
    /// ranks its candidates by (see `conv::CallTime::cost`).
    pub(crate) fn graph_steps_requested(&self) -> bool {
        with(self.ordinal, |g| g.is_some())
    }

    /// Starts a training step of the graph owned by `owner` (one per training loop). `stable`:
    /// the step has the shapes of the steps that follow (false while the key queue fills up);
    /// an unstable step runs eagerly and drops any graph. Returns whether the step runs under
    /// the graph (warm, capture or shadow step); `false`: an ordinary eager step, with nothing
    /// to end or abandon.
    pub fn graph_step_begin(&self, owner: u64, stable: bool) -> Result<bool> {
        let turn = self.turn();
        let ordinal = self.ordinal;
        let pool = self.pool.clone();
        let mut begin_capture = false;
        let mut stale = false;
        let active = GRAPHS.with(|all| -> Result<bool> {
            let mut all = all.borrow_mut();
            let g = all.entry(ordinal).or_insert_with(|| StepGraph::new(owner));
            if g.owner != owner {
                // Another training loop: a fresh graph (the counters run on, per thread).
                g.discard();
                let stats = g.stats;
                *g = StepGraph::new(owner);
                g.stats = stats;
            }
            if g.active.is_some() {
                // The previous step neither ended nor was abandoned (it panicked): drop its
                // graph below.
                stale = true;
                return Ok(false);
            }
            if !stable {
                if g.phase != Phase::Disabled {
                    g.discard();
                    g.phase = Phase::Warming(0);
                }
                return Ok(false);
            }
            let mode = match g.phase {
                Phase::Disabled => return Ok(false),
                Phase::Warming(_) => Mode::Warm,
                Phase::Capture => Mode::Capture,
                Phase::Ready => Mode::Shadow,
            };
            let arena = match &g.arena {
                Some(a) => a.clone(),
                None => {
                    // The step's working set moves to the new arena: the pool's cached buffers
                    // (from the eager steps before) would only sit beside it.
                    pool.trim();
                    let a = Arc::new(Arena::new(pool));
                    g.arena = Some(a.clone());
                    a
                }
            };
            arena.begin_step();
            if mode == Mode::Capture {
                g.recs.clear();
                g.exec = None;
                begin_capture = true;
            }
            g.active = Some(Active {
                mode,
                pos: 0,
                uploads: Vec::new(),
                patched: Vec::new(),
                ended: false,
                started: std::time::Instant::now(),
            });
            Ok(true)
        })?;
        if stale {
            self.graph_step_abort(false);
            return Err(Error::Cuda(
                "a graph step began before the previous one ended; its graph is dropped".into(),
            ));
        }
        drop(turn);
        if begin_capture {
            // The stream is this thread's until the capture ends (one capture at a time; other
            // threads' work waits meanwhile). The emulated device records instead of capturing,
            // but claims the stream all the same, so that the handshake runs in its tests.
            self.claim_stream();
            if let Some(d) = &self.drv {
                let r = d
                    .stream
                    .synchronize()
                    .map_err(cuda_err("synchronising before the step graph's capture"))
                    .and_then(|()| {
                        d.stream
                            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                            .map_err(cuda_err("beginning the step graph's capture"))
                    });
                if let Err(e) = r {
                    // Nothing was captured: release the stream before the abort, which would
                    // otherwise end a capture that never began.
                    self.release_stream();
                    self.graph_step_abort(false);
                    return Err(e);
                }
            }
        }
        Ok(active)
    }

    /// Ends a training step begun with [`CudaBackend::graph_step_begin`] (after its final read):
    /// launches the graph if the step did not read the device, and moves the phase on.
    pub fn graph_step_end(&self) -> Result<()> {
        // A step that never read the device still has its graph to run.
        let _turn = self.graph_before_read()?;
        with(self.ordinal, |g| -> Result<()> {
            let Some(g) = g else { return Ok(()) };
            let Some(a) = g.active.take() else {
                return Ok(());
            };
            let (out, misses) = g.arena.as_ref().map_or((0, 0), |a| a.step_counts());
            if std::env::var_os("MEDSSL_CUDA_GRAPH_LOG").is_some() {
                eprintln!(
                    "cuda graph: {:?} step ended ({} items recorded, {misses} new buffers, {out} kept)",
                    a.mode,
                    g.recs.len()
                );
            }
            match a.mode {
                Mode::Warm => {
                    g.stats.warm_steps += 1;
                    let n = match g.phase {
                        Phase::Warming(n) => n + 1,
                        _ => 1,
                    };
                    g.phase = if misses == 0 && out == 0 {
                        Phase::Capture
                    } else if n >= MAX_WARM {
                        eprintln!(
                            "cuda graph: the step still allocates new buffers after {n} steps \
                             ({misses} this step, {out} kept past its end); running eagerly"
                        );
                        g.discard();
                        Phase::Disabled
                    } else {
                        Phase::Warming(n)
                    };
                }
                Mode::Capture | Mode::Shadow => {
                    if out != 0 {
                        // A buffer outlives the step: the next step cannot get the same
                        // addresses. Capture again once it is back.
                        g.discard();
                        g.phase = Phase::Warming(0);
                    } else {
                        g.phase = Phase::Ready;
                    }
                }
            }
            Ok(())
        })
    }

    /// Abandons the current step after an error (`diverged`: the step did not match the graph):
    /// ends an open capture, drops the graph and its arena. Returns whether none of the step's
    /// device work was issued (a capture or shadow step before its graph launch), so that the
    /// caller may run the step again eagerly. A capture that failed otherwise than by diverging
    /// (e.g. a library call that cannot be captured), or `MAX_DIVERGENCES` divergences, turn
    /// the graphs off for the rest of the run.
    pub fn graph_step_abort(&self, diverged: bool) -> bool {
        let _turn = self.turn();
        let (was_capture, unrun) = with(self.ordinal, |g| {
            g.and_then(|g| g.active.as_ref())
                .map_or((false, false), |a| {
                    (
                        a.mode == Mode::Capture && !a.ended,
                        a.mode != Mode::Warm && !a.ended,
                    )
                })
        });
        // Only this thread's capture is ended (the stream is this thread's while it captures).
        if was_capture && self.release_stream() {
            if let Some(d) = &self.drv {
                // The partial graph is discarded; an invalidated capture reports an error here,
                // which changes nothing.
                let _ = d.stream.end_capture(sys::CUgraphInstantiate_flags(0));
            }
        }
        with(self.ordinal, |g| {
            if let Some(g) = g {
                g.discard();
                if diverged {
                    g.stats.divergences += 1;
                }
                g.phase = if g.stats.divergences >= MAX_DIVERGENCES || (was_capture && !diverged) {
                    Phase::Disabled
                } else {
                    Phase::Warming(0)
                };
            }
        });
        unrun
    }

    /// The calling thread's graph counters on this device.
    pub fn graph_stats(&self) -> GraphStats {
        with(self.ordinal, |g| g.map(|g| g.stats).unwrap_or_default())
    }

    /// The common path of every work item before it is issued: eager outside a capture or
    /// shadow step (and after its graph launch); in a capture step `new()` is recorded; in a
    /// shadow step `check` compares the item with the recorded one at the same position (none
    /// past the end) and says whether it updated that record (its node is then updated before
    /// the launch).
    fn graph_item(
        &self,
        new: impl FnOnce() -> Rec,
        check: impl FnOnce(usize, Option<&mut Rec>) -> Result<bool>,
    ) -> Result<Hook> {
        let _turn = self.turn();
        let emulated = self.is_emulated();
        with(self.ordinal, |g| {
            let Some(g) = g else { return Ok(Hook::Eager) };
            let Some(a) = g.active.as_mut() else {
                return Ok(Hook::Eager);
            };
            if a.ended || a.mode == Mode::Warm {
                return Ok(Hook::Eager);
            }
            if a.mode == Mode::Capture {
                g.recs.push(new());
                return Ok(if emulated { Hook::Skip } else { Hook::Capture });
            }
            let i = a.pos;
            a.pos += 1;
            if check(i, g.recs.get_mut(i))? && !a.patched.contains(&i) {
                a.patched.push(i);
            }
            Ok(Hook::Skip)
        })
    }

    /// Called for every kernel launch before it is issued.
    pub(crate) fn graph_kernel(
        &self,
        name: &'static str,
        cfg: &LaunchConfig,
        args: &[A],
        table: Option<&[u8]>,
    ) -> Result<Hook> {
        let new = || Rec::Kernel {
            name,
            cfg: *cfg,
            args: args.to_vec(),
            table: table.map(<[u8]>::to_vec),
            node: std::ptr::null_mut(),
        };
        self.graph_item(new, |i, rec| {
            let Some(Rec::Kernel {
                name: rn,
                cfg: rc,
                args: ra,
                table: rt,
                ..
            }) = rec
            else {
                return Err(diverged(format!(
                    "item {i}: the step launches kernel {name}, the graph has {}",
                    rec.map_or("nothing more".into(), |r| r.describe())
                )));
            };
            if *rn != name || !same_cfg(rc, cfg) || ra.len() != args.len() {
                return Err(diverged(format!(
                    "item {i}: the step launches kernel {name} (grid {:?}, block {:?}), the graph \
                     has {rn} (grid {:?}, block {:?})",
                    cfg.grid_dim, cfg.block_dim, rc.grid_dim, rc.block_dim
                )));
            }
            // Any argument of one of our kernels may change (the node is updated): the graph
            // runs the step's items in the step's order with the step's arguments, which is
            // what running them eagerly does. Kinds must match.
            let mut changed = rt.as_deref() != table;
            for (k, (x, y)) in ra.iter().zip(args).enumerate() {
                if same_arg(x, y) {
                    continue;
                }
                if std::mem::discriminant(x) != std::mem::discriminant(y) {
                    return Err(diverged(format!(
                        "item {i}: kernel {name} argument {k} is {y:?}, the graph has {x:?}"
                    )));
                }
                changed = true;
            }
            if rt.as_ref().map(Vec::len) != table.map(<[u8]>::len) {
                return Err(diverged(format!(
                    "item {i}: kernel {name}'s table parameter differs in size"
                )));
            }
            if changed {
                *ra = args.to_vec();
                *rt = table.map(<[u8]>::to_vec);
            }
            Ok(changed)
        })
    }

    /// After a kernel was issued under [`Hook::Capture`]: remembers its graph node (the capture's
    /// current dependency), so that its arguments can be updated later.
    pub(crate) fn graph_node_captured(&self) -> Result<()> {
        let d = self.drv.as_ref().expect("real device");
        let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        let mut id: sys::cuuint64_t = 0;
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        let mut deps: *const sys::CUgraphNode = std::ptr::null();
        let mut edges: *const sys::CUgraphEdgeData = std::ptr::null();
        let mut n: usize = 0;
        // SAFETY: valid stream; out-pointers are locals.
        unsafe {
            sys::cuStreamGetCaptureInfo_v3(
                d.stream.cu_stream(),
                &mut status,
                &mut id,
                &mut graph,
                &mut deps,
                &mut edges,
                &mut n,
            )
        }
        .result()
        .map_err(cuda_err("reading the step graph's capture state"))?;
        if status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE || n != 1 {
            return Err(Error::Cuda(format!(
                "the step graph's capture is {status:?} with {n} open nodes after a launch"
            )));
        }
        // SAFETY: the driver returned one node.
        let node = unsafe { *deps };
        with(self.ordinal, |g| {
            if let Some(Rec::Kernel { node: slot, .. }) = g.and_then(|g| g.recs.last_mut()) {
                *slot = node;
            }
        });
        Ok(())
    }

    /// Called for every cuBLAS / cuDNN call before it is issued; `sig` is its whole argument
    /// list (pointers, sizes, algorithm, scalars as bits), `blas` the product for the emulated
    /// replay. Only an identical call matches (library nodes are not updated).
    pub(crate) fn graph_lib(
        &self,
        what: &'static str,
        sig: Vec<u64>,
        blas: Option<BlasCall>,
    ) -> Result<Hook> {
        let new = || Rec::Lib {
            what,
            sig: sig.clone(),
            blas,
        };
        self.graph_item(new, |i, rec| match rec {
            Some(Rec::Lib {
                what: w, sig: s, ..
            }) if *w == what && *s == sig => Ok(false),
            other => Err(diverged(format!(
                "item {i}: the step calls {what} {sig:?}, the graph has {}",
                other.map_or("nothing more".into(), |r| match r {
                    Rec::Lib { what, sig, .. } => format!("{what} {sig:?}"),
                    r => r.describe(),
                })
            ))),
        })
    }

    /// Called for a zero-fill before it is issued (only the same fill matches).
    pub(crate) fn graph_memset(&self, ptr: u64, len: usize) -> Result<Hook> {
        self.graph_item(
            || Rec::Memset { ptr, len },
            |i, rec| match rec {
                Some(Rec::Memset { ptr: p, len: l }) if *p == ptr && *l == len => Ok(false),
                other => Err(diverged(format!(
                    "item {i}: the step zero-fills {len} elements at {ptr:#x}, the graph has {}",
                    other.map_or("nothing more".into(), |r| r.describe())
                ))),
            },
        )
    }

    /// Called for a host-to-device copy into the fresh buffer `s` (not yet seen by any work):
    /// inside a step its buffer is exchanged for an upload buffer of the arena (warm steps too,
    /// so that they use buffers as the graph steps do), and in capture and shadow steps the copy
    /// waits until just before the graph launch.
    pub(crate) fn graph_upload(&self, s: &mut super::CudaStorage, data: &[f32]) -> Result<Hook> {
        let _turn = self.turn();
        let Some((arena, strict)) = step_arena(self.ordinal) else {
            return Ok(Hook::Eager);
        };
        let (b, addr) = arena.take_upload(s.len, strict)?;
        s.replace_buffer(b, arena, addr);
        with(self.ordinal, |g| {
            let Some(a) = g.and_then(|g| g.active.as_mut()) else {
                return Ok(Hook::Eager);
            };
            if a.mode == Mode::Warm || a.ended {
                return Ok(Hook::Eager);
            }
            a.uploads.push((addr, data.to_vec()));
            Ok(Hook::Skip)
        })
    }

    /// Called before a device-to-host copy or a synchronisation: the step's graph (if one is
    /// open) must have run first. Returns the turn under which the caller issues the read.
    pub(crate) fn graph_before_read(&self) -> Result<Turn<'_>> {
        let turn = self.turn();
        let open = with(self.ordinal, |g| {
            g.and_then(|g| g.active.as_ref())
                .is_some_and(|a| a.mode != Mode::Warm && !a.ended)
        });
        if open {
            self.graph_region_end()?;
        }
        Ok(turn)
    }

    /// Ends the graph part of the step: instantiates a capture, or checks a shadow step against
    /// the graph and updates the changed nodes; then copies the step's uploads and launches.
    fn graph_region_end(&self) -> Result<()> {
        let ordinal = self.ordinal;
        // Taken out of the thread-local state while the driver runs (no borrow across calls).
        let (mode, uploads, patched, mut recs, exec, started) = with(ordinal, |g| -> Result<_> {
            let g = g.expect("open step");
            let a = g.active.as_mut().expect("open step");
            if a.mode == Mode::Shadow && a.pos != g.recs.len() {
                return Err(diverged(format!(
                    "the step read the device after {} work items, the graph has {}",
                    a.pos,
                    g.recs.len()
                )));
            }
            a.ended = true;
            Ok((
                a.mode,
                std::mem::take(&mut a.uploads),
                std::mem::take(&mut a.patched),
                std::mem::take(&mut g.recs),
                g.exec.take(),
                a.started,
            ))
        })?;
        let host = started.elapsed();
        let r = self.run_region(mode, &uploads, &patched, &mut recs, exec);
        if mode == Mode::Capture {
            // The capture is over (the real device released the stream as it ended it).
            self.release_stream();
        }
        let (exec, r, launched) = match r {
            Ok(e) => (e, Ok(()), true),
            Err((e, launched)) => (None, Err(e), launched),
        };
        with(ordinal, |g| {
            let g = g.expect("open step");
            if !launched {
                // Nothing of the step ran (instantiation, a node update or the launch itself
                // failed): the caller may run it again without the graph.
                if let Some(a) = g.active.as_mut() {
                    a.ended = false;
                }
            }
            g.stats.nodes = recs.len() as u64;
            g.recs = recs;
            g.exec = exec;
            if r.is_ok() {
                g.stats.replays += 1;
                g.stats.node_updates += patched.len() as u64;
                if mode == Mode::Capture {
                    g.stats.captures += 1;
                }
                if mode == Mode::Shadow {
                    g.stats.shadow_steps += 1;
                    g.stats.shadow_host_ns += u64::try_from(host.as_nanos()).unwrap_or(u64::MAX);
                }
            }
        });
        r
    }

    fn run_region(
        &self,
        mode: Mode,
        uploads: &[(u64, Vec<f32>)],
        patched: &[usize],
        recs: &mut [Rec],
        exec: Option<cudarc::driver::CudaGraph>,
    ) -> std::result::Result<Option<cudarc::driver::CudaGraph>, (Error, bool)> {
        // Errors carry whether any of the step's work may have run.
        let before = |e: Error| (e, false);
        let Some(d) = &self.drv else {
            // The emulated device: copy the uploads, then run the recorded items in order.
            for (p, data) in uploads {
                emu::write_at(*p, data).map_err(before)?;
            }
            self.count("cuda_graph_launch");
            for _ in patched {
                self.count("cuda_graph_node_update");
            }
            for r in recs.iter() {
                match r {
                    Rec::Kernel {
                        name,
                        cfg,
                        args,
                        table,
                        ..
                    } => {
                        let t = table
                            .as_ref()
                            .map(|t| (t.as_ptr().cast::<std::ffi::c_void>(), t.len()));
                        emu::launch(name, cfg, args, t).map_err(|e| (e, true))?;
                    }
                    Rec::Lib { what, blas, .. } => {
                        let call = blas.as_ref().ok_or_else(|| {
                            let e = format!("{what} cannot be replayed on the emulated device");
                            (Error::Cuda(e), true)
                        })?;
                        emu::cublas_sgemm(call)
                            .map_err(|e| (Error::Cuda(format!("{what}: {e}")), true))?;
                    }
                    Rec::Memset { ptr, len } => {
                        emu::write_at(*ptr, &vec![0.0; *len]).map_err(|e| (e, true))?
                    }
                }
            }
            return Ok(None);
        };
        let exec = match mode {
            Mode::Capture => {
                let g = d.stream.end_capture(sys::CUgraphInstantiate_flags(0));
                // The stream is no longer capturing (even when the capture failed): other
                // threads may go on.
                self.release_stream();
                let g = g
                    .map_err(cuda_err("ending the step graph's capture"))
                    .map_err(before)?
                    .ok_or_else(|| {
                        before(Error::Cuda("the step graph's capture is empty".into()))
                    })?;
                Some(g)
            }
            _ => exec,
        };
        let exec = exec.ok_or_else(|| before(Error::Cuda("no step graph to launch".into())))?;
        for &i in patched {
            if let Rec::Kernel {
                args,
                table,
                node,
                name,
                ..
            } = &recs[i]
            {
                set_kernel_args(exec.cu_graph_exec(), *node, args, table.as_deref()).map_err(
                    |e| {
                        before(Error::Cuda(format!(
                            "updating the graph node of {name}: {e}"
                        )))
                    },
                )?;
                self.count("cuda_graph_node_update");
            }
        }
        d.ctx
            .bind_to_thread()
            .map_err(cuda_err("binding the CUDA context"))
            .map_err(before)?;
        for (p, data) in uploads {
            // SAFETY: `p` is an arena buffer of at least `data.len()` f32 (the upload's own
            // buffer), pinned for the step; the copy is ordered before the graph on the stream.
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    *p,
                    data.as_ptr().cast(),
                    std::mem::size_of_val(data.as_slice()),
                    d.stream.cu_stream(),
                )
            }
            .result()
            .map_err(cuda_err("copying the step's uploads"))
            .map_err(before)?;
        }
        self.count("cuda_graph_launch");
        // A failed launch runs nothing of the graph.
        exec.launch()
            .map_err(cuda_err("launching the step graph"))
            .map_err(before)?;
        Ok(Some(exec))
    }

    /// This thread's turn to issue device work on the stream (launches, library calls, copies,
    /// reads, allocations and frees), held until the returned guard drops. A thread other than
    /// the one capturing a step graph waits here until the capture has ended (its work would be
    /// captured into the other thread's graph, or break the capture, otherwise); and a capture
    /// begins only once every turn of another thread has ended ([`CudaBackend::claim_stream`]).
    /// Turns nest: a thread that holds one already gets the next at once. A turn is taken before
    /// any lock that a capturing thread may also take (a thread that waits here must hold none).
    ///
    /// The handshake: a turn counts itself in `in_flight` and then looks at `capture_thread`;
    /// a capture sets `capture_thread` and then waits for `in_flight` to drain. Both are
    /// sequentially consistent, so of a turn and a claim racing, at least one sees the other:
    /// the turn backs off (uncounts, waits for the capture to end, tries again) or the claim
    /// waits for the turn to end.
    pub(crate) fn turn(&self) -> Turn<'_> {
        let key = self.turn_key();
        let nested = TURNS.with(|t| {
            let mut t = t.borrow_mut();
            let held = t.iter_mut().find(|e| e.0 == key);
            held.map(|e| e.1 += 1).is_some()
        });
        if !nested {
            let me = thread_key();
            loop {
                self.in_flight.fetch_add(1, Ordering::SeqCst);
                let c = self.capture_thread.load(Ordering::SeqCst);
                if c == 0 || c == me {
                    break;
                }
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                while self.capture_thread.load(Ordering::SeqCst) != 0 {
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
            }
            TURNS.with(|t| t.borrow_mut().push((key, 1)));
        }
        Turn { be: self }
    }

    /// Identifies this backend in a thread's list of turns.
    fn turn_key(&self) -> usize {
        self as *const CudaBackend as usize
    }

    /// Gives this thread the stream to itself, for a capture: waits until no other thread
    /// captures, claims the stream (new turns of other threads then wait), and waits until the
    /// other threads' turns have ended. Released by [`CudaBackend::release_stream`].
    fn claim_stream(&self) {
        let me = thread_key();
        while self
            .capture_thread
            .compare_exchange(0, me, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        CLAIMS.with(|c| c.0.borrow_mut().push((self.capture_thread.clone(), me)));
        // This thread's own turn, if it holds one, is counted once in `in_flight`.
        let key = self.turn_key();
        let own = TURNS.with(|t| t.borrow().iter().any(|e| e.0 == key)) as usize;
        while self.in_flight.load(Ordering::SeqCst) > own {
            std::thread::yield_now();
        }
    }

    /// Ends this thread's claim of the stream (false: it had none).
    fn release_stream(&self) -> bool {
        CLAIMS.with(|c| {
            c.0.borrow_mut()
                .retain(|(word, _)| !Arc::ptr_eq(word, &self.capture_thread))
        });
        self.capture_thread
            .compare_exchange(thread_key(), 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

/// A host thread's turn to issue device work ([`CudaBackend::turn`]); ends when dropped.
pub(crate) struct Turn<'a> {
    be: &'a CudaBackend,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let key = self.be.turn_key();
        let last = TURNS.with(|t| {
            let mut t = t.borrow_mut();
            let Some(i) = t.iter().position(|e| e.0 == key) else {
                return false;
            };
            t[i].1 -= 1;
            let last = t[i].1 == 0;
            if last {
                t.swap_remove(i);
            }
            last
        });
        if last {
            self.be.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A number for the calling thread, unique in the process and never 0.
pub(crate) fn thread_key() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static KEY: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    KEY.with(|k| *k)
}

/// Replaces the argument values of a kernel node of an instantiated graph.
fn set_kernel_args(
    exec: sys::CUgraphExec,
    node: sys::CUgraphNode,
    args: &[A],
    table: Option<&[u8]>,
) -> std::result::Result<(), String> {
    if node.is_null() {
        return Err("the node was not recorded during the capture".into());
    }
    let mut vals: Vec<u64> = args.iter().map(A::slot).collect();
    let mut ptrs: Vec<*mut std::ffi::c_void> = vals
        .iter_mut()
        .map(|v| (v as *mut u64).cast::<std::ffi::c_void>())
        .collect();
    let mut tbl = table.map(<[u8]>::to_vec);
    if let Some(t) = tbl.as_mut() {
        ptrs.push(t.as_mut_ptr().cast());
    }
    // SAFETY: `node` is a kernel node of the graph `exec` was instantiated from; the parameter
    // array points at values laid out as the kernel's parameters (4-byte scalars read from the
    // low bytes of each 8-byte slot, little-endian, as the emulation does), alive during the call.
    unsafe {
        let mut p: sys::CUDA_KERNEL_NODE_PARAMS = std::mem::zeroed();
        sys::cuGraphKernelNodeGetParams_v2(node, &mut p)
            .result()
            .map_err(|e| format!("{e:?}"))?;
        p.kernelParams = ptrs.as_mut_ptr();
        p.extra = std::ptr::null_mut();
        sys::cuGraphExecKernelNodeSetParams_v2(exec, node, &p)
            .result()
            .map_err(|e| format!("{e:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn in_flight(be: &CudaBackend) -> usize {
        be.in_flight.load(Ordering::SeqCst)
    }

    #[test]
    fn turns_nest_and_count_their_thread_once() {
        let be = CudaBackend::create_emulated(0);
        {
            let _outer = be.turn();
            assert_eq!(in_flight(&be), 1);
            {
                let _inner = be.turn();
                assert_eq!(in_flight(&be), 1, "a nested turn is not counted again");
            }
            assert_eq!(in_flight(&be), 1, "the outer turn is still held");
        }
        assert_eq!(in_flight(&be), 0);
    }

    #[test]
    fn a_claimed_stream_holds_other_threads_off_until_released() {
        let be = CudaBackend::create_emulated(0);
        be.claim_stream();
        {
            // The capturing thread's own work goes on.
            let _own = be.turn();
            assert_eq!(in_flight(&be), 1);
        }
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            let be = &be;
            s.spawn(move || {
                assert!(!be.release_stream(), "only the claiming thread releases");
                let _t = be.turn();
                tx.send(()).unwrap();
            });
            assert!(
                rx.recv_timeout(Duration::from_millis(150)).is_err(),
                "another thread issued work while the stream was claimed"
            );
            assert!(be.release_stream());
            rx.recv_timeout(Duration::from_secs(20))
                .expect("the other thread goes on after the release");
        });
        assert_eq!(in_flight(&be), 0);
    }

    #[test]
    fn a_thread_that_ends_with_a_claim_releases_it() {
        let be = CudaBackend::create_emulated(0);
        std::thread::scope(|s| {
            let be = &be;
            let r = s.spawn(move || {
                be.claim_stream();
                panic!("a capture step failed");
            });
            assert!(r.join().is_err());
        });
        assert_eq!(be.capture_thread.load(Ordering::SeqCst), 0);
        // This thread's work goes on at once.
        let _t = be.turn();
    }

    #[test]
    fn a_claim_waits_until_other_threads_turns_end() {
        let be = CudaBackend::create_emulated(0);
        let (held_tx, held_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (claimed_tx, claimed_rx) = mpsc::channel();
        std::thread::scope(|s| {
            let be = &be;
            s.spawn(move || {
                let _t = be.turn();
                held_tx.send(()).unwrap();
                // Bounded, so that a failing check below ends the test instead of hanging it.
                let _ = go_rx.recv_timeout(Duration::from_secs(20));
            });
            held_rx.recv().unwrap();
            s.spawn(move || {
                be.claim_stream();
                claimed_tx.send(()).unwrap();
                assert!(be.release_stream());
            });
            assert!(
                claimed_rx.recv_timeout(Duration::from_millis(150)).is_err(),
                "a capture began while another thread was issuing work"
            );
            go_tx.send(()).unwrap();
            claimed_rx
                .recv_timeout(Duration::from_secs(20))
                .expect("the claim goes through once the other turn has ended");
        });
        assert_eq!(in_flight(&be), 0);
        assert_eq!(be.capture_thread.load(Ordering::SeqCst), 0);
    }

    /// The timing hold keeps the (emulated) stream for at least its time, is counted like any
    /// launch, and a training loop's first graph step marks its thread as replaying graphs
    /// (what `MEDSSL_CUDNN_ALGO=time` ranks by), even where that step is not captured.
    #[test]
    fn the_timing_hold_holds_and_graph_steps_are_noted() {
        let be = CudaBackend::create_emulated(0);
        let t = std::time::Instant::now();
        be.hold(3000).unwrap();
        assert!(
            t.elapsed() >= Duration::from_micros(3000),
            "{:?}",
            t.elapsed()
        );
        be.hold(0).unwrap();
        assert_eq!(be.launch_counts(), vec![("timing_hold", 2)]);
        assert!(!be.graph_steps_requested());
        assert!(
            !be.graph_step_begin(7, false).unwrap(),
            "an unstable step runs eagerly"
        );
        assert!(be.graph_steps_requested());
    }
}
