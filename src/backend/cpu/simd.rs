//! Run-time choice of vector instructions for the CPU kernels written as loops over fixed-size
//! lane arrays (the Winograd transforms) or over a 16-lane vector type (the direct convolution).
//!
//! The crate is built for any x86-64, whose baseline vectors hold 4 floats. [`widest_simd`]
//! compiles a function body for AVX-512, for AVX2 and for the baseline, and picks the widest the
//! CPU offers on each call; [`has_avx512`] tells the direct convolution whether its AVX-512 build
//! may run. Only the instructions change, never the arithmetic, so every CPU gives the same bits
//! (each user states which operations it relies on for that).

/// Makes [`widest_simd`] functions and [`has_avx512`] keep to the baseline build: only the tests
/// set it, to compare the builds' bits.
#[cfg(test)]
pub(super) static BASELINE_ONLY: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether [`widest_simd`] functions and [`has_avx512`] keep to the baseline instructions: never
/// outside the tests, which compare the builds.
#[inline(always)]
pub(super) fn baseline_only() -> bool {
    #[cfg(test)]
    return BASELINE_ONLY.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(test))]
    false
}

/// Whether the CPU has AVX-512F: for choices that must not change while a test compares the
/// builds (which algorithm a layer takes), unlike [`has_avx512`].
pub(super) fn cpu_has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether AVX-512 code may run: the CPU has AVX-512F and the tests do not keep to the baseline
/// (only for choices between builds with the same bits).
pub(super) fn has_avx512() -> bool {
    cpu_has_avx512() && !baseline_only()
}

/// Defines a function that runs its body compiled for the widest vector instructions the CPU
/// offers (AVX-512, else AVX2, else the crate's baseline), chosen on each call. The body's
/// helpers are inlined into each build when marked `#[inline(always)]` or `#[inline]`.
macro_rules! widest_simd {
    (
        $(#[$m:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    ) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if $crate::backend::cpu::simd::has_avx512() {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { avx512($($arg),*) };
                }
                if !$crate::backend::cpu::simd::baseline_only()
                    && std::arch::is_x86_feature_detected!("avx2")
                {
                    // SAFETY: the CPU has AVX2.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(super) use widest_simd;
