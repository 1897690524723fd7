//! Elementwise ops. Large arrays are split into fixed chunks so results do not depend on timing.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Chunk length for parallel elementwise loops.
pub const CHUNK: usize = 1 << 15;

/// A vector of `n` floats written in parallel chunks of `chunk` elements, with no zeroing pass
/// first (on the training step's activation sizes the zeroing cost as much as the op itself):
/// `fill(c, dst)` writes chunk `c`, i.e. elements `c·chunk ..`, each exactly once.
///
/// # Safety
/// `fill` must initialise every element of every `dst` it is given.
pub unsafe fn par_fill(
    n: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    if n > 0 {
        v.spare_capacity_mut()[..n]
            .par_chunks_mut(chunk.max(1))
            .enumerate()
            .for_each(|(c, dst)| fill(c, dst));
    }
    // SAFETY: the caller guarantees `fill` initialised all `n` elements.
    unsafe { v.set_len(n) };
    v
}

/// `out[i] = f(i)` over `n` elements, in parallel chunks.
pub fn map_indexed(n: usize, f: impl Fn(usize) -> f32 + Sync) -> Vec<f32> {
    // SAFETY: every element of each chunk is written.
    unsafe {
        par_fill(n, CHUNK, |c, ch| {
            let base = c * CHUNK;
            for (j, o) in ch.iter_mut().enumerate() {
                o.write(f(base + j));
            }
        })
    }
}

/// `out[i] = f(x[i])`, in parallel chunks (vectorisable: no indexing in the inner loop).
fn map1(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    // SAFETY: chunk `c` of the output pairs with chunk `c` of `x`, of equal length; every element
    // is written.
    unsafe {
        par_fill(x.len(), CHUNK, |c, o| {
            let x = &x[c * CHUNK..][..o.len()];
            o.iter_mut().zip(x).for_each(|(o, x)| {
                o.write(f(*x));
            })
        })
    }
}

/// `out[i] = f(x[i], y[i])` over `x.len()` elements (`y` at least as long), in parallel chunks.
fn map2(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let y = &y[..x.len()];
    // SAFETY: as in `map1`.
    unsafe {
        par_fill(x.len(), CHUNK, |c, o| {
            let x = &x[c * CHUNK..][..o.len()];
            let y = &y[c * CHUNK..][..o.len()];
            o.iter_mut().zip(x.iter().zip(y)).for_each(|(o, (x, y))| {
                o.write(f(*x, *y));
            })
        })
    }
}

pub fn axpby(a: f32, x: &[f32], b: f32, y: &[f32]) -> Vec<f32> {
    map2(x, y, |x, y| a * x + b * y)
}

pub fn scale(x: &[f32], s: f32) -> Vec<f32> {
    map1(x, |x| s * x)
}

pub fn mul(x: &[f32], y: &[f32]) -> Vec<f32> {
    map2(x, y, |x, y| x * y)
}

pub fn relu_fwd(x: &[f32]) -> Vec<f32> {
    map1(x, |x| x.max(0.0))
}

pub fn relu_bwd(y: &[f32], gy: &[f32]) -> Vec<f32> {
    map2(y, gy, |y, g| if y > 0.0 { g } else { 0.0 })
}

pub fn add_assign(acc: &mut [f32], x: &[f32]) {
    acc.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += *b));
}

/// `Σ f(v)` in f64 with eight interleaved partial sums (a fixed order the compiler can vectorise;
/// a single running f64 sum cannot be reordered and runs one element per add latency).
#[inline(always)]
pub fn sum8(xs: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut it = xs.chunks_exact(8);
    for c in &mut it {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += f(*v);
        }
    }
    let tail: f64 = it.remainder().iter().map(|v| f(*v)).sum();
    acc.iter().sum::<f64>() + tail
}

/// Sum in f64 so the reference is more accurate than any device reduction it is compared with.
pub fn sum_all(x: &[f32]) -> f32 {
    x.iter().map(|&v| v as f64).sum::<f64>() as f32
}
