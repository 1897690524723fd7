//! Small, version-stable random helpers on top of `crate::rng` (rand's own shuffle and range
//! sampling may change between releases; these fix the numbers our splits depend on).

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::rng::splitmix64;

/// Uniform integer in `0..n` (`n > 0`), multiply-shift (bias ≤ n / 2^64).
#[inline]
pub(crate) fn below(rng: &mut impl RngCore, n: usize) -> usize {
    ((rng.next_u64() as u128 * n as u128) >> 64) as usize
}

/// Uniform f32 in `[0, 1)`.
#[inline]
pub(crate) fn unit(rng: &mut impl RngCore) -> f32 {
    (rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Fair coin.
#[inline]
pub(crate) fn coin(rng: &mut impl RngCore) -> bool {
    rng.next_u32() & 1 == 1
}

/// Fisher–Yates shuffle.
pub(crate) fn shuffle<T>(v: &mut [T], rng: &mut impl RngCore) {
    for i in (1..v.len()).rev() {
        let j = below(rng, i + 1);
        v.swap(i, j);
    }
}

/// A generator for one augmented view, a pure function of its coordinates so batches do not
/// depend on which worker thread made them.
pub(crate) fn view_rng(seed: u64, step: u64, role: u64, index: u64) -> ChaCha8Rng {
    let mut h = splitmix64(seed ^ 0x5eed_a06e_u64);
    h = splitmix64(h ^ step);
    h = splitmix64(h ^ role.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    h = splitmix64(h ^ index);
    ChaCha8Rng::seed_from_u64(h)
}
