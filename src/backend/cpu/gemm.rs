//! Row-major single-precision GEMM on top of the `gemm` crate, with its AVX-512 kernels built in
//! (feature `x86-v4`): the crate picks them at run time on CPUs that have AVX-512 and its AVX2
//! kernels elsewhere (2048³ on 2 threads of the development machine: 175 against 125 GFLOP/s).

/// Whether a GEMM of this size is worth splitting across threads.
fn worth_parallel(m: usize, n: usize, k: usize) -> bool {
    m * n * k >= 1 << 18
}

/// `C[m,n] = (accumulate ? C : 0) + op(A)·op(B)`, all row-major and contiguous.
/// `op(A)` is `A [m,k]`, or `Aᵀ` of a stored `[k,m]` when `trans_a`; likewise `B [k,n]` / `[n,k]`.
/// `parallel` lets the GEMM use the rayon pool (callers already inside a parallel loop pass false).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    trans_a: bool,
    b: &[f32],
    trans_b: bool,
    c: &mut [f32],
    accumulate: bool,
    parallel: bool,
) {
    assert!(c.len() >= m * n);
    // SAFETY: `c` is a live, initialised buffer of at least m·n floats, distinct from `a` and `b`.
    unsafe {
        sgemm_raw(
            m,
            n,
            k,
            a,
            trans_a,
            b,
            trans_b,
            c.as_mut_ptr(),
            accumulate,
            parallel,
        )
    }
}

/// [`sgemm`] without accumulation into a buffer that need not be initialised: every one of the
/// `m·n` elements is written (the GEMM never reads C when it does not accumulate).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_uninit(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    trans_a: bool,
    b: &[f32],
    trans_b: bool,
    c: &mut [std::mem::MaybeUninit<f32>],
    parallel: bool,
) {
    assert!(c.len() >= m * n);
    // SAFETY: C is only written (no accumulation), m·n elements fit in `c`, and `c` is distinct
    // from `a` and `b`.
    unsafe {
        sgemm_raw(
            m,
            n,
            k,
            a,
            trans_a,
            b,
            trans_b,
            c.as_mut_ptr().cast::<f32>(),
            false,
            parallel,
        )
    }
}

/// # Safety
/// `c` must be valid for writes of `m·n` floats (and for reads when `accumulate`), and must not
/// overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_raw(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    trans_a: bool,
    b: &[f32],
    trans_b: bool,
    c: *mut f32,
    accumulate: bool,
    parallel: bool,
) {
    assert!(a.len() >= m * k && b.len() >= k * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m * n {
                // SAFETY: the caller guarantees `c` holds m·n writable floats.
                unsafe { c.add(i).write(0.0) };
            }
        }
        return;
    }
    let (a_rs, a_cs) = if trans_a {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let (b_rs, b_cs) = if trans_b {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    let par = if parallel && worth_parallel(m, n, k) && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the assert above bounds every index the strides can reach in A (m·k elements) and
    // B (k·n); the caller guarantees C (m·n elements) and that it does not alias A or B. With
    // `read_dst` false the GEMM only writes C.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], ta: bool, b: &[f32], tb: bool) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn sgemm_matches_naive_all_transposes() {
        let (m, n, k) = (37, 23, 91);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
            .collect();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let want = naive(m, n, k, &a, ta, &b, tb);
            let mut got = vec![1.0; m * n];
            sgemm(m, n, k, &a, ta, &b, tb, &mut got, false, true);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "{ta} {tb}: {g} vs {w}");
            }
            sgemm(m, n, k, &a, ta, &b, tb, &mut got, true, false);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - 2.0 * w).abs() < 2e-4);
            }
            let mut un = vec![std::mem::MaybeUninit::new(f32::NAN); m * n];
            sgemm_uninit(m, n, k, &a, ta, &b, tb, &mut un, false);
            for (g, w) in un.iter().zip(&want) {
                // SAFETY: initialised above (and overwritten by the GEMM).
                let g = unsafe { g.assume_init() };
                assert!((g - w).abs() < 1e-4, "uninit {ta} {tb}: {g} vs {w}");
            }
        }
    }

    /// The GEMM's arithmetic must not depend on how many threads run it: only the shape picks
    /// the blocking along `k` (which fixes each element's summation order), so the CPU backend's
    /// results are the same for every rayon thread count.
    #[test]
    fn sgemm_bits_do_not_depend_on_the_thread_count() {
        // Shapes through the crate's small-matrix path, its m, n ≤ 64 path with k > 512, and
        // its blocked path with k > 512 (several `kc` blocks).
        for (m, n, k) in [
            (9, 13, 700),
            (48, 64, 1300),
            (64, 576, 784),
            (300, 257, 1500),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919 % 1009) as f32).sin())
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 104729 % 997) as f32).cos())
                .collect();
            let mut want = vec![0.0; m * n];
            sgemm(m, n, k, &a, false, &b, true, &mut want, false, false);
            for threads in [1, 2, 3, 8] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut got = vec![0.0; m * n];
                pool.install(|| sgemm(m, n, k, &a, false, &b, true, &mut got, false, true));
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits());
                assert!(
                    same,
                    "{m}x{n}x{k} on {threads} threads differs from one thread"
                );
            }
        }
    }
}
