//! One seeded RNG tree: every consumer (init, data order, augmentation) derives its own stream
//! from the run seed and a fixed label, so adding a consumer never shifts another's numbers.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// A deterministic generator for stream `label` of run `seed`.
pub fn stream(seed: u64, label: &str) -> ChaCha8Rng {
    // FNV-1a of the label, mixed with the seed by splitmix64.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in label.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    ChaCha8Rng::seed_from_u64(splitmix64(seed ^ splitmix64(h)))
}

/// splitmix64 finaliser.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
