//! In-place EMA, SGD and Adam updates (kernels/optim.cu), PyTorch semantics; single-tensor and
//! multi-tensor forms (a whole model in `⌈tensors / MT_MAX⌉` launches).

use super::{cfg_blocks, cfg_lin, ci, same_shape, CudaBackend, A};
use crate::backend::{AdamParams, OptSlot, SgdParams};
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
                &[A::I(ci(n)?)][..],
                &sgd_args(&p),
                &[A::P(pp), A::P(pg), A::P(pb)],
            ]
            .concat(),
        )?;
    }
    Ok(())
}

/// The scalar arguments of `op_sgd` / `op_sgd_mt`.
fn sgd_args(p: &SgdParams) -> [A; 4] {
    [
        A::F(p.lr),
        A::F(p.momentum),
        A::F(p.weight_decay),
        A::I(p.first_step as i32),
    ]
}

/// The scalar arguments of `op_adam` / `op_adam_mt` (bias corrections folded in on the host).
fn adam_args(p: &AdamParams) -> [A; 6] {
    let (step_size, bc2_sqrt) = adam_consts(p);
    [
        A::F(step_size),
        A::F(p.beta1),
        A::F(p.beta2),
        A::F(p.eps),
        A::F(p.weight_decay),
        A::F(bc2_sqrt),
    ]
}

/// Adam's host-side constants `(step_size, bc2_sqrt)`: bias corrections in f32, in the same
/// order as the CPU reference.
fn adam_consts(p: &AdamParams) -> (f32, f32) {
    let t = p.step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - p.beta1.powi(t);
    let bc2_sqrt = (1.0 - p.beta2.powi(t)).sqrt();
    (p.lr / bc1, bc2_sqrt)
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
                &[A::I(ci(n)?)][..],
                &adam_args(&p),
                &[A::P(pp), A::P(pg), A::P(pm), A::P(pv)],
            ]
            .concat(),
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Multi-tensor forms
// ---------------------------------------------------------------------------------------------

/// Tensors per launch and elements per block tile; must equal `MT_MAX` / `MT_TILE` of
/// kernels/optim.cu.
pub(super) const MT_MAX: usize = 48;
const MT_TILE: usize = 2048;
const MT_THREADS: u32 = 256;

/// The kernels' `MtTable` (kernels/optim.cu), field for field.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct MtTable {
    pub count: i32,
    pub first: [i32; MT_MAX + 1],
    pub n: [i32; MT_MAX],
    pub a: [u64; MT_MAX],
    pub b: [u64; MT_MAX],
    pub c: [u64; MT_MAX],
    pub d: [u64; MT_MAX],
}
// The C struct: 4 + 49·4 + 48·4 = 392 bytes of ints (a multiple of 8, so the pointer arrays need
// no padding), then 4 · 48 · 8 bytes of pointers.
const _: () = assert!(std::mem::size_of::<MtTable>() == 392 + 4 * MT_MAX * 8);

// SAFETY: plain `#[repr(C)]` data (ints and device addresses) that mirrors the kernel's
// by-value struct parameter.
unsafe impl cudarc::driver::DeviceRepr for MtTable {}

/// One tensor of a multi-tensor launch: element count and the four addresses (0 when unused).
#[derive(Clone, Copy)]
struct MtItem {
    n: usize,
    ptrs: [u64; 4],
}

/// Launches `kernel` over `items` in tables of at most `MT_MAX` tensors (empty tensors skipped),
/// `args` first and the table last.
fn launch_multi(
    be: &CudaBackend,
    kernel: &'static str,
    args: &[A],
    items: &[MtItem],
) -> Result<()> {
    let items: Vec<MtItem> = items.iter().copied().filter(|it| it.n > 0).collect();
    for chunk in items.chunks(MT_MAX) {
        let mut t = MtTable {
            count: chunk.len() as i32,
            first: [0; MT_MAX + 1],
            n: [0; MT_MAX],
            a: [0; MT_MAX],
            b: [0; MT_MAX],
            c: [0; MT_MAX],
            d: [0; MT_MAX],
        };
        let mut blocks = 0usize;
        for (k, it) in chunk.iter().enumerate() {
            t.first[k] = ci(blocks)?;
            t.n[k] = ci(it.n)?;
            [t.a[k], t.b[k], t.c[k], t.d[k]] = it.ptrs;
            blocks += it.n.div_ceil(MT_TILE);
        }
        t.first[chunk.len()] = ci(blocks)?;
        be.launch_table(kernel, cfg_blocks(blocks, MT_THREADS), args, &t)?;
    }
    Ok(())
}

pub(super) fn add_assign_multi(
    be: &CudaBackend,
    pairs: &mut [(&mut Tensor, &Tensor)],
) -> Result<()> {
    let mut items = Vec::with_capacity(pairs.len());
    for (acc, x) in pairs.iter_mut() {
        same_shape(acc, x, "add_assign")?;
        let px = be.p(x)?;
        items.push(MtItem {
            n: x.numel(),
            ptrs: [be.p_mut(acc)?, px, 0, 0],
        });
    }
    launch_multi(be, "op_add_mt", &[], &items)
}

/// Copies `n` floats from `src` to `dst` for each `(dst, src, n)` (device addresses; the ranges
/// do not overlap), in one launch per `MT_MAX` copies: the packing of `to_host_many`.
pub(super) fn copy_multi(be: &CudaBackend, copies: &[(u64, u64, usize)]) -> Result<()> {
    let items: Vec<MtItem> = copies
        .iter()
        .map(|&(dst, src, n)| MtItem {
            n,
            ptrs: [dst, src, 0, 0],
        })
        .collect();
    launch_multi(be, "op_copy_mt", &[], &items)
}

pub(super) fn ema_update_multi(
    be: &CudaBackend,
    pairs: &mut [(&mut Tensor, &Tensor)],
    alpha: f32,
) -> Result<()> {
    let mut items = Vec::with_capacity(pairs.len());
    for (t, s) in pairs.iter_mut() {
        same_shape(t, s, "ema_update")?;
        let ps = be.p(s)?;
        items.push(MtItem {
            n: s.numel(),
            ptrs: [be.p_mut(t)?, ps, 0, 0],
        });
    }
    launch_multi(be, "op_ema_mt", &[A::F(alpha)], &items)
}

pub(super) fn sgd_step_multi(
    be: &CudaBackend,
    slots: &mut [OptSlot<'_>],
    p: SgdParams,
) -> Result<()> {
    let mut items = Vec::with_capacity(slots.len());
    for s in slots.iter_mut() {
        same_shape(s.param, s.grad, "sgd_step")?;
        same_shape(s.param, s.state, "sgd_step")?;
        let pg = be.p(s.grad)?;
        items.push(MtItem {
            n: s.grad.numel(),
            ptrs: [be.p_mut(s.param)?, pg, be.p_mut(s.state)?, 0],
        });
    }
    launch_multi(be, "op_sgd_mt", &sgd_args(&p), &items)
}

pub(super) fn adam_step_multi(
    be: &CudaBackend,
    slots: &mut [OptSlot<'_>],
    p: AdamParams,
) -> Result<()> {
    let mut items = Vec::with_capacity(slots.len());
    for s in slots.iter_mut() {
        let v = s
            .state2
            .as_deref_mut()
            .ok_or_else(|| crate::error::Error::msg("adam_step_multi: a slot has no v"))?;
        same_shape(s.param, s.grad, "adam_step")?;
        same_shape(s.param, s.state, "adam_step")?;
        same_shape(s.param, v, "adam_step")?;
        let pg = be.p(s.grad)?;
        items.push(MtItem {
            n: s.grad.numel(),
            ptrs: [be.p_mut(s.param)?, pg, be.p_mut(s.state)?, be.p_mut(v)?],
        });
    }
    launch_multi(be, "op_adam_mt", &adam_args(&p), &items)
}
