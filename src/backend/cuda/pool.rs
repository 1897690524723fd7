//! Max pooling (kernels/pool.cu); global average pooling lives in reduce.rs like on the CPU.

use super::{cfg_lin, ci, CudaBackend, A};
use crate::backend::shapes::{self, PoolGeom};
use crate::backend::PoolParams;
use crate::error::Result;
use crate::tensor::Tensor;

fn geometry(s: &PoolGeom) -> Result<[A; 7]> {
    Ok([
        A::I(ci(s.h)?),
        A::I(ci(s.w)?),
        A::I(ci(s.ho())?),
        A::I(ci(s.wo())?),
        A::I(ci(s.k)?),
        A::I(ci(s.stride)?),
        A::I(ci(s.pad)?),
    ])
}

pub(super) fn max_pool2d_fwd(be: &CudaBackend, x: &Tensor, p: PoolParams) -> Result<Tensor> {
    let (n, c, s) = shapes::max_pool2d_fwd(x, p)?;
    let y = be.empty(&[n, c, s.ho(), s.wo()])?;
    let total = y.numel();
    if total > 0 {
        let mut args = vec![A::I(ci(total)?)];
        args.extend(geometry(&s)?);
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
    let (_, _, s) = shapes::max_pool2d_bwd(x, gy, p)?;
    let gx = be.empty(x.shape())?;
    let total = x.numel();
    if total > 0 {
        let mut args = vec![A::I(ci(total)?)];
        args.extend(geometry(&s)?);
        args.extend([A::P(be.p(x)?), A::P(be.p(gy)?), A::P(be.p(&gx)?)]);
        be.launch("mp_bwd", cfg_lin(total), &args)?;
    }
    Ok(gx)
}
