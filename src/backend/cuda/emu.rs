//! CPU emulation of the CUDA device, for testing the CUDA backend where there is no GPU.
//!
//! With `MEDSSL_CUDA_EMULATE=1`, `cuda:0` is a [`CudaBackend`](super::CudaBackend) whose buffers
//! are host memory and whose kernel launches run the very same `kernels/*.cu` source, compiled by
//! the host C++ compiler against `kernels/emu/cuda_emu.h` (see that header for the execution
//! model: blocks in sequence, CUDA threads as fibers, real barrier and warp-shuffle semantics).
//! Everything else in the backend is the production code: the op-family files, their launch
//! geometry and argument lists, the caching allocator, the multi-tensor tables. What is not
//! emulated: cuBLAS (a CPU GEMM with the same strided-batched semantics stands in) and cuDNN
//! (convolutions take the im2col + GEMM path, whose kernels are emulated). So the CUDA parity
//! tests and the CUDA conformance run check every hand-written kernel against the CPU reference
//! on any machine, and CI runs them.
//!
//! Checks the device would not make:
//! - every launch's argument list is compared with the kernel's C++ signature (count, and kind
//!   and size of each parameter);
//! - every pointer argument must point into a live buffer (or be null);
//! - every buffer carries guard zones before and after its data, verified after each launch
//!   that received it (after a launch with a multi-tensor table, whose pointers travel inside
//!   the table: every live buffer), so an out-of-bounds write is an error naming the kernel;
//! - fresh and recycled buffers are filled with NaN, so an op that leaves part of its output
//!   unwritten shows up in the parity tests;
//! - barrier misuse (deadlock, partial-warp shuffles) is reported by the C++ runtime.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::{Mutex, OnceLock};

use cudarc::driver::LaunchConfig;

use super::gemm::BlasCall;
#[cfg(test)]
use super::gemm::Gemm;
use super::{lock, A};
use crate::error::{Error, Result};

/// The environment variable that turns `cuda:N` into the CPU emulation.
pub const ENV: &str = "MEDSSL_CUDA_EMULATE";

/// Whether `MEDSSL_CUDA_EMULATE=1` is set (false when the CUDA switches do not parse: creating
/// a device then reports the error).
pub fn enabled() -> bool {
    super::switches::get().is_ok_and(|s| s.emulate)
}

extern "C" {
    fn medssl_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        args: *const *const c_void,
        kinds: *const c_char,
        sizes: *const usize,
        nargs: c_int,
        shared_bytes: usize,
        cooperative: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Guard-zone length (f32 words) on each side of every emulated buffer.
const GUARD: usize = 32;
/// Bit pattern of the guard words (a NaN no arithmetic produces).
const GUARD_BITS: u32 = 0x7fa5_d00d;
/// Bit pattern written into fresh and recycled buffers (a quiet NaN).
const POISON_BITS: u32 = 0x7fc0_0bad;

/// Live emulated buffers by data address: `(length in f32, allocation base)`.
fn live() -> &'static Mutex<BTreeMap<u64, (usize, u64)>> {
    static LIVE: OnceLock<Mutex<BTreeMap<u64, (usize, u64)>>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// Host memory standing in for one device buffer: `[guard | data | guard]`, owned through a raw
/// pointer because kernels write it through raw pointers.
pub(crate) struct HostBuf {
    base: *mut f32,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value; like a device buffer it is only
// written by launches on behalf of the tensor that owns it.
unsafe impl Send for HostBuf {}
unsafe impl Sync for HostBuf {}

impl HostBuf {
    pub(crate) fn new(len: usize) -> HostBuf {
        let mut v = vec![f32::from_bits(GUARD_BITS); len + 2 * GUARD];
        v[GUARD..GUARD + len].fill(f32::from_bits(POISON_BITS));
        let base = Box::into_raw(v.into_boxed_slice()) as *mut f32;
        let b = HostBuf { base, len };
        lock(live()).insert(b.addr(), (len, base as u64));
        b
    }
    pub(crate) fn len(&self) -> usize {
        self.len
    }
    /// Address of the data (the "device pointer").
    pub(crate) fn addr(&self) -> u64 {
        // SAFETY: GUARD is within the allocation.
        unsafe { self.base.add(GUARD) as u64 }
    }
    /// Fills the data with the poison NaN (a recycled buffer is as undefined as a fresh one).
    pub(crate) fn poison(&mut self) {
        self.fill(f32::from_bits(POISON_BITS));
    }
    /// Sets every data element to `v`.
    pub(crate) fn fill(&mut self, v: f32) {
        for i in 0..self.len {
            // SAFETY: in bounds; no reference to the memory exists.
            unsafe { self.base.add(GUARD + i).write(v) };
        }
    }
    pub(crate) fn write(&mut self, at: usize, data: &[f32]) {
        assert!(at + data.len() <= self.len);
        // SAFETY: in bounds (checked above); no reference to the memory exists.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(GUARD + at), data.len())
        }
    }
    pub(crate) fn read(&self, out: &mut [f32]) {
        assert!(out.len() <= self.len);
        // SAFETY: in bounds; launches have completed (they run synchronously).
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(GUARD), out.as_mut_ptr(), out.len()) }
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        lock(live()).remove(&self.addr());
        // SAFETY: `base` came from `Box::into_raw` of a slice of this length.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.base,
                self.len + 2 * GUARD,
            )))
        };
    }
}

/// Writes `data` at device address `p` of the emulated device (the start of, or a place
/// inside, one live buffer): the step graph's deferred uploads and recorded zero-fills.
pub(crate) fn write_at(p: u64, data: &[f32]) -> Result<()> {
    let map = lock(live());
    let Some((start, len, _)) = containing(&map, p) else {
        return Err(Error::Cuda(format!(
            "emulated copy to {p:#x}: not inside any live device buffer"
        )));
    };
    let at = ((p - start) / 4) as usize;
    if at + data.len() > len {
        return Err(Error::Cuda(format!(
            "emulated copy of {} elements to element {at} of a {len}-element buffer",
            data.len()
        )));
    }
    // SAFETY: in bounds of a live buffer (checked above, registry lock held); no reference to
    // the memory exists (kernels run synchronously on this thread).
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p as *mut f32, data.len()) };
    Ok(())
}

/// The live buffer containing address `p` (its data address and length), if any.
fn containing(map: &BTreeMap<u64, (usize, u64)>, p: u64) -> Option<(u64, usize, u64)> {
    let (&start, &(len, base)) = map.range(..=p).next_back()?;
    (p <= start + 4 * len as u64).then_some((start, len, base))
}

/// Whether both guard zones of the buffer at allocation `base` with `len` data words are intact.
fn guards_intact(base: u64, len: usize) -> bool {
    let base = base as *const u32;
    (0..GUARD).chain(GUARD + len..2 * GUARD + len).all(|i| {
        // SAFETY: the buffer is live (the caller holds the registry lock, and buffers only die
        // after leaving the registry); indices are within the allocation.
        unsafe { base.add(i).read() == GUARD_BITS }
    })
}

/// Runs kernel `name` on the emulated device. `table` is an optional by-value struct parameter
/// after `args` (its bytes). The kernels that [`super::cooperative`] names run every block at
/// once, each on an OS thread of its own, as a cooperative launch keeps them all resident on the
/// device; the others run block after block.
pub(crate) fn launch(
    name: &str,
    cfg: &LaunchConfig,
    args: &[A],
    table: Option<(*const c_void, usize)>,
) -> Result<()> {
    let n = args.len() + usize::from(table.is_some());
    // One 8-byte slot per scalar argument; kernels read the low 4 bytes of int/float slots
    // (little-endian), as the driver reads the argument's own bytes.
    let mut slots: Vec<u64> = Vec::with_capacity(args.len());
    let mut kinds: Vec<c_char> = Vec::with_capacity(n);
    let mut sizes: Vec<usize> = Vec::with_capacity(n);
    for a in args {
        let (kind, size) = match *a {
            A::P(_) => (b'P', 8),
            A::I(_) => (b'I', 4),
            A::F(_) => (b'F', 4),
        };
        slots.push(a.slot());
        kinds.push(kind as c_char);
        sizes.push(size);
    }
    let mut ptrs: Vec<*const c_void> = slots
        .iter()
        .map(|s| s as *const u64 as *const c_void)
        .collect();
    if let Some((p, size)) = table {
        ptrs.push(p);
        kinds.push(b'S' as c_char);
        sizes.push(size);
    }
    // Pointer arguments must lie in live buffers.
    let buffers: Vec<(u64, usize, u64)> = {
        let map = lock(live());
        let mut v = Vec::new();
        for (i, a) in args.iter().enumerate() {
            if let A::P(p) = *a {
                if p == 0 {
                    continue; // a null pointer (an optional output the kernel skips)
                }
                match containing(&map, p) {
                    Some(b) => v.push(b),
                    None => {
                        return Err(Error::Cuda(format!(
                            "emulated launch of {name}: argument {i} (address {p:#x}) is not \
                             inside any live device buffer"
                        )))
                    }
                }
            }
        }
        v
    };
    let cname = CString::new(name).map_err(|_| Error::msg("kernel name contains NUL"))?;
    let grid = [cfg.grid_dim.0, cfg.grid_dim.1, cfg.grid_dim.2];
    let block = [cfg.block_dim.0, cfg.block_dim.1, cfg.block_dim.2];
    let mut err = vec![0u8; 512];
    // SAFETY: every pointer in `ptrs` points at a live value of the size stated in `sizes`; the
    // kernel's signature is checked against `kinds`/`sizes` before it runs; the device pointers
    // were checked to lie in live buffers, and buffers sized by the callers' validated shapes.
    let rc = unsafe {
        medssl_emu_launch(
            cname.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            ptrs.as_ptr(),
            kinds.as_ptr(),
            sizes.as_ptr(),
            n as c_int,
            cfg.shared_mem_bytes as usize,
            c_int::from(super::cooperative(name)),
            err.as_mut_ptr() as *mut c_char,
            err.len(),
        )
    };
    if rc != 0 {
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        return Err(Error::Cuda(format!(
            "emulated launch of {name} (grid {grid:?}, block {block:?}): {}",
            String::from_utf8_lossy(&err[..end])
        )));
    }
    let map = lock(live());
    let checked: Vec<(u64, usize, u64)> = if table.is_some() {
        map.iter().map(|(&s, &(l, b))| (s, l, b)).collect()
    } else {
        buffers
    };
    for (start, len, base) in checked {
        if map.contains_key(&start) && !guards_intact(base, len) {
            return Err(Error::Cuda(format!(
                "emulated launch of {name} (grid {grid:?}, block {block:?}) wrote outside a \
                 {len}-element buffer that it received (guard zone overwritten)"
            )));
        }
    }
    Ok(())
}

/// `cublasSgemm` / `cublasSgemmStridedBatched` on the emulated device, column-major as cuBLAS
/// reads its arguments (the backend maps its row-major products onto this call, see
/// [`Gemm::blas_call`]). Leading dimensions are checked as cuBLAS checks them
/// (`CUBLAS_STATUS_INVALID_VALUE`), and every operand of every batch must lie inside one live
/// buffer.
pub(crate) fn cublas_sgemm(call: &BlasCall) -> std::result::Result<(), String> {
    let BlasCall {
        trans_a,
        trans_b,
        m,
        n,
        k,
        alpha,
        beta,
        a,
        lda,
        stride_a,
        b,
        ldb,
        stride_b,
        c,
        ldc,
        stride_c,
        batch,
    } = *call;
    // Stored (rows, columns) of A, B, C.
    let sa = if trans_a { (k, m) } else { (m, k) };
    let sb = if trans_b { (n, k) } else { (k, n) };
    let sc = (m, n);
    for (what, (rows, _), ld) in [("lda", sa, lda), ("ldb", sb, ldb), ("ldc", sc, ldc)] {
        if ld < rows.max(1) {
            return Err(format!(
                "CUBLAS_STATUS_INVALID_VALUE: {what} = {ld} < {} rows ({call:?})",
                rows.max(1)
            ));
        }
    }
    if m == 0 || n == 0 || batch == 0 {
        return Ok(());
    }
    {
        let last = batch - 1;
        let extent = |(rows, cols): (usize, usize), ld: usize, stride: usize| {
            last * stride + if cols == 0 { 0 } else { (cols - 1) * ld + rows }
        };
        let operands = [
            (a, "A", extent(sa, lda, stride_a)),
            (b, "B", extent(sb, ldb, stride_b)),
            (c, "C", extent(sc, ldc, stride_c)),
        ];
        let map = lock(live());
        for (p, what, extent) in operands {
            if extent == 0 {
                continue;
            }
            match containing(&map, p) {
                Some((start, len, _)) if p + 4 * extent as u64 <= start + 4 * len as u64 => {}
                Some((_, len, _)) => {
                    return Err(format!(
                        "operand {what} spans {extent} elements past its start, beyond its \
                         {len}-element buffer ({call:?})"
                    ))
                }
                None => {
                    return Err(format!(
                        "operand {what} (address {p:#x}) is not inside any live device buffer \
                         ({call:?})"
                    ))
                }
            }
        }
    }
    // (column stride, row stride) of op(A) [m, k], op(B) [k, n] and C [m, n].
    let (lda, ldb, ldc) = (lda as isize, ldb as isize, ldc as isize);
    let (a_cs, a_rs) = if trans_a { (1, lda) } else { (lda, 1) };
    let (b_cs, b_rs) = if trans_b { (1, ldb) } else { (ldb, 1) };
    for i in 0..batch {
        // SAFETY: the extents above lie inside live buffers (emulated device memory is host
        // memory); C does not overlap A or B (the callers' outputs are fresh buffers).
        unsafe {
            let pa = (a as *const f32).add(i * stride_a);
            let pb = (b as *const f32).add(i * stride_b);
            let pc = (c as *mut f32).add(i * stride_c);
            // gemm's convention: dst = α·dst + β·lhs·rhs (dst read only when α ≠ 0, like
            // cuBLAS, which never reads C when its beta is 0).
            gemm::gemm(
                m,
                n,
                k,
                pc,
                ldc,
                1,
                beta != 0.0,
                pa,
                a_cs,
                a_rs,
                pb,
                b_cs,
                b_rs,
                beta,
                alpha,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The emulation's own behaviour, on the kernels of `kernels/emu/selftest.cu` and a few real
    //! ones. These run on any machine (no GPU, no environment variable needed).
    use super::*;

    fn cfg(grid: u32, block: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn host(b: &HostBuf) -> Vec<f32> {
        let mut v = vec![0.0; b.len()];
        b.read(&mut v);
        v
    }

    #[test]
    fn block_barrier_orders_shared_memory() {
        for n in [1usize, 31, 32, 33, 256, 1000, 1024] {
            let mut x = HostBuf::new(n);
            x.write(0, &(0..n).map(|i| i as f32).collect::<Vec<_>>());
            let y = HostBuf::new(n);
            let args = [A::I(n as i32), A::P(x.addr()), A::P(y.addr())];
            launch("emu_selftest_reverse", &cfg(1, n as u32), &args, None).unwrap();
            let want: Vec<f32> = (0..n).rev().map(|i| i as f32).collect();
            assert_eq!(host(&y), want, "block of {n}");
        }
    }

    #[test]
    fn warp_shuffles_exchange_within_each_warp() {
        let (blocks, threads) = (3u32, 96u32);
        let n = (blocks * threads) as usize;
        for m in [1, 5, 16, 31] {
            let y = HostBuf::new(n);
            let z = HostBuf::new(n);
            let args = [A::I(m), A::P(y.addr()), A::P(z.addr())];
            launch("emu_selftest_shuffle", &cfg(blocks, threads), &args, None).unwrap();
            let (y, z) = (host(&y), host(&z));
            for t in 0..n {
                assert_eq!(
                    y[t],
                    (t ^ m as usize) as f32,
                    "lane exchange, thread {t}, mask {m}"
                );
                let w = t / 32 * 32;
                let sum: usize = (w..w + 32).sum();
                assert_eq!(z[t], sum as f32, "warp_sum, thread {t}");
            }
        }
    }

    #[test]
    fn real_reduction_kernels_match_a_plain_sum() {
        // red_sum_scaled: one block of 1024 threads, block_sum (shuffles + shared memory).
        let n = 5000usize;
        let mut x = HostBuf::new(n);
        let data: Vec<f32> = (0..n).map(|i| ((i * 7919) % 113) as f32 - 50.0).collect();
        x.write(0, &data);
        let out = HostBuf::new(1);
        let args = [A::I(n as i32), A::P(x.addr()), A::F(0.5), A::P(out.addr())];
        launch("red_sum_scaled", &cfg(1, 1024), &args, None).unwrap();
        let want: f32 = data.iter().sum::<f32>() * 0.5;
        assert_eq!(host(&out)[0], want);
    }

    #[test]
    fn deadlocks_are_reported() {
        let y = HostBuf::new(32);
        let e = launch_err("emu_selftest_deadlock", 1, 32, &[A::P(y.addr())]);
        assert!(e.contains("deadlock"), "{e}");
        assert!(e.contains("16 thread(s) wait at __syncthreads"), "{e}");
    }

    #[test]
    fn partial_warp_shuffles_are_reported() {
        // Warp-per-row kernel launched with 48 threads: warp 1 has 16 lanes.
        let x = HostBuf::new(64);
        let y = HostBuf::new(2);
        let args = [A::I(2), A::I(32), A::P(x.addr()), A::P(y.addr())];
        let e = launch_err("red_gap_fwd", 1, 48, &args);
        assert!(e.contains("16 live lanes"), "{e}");
    }

    #[test]
    fn out_of_bounds_writes_are_reported() {
        let y = HostBuf::new(100);
        launch(
            "emu_selftest_fill",
            &cfg(1, 256),
            &[A::I(100), A::P(y.addr())],
            None,
        )
        .unwrap();
        assert_eq!(host(&y), vec![1.0; 100]);
        let e = launch_err("emu_selftest_fill", 1, 256, &[A::I(101), A::P(y.addr())]);
        assert!(e.contains("wrote outside a 100-element buffer"), "{e}");
    }

    /// The error message of a launch that must fail.
    fn launch_err(name: &str, grid: u32, block: u32, args: &[A]) -> String {
        match launch(name, &cfg(grid, block), args, None) {
            Ok(()) => panic!("launching {name} with {args:?} succeeded"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn out_of_bounds_writes_through_a_multi_tensor_table_are_reported() {
        use super::super::optim::{MtTable, MT_MAX};
        let mut acc = HostBuf::new(100);
        acc.fill(1.0);
        let mut x = HostBuf::new(101);
        x.fill(2.0);
        let table = |n: i32| MtTable {
            count: 1,
            first: {
                let mut f = [0; MT_MAX + 1];
                f[1] = 1;
                f
            },
            n: {
                let mut v = [0; MT_MAX];
                v[0] = n;
                v
            },
            a: [acc.addr(); MT_MAX],
            b: [x.addr(); MT_MAX],
            c: [0; MT_MAX],
            d: [0; MT_MAX],
        };
        let run = |t: &MtTable| {
            let p = (t as *const MtTable).cast::<c_void>();
            launch(
                "op_add_mt",
                &cfg(1, 256),
                &[],
                Some((p, std::mem::size_of::<MtTable>())),
            )
        };
        run(&table(100)).unwrap();
        assert_eq!(host(&acc), vec![3.0; 100]);
        let e = run(&table(101)).unwrap_err().to_string();
        assert!(e.contains("wrote outside a 100-element buffer"), "{e}");
    }

    #[test]
    fn argument_lists_are_checked_against_the_signature() {
        let y = HostBuf::new(4);
        let cases: [(&str, u32, Vec<A>, &str); 5] = [
            (
                "emu_selftest_fill",
                32,
                vec![A::P(y.addr())],
                "has 2 parameters but the launch passes 1",
            ),
            (
                "emu_selftest_fill",
                32,
                vec![A::F(4.0), A::P(y.addr())],
                "parameter 0 is a int",
            ),
            ("no_such_kernel", 32, vec![], "not in any kernels/*.cu file"),
            (
                "emu_selftest_fill",
                32,
                vec![A::I(4), A::P(8)],
                "not inside any live device buffer",
            ),
            (
                "emu_selftest_fill",
                2048,
                vec![A::I(4), A::P(y.addr())],
                "invalid block",
            ),
        ];
        for (name, block, args, want) in cases {
            let e = launch_err(name, 1, block, &args);
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn fresh_buffers_are_poisoned_and_gemm_follows_cublas_semantics() {
        let b = HostBuf::new(3);
        assert!(host(&b).iter().all(|v| v.is_nan()));
        // C[2,2] = 2·Aᵀ·B + 0·C with A stored [3,2] (ta) and B [3,2]; C starts as NaN and must
        // not be read when beta = 0.
        let mut a = HostBuf::new(6);
        a.write(0, &[1., 2., 3., 4., 5., 6.]);
        let mut bb = HostBuf::new(6);
        bb.write(0, &[1., 0., 0., 1., 1., 1.]);
        let c = HostBuf::new(4);
        // Row-major products go through the backend's mapping onto the column-major call.
        let gemm = |g: Gemm, c: &HostBuf| cublas_sgemm(&g.blas_call(a.addr(), bb.addr(), c.addr()));
        gemm(Gemm::new(true, false, 2, 2, 3).alpha(2.0), &c).unwrap();
        // Aᵀ = [[1,3,5],[2,4,6]]; Aᵀ·B = [[6,8],[8,10]].
        assert_eq!(host(&c), vec![12., 16., 16., 20.]);
        // beta = 1 accumulates.
        gemm(Gemm::new(true, false, 2, 2, 3).beta(1.0), &c).unwrap();
        assert_eq!(host(&c), vec![18., 24., 24., 30.]);
        // A·Bᵀ with A [2,3] and B stored [2,3]: [[1,2,3],[4,5,6]]·[[1,0,0],[1,1,1]]ᵀ.
        gemm(Gemm::new(false, true, 2, 2, 3), &c).unwrap();
        assert_eq!(host(&c), vec![1., 6., 4., 15.]);
        // An operand that does not fit its buffer is refused.
        let e = gemm(Gemm::new(false, false, 2, 2, 4), &c).unwrap_err();
        assert!(e.contains("beyond its 6-element buffer"), "{e}");

        // The column-major call itself, as cuBLAS reads it: A [2,3] (lda 2) = [[1,3,5],[2,4,6]],
        // B [3,2] (ldb 3) = [[1,1],[0,1],[0,1]], C = A·B = [[1,9],[2,12]] stored by columns.
        let call = BlasCall {
            trans_a: false,
            trans_b: false,
            m: 2,
            n: 2,
            k: 3,
            alpha: 1.0,
            beta: 0.0,
            a: a.addr(),
            lda: 2,
            stride_a: 6,
            b: bb.addr(),
            ldb: 3,
            stride_b: 6,
            c: c.addr(),
            ldc: 2,
            stride_c: 4,
            batch: 1,
        };
        cublas_sgemm(&call).unwrap();
        assert_eq!(host(&c), vec![1., 2., 9., 12.]);
        // Leading dimensions shorter than the stored rows are cuBLAS errors.
        for bad in [
            BlasCall { lda: 1, ..call },
            BlasCall { ldb: 2, ..call },
            BlasCall { ldc: 1, ..call },
            BlasCall {
                trans_a: true,
                lda: 2,
                ..call
            },
        ] {
            let e = cublas_sgemm(&bad).unwrap_err();
            assert!(e.contains("CUBLAS_STATUS_INVALID_VALUE"), "{e}");
        }
    }
}
