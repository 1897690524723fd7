//! In-place optimiser and EMA updates (PyTorch semantics).

use rayon::prelude::*;

use super::elementwise::CHUNK;
use crate::backend::{AdamParams, SgdParams};

pub fn ema_update(t: &mut [f32], s: &[f32], alpha: f32) {
    t.par_chunks_mut(CHUNK)
        .zip(s.par_chunks(CHUNK))
        .for_each(|(t, s)| {
            t.iter_mut()
                .zip(s)
                .for_each(|(t, s)| *t = alpha * *t + (1.0 - alpha) * s)
        });
}

/// `d = g + wd·p; buf = first ? d : μ·buf + d; p −= lr·buf`.
pub fn sgd_step(p: &mut [f32], g: &[f32], buf: &mut [f32], h: SgdParams) {
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(buf.par_chunks_mut(CHUNK)))
        .for_each(|(p, (g, b))| {
            for i in 0..p.len() {
                let d = g[i] + h.weight_decay * p[i];
                b[i] = if h.first_step || h.momentum == 0.0 {
                    d
                } else {
                    h.momentum * b[i] + d
                };
                p[i] -= h.lr * b[i];
            }
        });
}

/// `g' = g + wd·p; m = β1 m + (1−β1) g'; v = β2 v + (1−β2) g'²;`
/// `p −= (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)`.
pub fn adam_step(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: AdamParams) {
    let bc1 = 1.0 - h.beta1.powi(h.step as i32);
    let bc2_sqrt = (1.0 - h.beta2.powi(h.step as i32)).sqrt();
    let step_size = h.lr / bc1;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                let gi = g[i] + h.weight_decay * p[i];
                m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * gi;
                v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * gi * gi;
                p[i] -= step_size * m[i] / (v[i].sqrt() / bc2_sqrt + h.eps);
            }
        });
}
