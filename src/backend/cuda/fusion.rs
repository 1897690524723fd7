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
use crate::backend::{shapes, ConvGrads};
use crate::error::Result;
use crate::tensor::Tensor;

/// `Sᵀ [B, Nq, Np]` for the given images, into `st`: the rows of `Qᵀ [Nq, k] · P [k, Np] · r`
/// softmaxed (`k` channels; `r = 1/√d` with `d` the fusion's channels).
#[allow(clippy::too_many_arguments)]
fn similarity_t(
    be: &CudaBackend,
    p: u64,
    q: u64,
    (b, k): (usize, usize),
    np: usize,
    nq: usize,
    r: f32,
    st: u64,
) -> Result<()> {
    let at = be.buffer(b * nq * np)?;
    // Aᵀ [Nq, Np] = Qᵀ [Nq, k] · P [k, Np] · r.
    Gemm::new(true, false, nq, np, k)
        .alpha(r)
        .batched(b)
        .run(be, q, p, at.ptr())?;
    let rows = b * nq;
    be.launch(
        "sx_softmax_fwd",
        cfg_rows(rows),
        &[A::I(ci(rows)?), A::I(ci(np)?), A::P(at.ptr()), A::P(st)],
    )
}

thread_local! {
    /// [`set_fusion_projected`]'s setting.
    static PROJECTED_HERE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Whether the projected fusion runs as one op without the projected map
/// (`fusion::projected_fusion_fwd`) rather than as the 1×1 projection and then the similarity fusion:
/// [`set_fusion_projected`]'s setting, else `MEDSSL_CUDA_FUSION` (see [`super::switches`];
/// `two-ops` by default: the one-op form has not yet run on a GPU).
pub fn fusion_projected() -> bool {
    PROJECTED_HERE
        .with(|s| s.get())
        .unwrap_or_else(|| super::switches::current().fusion_projected)
}

/// Sets [`fusion_projected`] for the fusions the calling thread issues (`None`: back to
/// `MEDSSL_CUDA_FUSION`); returns the previous setting.
pub fn set_fusion_projected(on: Option<bool>) -> Option<bool> {
    PROJECTED_HERE.with(|s| s.replace(on))
}

/// Device copy `dst ← src` of `n` elements (stream ordered).
fn copy(be: &CudaBackend, n: usize, src: u64, dst: u64) -> Result<()> {
    be.launch(
        "ew_scale",
        cfg_lin(n),
        &[A::I(ci(n)?), A::F(1.0), A::P(src), A::P(dst)],
    )
}

/// The softmax backward of `rows` rows of `np` (the rows of `Sᵀ` at `st`, their gradient at
/// `gst`): `gAᵀ = Sᵀ ⊙ (gSᵀ − rowsum(gSᵀ ⊙ Sᵀ))`, in a new buffer.
fn softmax_rows_bwd(
    be: &CudaBackend,
    rows: usize,
    np: usize,
    st: u64,
    gst: u64,
) -> Result<super::CudaStorage> {
    let gat = be.buffer(rows * np)?;
    be.launch(
        "sx_softmax_bwd",
        cfg_rows(rows),
        &[
            A::I(ci(rows)?),
            A::I(ci(np)?),
            A::P(st),
            A::P(gst),
            A::P(gat.ptr()),
        ],
    )?;
    Ok(gat)
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
        similarity_t(be, p, q, (b, d), np, nq, 1.0 / (d as f32).sqrt(), pst)?;
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
    let gat = softmax_rows_bwd(be, b * nq, np, pst, gst.ptr())?;
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

/// The projected fusion (`Backend::projected_fusion_fwd`, `MEDSSL_CUDA_FUSION=projected`)
/// without the projected map `P̂ = W·X + b` (as the CPU backend computes it): `M = Wᵀ·Q̂ [c, Nq]`,
/// `Sᵀ = softmax rows of Mᵀ·X/√d` (the bias term `bᵀQ̂` is constant along each softmax row and
/// drops out), `Z = X·S [c, Nq]`, `y = Q̂ + W·Z + b` (the columns of S sum to 1). Every product
/// runs over the low map's `c` channels instead of `d`, strided-batched over the images with `W`
/// broadcast (stride 0). Returns `(y, [Sᵀ, M, Z])`.
pub(super) fn projected_fusion_fwd(
    be: &CudaBackend,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    high: &Tensor,
) -> Result<(Tensor, Vec<Tensor>)> {
    let (b, c, d, np, nq) = shapes::projected_fusion(x, w, bias, high)?;
    let y = be.empty(high.shape())?;
    let full = b * c * d * np * nq > 0;
    let st = if full {
        be.empty(&[b, nq, np])?
    } else {
        be.zeros(&[b, nq, np])?
    };
    let (m, z) = if full {
        (be.empty(&[b, c, nq])?, be.empty(&[b, c, nq])?)
    } else {
        (be.zeros(&[b, c, nq])?, be.zeros(&[b, c, nq])?)
    };
    if y.numel() == 0 {
        return Ok((y, vec![st, m, z]));
    }
    let py = be.p(&y)?;
    copy(be, y.numel(), be.p(high)?, py)?;
    if np == 0 {
        // No low positions: S has no rows and y is Q̂ alone.
        return Ok((y, vec![st, m, z]));
    }
    if let Some(bias) = bias {
        super::elementwise::add_bias(be, &y, bias, d, nq)?;
    }
    if c == 0 {
        // No low channels: P̂ = b·1ᵀ, every softmax row uniform, y = Q̂ + b.
        if st.numel() > 0 {
            super::elementwise::fill(be, &st, 1.0 / np as f32)?;
        }
        return Ok((y, vec![st, m, z]));
    }
    let (px, pw, pq) = (be.p(x)?, be.p(w)?, be.p(high)?);
    let (pst, pm, pz) = (be.p(&st)?, be.p(&m)?, be.p(&z)?);
    // M [c, Nq] = Wᵀ [c, d] · Q̂ [d, Nq], W the same for every image.
    Gemm::new(true, false, c, nq, d)
        .batched(b)
        .strides(0, d * nq, c * nq)
        .run(be, pw, pq, pm)?;
    similarity_t(be, px, pm, (b, c), np, nq, 1.0 / (d as f32).sqrt(), pst)?;
    // Z [c, Nq] = X [c, Np] · S [Np, Nq], S read as (Sᵀ)ᵀ; y += W [d, c] · Z.
    Gemm::new(false, true, c, nq, np)
        .batched(b)
        .run(be, px, pst, pz)?;
    Gemm::new(false, false, d, nq, c)
        .beta(1.0)
        .batched(b)
        .strides(0, c * nq, d * nq)
        .run(be, pw, pz, py)?;
    Ok((y, vec![st, m, z]))
}

/// Gradients `(gX, gW, gb)` and `gQ̂` of [`projected_fusion_fwd`] from its `[Sᵀ, M, Z]`, for
/// upstream `gy`. Per image, with `gZ = Wᵀ·gy`: `gSᵀ = gZᵀ·X`, `gAᵀ = softmax backward of the
/// rows of Sᵀ`, `gX = gZ·Sᵀ + M·gAᵀ/√d`, `gM = X·gA/√d`, `gQ̂ = gy + W·gM`; `gW = Σ gy·Zᵀ + Q̂·gMᵀ`
/// (per image, then summed over the images), `gb = Σ gy` per channel.
pub(super) fn projected_fusion_bwd(
    be: &CudaBackend,
    x: &Tensor,
    w: &Tensor,
    has_bias: bool,
    high: &Tensor,
    saved: &[Tensor],
    gy: &Tensor,
) -> Result<(ConvGrads, Tensor)> {
    let ((b, c, d, np, nq), [st, m, z]) = shapes::projected_fusion_saved(x, w, high, saved, gy)?;
    let gh = be.empty(high.shape())?;
    let full = b * c * d * np * nq > 0;
    let (gx, gw) = if full {
        (be.empty(x.shape())?, be.empty(w.shape())?)
    } else {
        (be.zeros(x.shape())?, be.zeros(w.shape())?)
    };
    // The bias reaches y only through S's rows (none without low positions).
    let gb = match has_bias {
        true if np > 0 && gh.numel() > 0 => {
            let gb = be.empty(&[d])?;
            super::reduce::channel_sum_raw(be, b, d, nq, be.p(gy)?, be.p(&gb)?)?;
            Some(gb)
        }
        true => Some(be.zeros(&[d])?),
        false => None,
    };
    if gh.numel() > 0 {
        copy(be, gh.numel(), be.p(gy)?, be.p(&gh)?)?;
    }
    let grads = |gx, gw, gb| ConvGrads {
        x: Some(gx),
        weight: gw,
        bias: gb,
    };
    if !full {
        return Ok((grads(gx, gw, gb), gh));
    }
    let r = 1.0 / (d as f32).sqrt();
    let (px, pw, pq, pg) = (be.p(x)?, be.p(w)?, be.p(high)?, be.p(gy)?);
    let (pst, pm, pz) = (be.p(st)?, be.p(m)?, be.p(z)?);
    let (pgx, pgh) = (be.p(&gx)?, be.p(&gh)?);
    // gZ [c, Nq] = Wᵀ [c, d] · gy [d, Nq].
    let gz = be.buffer(b * c * nq)?;
    Gemm::new(true, false, c, nq, d)
        .batched(b)
        .strides(0, d * nq, c * nq)
        .run(be, pw, pg, gz.ptr())?;
    // gSᵀ [Nq, Np] = gZᵀ [Nq, c] · X [c, Np]; gAᵀ its softmax backward (unscaled: 1/√d goes
    // into the products below).
    let gst = be.buffer(b * nq * np)?;
    Gemm::new(true, false, nq, np, c)
        .batched(b)
        .run(be, gz.ptr(), px, gst.ptr())?;
    let gat = softmax_rows_bwd(be, b * nq, np, pst, gst.ptr())?;
    // gX [c, Np] = gZ [c, Nq] · Sᵀ [Nq, Np] + (1/√d) M [c, Nq] · gAᵀ [Nq, Np].
    Gemm::new(false, false, c, np, nq)
        .batched(b)
        .run(be, gz.ptr(), pst, pgx)?;
    Gemm::new(false, false, c, np, nq)
        .alpha(r)
        .beta(1.0)
        .batched(b)
        .run(be, pm, gat.ptr(), pgx)?;
    // gM [c, Nq] = (1/√d) X [c, Np] · gA [Np, Nq], gA read as (gAᵀ)ᵀ; gQ̂ += W [d, c] · gM.
    let gm = be.buffer(b * c * nq)?;
    Gemm::new(false, true, c, nq, np)
        .alpha(r)
        .batched(b)
        .run(be, px, gat.ptr(), gm.ptr())?;
    Gemm::new(false, false, d, nq, c)
        .beta(1.0)
        .batched(b)
        .strides(0, c * nq, d * nq)
        .run(be, pw, gm.ptr(), pgh)?;
    // gW [d, c] = Σ over the images of gy [d, Nq] · Zᵀ [Nq, c] + Q̂ [d, Nq] · gMᵀ [Nq, c].
    let per = be.buffer(b * d * c)?;
    Gemm::new(false, true, d, c, nq)
        .batched(b)
        .run(be, pg, pz, per.ptr())?;
    Gemm::new(false, true, d, c, nq)
        .beta(1.0)
        .batched(b)
        .run(be, pq, gm.ptr(), per.ptr())?;
    super::reduce::sum_rows_raw(be, b, d * c, per.ptr(), be.p(&gw)?)?;
    Ok((grads(gx, gw, gb), gh))
}
