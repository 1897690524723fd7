//! Max pooling (kernels/pool.cu); global average pooling lives in reduce.rs like on the CPU.

use super::{cfg_lin, ci, nchw, CudaBackend, A};
use crate::backend::PoolParams;
use crate::error::Result;
use crate::tensor::Tensor;

/// Output size `(ho, wo)` after validating the window like the CPU reference.
fn out_size(h: usize, w: usize, p: PoolParams) -> Result<(usize, usize)> {
    if p.kernel == 0
        || p.stride == 0
        || 2 * p.padding > p.kernel
        || h + 2 * p.padding < p.kernel
        || w + 2 * p.padding < p.kernel
    {
        crate::bail!(
            "max_pool2d: kernel {} stride {} padding {} invalid for {h}x{w} (padding at most half the kernel)",
            p.kernel,
            p.stride,
            p.padding
        );
    }
    Ok((
        (h + 2 * p.padding - p.kernel) / p.stride + 1,
        (w + 2 * p.padding - p.kernel) / p.stride + 1,
    ))
}

fn geometry(h: usize, w: usize, ho: usize, wo: usize, p: PoolParams) -> Result<[A; 7]> {
    Ok([
        A::I(ci(h)?),
        A::I(ci(w)?),
        A::I(ci(ho)?),
        A::I(ci(wo)?),
        A::I(ci(p.kernel)?),
        A::I(ci(p.stride)?),
        A::I(ci(p.padding)?),
    ])
}

pub(super) fn max_pool2d_fwd(be: &CudaBackend, x: &Tensor, p: PoolParams) -> Result<Tensor> {
    let (n, c, h, w) = nchw(x, "max_pool2d")?;
    let (ho, wo) = out_size(h, w, p)?;
    let y = be.empty(&[n, c, ho, wo])?;
    let total = y.numel();
    if total > 0 {
        let mut args = vec![A::I(ci(total)?)];
        args.extend(geometry(h, w, ho, wo, p)?);
        args.extend([A::P(be.p(x)?), A::P(be.p(&y)?)]);
        be.launch("mp_fwd", cfg_lin(total), &args)?;
    }
    Ok(y)
}

pub(super) fn max_pool2d_bwd(
    be: &CudaBackend,
    x: &Tensor,
    gy: &Tensor,
    p: PoolParams,
) -> Result<Tensor> {
    let (n, c, h, w) = nchw(x, "max_pool2d backward")?;
    let (ho, wo) = out_size(h, w, p)?;
    if gy.shape() != [n, c, ho, wo] {
        crate::bail!(
            "max_pool2d backward: gradient {:?} does not fit the output",
            gy.shape()
        );
    }
    let gx = be.empty(x.shape())?;
    let total = x.numel();
    if total > 0 {
        let mut args = vec![A::I(ci(total)?)];
        args.extend(geometry(h, w, ho, wo, p)?);
        args.extend([A::P(be.p(x)?), A::P(be.p(gy)?), A::P(be.p(&gx)?)]);
        be.launch("mp_bwd", cfg_lin(total), &args)?;
    }
    Ok(gx)
}
