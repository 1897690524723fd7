//! Softmax, log-softmax and cross-entropy over the last dimension (kernels/softmax_xent.cu).

use super::{cfg_rows, ci, reduce, rows2, rows_last, same_shape, scalar_grad, CudaBackend, A};
use crate::error::Result;
use crate::tensor::Tensor;

fn rowwise(be: &CudaBackend, name: &'static str, x: &Tensor) -> Result<Tensor> {
    let (rows, n) = rows_last(x, name)?;
    let y = be.empty(x.shape())?;
    if rows > 0 {
        be.launch(
            name,
            cfg_rows(rows),
            &[
                A::I(ci(rows)?),
                A::I(ci(n)?),
                A::P(be.p(x)?),
                A::P(be.p(&y)?),
            ],
        )?;
    }
    Ok(y)
}

fn rowwise_bwd(be: &CudaBackend, name: &'static str, y: &Tensor, gy: &Tensor) -> Result<Tensor> {
    same_shape(y, gy, name)?;
    let (rows, n) = rows_last(y, name)?;
    let gx = be.empty(y.shape())?;
    if rows > 0 {
        be.launch(
            name,
            cfg_rows(rows),
            &[
                A::I(ci(rows)?),
                A::I(ci(n)?),
                A::P(be.p(y)?),
                A::P(be.p(gy)?),
                A::P(be.p(&gx)?),
            ],
        )?;
    }
    Ok(gx)
}

pub(super) fn softmax_fwd(be: &CudaBackend, x: &Tensor) -> Result<Tensor> {
    rowwise(be, "sx_softmax_fwd", x)
}
pub(super) fn log_softmax_fwd(be: &CudaBackend, x: &Tensor) -> Result<Tensor> {
    rowwise(be, "sx_log_softmax_fwd", x)
}
pub(super) fn softmax_bwd(be: &CudaBackend, y: &Tensor, gy: &Tensor) -> Result<Tensor> {
    rowwise_bwd(be, "sx_softmax_bwd", y, gy)
}
pub(super) fn log_softmax_bwd(be: &CudaBackend, y: &Tensor, gy: &Tensor) -> Result<Tensor> {
    rowwise_bwd(be, "sx_log_softmax_bwd", y, gy)
}

/// Mean cross-entropy: per-row losses, then a fixed-order sum scaled by 1/B.
pub(super) fn cross_entropy_fwd(
    be: &CudaBackend,
    logits: &Tensor,
    labels: &[usize],
) -> Result<Tensor> {
    let (b, c) = rows2(logits, "cross_entropy")?;
    let lab = be.labels(labels, b, c, "cross_entropy")?;
    let rows = be.buffer(b)?;
    let out = be.empty(&[1])?;
    if b > 0 {
        be.launch(
            "sx_xent_rows",
            cfg_rows(b),
            &[
                A::I(ci(b)?),
                A::I(ci(c)?),
                A::P(be.p(logits)?),
                A::P(lab.ptr()),
                A::P(rows.ptr()),
            ],
        )?;
    }
    reduce::sum_scaled_raw(be, b, rows.ptr(), reduce::mean_scale(b), be.p(&out)?)?;
    Ok(out)
}

pub(super) fn cross_entropy_bwd(
    be: &CudaBackend,
    logits: &Tensor,
    labels: &[usize],
    g: &Tensor,
) -> Result<Tensor> {
    let (b, c) = rows2(logits, "cross_entropy")?;
    scalar_grad(g, "cross_entropy backward")?;
    let lab = be.labels(labels, b, c, "cross_entropy")?;
    let gz = be.empty(logits.shape())?;
    if b > 0 {
        be.launch(
            "sx_xent_bwd",
            cfg_rows(b),
            &[
                A::I(ci(b)?),
                A::I(ci(c)?),
                A::P(be.p(logits)?),
                A::P(lab.ptr()),
                A::P(be.p(g)?),
                A::F(1.0 / b as f32),
                A::P(be.p(&gz)?),
            ],
        )?;
    }
    Ok(gz)
}
