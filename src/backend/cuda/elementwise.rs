//! Elementwise ops and the channel/column bias broadcast (kernels/elementwise.cu).

use super::{cfg_lin, cfg_lin4, ci, same_shape, CudaBackend, A};
use crate::error::Result;
use crate::tensor::Tensor;

/// Fills `y` (freshly allocated, uniquely owned by the caller) with `v`.
pub(super) fn fill(be: &CudaBackend, y: &Tensor, v: f32) -> Result<()> {
    let n = y.numel();
    if n == 0 {
        return Ok(());
    }
    be.launch(
        "ew_fill",
        cfg_lin(n),
        &[A::I(ci(n)?), A::F(v), A::P(be.p(y)?)],
    )
}

/// `y[i] += bias[(i / inner) % c]` in place on a tensor the caller just created.
pub(super) fn add_bias(
    be: &CudaBackend,
    y: &Tensor,
    bias: &Tensor,
    c: usize,
    inner: usize,
) -> Result<()> {
    let n = y.numel();
    if n == 0 {
        return Ok(());
    }
    be.launch(
        "ew_add_bias",
        cfg_lin4(n),
        &[
            A::I(ci(n)?),
            A::I(ci(c)?),
            A::I(ci(inner)?),
            A::P(be.p(bias)?),
            A::P(be.p(y)?),
        ],
    )
}

/// `name(n, x, y)`, a kernel that takes four elements per thread (see [`cfg_lin4`]).
fn unary(be: &CudaBackend, name: &'static str, x: &Tensor) -> Result<Tensor> {
    let y = be.empty(x.shape())?;
    let n = x.numel();
    if n > 0 {
        be.launch(
            name,
            cfg_lin4(n),
            &[A::I(ci(n)?), A::P(be.p(x)?), A::P(be.p(&y)?)],
        )?;
    }
    Ok(y)
}

/// `name(n, x, y, out)`, a kernel that takes four elements per thread (see [`cfg_lin4`]).
fn binary(be: &CudaBackend, name: &'static str, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    same_shape(x, y, name)?;
    let out = be.empty(x.shape())?;
    let n = x.numel();
    if n > 0 {
        be.launch(
            name,
            cfg_lin4(n),
            &[
                A::I(ci(n)?),
                A::P(be.p(x)?),
                A::P(be.p(y)?),
                A::P(be.p(&out)?),
            ],
        )?;
    }
    Ok(out)
}

pub(super) fn axpby(be: &CudaBackend, a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
    same_shape(x, y, "axpby")?;
    let out = be.empty(x.shape())?;
    let n = x.numel();
    if n > 0 {
        be.launch(
            "ew_axpby",
            cfg_lin(n),
            &[
                A::I(ci(n)?),
                A::F(a),
                A::P(be.p(x)?),
                A::F(b),
                A::P(be.p(y)?),
                A::P(be.p(&out)?),
            ],
        )?;
    }
    Ok(out)
}

pub(super) fn scale(be: &CudaBackend, x: &Tensor, s: f32) -> Result<Tensor> {
    let out = be.empty(x.shape())?;
    let n = x.numel();
    if n > 0 {
        be.launch(
            "ew_scale",
            cfg_lin(n),
            &[A::I(ci(n)?), A::F(s), A::P(be.p(x)?), A::P(be.p(&out)?)],
        )?;
    }
    Ok(out)
}

pub(super) fn mul(be: &CudaBackend, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    binary(be, "ew_mul", x, y)
}

pub(super) fn add_relu_fwd(be: &CudaBackend, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(be, "ew_add_relu", a, b)
}

pub(super) fn relu_fwd(be: &CudaBackend, x: &Tensor) -> Result<Tensor> {
    unary(be, "ew_relu_fwd", x)
}

pub(super) fn relu_bwd(be: &CudaBackend, y: &Tensor, gy: &Tensor) -> Result<Tensor> {
    binary(be, "ew_relu_bwd", y, gy)
}

pub(super) fn add_assign(be: &CudaBackend, acc: &mut Tensor, x: &Tensor) -> Result<()> {
    same_shape(acc, x, "add_assign")?;
    let n = x.numel();
    let px = be.p(x)?;
    let pa = be.p_mut(acc)?;
    if n > 0 {
        be.launch(
            "ew_add_assign",
            cfg_lin(n),
            &[A::I(ci(n)?), A::P(pa), A::P(px)],
        )?;
    }
    Ok(())
}
