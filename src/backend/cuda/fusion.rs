//! MedFuseNet similarity fusion (SPEC §2): the products run on cuBLAS (strided-batched over the
//! images), the softmax is the warp-per-row softmax of kernels/softmax_xent.cu.
//!
//! Per image: `P̂ [d,Np]`, `Q̂ [d,Nq]`, `A = P̂ᵀQ̂/√d [Np,Nq]`, `S = softmax over i` (each column
//! of `A`), `y = Q̂ + P̂·S`.
//!
//! Layout: `A` and `S` are kept transposed, `Aᵀ = Q̂ᵀP̂/√d [Nq,Np]`, so that each softmax column
//! is a contiguous row of `Np` (784 low-level positions at 28 px against 16 high-level ones): one
//! warp per row, coalesced, `B·Nq` rows in parallel. (A thread per column of `A` gave only `B·Nq`
//! threads, each walking `Np` strided entries three times.) The products take `Sᵀ` through
//! cuBLAS's transpose flags, so no transpose is ever materialised.

use super::gemm::Gemm;
use super::{cfg_lin, cfg_rows, ci, same_shape, CudaBackend, A};
use crate::backend::shapes;
use crate::error::Result;
use crate::tensor::Tensor;

/// `Sᵀ [B, Nq, Np]` for the given images, into `st`.
#[allow(clippy::too_many_arguments)]
fn similarity_t(
    be: &CudaBackend,
    p: u64,
    q: u64,
    b: usize,
    d: usize,
    np: usize,
    nq: usize,
    st: u64,
) -> Result<()> {
    let at = be.buffer(b * nq * np)?;
    // Aᵀ [Nq, Np] = Q̂ᵀ [Nq, d] · P̂ [d, Np] / √d.
    Gemm::new(true, false, nq, np, d)
        .alpha(1.0 / (d as f32).sqrt())
        .batched(b)
        .run(be, q, p, at.ptr())?;
    let rows = b * nq;
    be.launch(
        "sx_softmax_fwd",
        cfg_rows(rows),
        &[A::I(ci(rows)?), A::I(ci(np)?), A::P(at.ptr()), A::P(st)],
    )
}

/// Device copy `dst ← src` of `n` elements (stream ordered).
fn copy(be: &CudaBackend, n: usize, src: u64, dst: u64) -> Result<()> {
    be.launch(
        "ew_scale",
        cfg_lin(n),
        &[A::I(ci(n)?), A::F(1.0), A::P(src), A::P(dst)],
    )
}

/// `(y, Sᵀ)`; `Sᵀ [B, Nq, Np]` zeros where the maps have no channels or no low positions.
pub(super) fn similarity_fusion_fwd(
    be: &CudaBackend,
    low: &Tensor,
    high: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let shapes::FusionGeom { b, d, np, nq } = shapes::fusion(low, high)?;
    let y = be.empty(high.shape())?;
    let has_s = np > 0 && d > 0 && nq > 0;
    let st = if has_s {
        be.empty(&[b, nq, np])?
    } else {
        be.zeros(&[b, nq, np])?
    };
    if y.numel() == 0 {
        return Ok((y, st));
    }
    let (p, q, py) = (be.p(low)?, be.p(high)?, be.p(&y)?);
    copy(be, y.numel(), q, py)?;
    if has_s {
        let pst = be.p(&st)?;
        similarity_t(be, p, q, b, d, np, nq, pst)?;
        // y += P̂ [d, Np] · S [Np, Nq], S read as (Sᵀ)ᵀ.
        Gemm::new(false, true, d, nq, np)
            .beta(1.0)
            .batched(b)
            .run(be, p, pst, py)?;
    }
    Ok((y, st))
}

/// `gQ̂ = gy + P̂·gA/√d`, `gP̂ = gy·Sᵀ + Q̂·gAᵀ/√d`, `gA = S ⊙ (gS − colsum(gS ⊙ S))`,
/// `gS = P̂ᵀ·gy`; all of `S`, `gS`, `gA` held transposed (rows of `Np`, see the module comment),
/// `Sᵀ` the forward's `st`.
pub(super) fn similarity_fusion_bwd(
    be: &CudaBackend,
    low: &Tensor,
    high: &Tensor,
    st: &Tensor,
    gy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let geom = shapes::fusion(low, high)?;
    shapes::fusion_similarity(st, &geom)?;
    let shapes::FusionGeom { b, d, np, nq } = geom;
    same_shape(high, gy, "similarity_fusion backward")?;
    let ghigh = be.empty(high.shape())?;
    // gP̂ is written whole by the first of its two products below; zeros only where there is
    // no product (an empty side).
    let glow = if ghigh.numel() > 0 && np > 0 && d > 0 {
        be.empty(low.shape())?
    } else {
        be.zeros(low.shape())?
    };
    if ghigh.numel() == 0 {
        return Ok((glow, ghigh));
    }
    let (p, q, g) = (be.p(low)?, be.p(high)?, be.p(gy)?);
    let (pgl, pgh, pst) = (be.p(&glow)?, be.p(&ghigh)?, be.p(st)?);
    copy(be, ghigh.numel(), g, pgh)?;
    if np == 0 || d == 0 {
        return Ok((glow, ghigh));
    }
    let r = 1.0 / (d as f32).sqrt();
    // gSᵀ [Nq, Np] = gyᵀ [Nq, d] · P̂ [d, Np].
    let gst = be.buffer(b * nq * np)?;
    Gemm::new(true, false, nq, np, d)
        .batched(b)
        .run(be, g, p, gst.ptr())?;
    // gAᵀ: the softmax backward of each row, gAᵀ = Sᵀ ⊙ (gSᵀ − rowsum(gSᵀ ⊙ Sᵀ)).
    let gat = be.buffer(b * nq * np)?;
    let rows = b * nq;
    be.launch(
        "sx_softmax_bwd",
        cfg_rows(rows),
        &[
            A::I(ci(rows)?),
            A::I(ci(np)?),
            A::P(pst),
            A::P(gst.ptr()),
            A::P(gat.ptr()),
        ],
    )?;
    // gP̂ [d, Np] = gy [d, Nq] · Sᵀ + (1/√d) Q̂ [d, Nq] · gAᵀ.
    Gemm::new(false, false, d, np, nq)
        .batched(b)
        .run(be, g, pst, pgl)?;
    Gemm::new(false, false, d, np, nq)
        .alpha(r)
        .beta(1.0)
        .batched(b)
        .run(be, q, gat.ptr(), pgl)?;
    // gQ̂ = gy + (1/√d) P̂ [d, Np] · gA, gA read as (gAᵀ)ᵀ.
    Gemm::new(false, true, d, nq, np)
        .alpha(r)
        .beta(1.0)
        .batched(b)
        .run(be, p, gat.ptr(), pgh)?;
    Ok((glow, ghigh))
}
