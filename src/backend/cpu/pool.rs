//! Max pooling (implicit −∞ padding) per `[H, W]` plane.

use rayon::prelude::*;

/// Pooling geometry of one plane (validated by [`crate::backend::shapes::pool`]).
pub use crate::backend::shapes::PoolGeom as PoolShape;

impl PoolShape {
    /// Index within the plane of the first maximum of window `(oh, ow)` (scan kh outer, kw
    /// inner; NaN wins, as in PyTorch).
    fn argmax(&self, plane: &[f32], oh: usize, ow: usize) -> usize {
        let mut best = usize::MAX;
        let mut bv = f32::NEG_INFINITY;
        for ki in 0..self.k {
            let ih = (oh * self.stride + ki) as isize - self.pad as isize;
            if ih < 0 || ih >= self.h as isize {
                continue;
            }
            for kj in 0..self.k {
                let iw = (ow * self.stride + kj) as isize - self.pad as isize;
                if iw < 0 || iw >= self.w as isize {
                    continue;
                }
                let idx = ih as usize * self.w + iw as usize;
                let v = plane[idx];
                if best == usize::MAX || v > bv || v.is_nan() {
                    best = idx;
                    bv = v;
                    if v.is_nan() {
                        return best;
                    }
                }
            }
        }
        best
    }
}

pub fn max_pool2d_fwd(x: &[f32], s: &PoolShape) -> Vec<f32> {
    let (ho, wo) = (s.ho(), s.wo());
    let planes = x.len() / (s.h * s.w);
    let mut y = vec![0.0f32; planes * ho * wo];
    y.par_chunks_mut(ho * wo).enumerate().for_each(|(p, yp)| {
        let plane = &x[p * s.h * s.w..(p + 1) * s.h * s.w];
        for oh in 0..ho {
            for ow in 0..wo {
                yp[oh * wo + ow] = plane[s.argmax(plane, oh, ow)];
            }
        }
    });
    y
}

pub fn max_pool2d_bwd(x: &[f32], gy: &[f32], s: &PoolShape) -> Vec<f32> {
    let (ho, wo) = (s.ho(), s.wo());
    let mut gx = vec![0.0f32; x.len()];
    gx.par_chunks_mut(s.h * s.w)
        .enumerate()
        .for_each(|(p, gp)| {
            let plane = &x[p * s.h * s.w..(p + 1) * s.h * s.w];
            for oh in 0..ho {
                for ow in 0..wo {
                    gp[s.argmax(plane, oh, ow)] += gy[(p * ho + oh) * wo + ow];
                }
            }
        });
    gx
}
