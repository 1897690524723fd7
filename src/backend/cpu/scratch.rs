//! Per-thread scratch buffers for the CPU kernels.
//!
//! Convolution needs large temporary matrices (im2col blocks, transposed gradients) on every call;
//! allocating them afresh costs a zeroing pass and page faults larger than the copies themselves.
//! Each thread keeps the buffers it used last and hands them out again. Contents of a taken buffer
//! are unspecified (always initialised floats), so callers must write before they read.

use std::cell::RefCell;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// Most buffers one thread keeps (a convolution uses at most four at once).
const KEEP: usize = 8;

/// A buffer of at least `len` floats (callers slice what they use) with unspecified contents;
/// return it with [`give`].
pub fn take(len: usize) -> Vec<f32> {
    let mut v = POOL.with(|p| {
        let mut p = p.borrow_mut();
        // The smallest kept buffer that is large enough, else the largest one (grown below).
        let pick = p
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len)
            .min_by_key(|(_, v)| v.capacity())
            .or_else(|| p.iter().enumerate().max_by_key(|(_, v)| v.capacity()))
            .map(|(i, _)| i);
        pick.map(|i| p.swap_remove(i)).unwrap_or_default()
    });
    // A kept buffer keeps its length, so only growth beyond it is ever initialised.
    if v.len() < len {
        v.resize(len, 0.0);
    }
    v
}

/// Returns a buffer taken with [`take`] to this thread's pool.
pub fn give(v: Vec<f32>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < KEEP {
            p.push(v);
        }
    });
}

/// A [`take`]n buffer that goes back to the pool when dropped (for buffers made per job inside
/// rayon's `*_init` loops).
pub struct Taken(pub Vec<f32>);

impl Drop for Taken {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_sized() {
        let a = take(1000);
        assert!(a.len() >= 1000);
        let ptr = a.as_ptr();
        give(a);
        let b = take(500);
        assert!(b.len() >= 500);
        assert_eq!(b.as_ptr(), ptr, "the kept buffer is handed out again");
        let c = take(2000);
        assert!(c.len() >= 2000);
        give(b);
        give(c);
    }
}
