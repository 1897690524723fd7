//! In-place EMA, SGD and Adam updates (kernels/optim.cu), PyTorch semantics.

use super::{cfg_lin, ci, same_shape, CudaBackend, A};
use crate::backend::{AdamParams, SgdParams};
use crate::error::Result;
use crate::tensor::Tensor;

pub(super) fn ema_update(
    be: &CudaBackend,
    teacher: &mut Tensor,
    student: &Tensor,
    alpha: f32,
) -> Result<()> {
    same_shape(teacher, student, "ema_update")?;
    let n = student.numel();
    let ps = be.p(student)?;
    let pt = be.p_mut(teacher)?;
    if n > 0 {
        be.launch(
            "op_ema",
            cfg_lin(n),
            &[A::I(ci(n)?), A::F(alpha), A::P(pt), A::P(ps)],
        )?;
    }
    Ok(())
}

pub(super) fn sgd_step(
    be: &CudaBackend,
    param: &mut Tensor,
    grad: &Tensor,
    buf: &mut Tensor,
    p: SgdParams,
) -> Result<()> {
    same_shape(param, grad, "sgd_step")?;
    same_shape(param, buf, "sgd_step")?;
    let n = grad.numel();
    let pg = be.p(grad)?;
    let pp = be.p_mut(param)?;
    let pb = be.p_mut(buf)?;
    if n > 0 {
        be.launch(
            "op_sgd",
            cfg_lin(n),
            &[
                A::I(ci(n)?),
                A::F(p.lr),
                A::F(p.momentum),
                A::F(p.weight_decay),
                A::I(p.first_step as i32),
                A::P(pp),
                A::P(pg),
                A::P(pb),
            ],
        )?;
    }
    Ok(())
}

pub(super) fn adam_step(
    be: &CudaBackend,
    param: &mut Tensor,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    p: AdamParams,
) -> Result<()> {
    same_shape(param, grad, "adam_step")?;
    same_shape(param, m, "adam_step")?;
    same_shape(param, v, "adam_step")?;
    // Bias corrections on the host, in f32 and in the same order as the CPU reference.
    let t = p.step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - p.beta1.powi(t);
    let bc2_sqrt = (1.0 - p.beta2.powi(t)).sqrt();
    let step_size = p.lr / bc1;
    let n = grad.numel();
    let pg = be.p(grad)?;
    let pp = be.p_mut(param)?;
    let pm = be.p_mut(m)?;
    let pv = be.p_mut(v)?;
    if n > 0 {
        be.launch(
            "op_adam",
            cfg_lin(n),
            &[
                A::I(ci(n)?),
                A::F(step_size),
                A::F(p.beta1),
                A::F(p.beta2),
                A::F(p.eps),
                A::F(p.weight_decay),
                A::F(bc2_sqrt),
                A::P(pp),
                A::P(pg),
                A::P(pm),
                A::P(pv),
            ],
        )?;
    }
    Ok(())
}
