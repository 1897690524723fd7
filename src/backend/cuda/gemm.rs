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

/// The arguments of one `cublasSgemm` / `cublasSgemmStridedBatched` call, column-major as cuBLAS
/// reads them: `C[i] = alpha·op(A[i])·op(B[i]) + beta·C[i]`, `op(A)` `[m, k]`, `op(B)` `[k, n]`,
/// `C` `[m, n]`, element `(r, c)` of a matrix at `r + c·ld`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct BlasCall {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub beta: f32,
    pub a: u64,
    pub lda: usize,
    pub stride_a: usize,
    pub b: u64,
    pub ldb: usize,
    pub stride_b: usize,
    pub c: u64,
    pub ldc: usize,
    pub stride_c: usize,
    pub batch: usize,
}

impl BlasCall {
    /// Every argument as a number (scalars by their bits), for comparing two calls exactly.
    pub fn signature(&self) -> Vec<u64> {
        let c = self;
        vec![
            u64::from(c.trans_a),
            u64::from(c.trans_b),
            c.m as u64,
            c.n as u64,
            c.k as u64,
            u64::from(c.alpha.to_bits()),
            u64::from(c.beta.to_bits()),
            c.a,
            c.lda as u64,
            c.stride_a as u64,
            c.b,
            c.ldb as u64,
            c.stride_b as u64,
            c.c,
            c.ldc as u64,
            c.stride_c as u64,
            c.batch as u64,
        ]
    }
}

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

    /// The cuBLAS call that computes this product on the row-major buffers `a`, `b`, `c`:
    /// column-major `Cᵀ [n, m] = op(B)ᵀ·op(A)ᵀ`, i.e. the operands swapped, each keeping its
    /// transpose flag, with the leading dimensions of the row-major rows.
    pub fn blas_call(&self, a: u64, b: u64, c: u64) -> BlasCall {
        let g = self;
        BlasCall {
            trans_a: g.tb,
            trans_b: g.ta,
            m: g.n,
            n: g.m,
            k: g.k,
            alpha: g.alpha,
            beta: g.beta,
            a: b,
            lda: if g.tb { g.k } else { g.n }.max(1),
            stride_a: g.stride_b,
            b: a,
            ldb: if g.ta { g.m } else { g.k }.max(1),
            stride_b: g.stride_a,
            c,
            ldc: g.n.max(1),
            stride_c: g.stride_c,
            batch: g.batch,
        }
    }

    /// Runs the product on the backend's stream.
    pub fn run(self, be: &CudaBackend, a: u64, b: u64, c: u64) -> Result<()> {
        let g = self;
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        if g.k == 0 {
            // C = beta·C, as cuBLAS does: with beta = 0 the output (possibly uninitialised
            // memory, NaN or Inf) is written with zeros, not scaled. Only each batch's [m, n]
            // block is touched.
            let mn = g.m * g.n;
            let blocks: Vec<(u64, usize)> = if g.stride_c == mn {
                vec![(c, g.batch * mn)]
            } else {
                (0..g.batch)
                    .map(|i| (c + 4 * (i * g.stride_c) as u64, mn))
                    .collect()
            };
            for (p, len) in blocks {
                let n = A::I(ci(len)?);
                if g.beta == 0.0 {
                    be.launch("ew_fill", cfg_lin(len), &[n, A::F(0.0), A::P(p)])?;
                } else {
                    be.launch(
                        "ew_scale",
                        cfg_lin(len),
                        &[n, A::F(g.beta), A::P(p), A::P(p)],
                    )?;
                }
            }
            return Ok(());
        }
        let name = if g.batch == 1 {
            "cublas_sgemm"
        } else {
            "cublas_sgemm_strided_batched"
        };
        let _turn = be.turn();
        be.count(name);
        let call = g.blas_call(a, b, c);
        if be.graph_lib(name, call.signature(), Some(call))? == super::graph::Hook::Skip {
            return Ok(());
        }
        if be.is_emulated() {
            // The emulation takes the same column-major call, so CI checks the mapping above.
            return super::profile::host_timed(name, || super::emu::cublas_sgemm(&call))
                .map_err(|e| Error::Cuda(format!("{name} for {g:?}: {e}")));
        }
        let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        let (m, n, k) = (ci(call.m)?, ci(call.n)?, ci(call.k)?);
        let (lda, ldb, ldc) = (ci(call.lda)?, ci(call.ldb)?, ci(call.ldc)?);
        be.bind()?;
        let blas = be.blas()?;
        let h = *blas.handle();
        let (alpha, beta) = (call.alpha, call.beta);
        // SAFETY: a, b, c are live device buffers on this backend's stream (the cuBLAS handle is
        // bound to it), sized by the validated shapes of the callers.
        let r = unsafe {
            if call.batch == 1 {
                cudarc::cublas::result::sgemm(
                    h,
                    op(call.trans_a),
                    op(call.trans_b),
                    m,
                    n,
                    k,
                    &alpha,
                    call.a as *const f32,
                    lda,
                    call.b as *const f32,
                    ldb,
                    &beta,
                    call.c as *mut f32,
                    ldc,
                )
            } else {
                cudarc::cublas::result::sgemm_strided_batched(
                    h,
                    op(call.trans_a),
                    op(call.trans_b),
                    m,
                    n,
                    k,
                    &alpha,
                    call.a as *const f32,
                    lda,
                    call.stride_a as i64,
                    call.b as *const f32,
                    ldb,
                    call.stride_b as i64,
                    &beta,
                    call.c as *mut f32,
                    ldc,
                    call.stride_c as i64,
                    ci(call.batch)?,
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
