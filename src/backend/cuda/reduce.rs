//! Reductions (kernels/reduce.cu): total sum, column sums, global average pooling. All kernels
//! use fixed reduction trees, so results are deterministic run to run.

use cudarc::driver::LaunchConfig;

use super::{cfg_blocks, cfg_lin, cfg_rows, ci, CudaBackend, A};
use crate::backend::shapes;
use crate::error::Result;
use crate::tensor::Tensor;

/// `out[0] = scale · Σ x` over the first `n` elements at `x` (one 1024-thread block).
pub(super) fn sum_scaled_raw(
    be: &CudaBackend,
    n: usize,
    x: u64,
    scale: f32,
    out: u64,
) -> Result<()> {
    be.launch(
        "red_sum_scaled",
        cfg_blocks(1, 1024),
        &[A::I(ci(n)?), A::P(x), A::F(scale), A::P(out)],
    )
}

/// The scale of a mean over `rows` rows for [`sum_scaled_raw`]: `1/rows`, and NaN for no rows
/// (the mean of nothing, as the CPU reference and PyTorch's `mean` give it; `red_sum_scaled`
/// writes `scale · 0`).
pub(super) fn mean_scale(rows: usize) -> f32 {
    if rows == 0 {
        f32::NAN
    } else {
        1.0 / rows as f32
    }
}

pub(super) fn sum_all(be: &CudaBackend, x: &Tensor) -> Result<Tensor> {
    let out = be.empty(&[1])?;
    sum_scaled_raw(be, x.numel(), be.p(x)?, 1.0, be.p(&out)?)?;
    Ok(out)
}

/// Column sums of `[rows, n]` at `x` into `out [n]`.
pub(super) fn sum_rows_raw(
    be: &CudaBackend,
    rows: usize,
    n: usize,
    x: u64,
    out: u64,
) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(32).max(1) as u32, 1, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    be.launch(
        "red_sum_rows",
        cfg,
        &[A::I(ci(rows)?), A::I(ci(n)?), A::P(x), A::P(out)],
    )
}

pub(super) fn sum_rows(be: &CudaBackend, x: &Tensor, n: usize) -> Result<Tensor> {
    shapes::sum_rows(x, n)?;
    let out = be.empty(&[n])?;
    sum_rows_raw(be, x.numel() / n, n, be.p(x)?, be.p(&out)?)?;
    Ok(out)
}

/// Per-channel sums of `[N, C, inner]` at `x` into `out [C]`.
pub(super) fn channel_sum_raw(
    be: &CudaBackend,
    n: usize,
    c: usize,
    inner: usize,
    x: u64,
    out: u64,
) -> Result<()> {
    be.launch(
        "red_channel_sum",
        cfg_blocks(c, 256),
        &[
            A::I(ci(n)?),
            A::I(ci(c)?),
            A::I(ci(inner)?),
            A::P(x),
            A::P(out),
        ],
    )
}

pub(super) fn global_avg_pool_fwd(be: &CudaBackend, x: &Tensor) -> Result<Tensor> {
    let (n, c, hw) = shapes::global_avg_pool_fwd(x)?;
    let y = be.empty(&[n, c])?;
    let rows = n * c;
    if rows > 0 {
        be.launch(
            "red_gap_fwd",
            cfg_rows(rows),
            &[
                A::I(ci(rows)?),
                A::I(ci(hw)?),
                A::P(be.p(x)?),
                A::P(be.p(&y)?),
            ],
        )?;
    }
    Ok(y)
}

pub(super) fn global_avg_pool_bwd(
    be: &CudaBackend,
    gy: &Tensor,
    x_shape: &[usize],
) -> Result<Tensor> {
    let hw = shapes::global_avg_pool_bwd(gy, x_shape)?;
    let gx = be.empty(x_shape)?;
    let total = gx.numel();
    if total > 0 {
        be.launch(
            "red_gap_bwd",
            cfg_lin(total),
            &[
                A::I(ci(total)?),
                A::I(ci(hw)?),
                A::P(be.p(gy)?),
                A::P(be.p(&gx)?),
            ],
        )?;
    }
    Ok(gx)
}

/// The read-bandwidth probes (`probe_read_f32`, `probe_read_f32x4` in kernels/reduce.cu): `x`
/// read once, four loads in flight per thread, of one float each or (`wide`) of one float4 each;
/// returns the per-block partial sums (their total is the sum of `x`). `wide` needs a length that
/// is a multiple of 4 and a 16-byte aligned tensor.
pub(super) fn read_probe(be: &CudaBackend, x: &Tensor, wide: bool) -> Result<Tensor> {
    let n = x.numel();
    let p = be.p(x)?;
    if wide && (!n.is_multiple_of(4) || !p.is_multiple_of(16)) {
        return Err(crate::error::Error::msg(format!(
            "read probe: the float4 probe needs a length that is a multiple of 4 and a 16-byte \
             aligned tensor ({n} elements at {p:#x})"
        )));
    }
    let units = if wide { n / 4 } else { n };
    let cfg = super::cfg_lin4(units);
    // Every block writes its partial sum.
    let out = be.empty(&[cfg.grid_dim.0 as usize])?;
    if units > 0 {
        let name = if wide {
            "probe_read_f32x4"
        } else {
            "probe_read_f32"
        };
        be.launch(name, cfg, &[A::I(ci(units)?), A::P(p), A::P(be.p(&out)?)])?;
    }
    Ok(out)
}
