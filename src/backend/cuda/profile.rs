//! Where a CUDA step's device time goes: every kernel (hand-written, cuBLAS and cuDNN internals
//! alike), copy and fill the device ran between [`start`] and [`stop`], with its device start and
//! end times, summed by name. Used by `medssl-bench step --profile`.
//!
//! On a GPU the records come from CUPTI's activity API (`libcupti.so`, loaded at run time like the
//! other CUDA libraries; the `nvidia/cuda_cupti/lib` folder of a PyTorch pip environment has it):
//! CUPTI fills host buffers it asks for through `buffer_requested` and hands them back full
//! through `buffer_completed`, where the records are read. Records are read through their
//! leading fields only (kind; start and end at bytes 16 and 24; a kernel's name pointer), which
//! every CUPTI version since CUDA 9 lays out the same, so the profile does not depend on the
//! CUPTI version the node provides.
//!
//! On the emulated device there is no device clock: each emulated kernel launch is timed on the
//! host instead (`host_timed`), which exercises the same bookkeeping but says nothing about a
//! GPU (the profile's `source` says which).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use crate::error::{Error, Result};

/// One name's share of a profile.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// Kernel name as the driver reports it (C++ names stay mangled), or `memcpy HtoD` /
    /// `memcpy DtoH` / `memcpy DtoD` / `memcpy other` / `memset`.
    pub name: String,
    pub calls: u64,
    /// Summed device time in nanoseconds.
    pub ns: u64,
}

/// What ran on the device between [`start`] and [`stop`].
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// `cupti` (device timestamps) or `emulation host time`.
    pub source: &'static str,
    /// By name, most device time first.
    pub entries: Vec<Entry>,
    /// Time during which at least one recorded item ran (the union of their intervals), ns.
    pub busy_ns: u64,
    /// From the first item's start to the last item's end, ns.
    pub span_ns: u64,
    /// Records the profiler could not keep (CUPTI ran out of buffer space), 0 normally.
    pub dropped: u64,
}

#[derive(Default)]
struct Collector {
    by_name: HashMap<String, (u64, u64)>,
    intervals: Vec<(u64, u64)>,
}

impl Collector {
    fn add(&mut self, name: &str, start: u64, end: u64) {
        let end = end.max(start);
        let e = self.by_name.entry(name.to_string()).or_insert((0, 0));
        e.0 += 1;
        e.1 += end - start;
        self.intervals.push((start, end));
    }

    fn finish(self, source: &'static str, dropped: u64) -> Profile {
        let mut entries: Vec<Entry> = self
            .by_name
            .into_iter()
            .map(|(name, (calls, ns))| Entry { name, calls, ns })
            .collect();
        entries.sort_by(|a, b| b.ns.cmp(&a.ns).then_with(|| a.name.cmp(&b.name)));
        let (busy_ns, span_ns) = union_and_span(self.intervals);
        Profile {
            source,
            entries,
            busy_ns,
            span_ns,
            dropped,
        }
    }
}

/// `(length of the union of the intervals, last end − first start)`.
fn union_and_span(mut iv: Vec<(u64, u64)>) -> (u64, u64) {
    if iv.is_empty() {
        return (0, 0);
    }
    iv.sort_unstable();
    let first = iv[0].0;
    let mut busy = 0;
    let (mut cs, mut ce) = iv[0];
    let mut last = ce;
    for &(s, e) in &iv[1..] {
        last = last.max(e);
        if s > ce {
            busy += ce - cs;
            (cs, ce) = (s, e);
        } else {
            ce = ce.max(e);
        }
    }
    busy += ce - cs;
    (busy, last - first)
}

static COLLECTOR: Mutex<Option<Collector>> = Mutex::new(None);
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Host clock origin of the emulation's timings.
static HOST_EPOCH: OnceLock<Instant> = OnceLock::new();

fn with_collector(f: impl FnOnce(&mut Collector)) {
    let mut g = COLLECTOR.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = g.as_mut() {
        f(c)
    }
}

/// Whether a profile is being recorded.
pub fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

/// Runs `f`, one emulated launch or product, and records it under `name` with host timings while
/// a profile is being recorded.
pub(super) fn host_timed<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let t0 = Instant::now();
    let r = f();
    if active() {
        let epoch = *HOST_EPOCH.get_or_init(Instant::now);
        let ns = |t: Instant| t.saturating_duration_since(epoch).as_nanos() as u64;
        let (s, e) = (ns(t0), ns(Instant::now()));
        with_collector(|c| c.add(name, s, e));
    }
    r
}

/// Starts recording: on the CPU emulation of the device (`MEDSSL_CUDA_EMULATE=1`) host timings of
/// the emulated launches, otherwise CUPTI's record of the device's activity. The caller should
/// synchronise the device first, so that work queued earlier is not counted.
pub fn start() -> Result<()> {
    let emulated = super::emu::enabled();
    if ACTIVE.swap(true, Ordering::SeqCst) {
        return Err(Error::Cuda(
            "a device profile is already being recorded".into(),
        ));
    }
    *COLLECTOR.lock().unwrap_or_else(|p| p.into_inner()) = Some(Collector::default());
    if emulated {
        // The host timings' origin, set before the first recorded launch starts (set by that
        // launch's end instead, it would put the launch's start before the origin: 0 ns long).
        HOST_EPOCH.get_or_init(Instant::now);
        return Ok(());
    }
    let r = cupti::enable();
    if r.is_err() {
        ACTIVE.store(false, Ordering::SeqCst);
    }
    r
}

/// Stops recording and returns the profile. The caller synchronises the device first, so that
/// every item it queued has finished.
pub fn stop() -> Result<Profile> {
    let emulated = super::emu::enabled();
    if !ACTIVE.load(Ordering::SeqCst) {
        return Err(Error::Cuda("no device profile is being recorded".into()));
    }
    let dropped = if emulated { Ok(0) } else { cupti::disable() };
    ACTIVE.store(false, Ordering::SeqCst);
    let c = COLLECTOR
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or_default();
    let source = if emulated {
        "emulation host time"
    } else {
        "cupti"
    };
    Ok(c.finish(source, dropped?))
}

mod cupti {
    //! The CUPTI side: buffer callbacks and record parsing.

    use std::alloc::{alloc, dealloc, Layout};
    use std::ffi::CStr;
    use std::panic::catch_unwind;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use cudarc::cupti::result::activity;
    use cudarc::cupti::sys::{self, CUptiResult, CUpti_ActivityKind as K};

    use super::with_collector;
    use crate::error::{Error, Result};

    const BUF_BYTES: usize = 4 << 20;
    const BUF_ALIGN: usize = 8;
    /// Kinds recorded: kernels without serialising them, copies, fills.
    const KINDS: [K; 3] = [
        K::CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL,
        K::CUPTI_ACTIVITY_KIND_MEMCPY,
        K::CUPTI_ACTIVITY_KIND_MEMSET,
    ];
    /// `CUPTI_ACTIVITY_FLAG_FLUSH_FORCED` (its value is shared with another flag in the C enum).
    const FLUSH_FORCED: u32 = 1;

    static DROPPED: AtomicU64 = AtomicU64::new(0);
    /// The buffer callbacks are registered once per process.
    static REGISTERED: AtomicBool = AtomicBool::new(false);

    fn err(what: &str) -> impl FnOnce(cudarc::cupti::result::CuptiError) -> Error + '_ {
        move |e| Error::Cuda(format!("CUPTI {what}: {:?}", e.0))
    }

    /// Guards a CUPTI call: cudarc panics when a symbol is missing from the loaded library.
    fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
            Err(Error::Cuda(format!(
                "CUPTI {what}: the loaded libcupti.so lacks an entry point it needs"
            )))
        })
    }

    pub(super) fn enable() -> Result<()> {
        // Without the driver library, libcupti 13 recurses until the stack overflows inside
        // cuptiActivityRegisterCallbacks instead of returning an error.
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "the device profiler needs the CUDA driver library (libcuda.so)".into(),
            ));
        }
        // SAFETY: as above.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Cuda(
                "libcupti.so could not be loaded: add the folder holding libcupti.so.* (e.g. \
                 site-packages/nvidia/cuda_cupti/lib or nvidia/cu13/lib of a PyTorch pip \
                 environment) to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        guarded("start", || {
            DROPPED.store(0, Ordering::SeqCst);
            if !REGISTERED.load(Ordering::SeqCst) {
                activity::register_callbacks(Some(buffer_requested), Some(buffer_completed))
                    .map_err(err("registering the buffer callbacks"))?;
                REGISTERED.store(true, Ordering::SeqCst);
            }
            for (i, k) in KINDS.into_iter().enumerate() {
                if let Err(e) = activity::enable(k) {
                    // Leave nothing half on.
                    for done in &KINDS[..i] {
                        let _ = activity::disable(*done);
                    }
                    return Err(err("enabling activity records")(e));
                }
            }
            Ok(())
        })
    }

    /// Delivers every pending record, stops recording; returns the records CUPTI dropped.
    pub(super) fn disable() -> Result<u64> {
        guarded("stop", || {
            activity::flush_all(FLUSH_FORCED).map_err(err("flushing the records"))?;
            for k in KINDS {
                activity::disable(k).map_err(err("disabling activity records"))?;
            }
            activity::flush_all(FLUSH_FORCED).map_err(err("flushing the records"))?;
            Ok(DROPPED.load(Ordering::SeqCst))
        })
    }

    fn layout() -> Layout {
        Layout::from_size_align(BUF_BYTES, BUF_ALIGN).expect("valid layout")
    }

    /// CUPTI asks for an empty buffer.
    unsafe extern "C" fn buffer_requested(buf: *mut *mut u8, size: *mut usize, max: *mut usize) {
        // SAFETY: CUPTI passes valid out-pointers; the buffer is freed in `buffer_completed`.
        unsafe {
            let p = alloc(layout());
            *buf = p;
            *size = if p.is_null() { 0 } else { BUF_BYTES };
            *max = 0; // as many records as fit
        }
    }

    /// CUPTI hands back a buffer holding `valid` bytes of records.
    unsafe extern "C" fn buffer_completed(
        ctx: cudarc::driver::sys::CUcontext,
        stream: u32,
        buf: *mut u8,
        _size: usize,
        valid: usize,
    ) {
        if buf.is_null() {
            return;
        }
        // A panic must not unwind into CUPTI.
        let _ = catch_unwind(|| {
            // SAFETY: `buf` holds `valid` bytes of records written by CUPTI.
            unsafe { read_records(buf, valid) };
            let mut n = 0usize;
            // SAFETY: valid out-pointer.
            if unsafe { activity::get_num_dropped_records(ctx, stream, &mut n) }.is_ok() {
                DROPPED.fetch_add(n as u64, Ordering::SeqCst);
            }
        });
        // SAFETY: allocated by `buffer_requested` with the same layout.
        unsafe { dealloc(buf, layout()) };
    }

    /// Reads the records of one buffer into the collector.
    ///
    /// # Safety
    /// `buf` holds `valid` bytes of CUPTI activity records.
    unsafe fn read_records(buf: *mut u8, valid: usize) {
        let mut rec: *mut sys::CUpti_Activity = std::ptr::null_mut();
        loop {
            // SAFETY: per the contract above.
            match unsafe { activity::get_next_record(buf, valid, &mut rec) } {
                Ok(()) => {}
                Err(e)
                    if e.0 == CUptiResult::CUPTI_ERROR_MAX_LIMIT_REACHED
                        || e.0 == CUptiResult::CUPTI_ERROR_INVALID_KIND =>
                {
                    break
                }
                Err(_) => break,
            }
            let p = rec as *const u8;
            // The kind is read as a plain integer: a kind newer than these bindings must not be
            // turned into a Rust enum.
            // SAFETY: every record starts with its 4-byte kind; start and end are the u64 at
            // bytes 16 and 24 of the kernel (v4 on), memcpy and memset records alike.
            let (kind, start, end) = unsafe {
                (
                    (p as *const u32).read_unaligned(),
                    (p.add(16) as *const u64).read_unaligned(),
                    (p.add(24) as *const u64).read_unaligned(),
                )
            };
            let name = if kind == K::CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL as u32
                || kind == K::CUPTI_ACTIVITY_KIND_KERNEL as u32
            {
                // SAFETY: a kernel record; its name pointer sits where CUpti_ActivityKernel4
                // (and every later version) has it, and CUPTI keeps the string alive.
                let np = unsafe {
                    (p.add(std::mem::offset_of!(sys::CUpti_ActivityKernel4, name))
                        as *const *const std::ffi::c_char)
                        .read_unaligned()
                };
                if np.is_null() {
                    "(unnamed kernel)".to_string()
                } else {
                    // SAFETY: a NUL-terminated string owned by CUPTI.
                    unsafe { CStr::from_ptr(np) }.to_string_lossy().into_owned()
                }
            } else if kind == K::CUPTI_ACTIVITY_KIND_MEMCPY as u32 {
                // SAFETY: a memcpy record: copyKind is the byte after the kind.
                let ck = unsafe { *p.add(4) };
                match ck {
                    1 => "memcpy HtoD",
                    2 => "memcpy DtoH",
                    8 => "memcpy DtoD",
                    _ => "memcpy other",
                }
                .to_string()
            } else if kind == K::CUPTI_ACTIVITY_KIND_MEMSET as u32 {
                "memset".to_string()
            } else {
                continue;
            };
            with_collector(|c| c.add(&name, start, end));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_span_and_order() {
        assert_eq!(union_and_span(vec![]), (0, 0));
        // [0,10) ∪ [5,12) ∪ [20,25) ∪ [21,22): busy 12 + 5, span 25.
        assert_eq!(
            union_and_span(vec![(20, 25), (0, 10), (21, 22), (5, 12)]),
            (17, 25)
        );
        let mut c = Collector::default();
        c.add("b", 0, 10);
        c.add("a", 10, 13);
        c.add("b", 20, 25);
        c.add("c", 30, 33);
        // A reversed interval counts as empty.
        c.add("c", 40, 39);
        let p = c.finish("test", 0);
        let got: Vec<(&str, u64, u64)> = p
            .entries
            .iter()
            .map(|e| (e.name.as_str(), e.calls, e.ns))
            .collect();
        assert_eq!(got, vec![("b", 2, 15), ("a", 1, 3), ("c", 2, 3)]);
        assert_eq!((p.busy_ns, p.span_ns), (21, 40));
    }
}
