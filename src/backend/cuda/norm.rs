//! Batch norm and row-wise L2 normalisation (kernels/norm.cu).

use super::{
    cfg_blocks, cfg_lin, cfg_lin4, cfg_rows, ci, nchw, rows_last, same_shape, CudaBackend, A,
};
use crate::backend::{shapes, BnAct, BnTrainOut};
use crate::error::Result;
use crate::tensor::Tensor;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::LaunchConfig;

/// Threads per block of the per-channel reductions.
const RED_THREADS: u32 = 512;

/// Channels of at most this many elements (M = N·H·W) get their batch norm, forward and backward,
/// from one launch (`bn_train_fused`, `bn_bwd_fused`: the block that reduces a channel also writes
/// its elements) instead of two (a per-channel reduction, then an elementwise pass over the whole
/// tensor). Below it the second launch costs more than the block's extra pass; above it the
/// elementwise pass is better spread over the device.
pub(super) const FUSED_MAX_M: usize = 65536;

/// The one-launch limit in force on the calling thread: [`set_bn_fused_max_m`]'s setting, else
/// `MEDSSL_CUDA_BN_FUSED_MAX_M` when set (0: always two launches; see [`super::switches`]), else
/// `FUSED_MAX_M`.
pub fn bn_fused_max_m() -> usize {
    here(&FUSED_HERE, || super::switches::current().bn_fused_max_m)
}

/// Sets the largest N·H·W whose batch norm runs as one launch per pass (0: always two) for the
/// batch norms the calling thread issues, on every CUDA device; returns the previous limit. For
/// tests and benchmarks that compare the two paths; being per thread, like the other switches'
/// setters, it cannot change the path of another thread's batch norms midway (a training run
/// replaying a step graph on another thread would see its step diverge from the graph).
pub fn set_bn_fused_max_m(m: usize) -> usize {
    let old = bn_fused_max_m();
    FUSED_HERE.with(|s| s.set(Some(m)));
    old
}

/// Whether a train-mode batch-norm pass over channels of `m` elements, reduced by `split` blocks
/// each, runs as one launch (`bn_train_fused`, `bn_bwd_fused`: one block per channel and at most
/// [`bn_fused_max_m`] elements); otherwise it takes two, or one resident launch where asked.
fn one_launch(split: usize, m: usize) -> bool {
    split == 1 && m <= bn_fused_max_m()
}

/// Fewest elements a block of a split reduction is given: below it, more blocks per channel
/// cost more in partial results and arrival counting than they gain in spread.
pub(super) const SPLIT_MIN_CHUNK: usize = 4096;

/// The [`bn_split`] setting `MEDSSL_CUDA_BN_SPLIT=wave`: as many blocks per channel as fill the
/// device once ([`CudaBackend::split_resident_blocks`] / channels, rounded down), where the
/// automatic choice aims at about two blocks per multiprocessor rounded up, which can leave a
/// second, mostly empty wave of blocks (64 channels on 132 multiprocessors: 5 blocks each, 320
/// blocks where 264 fit at once).
pub const BN_SPLIT_WAVE: usize = usize::MAX;

impl CudaBackend {
    /// How many blocks of the split batch-norm reductions (`bn_stats_split`, `bn_bwd_split`,
    /// 512 threads each) the device runs at once: the driver's occupancy of the one that fits
    /// fewer per multiprocessor, times the multiprocessors (2 per multiprocessor on the emulated
    /// device, what a GPU gives their 48-56 registers per thread). Read once.
    pub fn split_resident_blocks(&self) -> usize {
        self.split_resident_blocks_with(1)
    }

    /// [`CudaBackend::split_resident_blocks`] with the statistics kernel that loads `g` groups
    /// of four elements per thread at a time ([`stats_kernel`]; `g` 1, 2 or 4).
    fn split_resident_blocks_with(&self, g: usize) -> usize {
        let (i, stats) = stats_kernel(g);
        *self.split_resident[i].get_or_init(|| {
            let per_sm = match &self.drv {
                None => 2,
                Some(d) => [stats, "bn_bwd_split"]
                    .iter()
                    .filter_map(|name| {
                        Self::func(d, name)
                            .ok()?
                            .occupancy_max_active_blocks_per_multiprocessor(RED_THREADS, 0, None)
                            .ok()
                    })
                    .min()
                    .unwrap_or(2) as usize,
            };
            per_sm.max(1) * self.sms
        })
    }
}

/// The split statistics kernel that loads `g` groups of four elements per thread at a time
/// (1, 2 or 4; see `MEDSSL_CUDA_BN_INFLIGHT`), with its index among them.
fn stats_kernel(g: usize) -> (usize, &'static str) {
    match g {
        4 => (2, "bn_stats_split_g4"),
        2 => (1, "bn_stats_split_g2"),
        _ => (0, "bn_stats_split"),
    }
}

/// Groups of four loads each thread of the one-pass statistics issues at a time in the split
/// (`resident` false) or resident forward: [`bn_inflight`] / 4, or each kernel's own (1 split,
/// 2 resident) under `auto`.
fn stats_groups(resident: bool) -> usize {
    match bn_inflight() {
        0 if resident => 2,
        0 => 1,
        n => n / 4,
    }
}

/// The resident batch-norm kernels: one cooperative launch of one wave of blocks, each block
/// keeping what shared memory holds of its chunk (see kernels/norm.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resident {
    /// `bn_fwd_resident` ([`bn_resident`], `MEDSSL_CUDA_BN_FWD=resident`): keeps x.
    Fwd,
    /// `bn_bwd_resident` ([`bn_resident_bwd`], `MEDSSL_CUDA_BN_BWD=resident`): keeps the
    /// masked output gradient and x.
    Bwd,
    /// `bn_fwd_resident_g1`: [`Resident::Fwd`] with four loads in flight per thread
    /// (`MEDSSL_CUDA_BN_INFLIGHT=4`; `Fwd` has eight).
    Fwd4,
    /// `bn_fwd_resident_g4`: [`Resident::Fwd`] with sixteen (`MEDSSL_CUDA_BN_INFLIGHT=16`).
    Fwd16,
    /// `bn_bwd_resident_l2`: [`Resident::Bwd`] with L2 eviction priorities
    /// (`MEDSSL_CUDA_BN_L2=hint`, see [`bn_l2_hint`]).
    BwdL2,
    /// `bn_fwd_resident4_g1`: the float4 resident forward ([`bn_vec`], `MEDSSL_CUDA_BN_VEC=on`),
    /// one float4 per thread at a time (`MEDSSL_CUDA_BN_INFLIGHT=4`).
    Fwd4V1,
    /// `bn_fwd_resident4_g2`: two float4s at a time (eight elements: its own, as `Fwd`'s).
    Fwd4V2,
    /// `bn_fwd_resident4_g4`: four float4s at a time (`MEDSSL_CUDA_BN_INFLIGHT=16`).
    Fwd4V4,
    /// `bn_bwd_resident4`: the float4 resident backward.
    Bwd4V,
    /// `bn_fwd_pipe4`: the pipelined float4 forward ([`bn_pipe`], `MEDSSL_CUDA_BN_PIPE=on`):
    /// one wave of blocks taking the channels' chunks a few channels at a time, each block
    /// copying its next chunk of x into shared memory while it meets the other blocks of the
    /// current one (see [`CudaBackend::bn_pipe_plan`] and kernels/norm.cu). Keeps two stages of x.
    FwdPipe4,
    /// `bn_bwd_pipe4`: its backward counterpart. Keeps two stages of the output gradient, x and
    /// (with a fused ReLU) the ReLU's output.
    BwdPipe4,
}

impl Resident {
    /// The resident forward that loads `g` groups of four elements per thread at a time.
    fn fwd(g: usize) -> Resident {
        match g {
            1 => Resident::Fwd4,
            4 => Resident::Fwd16,
            _ => Resident::Fwd,
        }
    }

    /// The float4 resident forward that loads `g` float4s per thread at a time.
    fn fwd4(g: usize) -> Resident {
        match g {
            1 => Resident::Fwd4V1,
            4 => Resident::Fwd4V4,
            _ => Resident::Fwd4V2,
        }
    }

    /// The resident backward, with L2 eviction priorities or without.
    fn bwd(l2: bool) -> Resident {
        match l2 {
            true => Resident::BwdL2,
            false => Resident::Bwd,
        }
    }

    /// Elements per access: 4 for the float4 kernels, whose chunks, kept elements and
    /// [`CudaBackend::bn_resident_split`] / `resident_launch` counts are in float4 units.
    pub fn unit(self) -> usize {
        match self {
            Resident::Fwd4V1
            | Resident::Fwd4V2
            | Resident::Fwd4V4
            | Resident::Bwd4V
            | Resident::FwdPipe4
            | Resident::BwdPipe4 => 4,
            _ => 1,
        }
    }

    fn kernel(self) -> &'static str {
        match self {
            Resident::Fwd => "bn_fwd_resident",
            Resident::Bwd => "bn_bwd_resident",
            Resident::Fwd4 => "bn_fwd_resident_g1",
            Resident::Fwd16 => "bn_fwd_resident_g4",
            Resident::BwdL2 => "bn_bwd_resident_l2",
            Resident::Fwd4V1 => "bn_fwd_resident4_g1",
            Resident::Fwd4V2 => "bn_fwd_resident4_g2",
            Resident::Fwd4V4 => "bn_fwd_resident4_g4",
            Resident::Bwd4V => "bn_bwd_resident4",
            Resident::FwdPipe4 => "bn_fwd_pipe4",
            Resident::BwdPipe4 => "bn_bwd_pipe4",
        }
    }

    /// The setting that asks for it, and what runs otherwise (for messages).
    fn switch(self) -> (&'static str, &'static str) {
        match self {
            Resident::Bwd | Resident::BwdL2 | Resident::Bwd4V => {
                ("MEDSSL_CUDA_BN_BWD=resident", "batch-norm backwards")
            }
            Resident::FwdPipe4 => ("MEDSSL_CUDA_BN_PIPE=on", "batch-norm forwards"),
            Resident::BwdPipe4 => ("MEDSSL_CUDA_BN_PIPE=on", "batch-norm backwards"),
            _ => ("MEDSSL_CUDA_BN_FWD=resident", "batch-norm forwards"),
        }
    }

    /// Tensors whose elements a block keeps (each gets the same number of elements).
    fn arrays(self) -> usize {
        match self {
            Resident::Bwd | Resident::BwdL2 | Resident::Bwd4V | Resident::FwdPipe4 => 2,
            Resident::BwdPipe4 => 6,
            _ => 1,
        }
    }
}

/// What a resident batch-norm kernel may use on a device: how many of its blocks the device holds
/// at once (its grid is at most that: one wave) and how many elements of each kept tensor each
/// block can keep in shared memory.
#[derive(Clone, Copy, Debug)]
pub(super) struct ResidentLimits {
    pub blocks: usize,
    pub keep: usize,
}

/// Elements of each kept tensor a block of a resident kernel keeps on the emulated device (small,
/// so that the parity tests' shapes cover chunks kept whole and chunks kept in part).
const EMULATED_KEEP: usize = 1024;

impl CudaBackend {
    /// [`ResidentLimits`] of `kind` on this device, read once: `None` where the device cannot
    /// launch it cooperatively or its attributes cannot be read (the batch norm then stays on two
    /// launches, which stderr says once). On a device: shared memory for two blocks of
    /// [`RED_THREADS`] per multiprocessor (one where the kernel's registers allow only one), less
    /// what the driver reserves per block and the kernel's own; the kernel is allowed that much
    /// dynamic shared memory, and the driver's occupancy for it gives the blocks. On the emulated
    /// device: two blocks per multiprocessor, [`EMULATED_KEEP`] elements each.
    pub(super) fn resident_limits(&self, kind: Resident) -> Option<ResidentLimits> {
        *self.resident[kind as usize].get_or_init(|| match &self.drv {
            None => Some(ResidentLimits {
                blocks: 2 * self.sms,
                keep: EMULATED_KEEP,
            }),
            Some(d) => {
                let (switch, others) = kind.switch();
                match device_resident_limits(d, self.sms, kind) {
                    Ok(Some(l)) => Some(l),
                    Ok(None) => {
                        eprintln!(
                            "{switch}: this device cannot keep {}'s blocks resident \
                             together (no cooperative launch, or not one block per \
                             multiprocessor); {others} stay on two launches",
                            kind.kernel()
                        );
                        None
                    }
                    Err(e) => {
                        eprintln!("{switch}: {e}; {others} stay on two launches");
                        None
                    }
                }
            }
        })
    }

    /// Under `MEDSSL_CUDA_BN_L2=hint` on a device, before the first hinted launch: sets aside
    /// as much of L2 for evict-last (persisting) lines as the device allows, at most three
    /// quarters of it, once per process (`cuCtxSetLimit(CU_LIMIT_PERSISTING_L2_CACHE_SIZE)`):
    /// without a set-aside the evict-last priority may go unused. Other accesses use the set-aside
    /// part while no evict-last line holds it. Returns the bytes set aside (0 on the emulated
    /// device, or where the device refuses, which stderr then says once).
    pub fn l2_set_aside(&self) -> usize {
        if let Some(&bytes) = self.l2_aside.get() {
            return bytes;
        }
        // In a turn of the device's work (no other thread's graph capture open), taken before
        // the once-lock as turns must be.
        let _turn = self.turn();
        *self.l2_aside.get_or_init(|| {
            let Some(d) = &self.drv else { return 0 };
            let attr = |a: CUdevice_attribute| {
                d.ctx
                    .attribute(a)
                    .ok()
                    .and_then(|v| usize::try_from(v).ok())
            };
            let l2 = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE).unwrap_or(0);
            let most = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE)
                .unwrap_or(0);
            let bytes = (l2 / 4 * 3).min(most);
            // SAFETY: a context-wide limit, set with this backend's context bound.
            let r = self.bind().and_then(|()| {
                unsafe {
                    cudarc::driver::sys::cuCtxSetLimit(
                        cudarc::driver::sys::CUlimit::CU_LIMIT_PERSISTING_L2_CACHE_SIZE,
                        bytes,
                    )
                }
                .result()
                .map_err(super::cuda_err("setting aside L2 for evict-last lines"))
            });
            match r {
                Ok(()) if bytes > 0 => bytes,
                Ok(()) => {
                    eprintln!(
                        "MEDSSL_CUDA_BN_L2=hint: this device sets aside no L2 for evict-last lines \
                         (L2 {l2} B, at most {most} B); the priorities alone apply"
                    );
                    0
                }
                Err(e) => {
                    eprintln!("MEDSSL_CUDA_BN_L2=hint: {e}; the priorities alone apply");
                    0
                }
            }
        })
    }

    /// Blocks per channel of the resident kernel `kind` for `c` channels of `m` elements (of `m`
    /// float4 units for the float4 kinds, see [`Resident::unit`]; the most blocks that fit in one
    /// wave, and no chunk empty), or `None` where it cannot run: more channels than the device
    /// holds blocks, or where the device cannot launch it cooperatively.
    pub fn bn_resident_split(&self, kind: Resident, c: usize, m: usize) -> Option<usize> {
        let lim = self.resident_limits(kind)?;
        if c == 0 || m == 0 || c > lim.blocks || c > 65535 {
            return None;
        }
        Some(filled_chunks(lim.blocks / c, m))
    }

    /// The launch of resident kernel `kind` for `c` channels of `m` elements in `s` blocks per
    /// channel: the elements of each kept tensor a block keeps (at most the device's limit, the
    /// chunk's length and [`set_bn_resident_keep`]'s setting) and the grid, with the shared
    /// memory they take. For the float4 kinds `m` and the count returned are in float4 units
    /// (the device's limit and the setting, in elements, rounded down to whole units).
    fn resident_launch(&self, kind: Resident, c: usize, m: usize, s: usize) -> OneLaunch {
        let unit = kind.unit();
        let keep = (self.resident_limits(kind).map_or(0, |l| l.keep) / unit)
            .min(m.div_ceil(s))
            .min(bn_keep() / unit);
        let bytes = 4 * unit * kind.arrays() * keep;
        let cfg = LaunchConfig {
            shared_mem_bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
            ..cfg_split(s, c)
        };
        OneLaunch { s, keep, cfg }
    }

    /// The one launch of `kind` for `c` channels of `m` elements (float4 units for the float4
    /// kinds): the pipelined kinds' [`CudaBackend::bn_pipe_plan`] with `arrays` tensors copied
    /// per stage, the resident kinds' [`CudaBackend::bn_resident_split`] and launch (`arrays`
    /// unused); `None` where it cannot run.
    fn one_launch_plan(
        &self,
        kind: Resident,
        c: usize,
        m: usize,
        arrays: usize,
    ) -> Option<OneLaunch> {
        match kind {
            Resident::FwdPipe4 | Resident::BwdPipe4 => self.bn_pipe_plan(kind, c, m, arrays),
            _ => {
                let s = self.bn_resident_split(kind, c, m)?;
                Some(self.resident_launch(kind, c, m, s))
            }
        }
    }

    /// The launch of the pipelined kernel `kind` ([`Resident::FwdPipe4`], [`Resident::BwdPipe4`])
    /// for `c` channels of `m4` float4 units with `arrays` tensors copied per stage (the forward
    /// 1; the backward 2, or 3 with a fused ReLU), or `None` where it cannot run (the device
    /// cannot launch it cooperatively, or a channel would need more chunks than the grid has
    /// blocks). The plan: `s` chunks per channel, each of at most `cap` units (so that two
    /// stages of `arrays` tensors fit the shared memory the device allows a block of it,
    /// limited by [`set_bn_resident_keep`]'s setting, in elements per tensor), and one wave of
    /// blocks, at most the `c * s` items. Among the chunk counts from the fewest that fit to twice
    /// that (or, where one round of the grid holds every item, to as many as fill it with chunks
    /// of at least 4096 elements, `SPLIT_MIN_CHUNK`), the one whose items fill the last round of
    /// the grid best, the fewest on a tie: block `b` takes items `b, b + grid, ...`, so an item
    /// count just past a multiple of the grid would leave most blocks idle for a whole round.
    pub fn bn_pipe_plan(
        &self,
        kind: Resident,
        c: usize,
        m4: usize,
        arrays: usize,
    ) -> Option<OneLaunch> {
        let lim = self.resident_limits(kind)?;
        let allowed = lim.keep * 4 * kind.arrays();
        let cap = (allowed / (32 * arrays.max(1))).min(bn_keep() / 4);
        let s = pipe_chunks(c, m4, cap, lim.blocks)?;
        let cap = m4.div_ceil(s);
        let grid = (c * s).min(lim.blocks);
        let bytes = 32 * arrays.max(1) * cap;
        let cfg = LaunchConfig {
            grid_dim: (u32::try_from(grid).ok()?, 1, 1),
            block_dim: (RED_THREADS, 1, 1),
            shared_mem_bytes: u32::try_from(bytes).ok()?,
        };
        Some(OneLaunch { s, keep: cap, cfg })
    }
}

/// The chunks per channel of [`CudaBackend::bn_pipe_plan`] for `c` channels of `m4` units,
/// chunks of at most `cap` units and a grid of `blocks`: `None` where a channel needs more chunks
/// than the grid has blocks (or nothing fits).
fn pipe_chunks(c: usize, m4: usize, cap: usize, blocks: usize) -> Option<usize> {
    if c == 0 || m4 == 0 || cap == 0 || blocks == 0 {
        return None;
    }
    let fewest = m4.div_ceil(cap);
    if fewest > blocks {
        return None;
    }
    // Up to twice the fewest, or, where one round of the grid holds every item, as many as fill
    // it with chunks of at least SPLIT_MIN_CHUNK elements (a small activation then spreads over
    // as many blocks as the split kernels give it).
    let spread = (blocks / c).min(m4 / (SPLIT_MIN_CHUNK / 4));
    let most = (2 * fewest).max(spread).min(blocks).min(m4);
    // Fill of the last round as a fraction items / (rounds * blocks), compared exactly.
    let fill = |s: usize| {
        let items = c * s;
        (items, items.div_ceil(blocks) * blocks)
    };
    (fewest..=most)
        .map(|s| filled_chunks(s, m4))
        .reduce(|best, s| {
            let ((bi, br), (si, sr)) = (fill(best), fill(s));
            if si * br > bi * sr {
                s
            } else {
                best
            }
        })
}

/// The launch of a resident or pipelined batch-norm kernel ([`CudaBackend::bn_pipe_plan`],
/// `resident_launch`).
#[derive(Clone, Copy, Debug)]
pub struct OneLaunch {
    /// Blocks (resident) or chunks (pipelined) per channel.
    pub s: usize,
    /// The kernel's `cap`: elements (float4 units for the float4 kinds) of each tensor a resident
    /// block keeps; for the pipelined kinds the most units per chunk, per tensor and stage.
    pub keep: usize,
    /// One wave of blocks with their shared memory.
    pub cfg: LaunchConfig,
}

/// [`CudaBackend::resident_limits`] on a device.
fn device_resident_limits(
    d: &super::Driver,
    sms: usize,
    kind: Resident,
) -> Result<Option<ResidentLimits>> {
    let attr = |a: CUdevice_attribute| -> Result<usize> {
        let v = d
            .ctx
            .attribute(a)
            .map_err(super::cuda_err("reading a device attribute"))?;
        Ok(usize::try_from(v).unwrap_or(0))
    };
    if attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH)? == 0 {
        return Ok(None);
    }
    let per_sm =
        attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)?;
    let optin = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
    let reserved = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK)?;
    let name = kind.kernel();
    let f = CudaBackend::func(d, name)?;
    let own = f
        .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
        .map_err(super::cuda_err("reading a resident kernel's shared memory"))?;
    let own = usize::try_from(own).unwrap_or(0);
    for per_block in [2usize, 1] {
        let bytes = (per_sm / per_block)
            .saturating_sub(reserved + own)
            .min(optin.saturating_sub(own))
            / (16 * kind.arrays())
            * (16 * kind.arrays());
        let b = i32::try_from(bytes).unwrap_or(0);
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            b,
        )
        .map_err(super::cuda_err(
            "allowing a resident kernel its shared memory",
        ))?;
        let fit = f
            .occupancy_max_active_blocks_per_multiprocessor(RED_THREADS, bytes, None)
            .map_err(super::cuda_err("reading a resident kernel's occupancy"))?
            as usize;
        if fit >= per_block {
            return Ok(Some(ResidentLimits {
                blocks: per_block * sms,
                keep: bytes / 4 / kind.arrays(),
            }));
        }
    }
    Ok(None)
}

/// A switch's setting for the calling thread only (`None`: the environment's), which tests and
/// benchmarks set to compare paths: being per thread, it cannot change the bits of another
/// thread's ops midway.
type Here<T> = std::thread::LocalKey<std::cell::Cell<Option<T>>>;

thread_local! {
    /// [`set_bn_fused_max_m`]'s setting.
    static FUSED_HERE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    /// [`set_bn_split`]'s setting.
    static SPLIT_HERE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    /// [`set_bn_welford`]'s setting.
    static WELFORD_HERE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// [`set_bn_l2_hint`]'s setting.
    static L2_HERE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// [`set_bn_inflight`]'s setting.
    static INFLIGHT_HERE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    /// [`set_bn_apply_chunks`]'s setting.
    static CHUNKS_HERE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// [`set_bn_resident`]'s setting.
    static RESIDENT_HERE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// [`set_bn_resident_bwd`]'s setting.
    static RESIDENT_BWD_HERE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// [`set_bn_resident_keep`]'s setting.
    static KEEP_HERE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    /// [`set_bn_vec`]'s setting.
    static VEC_HERE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// [`set_bn_pipe`]'s setting.
    static PIPE_HERE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// The calling thread's setting of `key`, else `env()`.
fn here<T: Copy>(key: &'static Here<T>, env: impl FnOnce() -> T) -> T {
    key.with(|s| s.get()).unwrap_or_else(env)
}

/// Blocks per channel of the batch-norm reductions in force on the calling thread:
/// [`set_bn_split`]'s setting, else `MEDSSL_CUDA_BN_SPLIT` (see [`super::switches`]);
/// [`BN_SPLIT_WAVE`] (the default) is one wave of blocks, 0 `auto` (see `split_count`).
pub fn bn_split() -> usize {
    here(&SPLIT_HERE, || super::switches::current().bn_split)
}

/// Sets the blocks per channel of the batch-norm reductions for the ops the calling thread
/// issues (`Some(0)`: automatic, `Some(BN_SPLIT_WAVE)`: one wave of blocks, `Some(1)`: one
/// block per channel, `Some(n)`: n blocks, at most one per element; `None`: back to
/// `MEDSSL_CUDA_BN_SPLIT`); returns the previous setting.
pub fn set_bn_split(n: Option<usize>) -> Option<usize> {
    SPLIT_HERE.with(|s| s.replace(n))
}

/// Whether the batch-norm statistics kernels in force on the calling thread make one pass over
/// each channel (Welford's update per thread, merged by Chan et al.'s) rather than two (the mean,
/// then the squared deviations): [`set_bn_welford`]'s setting, else `MEDSSL_CUDA_BN_STATS`
/// (see [`super::switches`]).
pub fn bn_welford() -> bool {
    here(&WELFORD_HERE, || super::switches::current().bn_welford)
}

/// Sets the statistics pass count for the batch norms the calling thread issues (`Some(true)`:
/// one pass, `Some(false)`: two, `None`: back to `MEDSSL_CUDA_BN_STATS`); returns the previous
/// setting.
pub fn set_bn_welford(on: Option<bool>) -> Option<bool> {
    WELFORD_HERE.with(|s| s.replace(on))
}

/// Loads in flight per thread in the one-pass statistics of the split and resident forwards
/// (4, 8 or 16; 0: `auto`, each kernel's own, 4 split and 8 resident): [`set_bn_inflight`]'s
/// setting, else `MEDSSL_CUDA_BN_INFLIGHT` (see [`super::switches`]). The same bits for every
/// setting: each thread still merges its elements four at a time in the same order. At
/// `[256,64,28,28]` on an H100 the split statistics kernel (four in flight) read x at about
/// 1.6 TB/s, half the rate of the normalising pass after it (bench/results/2026-11-27-h100.md,
/// runs 6 and 7): short of bytes in flight rather than of bandwidth, it seems.
pub fn bn_inflight() -> usize {
    here(&INFLIGHT_HERE, || super::switches::current().bn_inflight)
}

/// Sets [`bn_inflight`] for the batch norms the calling thread issues (`Some(4 | 8 | 16)`,
/// `Some(0)`: `auto`, `None`: back to `MEDSSL_CUDA_BN_INFLIGHT`); returns the previous setting.
pub fn set_bn_inflight(n: Option<usize>) -> Option<usize> {
    assert!(
        n.is_none_or(|n| matches!(n, 0 | 4 | 8 | 16)),
        "loads in flight: 4, 8 or 16 (0: auto), not {n:?}"
    );
    INFLIGHT_HERE.with(|s| s.replace(n))
}

/// Whether the one-pass train-mode forwards that take more than one launch per channel's block
/// (`bn_stats_split` then `bn_apply_chunks`, and the resident forward) mark their memory accesses
/// with L2 eviction priorities: the statistics pass loads x evict-last, the normalising pass reads
/// x (its last use) and writes y evict-first, so that L2 replaces the lines already used before
/// the ones still to be read. Where x is larger than L2 (on an H100 `[256,64,28,28]`, 51 MB
/// against 50 MB), the normalising pass then reads more of x from L2 instead of memory. The
/// backward likewise (`bn_bwd_split` then `bn_dx_chunks_l2`, and `bn_bwd_resident_l2`): the
/// gradient sums load x and the output gradient evict-last (the resident kernel: those it does
/// not keep in shared memory), the input-gradient pass reads them and writes its output
/// evict-first.
/// [`set_bn_l2_hint`]'s setting, else `MEDSSL_CUDA_BN_L2` (see [`super::switches`]; `plain` by
/// default: not yet measured on a GPU). The same bits either way; the emulation has no caches.
pub fn bn_l2_hint() -> bool {
    here(&L2_HERE, || super::switches::current().bn_l2_hint)
}

/// Sets [`bn_l2_hint`] for the batch norms the calling thread issues (`None`: back to
/// `MEDSSL_CUDA_BN_L2`); returns the previous setting.
pub fn set_bn_l2_hint(on: Option<bool>) -> Option<bool> {
    L2_HERE.with(|s| s.replace(on))
}

/// Whether the two-launch batch norm's elementwise pass (`bn_apply_chunks`, `bn_dx_chunks`) runs
/// on the grid of the reduction before it, each block writing the chunk of a channel that the
/// reduction's block read, starting with what it read last, rather than over the flat tensor
/// (`bn_apply`, `bn_train_dx`): [`set_bn_apply_chunks`]'s setting, else `MEDSSL_CUDA_BN_APPLY`
/// (see [`super::switches`]; `chunks` by default). Both give the same bits. The chunk pass has
/// only the reduction's parallelism (S·C blocks, one walk per chunk), where the flat pass fills
/// the device, but with one wave of reduction blocks (`MEDSSL_CUDA_BN_SPLIT=wave`) every block
/// ends its reduction at about the same time, so the end of every chunk is still in L2 when the
/// chunk pass starts there: on an H100 at `[256,64,28,28]` the two together took the forward from
/// 0.108 to 0.088 ms and the backward from 0.115 to 0.095 ms (bench/results/2026-11-27-h100.md,
/// run 4), where either alone gained at most 0.011 ms.
pub fn bn_apply_chunks() -> bool {
    here(&CHUNKS_HERE, || super::switches::current().bn_apply_chunks)
}

/// Sets [`bn_apply_chunks`] for the batch norms the calling thread issues (`None`: back to
/// `MEDSSL_CUDA_BN_APPLY`); returns the previous setting.
pub fn set_bn_apply_chunks(on: Option<bool>) -> Option<bool> {
    CHUNKS_HERE.with(|s| s.replace(on))
}

/// Whether the train-mode batch-norm forward that would take two launches (statistics, then the
/// normalising pass) takes one instead, `bn_fwd_resident`: one wave of blocks, all resident at
/// once (a cooperative launch), reads x once, keeping what shared memory holds of it, combines
/// the channel's statistics across its blocks and writes y (see kernels/norm.cu). Same bits as
/// the two-launch forward with as many blocks per channel. One-pass statistics only (with
/// `MEDSSL_CUDA_BN_STATS=two-pass` the forward stays on two launches), and only where the
/// device holds a block per channel at once. [`set_bn_resident`]'s setting, else
/// `MEDSSL_CUDA_BN_FWD` (see [`super::switches`]; `split` by default: on an H100 the resident
/// forward was 1.23–1.30× faster above L2 but no faster in the step,
/// `bench/results/2026-11-27-h100.md`).
pub fn bn_resident() -> bool {
    here(&RESIDENT_HERE, || super::switches::current().bn_resident)
}

/// Sets [`bn_resident`] for the batch norms the calling thread issues (`None`: back to
/// `MEDSSL_CUDA_BN_FWD`); returns the previous setting.
pub fn set_bn_resident(on: Option<bool>) -> Option<bool> {
    RESIDENT_HERE.with(|s| s.replace(on))
}

/// Whether the train-mode batch-norm backward that would take two launches (gradient sums, then
/// the input gradient) takes one instead, `bn_bwd_resident`, the backward counterpart of
/// [`bn_resident`]: it reads x and the output gradient (and the fused ReLU's output) once, keeping
/// what shared memory holds of them. Same bits as the two-launch backward with as many blocks per
/// channel. [`set_bn_resident_bwd`]'s setting, else `MEDSSL_CUDA_BN_BWD` (see
/// [`super::switches`]; `split` by default: on an H100 the resident backward was 1.03–1.19×
/// faster above L2 and no faster in the step).
pub fn bn_resident_bwd() -> bool {
    here(&RESIDENT_BWD_HERE, || {
        super::switches::current().bn_resident_bwd
    })
}

/// Sets [`bn_resident_bwd`] for the batch norms the calling thread issues (`None`: back to
/// `MEDSSL_CUDA_BN_BWD`); returns the previous setting.
pub fn set_bn_resident_bwd(on: Option<bool>) -> Option<bool> {
    RESIDENT_BWD_HERE.with(|s| s.replace(on))
}

/// The most elements of each kept tensor a block of the resident or pipelined batch-norm kernels
/// keeps in shared memory (the pipelined ones per stage: their chunks are at most that long;
/// `usize::MAX`: as many as the device allows a block): [`set_bn_resident_keep`]'s setting, else
/// `MEDSSL_CUDA_BN_KEEP` (`auto` by default: as many as fit). A benchmark of the pipelined
/// kernels can so try shorter chunks than the fewest that fit (more items, more rounds).
pub fn bn_keep() -> usize {
    here(&KEEP_HERE, || super::switches::current().bn_keep)
}

/// Limits the elements (of each kept tensor) each block of the resident kernels keeps in shared
/// memory to `n` for the batch norms the calling thread issues (tests: `Some(0)` keeps none, so
/// every element is read twice; `None`: back to `MEDSSL_CUDA_BN_KEEP`, see [`bn_keep`]); returns
/// the previous setting.
pub fn set_bn_resident_keep(n: Option<usize>) -> Option<usize> {
    KEEP_HERE.with(|s| s.replace(n))
}

/// Whether the train-mode batch norms above one launch per channel (the split reductions and
/// their elementwise passes, the resident kernels) run their float4 kernels, which load and store
/// four consecutive elements of a plane at a time (see kernels/norm.cu): [`set_bn_vec`]'s
/// setting, else `MEDSSL_CUDA_BN_VEC`. They apply where a plane's H·W is a multiple of 4 and
/// every tensor involved is 16-byte aligned, with one-pass statistics and without L2 eviction
/// priorities ([`bn_l2_hint`]); elsewhere the one-element kernels run. The float4 kernels group
/// the same values differently in their sums, so their bits differ from the one-element
/// kernels' (within the batch-norm tolerances of the CPU reference), not between their own split
/// and resident paths.
pub fn bn_vec() -> bool {
    here(&VEC_HERE, || super::switches::current().bn_vec)
}

/// Sets [`bn_vec`] for the batch norms the calling thread issues (`None`: back to
/// `MEDSSL_CUDA_BN_VEC`); returns the previous setting.
pub fn set_bn_vec(on: Option<bool>) -> Option<bool> {
    VEC_HERE.with(|s| s.replace(on))
}

/// Whether the train-mode batch norms that run their float4 kernels ([`bn_vec`]) and would take
/// more than one launch per channel run the pipelined ones instead, `bn_fwd_pipe4` and
/// `bn_bwd_pipe4` (one cooperative launch each; see [`CudaBackend::bn_pipe_plan`] and
/// kernels/norm.cu), whatever [`bn_resident`] and [`bn_resident_bwd`] say. The same bits as the
/// float4 split kernels with as many blocks per channel. [`set_bn_pipe`]'s setting, else
/// `MEDSSL_CUDA_BN_PIPE` (`off` by default: no GPU has timed them yet).
pub fn bn_pipe() -> bool {
    here(&PIPE_HERE, || super::switches::current().bn_pipe)
}

/// Sets [`bn_pipe`] for the batch norms the calling thread issues (`None`: back to
/// `MEDSSL_CUDA_BN_PIPE`); returns the previous setting.
pub fn set_bn_pipe(on: Option<bool>) -> Option<bool> {
    PIPE_HERE.with(|s| s.replace(on))
}

/// Whether a batch norm over planes of `hw` elements whose tensors are at the device addresses
/// `ptrs` (0: absent) runs its float4 kernels: [`bn_vec`] asks for them, no L2 eviction
/// priorities are asked for ([`bn_l2_hint`]), and the planes and tensors fit (the forward also
/// needs one-pass statistics).
fn vec_fits(hw: usize, ptrs: &[u64]) -> bool {
    bn_vec()
        && !bn_l2_hint()
        && hw > 0
        && hw.is_multiple_of(4)
        && ptrs.iter().all(|&p| p.is_multiple_of(16))
}

/// `split` blocks per channel of `m4` float4 units, reduced so that no chunk is empty (as
/// [`split_count`] does for elements).
fn split_units(split: usize, m4: usize) -> usize {
    filled_chunks(split, m4.max(1))
}

/// The float4 split statistics kernel loading `g` float4s per thread at a time (1, 2 or 4).
fn stats_kernel4(g: usize) -> &'static str {
    match g {
        4 => "bn_stats_split4_g4",
        2 => "bn_stats_split4_g2",
        _ => "bn_stats_split4_g1",
    }
}

/// The grid of the reduction of `c` channels with `split` blocks each, when the elementwise pass
/// after it runs on that grid ([`bn_apply_chunks`]; the grid has at most 65535 rows).
fn chunk_grid(c: usize, split: usize) -> Option<LaunchConfig> {
    (bn_apply_chunks() && c <= 65535).then(|| cfg_split(split, c))
}

/// How many blocks share the reduction of each of `c` channels of `m` elements on a device of
/// `sms` multiprocessors that runs `resident` blocks of the reduction at once. `auto`
/// (`setting` 0): one per channel when the channels alone give every multiprocessor a block;
/// otherwise about two blocks per multiprocessor in all, but no block under [`SPLIT_MIN_CHUNK`]
/// elements. [`BN_SPLIT_WAVE`]: `resident / c` rounded down (one wave of blocks), with the same
/// minimum chunk. Forced (`setting` ≥ 1): that many, at most `m`. Either way reduced so that no
/// chunk is empty (chunks are `ceil(m / s)` long), and 1 when the channels exceed the grid's
/// 65535 rows.
pub(super) fn split_count(
    c: usize,
    m: usize,
    sms: usize,
    resident: usize,
    setting: usize,
) -> usize {
    if c == 0 || m == 0 || c > 65535 {
        return 1;
    }
    let s = match setting {
        0 if c >= sms => 1,
        0 => (2 * sms).div_ceil(c).min(m / SPLIT_MIN_CHUNK),
        BN_SPLIT_WAVE => (resident / c).min(m / SPLIT_MIN_CHUNK),
        n => n,
    };
    filled_chunks(s, m)
}

/// `s` chunks (at least 1, at most `m`) of `m ≥ 1` elements or units, reduced so that none is
/// empty: chunks are `ceil(m / s)` long, so `ceil(m / ceil(m / s))` of them.
fn filled_chunks(s: usize, m: usize) -> usize {
    let s = s.clamp(1, m);
    m.div_ceil(m.div_ceil(s))
}

/// [`split_count`] on `be` with the calling thread's setting.
fn split_on(be: &CudaBackend, c: usize, m: usize) -> usize {
    split_on_with(be, c, m, 1)
}

/// [`split_on`] for a forward whose statistics kernel loads `g` groups of four at a time (its
/// one wave may hold fewer blocks: [`CudaBackend::split_resident_blocks_with`]).
fn split_on_with(be: &CudaBackend, c: usize, m: usize, g: usize) -> usize {
    let setting = bn_split();
    let resident = match setting {
        BN_SPLIT_WAVE => be.split_resident_blocks_with(g),
        _ => 0,
    };
    split_count(c, m, be.sm_count(), resident, setting)
}

/// Launch shape of a split reduction: `s` blocks per channel (grid x), one grid row per channel.
fn cfg_split(s: usize, c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (s as u32, c as u32, 1),
        block_dim: (RED_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(super) fn batch_norm_train_fwd(
    be: &CudaBackend,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<BnTrainOut> {
    train_fwd(be, x, gamma, beta, eps, NO_UPDATE, BnAct::None)
}

/// `bn_store_stats`'s running-statistics arguments for no update: momentum, rm, rv, rm_out,
/// rv_out (null pointers).
const NO_UPDATE: [A; 5] = [A::F(0.0), A::P(0), A::P(0), A::P(0), A::P(0)];

/// The forward pass with the running-statistics update fused into the statistics kernel (in
/// place: each channel's thread reads its running value, then writes it; a running tensor whose
/// storage is shared gets a new one instead) and the activation `act` into the normalising pass.
/// Updating in place keeps the running statistics at fixed addresses, which a step graph needs
/// (see `graph.rs`).
pub(super) fn batch_norm_train_fwd_running(
    be: &CudaBackend,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    running: (&mut Tensor, &mut Tensor, f32),
    act: BnAct<'_>,
) -> Result<BnTrainOut> {
    let (rm, rv, m) = running;
    shapes::same_shape(rm, gamma, "batch_norm2d running_mean")?;
    shapes::same_shape(rv, gamma, "batch_norm2d running_var")?;
    let (pm, pv) = (be.p(rm)?, be.p(rv)?);
    let in_place = rm.storage_mut().is_ok() && rv.storage_mut().is_ok();
    let fresh = match in_place {
        true => None,
        false => Some((be.empty(gamma.shape())?, be.empty(gamma.shape())?)),
    };
    let (om, ov) = match &fresh {
        Some((a, b)) => (be.p(a)?, be.p(b)?),
        None => (pm, pv),
    };
    let upd = [A::F(m), A::P(pm), A::P(pv), A::P(om), A::P(ov)];
    let o = train_fwd(be, x, gamma, beta, eps, upd, act)?;
    if let Some((a, b)) = fresh {
        *rm = a;
        *rv = b;
    }
    Ok(o)
}

fn train_fwd(
    be: &CudaBackend,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    upd: [A; 5],
    act: BnAct<'_>,
) -> Result<BnTrainOut> {
    let (n, c, h, w) = shapes::batch_norm_train_fwd(x, gamma, beta)?;
    // The epilogue of bn_apply: residual pointer (null: none) and ReLU flag.
    let epilogue = act_args(be, x, act)?;
    let hw = h * w;
    let (mean, invstd, var) = (be.empty(&[c])?, be.empty(&[c])?, be.empty(&[c])?);
    let y = be.empty(x.shape())?;
    let welford = i32::from(bn_welford());
    // L2 eviction priorities, with one-pass statistics only (see bn_l2_hint).
    let l2 = i32::from(welford != 0 && bn_l2_hint());
    if l2 != 0 {
        be.l2_set_aside();
    }
    // One-pass statistics: groups of four loads in flight per thread (two-pass: one).
    let groups = |resident| {
        if welford != 0 {
            stats_groups(resident)
        } else {
            1
        }
    };
    let split = split_on_with(be, c, n * hw, groups(false));
    let m = n * hw;
    // The float4 kernels (see bn_vec): one-pass statistics, no L2 hints, whole float4s.
    let res_p = match act {
        BnAct::AddRelu(r) => be.p(r)?,
        _ => 0,
    };
    let vec = welford != 0 && vec_fits(hw, &[be.p(x)?, be.p(&y)?, res_p]);
    // Elements, or float4 units, per channel.
    let mu = if vec { m / 4 } else { m };
    let pipe = vec && bn_pipe();
    let kind = match vec {
        true if pipe => Resident::FwdPipe4,
        true => Resident::fwd4(groups(true)),
        false => Resident::fwd(groups(true)),
    };
    // One launch: pipelined (MEDSSL_CUDA_BN_PIPE=on, float4) or resident (MEDSSL_CUDA_BN_FWD).
    let resident = match welford != 0 && (pipe || bn_resident()) && !one_launch(split, m) {
        true => be.one_launch_plan(kind, c, mu, 1),
        false => None,
    };
    if c == 0 {
        // Nothing to normalise.
    } else if let Some(OneLaunch { s, keep, cfg }) = resident {
        let part = be.buffer(c * s * 2)?;
        let mut args = vec![
            A::I(ci(n)?),
            A::I(ci(c)?),
            A::I(ci(hw)?),
            A::I(ci(s)?),
            A::I(ci(keep)?),
            A::F(eps),
            A::P(be.p(x)?),
            A::P(part.ptr()),
            A::P(be.counters(2 * c)?),
            A::P(be.p(&mean)?),
            A::P(be.p(&invstd)?),
            A::P(be.p(&var)?),
        ];
        args.extend(upd);
        args.extend([
            A::P(be.p(gamma)?),
            A::P(be.p(beta)?),
            epilogue[0],
            epilogue[1],
            A::P(be.p(&y)?),
        ]);
        if !vec {
            args.push(A::I(l2));
        }
        be.launch(kind.kernel(), cfg, &args)?;
    } else if split > 1 {
        // The float4 statistics (chunks cut in units) take no `welford` and `l2` arguments: one
        // pass, no hints.
        let (split, name) = match vec {
            true => (split_units(split, mu), stats_kernel4(groups(false))),
            false => (split, stats_kernel(groups(false)).1),
        };
        let part = be.buffer(c * split * 2)?;
        let mut args = vec![
            A::I(ci(n)?),
            A::I(ci(c)?),
            A::I(ci(hw)?),
            A::I(ci(split)?),
            A::F(eps),
        ];
        if !vec {
            args.push(A::I(welford));
        }
        args.extend([
            A::P(be.p(x)?),
            A::P(part.ptr()),
            A::P(be.counters(c)?),
            A::P(be.p(&mean)?),
            A::P(be.p(&invstd)?),
            A::P(be.p(&var)?),
        ]);
        args.extend(upd);
        if !vec {
            args.push(A::I(l2));
        }
        be.launch(name, cfg_split(split, c), &args)?;
        let stats = (&mean, &invstd, gamma, beta);
        let shape = (n, c, hw, split, welford, l2);
        apply(be, x, stats, epilogue, &y, shape, vec)?;
    } else {
        let mut args = vec![
            A::I(ci(n)?),
            A::I(ci(c)?),
            A::I(ci(hw)?),
            A::F(eps),
            A::I(welford),
            A::P(be.p(x)?),
            A::P(be.p(&mean)?),
            A::P(be.p(&invstd)?),
            A::P(be.p(&var)?),
        ];
        args.extend(upd);
        if one_launch(split, m) {
            args.extend([
                A::P(be.p(gamma)?),
                A::P(be.p(beta)?),
                epilogue[0],
                epilogue[1],
                A::P(be.p(&y)?),
            ]);
            be.launch("bn_train_fused", cfg_blocks(c, RED_THREADS), &args)?;
        } else {
            be.launch("bn_stats", cfg_blocks(c, RED_THREADS), &args)?;
            let stats = (&mean, &invstd, gamma, beta);
            apply(be, x, stats, epilogue, &y, (n, c, hw, 1, welford, 0), false)?;
        }
    }
    Ok(BnTrainOut {
        y,
        mean,
        invstd,
        var_unbiased: var,
    })
}

/// `y = γ (x − mean)·invstd + β` and the epilogue after a separate statistics launch of `split`
/// blocks per channel (`welford`: one-pass statistics): `bn_apply_chunks` on that launch's grid
/// (see [`bn_apply_chunks`]; `bn_apply_chunks4` after the float4 statistics, `vec`, whose
/// chunks are cut in float4 units), else `bn_apply` over the flat tensor.
fn apply(
    be: &CudaBackend,
    x: &Tensor,
    (mean, invstd, gamma, beta): (&Tensor, &Tensor, &Tensor, &Tensor),
    epilogue: [A; 2],
    y: &Tensor,
    (n, c, hw, split, welford, l2): (usize, usize, usize, usize, i32, i32),
    vec: bool,
) -> Result<()> {
    let total = x.numel();
    if total == 0 {
        return Ok(());
    }
    let tail = [
        A::P(be.p(x)?),
        A::P(be.p(mean)?),
        A::P(be.p(invstd)?),
        A::P(be.p(gamma)?),
        A::P(be.p(beta)?),
        epilogue[0],
        epilogue[1],
        A::P(be.p(y)?),
    ];
    let (name, cfg, mut args) = match chunk_grid(c, split) {
        Some(cfg) if vec => (
            "bn_apply_chunks4",
            cfg,
            vec![A::I(ci(n)?), A::I(ci(c)?), A::I(ci(hw)?), A::I(ci(split)?)],
        ),
        Some(cfg) => (
            "bn_apply_chunks",
            cfg,
            vec![
                A::I(ci(n)?),
                A::I(ci(c)?),
                A::I(ci(hw)?),
                A::I(ci(split)?),
                A::I(welford),
            ],
        ),
        None => (
            "bn_apply",
            cfg_lin4(total),
            vec![A::I(ci(total)?), A::I(ci(c)?), A::I(ci(hw)?)],
        ),
    };
    args.extend(tail);
    if name == "bn_apply_chunks" {
        args.push(A::I(l2));
    }
    be.launch(name, cfg, &args)?;
    Ok(())
}

/// `bn_apply`'s epilogue arguments `(res, relu)` for `act` on an output shaped like `x`.
fn act_args(be: &CudaBackend, x: &Tensor, act: BnAct<'_>) -> Result<[A; 2]> {
    Ok(match act {
        BnAct::None => [A::P(0), A::I(0)],
        BnAct::Relu => [A::P(0), A::I(1)],
        BnAct::AddRelu(r) => {
            same_shape(x, r, "batch_norm2d residual")?;
            [A::P(be.p(r)?), A::I(1)]
        }
    })
}

/// `(gγ, gβ)` per channel for statistics `mean`/`invstd` (batch or running) by `bn_bwd_reduce`
/// (`bn_bwd_split` when [`split_count`] gives the channels more than one block each);
/// `ry` is the output of a ReLU that followed the norm (its mask applies to `gy`), or 0; `gm`
/// receives the masked gradient, or is 0. With `fuse = Some((gamma, gx))`, channels that are
/// unsplit and small enough (see [`FUSED_MAX_M`]) go to `bn_bwd_fused`, which also writes the
/// train-mode input gradient into `gx` in the same launch. The third value is `None` when it
/// did, else the blocks per channel of the reduction launched (the grid of `bn_dx_chunks`).
/// With `vec` (see [`bn_vec`]; the caller checked the shape and alignment) the split reduction
/// is `bn_bwd_split4`, whose chunks are cut in float4 units.
#[allow(clippy::too_many_arguments)]
fn bwd_reduce(
    be: &CudaBackend,
    x: &Tensor,
    gy: &Tensor,
    ry: u64,
    mean: u64,
    invstd: u64,
    gm: u64,
    fuse: Option<(u64, u64)>,
    vec: bool,
) -> Result<(Tensor, Tensor, Option<usize>)> {
    let (n, c, h, w) = nchw(x, "batch_norm2d backward")?;
    let (gg, gb) = (be.empty(&[c])?, be.empty(&[c])?);
    if c == 0 {
        return Ok((gg, gb, Some(1)));
    }
    let split = split_on(be, c, n * h * w);
    let fused = fuse.filter(|_| one_launch(split, n * h * w));
    if split > 1 {
        // The float4 kernel's chunks are cut in units; the one-element kernel takes L2 eviction
        // priorities (see bn_l2_hint: the sums load their inputs evict-last).
        let (split, name, l2) = match vec {
            true => (split_units(split, n * h * w / 4), "bn_bwd_split4", None),
            false => (split, "bn_bwd_split", Some(i32::from(bn_l2_hint()))),
        };
        if l2 == Some(1) {
            be.l2_set_aside();
        }
        let part = be.buffer(c * split * 2)?;
        let mut args = vec![
            A::I(ci(n)?),
            A::I(ci(c)?),
            A::I(ci(h * w)?),
            A::I(ci(split)?),
            A::P(be.p(x)?),
            A::P(be.p(gy)?),
            A::P(ry),
            A::P(mean),
            A::P(invstd),
            A::P(part.ptr()),
            A::P(be.counters(c)?),
            A::P(be.p(&gg)?),
            A::P(be.p(&gb)?),
            A::P(gm),
        ];
        args.extend(l2.map(A::I));
        be.launch(name, cfg_split(split, c), &args)?;
        return Ok((gg, gb, Some(split)));
    }
    let mut args = vec![
        A::I(ci(n)?),
        A::I(ci(c)?),
        A::I(ci(h * w)?),
        A::P(be.p(x)?),
        A::P(be.p(gy)?),
        A::P(ry),
        A::P(mean),
        A::P(invstd),
    ];
    if let Some((gamma, _)) = fused {
        args.push(A::P(gamma));
    }
    args.extend([A::P(be.p(&gg)?), A::P(be.p(&gb)?), A::P(gm)]);
    let name = match fused {
        Some((_, gx)) => {
            args.push(A::P(gx));
            "bn_bwd_fused"
        }
        None => "bn_bwd_reduce",
    };
    be.launch(name, cfg_blocks(c, RED_THREADS), &args)?;
    Ok((gg, gb, fused.is_none().then_some(split)))
}

/// Train-mode gradients: `bn_bwd_fused` for small unsplit channels (see [`FUSED_MAX_M`] and
/// [`split_count`]), else `bn_bwd_reduce` (or `bn_bwd_split`) then `bn_train_dx`. With
/// `relu_out` (the output of a ReLU that followed the norm), the ReLU's backward is folded into
/// the kernels: no `ew_relu_bwd` launch, and the masked gradient is materialised (by the reducing
/// kernel; `bn_train_dx` then reads it unmasked) only when `keep_masked` asks for it, returned as
/// the fourth value.
#[allow(clippy::too_many_arguments)]
pub(super) fn batch_norm_train_bwd(
    be: &CudaBackend,
    x: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    invstd: &Tensor,
    gy: &Tensor,
    relu_out: Option<&Tensor>,
    keep_masked: bool,
) -> Result<(Tensor, Tensor, Tensor, Option<Tensor>)> {
    let (n, c, h, w) = shapes::batch_norm_train_bwd(x, gamma, mean, invstd, gy)?;
    let ry = match relu_out {
        Some(r) => {
            same_shape(x, r, "batch_norm2d backward ReLU output")?;
            be.p(r)?
        }
        None => 0,
    };
    let gm = match (relu_out, keep_masked) {
        (Some(_), true) => Some(be.empty(x.shape())?),
        _ => None,
    };
    let gm_p = gm.as_ref().map(|t| be.p(t)).transpose()?.unwrap_or(0);
    let gx = be.empty(x.shape())?;
    let (mean_p, invstd_p) = (be.p(mean)?, be.p(invstd)?);
    let m = n * h * w;
    // L2 eviction priorities in the passes above one launch per channel (see bn_l2_hint).
    let l2 = bn_l2_hint();
    // The float4 kernels (see bn_vec), without L2 hints.
    let vec = vec_fits(h * w, &[be.p(x)?, be.p(gy)?, ry, gm_p, be.p(&gx)?]);
    // Elements, or float4 units, per channel.
    let mu = if vec { m / 4 } else { m };
    let pipe = vec && bn_pipe();
    let kind = match vec {
        true if pipe => Resident::BwdPipe4,
        true => Resident::Bwd4V,
        false => Resident::bwd(l2),
    };
    // One launch: pipelined (MEDSSL_CUDA_BN_PIPE=on, float4; copying gy, x and any ReLU output)
    // or resident (MEDSSL_CUDA_BN_BWD).
    let resident = match c > 0 && (pipe || bn_resident_bwd()) {
        true if one_launch(split_on(be, c, m), m) => None,
        true => be.one_launch_plan(kind, c, mu, if ry != 0 { 3 } else { 2 }),
        false => None,
    };
    if let Some(OneLaunch { s, keep, cfg }) = resident {
        if l2 {
            be.l2_set_aside();
        }
        let (gg, gb) = (be.empty(&[c])?, be.empty(&[c])?);
        let part = be.buffer(c * s * 2)?;
        let args = [
            A::I(ci(n)?),
            A::I(ci(c)?),
            A::I(ci(h * w)?),
            A::I(ci(s)?),
            A::I(ci(keep)?),
            A::P(be.p(x)?),
            A::P(be.p(gy)?),
            A::P(ry),
            A::P(mean_p),
            A::P(invstd_p),
            A::P(be.p(gamma)?),
            A::P(part.ptr()),
            A::P(be.counters(2 * c)?),
            A::P(be.p(&gg)?),
            A::P(be.p(&gb)?),
            A::P(gm_p),
            A::P(be.p(&gx)?),
        ];
        be.launch(kind.kernel(), cfg, &args)?;
        return Ok((gx, gg, gb, gm));
    }
    let fuse = Some((be.p(gamma)?, be.p(&gx)?));
    let (gg, gb, split) = bwd_reduce(be, x, gy, ry, mean_p, invstd_p, gm_p, fuse, vec)?;
    let Some(split) = split else {
        // bn_bwd_fused wrote gx.
        return Ok((gx, gg, gb, gm));
    };
    // bn_train_dx reads the masked gradient where bn_bwd_reduce wrote it.
    let (gy_p, ry) = match &gm {
        Some(t) => (be.p(t)?, 0),
        _ => (be.p(gy)?, ry),
    };
    let total = x.numel();
    if total == 0 {
        return Ok((gx, gg, gb, gm));
    }
    // On the grid of the reduction just launched (see `bn_apply_chunks`), else over the flat
    // tensor.
    let (name, cfg, mut args) = match chunk_grid(c, split) {
        Some(cfg) => (
            if vec {
                "bn_dx_chunks4"
            } else if l2 {
                "bn_dx_chunks_l2"
            } else {
                "bn_dx_chunks"
            },
            cfg,
            vec![
                A::I(ci(n)?),
                A::I(ci(c)?),
                A::I(ci(h * w)?),
                A::I(ci(split)?),
            ],
        ),
        None => (
            "bn_train_dx",
            cfg_lin4(total),
            vec![
                A::I(ci(total)?),
                A::I(ci(c)?),
                A::I(ci(h * w)?),
                A::I(ci(n * h * w)?),
            ],
        ),
    };
    args.extend([
        A::P(be.p(x)?),
        A::P(gy_p),
        A::P(ry),
        A::P(mean_p),
        A::P(invstd_p),
        A::P(be.p(gamma)?),
        A::P(be.p(&gg)?),
        A::P(be.p(&gb)?),
        A::P(be.p(&gx)?),
    ]);
    be.launch(name, cfg, &args)?;
    Ok((gx, gg, gb, gm))
}

fn eval_invstd(be: &CudaBackend, rv: &Tensor, c: usize, eps: f32) -> Result<Tensor> {
    let inv = be.empty(&[c])?;
    if c > 0 {
        be.launch(
            "bn_eval_invstd",
            cfg_lin(c),
            &[A::I(ci(c)?), A::F(eps), A::P(be.p(rv)?), A::P(be.p(&inv)?)],
        )?;
    }
    Ok(inv)
}

/// Eval-mode forward with `act` after it, in one launch (`bn_eval_apply`).
#[allow(clippy::too_many_arguments)]
pub(super) fn batch_norm_eval_fwd(
    be: &CudaBackend,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    rm: &Tensor,
    rv: &Tensor,
    eps: f32,
    act: BnAct<'_>,
) -> Result<Tensor> {
    let (_, c, h, w) = shapes::batch_norm_eval_fwd(x, gamma, beta, rm, rv)?;
    let epilogue = act_args(be, x, act)?;
    let y = be.empty(x.shape())?;
    let total = x.numel();
    if total > 0 {
        be.launch(
            "bn_eval_apply",
            cfg_lin4(total),
            &[
                A::I(ci(total)?),
                A::I(ci(c)?),
                A::I(ci(h * w)?),
                A::F(eps),
                A::P(be.p(x)?),
                A::P(be.p(rm)?),
                A::P(be.p(rv)?),
                A::P(be.p(gamma)?),
                A::P(be.p(beta)?),
                epilogue[0],
                epilogue[1],
                A::P(be.p(&y)?),
            ],
        )?;
    }
    Ok(y)
}

pub(super) fn batch_norm_eval_bwd(
    be: &CudaBackend,
    x: &Tensor,
    gamma: &Tensor,
    rm: &Tensor,
    rv: &Tensor,
    eps: f32,
    gy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (_, c, h, w) = shapes::batch_norm_eval_bwd(x, gamma, rm, rv, gy)?;
    let inv = eval_invstd(be, rv, c, eps)?;
    let vec = vec_fits(h * w, &[be.p(x)?, be.p(gy)?]);
    let (gg, gb, _) = bwd_reduce(be, x, gy, 0, be.p(rm)?, be.p(&inv)?, 0, None, vec)?;
    let gx = be.empty(x.shape())?;
    let total = x.numel();
    if total > 0 {
        be.launch(
            "bn_eval_dx",
            cfg_lin4(total),
            &[
                A::I(ci(total)?),
                A::I(ci(c)?),
                A::I(ci(h * w)?),
                A::P(be.p(gy)?),
                A::P(be.p(gamma)?),
                A::P(be.p(&inv)?),
                A::P(be.p(&gx)?),
            ],
        )?;
    }
    Ok((gx, gg, gb))
}

pub(super) fn l2_normalize_fwd(be: &CudaBackend, x: &Tensor) -> Result<Tensor> {
    let (rows, n) = rows_last(x, "l2_normalize")?;
    let y = be.empty(x.shape())?;
    if rows > 0 {
        be.launch(
            "l2n_fwd",
            cfg_rows(rows),
            &[
                A::I(ci(rows)?),
                A::I(ci(n)?),
                A::P(be.p(x)?),
                A::P(be.p(&y)?),
            ],
        )?;
    }
    Ok(y)
}

pub(super) fn l2_normalize_bwd(be: &CudaBackend, x: &Tensor, gy: &Tensor) -> Result<Tensor> {
    same_shape(x, gy, "l2_normalize backward")?;
    let (rows, n) = rows_last(x, "l2_normalize")?;
    let gx = be.empty(x.shape())?;
    if rows > 0 {
        be.launch(
            "l2n_bwd",
            cfg_rows(rows),
            &[
                A::I(ci(rows)?),
                A::I(ci(n)?),
                A::P(be.p(x)?),
                A::P(be.p(gy)?),
                A::P(be.p(&gx)?),
            ],
        )?;
    }
    Ok(gx)
}

#[cfg(test)]
mod tests {
    use super::{pipe_chunks, split_count, BN_SPLIT_WAVE, SPLIT_MIN_CHUNK};

    /// Chunks as the kernels cut them: `ceil(m / s)` long, the last one shorter.
    fn chunks(m: usize, s: usize) -> Vec<usize> {
        let chunk = m.div_ceil(s);
        (0..s).map(|t| m.min((t + 1) * chunk) - t * chunk).collect()
    }

    #[test]
    fn split_count_spreads_few_channels_and_never_leaves_a_chunk_empty() {
        // The model's full-resolution layers on a 132-multiprocessor device, batch 36 at 28 px:
        // 64 channels get 5 blocks each (320 in all), 16 channels 6 (not 17: chunks of at least
        // SPLIT_MIN_CHUNK elements); 256 channels fill the device alone.
        let m = 36 * 28 * 28;
        assert_eq!(split_count(64, m, 132, 264, 0), 5);
        assert_eq!(split_count(16, m, 132, 264, 0), m / SPLIT_MIN_CHUNK);
        assert_eq!(split_count(256, 36 * 7 * 7, 132, 264, 0), 1);
        assert_eq!(split_count(132, m, 132, 264, 0), 1);
        // Too few elements to split, empty tensors, too many channels for the grid.
        assert_eq!(split_count(3, SPLIT_MIN_CHUNK * 2 - 1, 132, 264, 0), 1);
        assert_eq!(split_count(3, 0, 132, 264, 0), 1);
        assert_eq!(split_count(0, m, 132, 264, 0), 1);
        assert_eq!(split_count(70_000, m, 132, 264, 5), 1);
        // Forced: the setting, at most one block per element, 1 keeps one block per channel.
        assert_eq!(split_count(256, m, 132, 264, 1), 1);
        assert_eq!(split_count(256, m, 132, 264, 7), 7);
        assert_eq!(split_count(4, 3, 132, 264, 8), 3);
        // One wave (264 blocks at once: two per multiprocessor): 64 channels 4 blocks each (256,
        // where the automatic 5 make 320), 128 channels 2, 16 channels as automatic (the minimum
        // chunk decides); as many channels as fit at once, or more, one block each.
        assert_eq!(split_count(64, 256 * 784, 132, 264, BN_SPLIT_WAVE), 4);
        assert_eq!(split_count(64, 256 * 784, 132, 264, 0), 5);
        assert_eq!(split_count(128, 256 * 196, 132, 264, BN_SPLIT_WAVE), 2);
        assert_eq!(
            split_count(16, m, 132, 264, BN_SPLIT_WAVE),
            m / SPLIT_MIN_CHUNK
        );
        assert_eq!(split_count(264, m, 132, 264, BN_SPLIT_WAVE), 1);
        assert_eq!(split_count(300, m, 132, 264, BN_SPLIT_WAVE), 1);
        assert_eq!(
            split_count(3, SPLIT_MIN_CHUNK - 1, 132, 264, BN_SPLIT_WAVE),
            1
        );
        // Every (m, setting) gives non-empty chunks that cover m exactly.
        for m in 1..200 {
            for setting in 1..20 {
                let s = split_count(2, m, 132, 264, setting);
                assert!(
                    s >= 1 && s <= setting.min(m),
                    "m {m} setting {setting}: {s}"
                );
                let c = chunks(m, s);
                assert!(c.iter().all(|&n| n > 0), "m {m} s {s}: {c:?}");
                assert_eq!(c.iter().sum::<usize>(), m);
            }
        }
    }

    #[test]
    fn pipe_chunks_fit_the_stages_and_fill_the_last_round() {
        // An H100 (264 blocks): the forward's two stages of x allow 3603 units per chunk, the
        // backward's of gy and x 1806, with the ReLU's output too 1204. [256,64,28,28] (50176
        // units per channel): 14 chunks fit, 16 make 1024 items, 97 % of 4 rounds (14: 85 %);
        // the backward 33 and 66 chunks.
        let m4 = 256 * 784 / 4;
        assert_eq!(pipe_chunks(64, m4, 3603, 264), Some(16));
        assert_eq!(pipe_chunks(64, m4, 1806, 264), Some(33));
        assert_eq!(pipe_chunks(64, m4, 1204, 264), Some(66));
        // [256,128,14,14]: 4 chunks fit, 512 items fill 2 rounds to 97 %.
        assert_eq!(pipe_chunks(128, 256 * 196 / 4, 3603, 264), Some(4));
        // A small activation ([36,16,28,28], 7056 units): one round holds every item, so as many
        // chunks as fill it with chunks of at least 1024 units: 6, as the split kernels.
        assert_eq!(pipe_chunks(16, 36 * 784 / 4, 3603, 264), Some(6));
        // A channel needing more chunks than the grid has blocks, or nothing at all: none.
        assert_eq!(pipe_chunks(4, 264 * 100 + 1, 100, 264), None);
        assert_eq!(pipe_chunks(0, m4, 3603, 264), None);
        assert_eq!(pipe_chunks(64, 0, 3603, 264), None);
        assert_eq!(pipe_chunks(64, m4, 0, 264), None);
        // Always: chunks of at most `cap` units, none empty, at most the grid's blocks.
        for c in [1, 3, 64, 300] {
            for m4 in [1, 7, 100, 1000, 5000] {
                for cap in [1, 5, 64, 1000] {
                    let Some(s) = pipe_chunks(c, m4, cap, 16) else {
                        assert!(m4.div_ceil(cap) > 16, "{c} {m4} {cap}");
                        continue;
                    };
                    let ch = chunks(m4, s);
                    assert!(
                        s <= 16 && ch.iter().all(|&n| n > 0 && n <= cap),
                        "{s} {ch:?}"
                    );
                    assert_eq!(ch.iter().sum::<usize>(), m4);
                }
            }
        }
    }
}
