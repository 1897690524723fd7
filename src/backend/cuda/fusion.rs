//! MedFuseNet similarity fusion (SPEC §2): the products run on cuBLAS (strided-batched over the
//! images), the softmax over low-level positions is kernels/fusion.cu.
//!
//! Per image: `P̂ [d,Np]`, `Q̂ [d,Nq]`, `A = P̂ᵀQ̂/√d [Np,Nq]`, `S = softmax over i` (each column
//! of `A`), `y = Q̂ + P̂·S`.

use super::gemm::Gemm;
use super::{cfg_lin, ci, same_shape, CudaBackend, CudaStorage, A};
use crate::backend::shapes;
use crate::error::Result;
use crate::tensor::Tensor;

/// `S [B, Np, Nq]` for the given images.
fn similarity(
    be: &CudaBackend,
    p: u64,
    q: u64,
    b: usize,
    d: usize,
    np: usize,
    nq: usize,
) -> Result<CudaStorage> {
    let a = be.buffer(b * np * nq)?;
    let s = be.buffer(b * np * nq)?;
    Gemm::new(true, false, np, nq, d)
        .alpha(1.0 / (d as f32).sqrt())
        .batched(b)
        .run(be, p, q, a.ptr())?;
    let cols = b * nq;
    be.launch(
        "fu_col_softmax",
        cfg_lin(cols),
        &[
            A::I(ci(b)?),
            A::I(ci(np)?),
            A::I(ci(nq)?),
            A::P(a.ptr()),
            A::P(s.ptr()),
        ],
    )?;
    Ok(s)
}

/// Device copy `dst ← src` of `n` elements (stream ordered).
fn copy(be: &CudaBackend, n: usize, src: u64, dst: u64) -> Result<()> {
    be.launch(
        "ew_scale",
        cfg_lin(n),
        &[A::I(ci(n)?), A::F(1.0), A::P(src), A::P(dst)],
    )
}

pub(super) fn similarity_fusion_fwd(
    be: &CudaBackend,
    low: &Tensor,
    high: &Tensor,
) -> Result<Tensor> {
    let shapes::FusionGeom { b, d, np, nq } = shapes::fusion(low, high)?;
    let y = be.empty(high.shape())?;
    if y.numel() == 0 {
        return Ok(y);
    }
    let (p, q, py) = (be.p(low)?, be.p(high)?, be.p(&y)?);
    copy(be, y.numel(), q, py)?;
    if np > 0 && d > 0 {
        let s = similarity(be, p, q, b, d, np, nq)?;
        Gemm::new(false, false, d, nq, np)
            .beta(1.0)
            .batched(b)
            .run(be, p, s.ptr(), py)?;
    }
    Ok(y)
}

/// `gQ̂ = gy + P̂·gA/√d`, `gP̂ = gy·Sᵀ + Q̂·gAᵀ/√d`, `gA = S ⊙ (gS − colsum(gS ⊙ S))`,
/// `gS = P̂ᵀ·gy`.
pub(super) fn similarity_fusion_bwd(
    be: &CudaBackend,
    low: &Tensor,
    high: &Tensor,
    gy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let shapes::FusionGeom { b, d, np, nq } = shapes::fusion(low, high)?;
    same_shape(high, gy, "similarity_fusion backward")?;
    let glow = be.zeros(low.shape())?;
    let ghigh = be.empty(high.shape())?;
    if ghigh.numel() == 0 {
        return Ok((glow, ghigh));
    }
    let (p, q, g) = (be.p(low)?, be.p(high)?, be.p(gy)?);
    let (pgl, pgh) = (be.p(&glow)?, be.p(&ghigh)?);
    copy(be, ghigh.numel(), g, pgh)?;
    if np == 0 || d == 0 {
        return Ok((glow, ghigh));
    }
    let r = 1.0 / (d as f32).sqrt();
    let s = similarity(be, p, q, b, d, np, nq)?;
    let gs = be.buffer(b * np * nq)?;
    Gemm::new(true, false, np, nq, d)
        .batched(b)
        .run(be, p, g, gs.ptr())?;
    let ga = be.buffer(b * np * nq)?;
    be.launch(
        "fu_col_softmax_bwd",
        cfg_lin(b * nq),
        &[
            A::I(ci(b)?),
            A::I(ci(np)?),
            A::I(ci(nq)?),
            A::P(s.ptr()),
            A::P(gs.ptr()),
            A::P(ga.ptr()),
        ],
    )?;
    // gP̂ = gy·Sᵀ + (1/√d) Q̂·gAᵀ
    Gemm::new(false, true, d, np, nq)
        .batched(b)
        .run(be, g, s.ptr(), pgl)?;
    Gemm::new(false, true, d, np, nq)
        .alpha(r)
        .beta(1.0)
        .batched(b)
        .run(be, q, ga.ptr(), pgl)?;
    // gQ̂ = gy + (1/√d) P̂·gA
    Gemm::new(false, false, d, nq, np)
        .alpha(r)
        .beta(1.0)
        .batched(b)
        .run(be, p, ga.ptr(), pgh)?;
    Ok((glow, ghigh))
}
