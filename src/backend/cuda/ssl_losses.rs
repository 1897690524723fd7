//! Semi-supervised terms of SPEC §1 (kernels/ssl_losses.cu): entropy weight, weighted
//! consistency, PGC (products `q·Kᵀ` and `G·K` on cuBLAS) and the DSR alignment (linear heads
//! and Gram matrices on cuBLAS, residuals and the final contraction in kernels), and the key
//! queue on the device: enqueue into the ring and the [batch keys; queue] key set.

use super::gemm::{linear_fwd, Gemm};
use super::{cfg_lin, cfg_rows, ci, reduce, rows2, scalar_grad, CudaBackend, CudaStorage, A};
use cudarc::driver::LaunchConfig;

use crate::backend::{label_tensor, shapes, DsrFactors};
use crate::error::Result;
use crate::tensor::Tensor;

/// One value per row of `z [B, C]` → `[B]`, by `kernel(B, C, z, out)` launched with `cfg(B)`.
fn per_row(
    be: &CudaBackend,
    kernel: &'static str,
    cfg: fn(usize) -> LaunchConfig,
    z: &Tensor,
) -> Result<Tensor> {
    let (b, c) = rows2(z, kernel)?;
    let out = be.empty(&[b])?;
    if b > 0 {
        be.launch(
            kernel,
            cfg(b),
            &[
                A::I(ci(b)?),
                A::I(ci(c)?),
                A::P(be.p(z)?),
                A::P(be.p(&out)?),
            ],
        )?;
    }
    Ok(out)
}

/// Warp per row (kernels/ssl_losses.cu `ssl_entropy_weight`).
pub(super) fn entropy_weight(be: &CudaBackend, logits: &Tensor) -> Result<Tensor> {
    per_row(be, "ssl_entropy_weight", cfg_rows, logits)
}

/// Pseudo-labels as a label tensor, thread per row (kernels/ssl_losses.cu `ssl_argmax_rows`).
pub(super) fn argmax_rows(be: &CudaBackend, z: &Tensor) -> Result<Tensor> {
    per_row(be, "ssl_argmax_rows", cfg_lin, z)
}

pub(super) fn weighted_consistency_fwd(
    be: &CudaBackend,
    zs: &Tensor,
    zt: &Tensor,
    w: &Tensor,
) -> Result<Tensor> {
    let (b, c) = shapes::consistency(zs, zt, w)?;
    let rows = be.buffer(b)?;
    let out = be.empty(&[1])?;
    if b > 0 {
        be.launch(
            "ssl_wcons_rows",
            cfg_rows(b),
            &[
                A::I(ci(b)?),
                A::I(ci(c)?),
                A::P(be.p(zs)?),
                A::P(be.p(zt)?),
                A::P(be.p(w)?),
                A::P(rows.ptr()),
            ],
        )?;
    }
    reduce::sum_scaled_raw(be, b, rows.ptr(), reduce::mean_scale(b), be.p(&out)?)?;
    Ok(out)
}

pub(super) fn weighted_consistency_bwd(
    be: &CudaBackend,
    zs: &Tensor,
    zt: &Tensor,
    w: &Tensor,
    g: &Tensor,
) -> Result<Tensor> {
    let (b, c) = shapes::consistency(zs, zt, w)?;
    scalar_grad(g, "weighted_consistency backward")?;
    let gz = be.empty(zs.shape())?;
    if b > 0 {
        be.launch(
            "ssl_wcons_bwd",
            cfg_rows(b),
            &[
                A::I(ci(b)?),
                A::I(ci(c)?),
                A::P(be.p(zs)?),
                A::P(be.p(zt)?),
                A::P(be.p(w)?),
                A::P(be.p(g)?),
                A::F(1.0 / b as f32),
                A::P(be.p(&gz)?),
            ],
        )?;
    }
    Ok(gz)
}

/// Validated PGC inputs: `(B, Nk, E)`.
struct Pgc {
    b: usize,
    nk: usize,
    e: usize,
}

fn pgc_prepare(
    q: &Tensor,
    ql: &Tensor,
    qw: &Tensor,
    k: &Tensor,
    kl: &Tensor,
    kw: &Tensor,
) -> Result<Pgc> {
    let (b, nk, e) = shapes::pgc(q, ql, qw, k, kl, kw)?;
    Ok(Pgc { b, nk, e })
}

/// `L = q·Kᵀ/τ` `[B, Nk]`.
fn pgc_logits(be: &CudaBackend, s: &Pgc, q: &Tensor, k: &Tensor, tau: f32) -> Result<CudaStorage> {
    let l = be.buffer(s.b * s.nk)?;
    Gemm::new(false, true, s.b, s.nk, s.e)
        .alpha(1.0 / tau)
        .run(be, be.p(q)?, be.p(k)?, l.ptr())?;
    Ok(l)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn pgc_loss_fwd(
    be: &CudaBackend,
    q: &Tensor,
    q_labels: &Tensor,
    q_w: &Tensor,
    keys: &Tensor,
    k_labels: &Tensor,
    k_w: &Tensor,
    tau: f32,
) -> Result<Tensor> {
    let s = pgc_prepare(q, q_labels, q_w, keys, k_labels, k_w)?;
    let out = be.empty(&[1])?;
    let rows = be.buffer(s.b)?;
    if s.b > 0 && s.nk > 0 {
        let l = pgc_logits(be, &s, q, keys, tau)?;
        be.launch(
            "ssl_pgc_rows",
            cfg_rows(s.b),
            &[
                A::I(ci(s.b)?),
                A::I(ci(s.nk)?),
                A::P(l.ptr()),
                A::P(be.p(q_labels)?),
                A::P(be.p(q_w)?),
                A::P(be.p(k_labels)?),
                A::P(be.p(k_w)?),
                A::P(rows.ptr()),
            ],
        )?;
        reduce::sum_scaled_raw(be, s.b, rows.ptr(), 1.0 / s.b as f32, be.p(&out)?)?;
    } else {
        // No keys: 0 (no query has a positive); no queries: the mean of nothing, NaN.
        reduce::sum_scaled_raw(be, 0, rows.ptr(), reduce::mean_scale(s.b), be.p(&out)?)?;
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn pgc_loss_bwd(
    be: &CudaBackend,
    q: &Tensor,
    q_labels: &Tensor,
    q_w: &Tensor,
    keys: &Tensor,
    k_labels: &Tensor,
    k_w: &Tensor,
    tau: f32,
    g: &Tensor,
) -> Result<Tensor> {
    scalar_grad(g, "pgc_loss backward")?;
    let s = pgc_prepare(q, q_labels, q_w, keys, k_labels, k_w)?;
    if s.b == 0 || s.nk == 0 {
        return be.zeros(q.shape());
    }
    let gq = be.empty(q.shape())?;
    let l = pgc_logits(be, &s, q, keys, tau)?;
    let gl = be.buffer(s.b * s.nk)?;
    be.launch(
        "ssl_pgc_grad_logits",
        cfg_rows(s.b),
        &[
            A::I(ci(s.b)?),
            A::I(ci(s.nk)?),
            A::P(l.ptr()),
            A::P(be.p(q_labels)?),
            A::P(be.p(q_w)?),
            A::P(be.p(k_labels)?),
            A::P(be.p(k_w)?),
            A::P(be.p(g)?),
            A::F(1.0 / s.b as f32),
            A::P(gl.ptr()),
        ],
    )?;
    // gq = G·K/τ
    Gemm::new(false, false, s.b, s.e, s.nk)
        .alpha(1.0 / tau)
        .run(be, gl.ptr(), be.p(keys)?, be.p(&gq)?)?;
    Ok(gq)
}

/// `softmax(z) − onehot(labels)` for `z [rows, c]` and a `[rows]` label tensor (shapes checked
/// by the caller, `shapes::dsr_alignment`).
fn residual(be: &CudaBackend, z: &Tensor, labels: &Tensor, what: &str) -> Result<Tensor> {
    let (rows, c) = rows2(z, what)?;
    let out = be.empty(z.shape())?;
    if rows > 0 {
        be.launch(
            "ssl_prob_minus_onehot",
            cfg_rows(rows),
            &[
                A::I(ci(rows)?),
                A::I(ci(c)?),
                A::P(be.p(z)?),
                A::P(be.p(labels)?),
                A::P(be.p(&out)?),
            ],
        )?;
    }
    Ok(out)
}

pub(super) fn dsr_alignment(
    be: &CudaBackend,
    feat_lab: &Tensor,
    y_lab: &[usize],
    feat_unl: &Tensor,
    pseudo: &Tensor,
    fc_w: &Tensor,
    fc_b: &Tensor,
) -> Result<Tensor> {
    let shapes::DsrGeom { bl, bu, d, c } =
        shapes::dsr_alignment(feat_lab, y_lab, feat_unl, pseudo, fc_w, fc_b)?;
    let rl = residual(
        be,
        &linear_fwd(be, feat_lab, fc_w, Some(fc_b))?,
        &label_tensor(be, y_lab)?,
        "dsr_alignment labels",
    )?;
    let ru = residual(
        be,
        &linear_fwd(be, feat_unl, fc_w, Some(fc_b))?,
        pseudo,
        "dsr_alignment pseudo-labels",
    )?;
    let out = be.empty(&[bu])?;
    if bu == 0 {
        return Ok(out);
    }
    let rs = be.buffer(bu * bl)?;
    let ff = be.buffer(bu * bl)?;
    Gemm::new(false, true, bu, bl, c).run(be, be.p(&ru)?, be.p(&rl)?, rs.ptr())?;
    Gemm::new(false, true, bu, bl, d).run(be, be.p(feat_unl)?, be.p(feat_lab)?, ff.ptr())?;
    be.launch(
        "ssl_dsr_combine",
        cfg_rows(bu),
        &[
            A::I(ci(bu)?),
            A::I(ci(bl)?),
            A::P(rs.ptr()),
            A::P(ff.ptr()),
            A::F(reduce::mean_scale(bl)),
            A::P(be.p(&out)?),
        ],
    )?;
    Ok(out)
}

/// DSR weights and updated meta weights in one launch (kernels/ssl_losses.cu
/// `ssl_dsr_weights`; an absent factor is passed as a null pointer).
pub(super) fn dsr_weights(
    be: &CudaBackend,
    f: &DsrFactors<'_>,
) -> Result<(Tensor, Option<Tensor>)> {
    shapes::dsr_weights(f)?;
    let w = be.empty(&[f.n])?;
    let m_new = f.meta.map(|_| be.empty(&[f.n])).transpose()?;
    if f.n == 0 {
        return Ok((w, m_new));
    }
    let p = |t: Option<&Tensor>| -> Result<u64> { t.map_or(Ok(0), |t| be.p(t)) };
    let (a, beta) = match f.align {
        Some((a, beta)) => (Some(a), beta),
        None => (None, 0.0),
    };
    be.launch(
        "ssl_dsr_weights",
        cfg_lin(f.n),
        &[
            A::I(ci(f.n)?),
            A::P(p(f.conf)?),
            A::P(p(f.meta)?),
            A::P(p(a)?),
            A::F(beta),
            A::P(p(f.balance)?),
            A::P(be.p(&w)?),
            A::P(p(m_new.as_ref())?),
        ],
    )?;
    Ok((w, m_new))
}

/// `[a; b[..b_rows]]` (kernels/ssl_losses.cu `q_concat_rows`).
pub(super) fn concat_rows(
    be: &CudaBackend,
    a: &Tensor,
    b: &Tensor,
    b_rows: usize,
) -> Result<Tensor> {
    let (ra, e) = shapes::concat_rows(a, b, b_rows)?;
    let y = be.empty(&[ra + b_rows, e])?;
    let total = (ra + b_rows) * e;
    if total > 0 {
        be.launch(
            "q_concat_rows",
            cfg_lin(total),
            &[
                A::I(ci(ra * e)?),
                A::I(ci(total)?),
                A::P(be.p(a)?),
                A::P(be.p(b)?),
                A::P(be.p(&y)?),
            ],
        )?;
    }
    Ok(y)
}

/// Queue enqueue into the ring `dst` (kernels/ssl_losses.cu `q_ring_write`).
pub(super) fn ring_write_rows(
    be: &CudaBackend,
    dst: &mut Tensor,
    src: &Tensor,
    start: usize,
) -> Result<()> {
    let (k, r, e) = shapes::ring_write_rows(dst, src, start)?;
    let n = r * e;
    let ps = be.p(src)?;
    let pd = be.p_mut(dst)?;
    if n > 0 {
        be.launch(
            "q_ring_write",
            cfg_lin(n),
            &[
                A::I(ci(n)?),
                A::I(ci(k)?),
                A::I(ci(e)?),
                A::I(ci(start)?),
                A::P(ps),
                A::P(pd),
            ],
        )?;
    }
    Ok(())
}
