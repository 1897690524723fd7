//! Matrix products on cuBLAS (FP32 SGEMM, no TF32 unless `MEDSSL_TF32=1`).
//!
//! cuBLAS is column-major; our tensors are row-major. A row-major `[r, c]` buffer read as
//! column-major is its transpose, so `C = op(A)·op(B)` (row-major) is computed as the
//! column-major product `Cᵀ = op(B)ᵀ·op(A)ᵀ`: swap the operands, keep each transpose flag.

use cudarc::cublas::sys::cublasOperation_t as Op;

use super::{cfg_lin, ci, elementwise, CudaBackend, A};
use crate::backend::shapes;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// One (strided-batched) row-major GEMM on raw device addresses:
/// `C[i] = alpha·op(A[i])·op(B[i]) + beta·C[i]` with `op(A)` `[m, k]` (A stored `[k, m]` when
/// `ta`), `op(B)` `[k, n]` (B stored `[n, k]` when `tb`), `C` `[m, n]`. Strides are in elements;
/// a zero stride broadcasts that operand over the batch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gemm {
    pub ta: bool,
    pub tb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub beta: f32,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl Gemm {
    /// A single (unbatched) product.
    pub fn new(ta: bool, tb: bool, m: usize, n: usize, k: usize) -> Gemm {
        Gemm {
            ta,
            tb,
            m,
            n,
            k,
            alpha: 1.0,
            beta: 0.0,
            batch: 1,
            stride_a: m * k,
            stride_b: k * n,
            stride_c: m * n,
        }
    }
    pub fn alpha(mut self, a: f32) -> Gemm {
        self.alpha = a;
        self
    }
    pub fn beta(mut self, b: f32) -> Gemm {
        self.beta = b;
        self
    }
    /// `batch` products with the natural (dense) strides.
    pub fn batched(mut self, batch: usize) -> Gemm {
        self.batch = batch;
        self
    }
    pub fn strides(mut self, a: usize, b: usize, c: usize) -> Gemm {
        self.stride_a = a;
        self.stride_b = b;
        self.stride_c = c;
        self
    }

    /// Runs the product on the backend's stream.
    pub fn run(self, be: &CudaBackend, a: u64, b: u64, c: u64) -> Result<()> {
        let g = self;
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        if g.k == 0 {
            // C = beta·C; with beta = 0 the output may be uninitialised memory.
            let len = (g.batch - 1) * g.stride_c + g.m * g.n;
            let n = ci(len)?;
            return be.launch(
                "ew_scale",
                cfg_lin(len),
                &[A::I(n), A::F(g.beta), A::P(c), A::P(c)],
            );
        }
        let name = if g.batch == 1 {
            "cublas_sgemm"
        } else {
            "cublas_sgemm_strided_batched"
        };
        be.count(name);
        if be.is_emulated() {
            let t0 = std::time::Instant::now();
            let r = super::emu::gemm(&g, a, b, c);
            if super::profile::active() {
                super::profile::record_host(name, t0);
            }
            return r;
        }
        let (m, n, k) = (ci(g.m)?, ci(g.n)?, ci(g.k)?);
        // Column-major view: C^T [n, m] = op(B)^T [n, k] · op(A)^T [k, m].
        let (op_b, ld_b) = if g.tb {
            (Op::CUBLAS_OP_T, k)
        } else {
            (Op::CUBLAS_OP_N, n)
        };
        let (op_a, ld_a) = if g.ta {
            (Op::CUBLAS_OP_T, m)
        } else {
            (Op::CUBLAS_OP_N, k)
        };
        be.bind()?;
        let blas = be.blas()?;
        let h = *blas.handle();
        let (alpha, beta) = (g.alpha, g.beta);
        // SAFETY: a, b, c are live device buffers on this backend's stream (the cuBLAS handle is
        // bound to it), sized by the validated shapes of the callers.
        let r = unsafe {
            if g.batch == 1 {
                cudarc::cublas::result::sgemm(
                    h,
                    op_b,
                    op_a,
                    n,
                    m,
                    k,
                    &alpha,
                    b as *const f32,
                    ld_b.max(1),
                    a as *const f32,
                    ld_a.max(1),
                    &beta,
                    c as *mut f32,
                    n.max(1),
                )
            } else {
                cudarc::cublas::result::sgemm_strided_batched(
                    h,
                    op_b,
                    op_a,
                    n,
                    m,
                    k,
                    &alpha,
                    b as *const f32,
                    ld_b.max(1),
                    g.stride_b as i64,
                    a as *const f32,
                    ld_a.max(1),
                    g.stride_a as i64,
                    &beta,
                    c as *mut f32,
                    n.max(1),
                    g.stride_c as i64,
                    ci(g.batch)?,
                )
            }
        };
        r.map_err(|e| Error::Cuda(format!("cuBLAS sgemm {g:?}: {e:?}")))
    }
}

pub(super) fn matmul(
    be: &CudaBackend,
    a: &Tensor,
    b: &Tensor,
    trans_a: bool,
    trans_b: bool,
) -> Result<Tensor> {
    let shapes::MatmulGeom {
        batch,
        m,
        n,
        k,
        out_shape,
    } = shapes::matmul(a, b, trans_a, trans_b)?;
    let c = be.empty(&out_shape)?;
    Gemm::new(trans_a, trans_b, m, n, k)
        .batched(batch)
        .run(be, be.p(a)?, be.p(b)?, be.p(&c)?)?;
    Ok(c)
}

pub(super) fn linear_fwd(
    be: &CudaBackend,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, o, k) = shapes::linear(x, w, b)?;
    let y = be.empty(&[n, o])?;
    Gemm::new(false, true, n, o, k).run(be, be.p(x)?, be.p(w)?, be.p(&y)?)?;
    if let Some(b) = b {
        elementwise::add_bias(be, &y, b, o, 1)?;
    }
    Ok(y)
}
