//! The CPU reference backend: plain loops, f64 accumulation where a sum decides accuracy, a fast
//! GEMM for products, rayon for threads. Deterministic for a given thread count.

pub mod conv;
pub mod elementwise;
pub mod fusion;
pub mod gemm;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod reduce;
pub mod softmax_xent;
pub mod ssl_losses;

use crate::backend::{
    AdamParams, Backend, BnTrainOut, ConvGrads, ConvParams, PoolParams, SgdParams,
};
use crate::bail;
use crate::error::Result;
use crate::tensor::{numel, Device, Storage, Tensor};

/// The CPU backend (stateless).
pub struct CpuBackend;

static CPU: CpuBackend = CpuBackend;

impl CpuBackend {
    pub fn get() -> &'static dyn Backend {
        &CPU
    }
}

fn data(t: &Tensor) -> Result<&[f32]> {
    t.cpu_data()
}

fn out(v: Vec<f32>, shape: &[usize]) -> Tensor {
    debug_assert_eq!(v.len(), numel(shape));
    Tensor::from_storage(Storage::Cpu(v), shape)
}

fn same_shape(a: &Tensor, b: &Tensor, op: &str) -> Result<()> {
    if a.shape() != b.shape() {
        bail!("{op}: shapes {:?} and {:?} differ", a.shape(), b.shape());
    }
    Ok(())
}

fn last_dim(t: &Tensor, op: &str) -> Result<usize> {
    match t.shape().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => bail!(
            "{op}: needs a non-empty last dimension, got {:?}",
            t.shape()
        ),
    }
}

fn nchw(t: &Tensor, op: &str) -> Result<(usize, usize, usize, usize)> {
    match t.shape() {
        &[n, c, h, w] => Ok((n, c, h, w)),
        s => bail!("{op}: expected an NCHW tensor, got shape {s:?}"),
    }
}

fn check_labels(labels: &[usize], rows: usize, classes: usize, op: &str) -> Result<()> {
    if labels.len() != rows {
        bail!("{op}: {} labels for {rows} rows", labels.len());
    }
    if let Some(l) = labels.iter().find(|&&l| l >= classes) {
        bail!("{op}: label {l} out of range for {classes} classes");
    }
    Ok(())
}

/// Validated conv geometry.
fn conv_shape(x: &Tensor, w: &Tensor, p: ConvParams) -> Result<conv::ConvShape> {
    let (n, cin, h, wd) = nchw(x, "conv2d input")?;
    let (cout, wc, kh, kw) = nchw(w, "conv2d weight")?;
    if wc != cin || kh != kw {
        bail!(
            "conv2d: weight {:?} does not fit input {:?} (square kernels, same channels)",
            w.shape(),
            x.shape()
        );
    }
    if p.stride == 0 || h + 2 * p.padding < kh || wd + 2 * p.padding < kw {
        bail!(
            "conv2d: kernel {kh} stride {} padding {} does not fit input {:?}",
            p.stride,
            p.padding,
            x.shape()
        );
    }
    Ok(conv::ConvShape {
        n,
        cin,
        h,
        w: wd,
        cout,
        k: kh,
        stride: p.stride,
        pad: p.padding,
    })
}

fn scalar_of(g: &Tensor) -> Result<f32> {
    if g.numel() != 1 {
        bail!("expected a [1] upstream gradient, got {:?}", g.shape());
    }
    g.item()
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        "cpu".into()
    }
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn from_host(&self, d: &[f32], shape: &[usize]) -> Result<Tensor> {
        Tensor::from_vec(d.to_vec(), shape)
    }
    fn to_host(&self, t: &Tensor) -> Result<Vec<f32>> {
        Ok(data(t)?.to_vec())
    }
    fn full(&self, shape: &[usize], value: f32) -> Result<Tensor> {
        Ok(out(vec![value; numel(shape)], shape))
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn axpby(&self, a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
        same_shape(x, y, "axpby")?;
        Ok(out(elementwise::axpby(a, data(x)?, b, data(y)?), x.shape()))
    }
    fn scale(&self, x: &Tensor, s: f32) -> Result<Tensor> {
        Ok(out(elementwise::scale(data(x)?, s), x.shape()))
    }
    fn mul(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        same_shape(x, y, "mul")?;
        Ok(out(elementwise::mul(data(x)?, data(y)?), x.shape()))
    }
    fn relu_fwd(&self, x: &Tensor) -> Result<Tensor> {
        Ok(out(elementwise::relu_fwd(data(x)?), x.shape()))
    }
    fn relu_bwd(&self, y: &Tensor, gy: &Tensor) -> Result<Tensor> {
        same_shape(y, gy, "relu_bwd")?;
        Ok(out(elementwise::relu_bwd(data(y)?, data(gy)?), y.shape()))
    }
    fn add_assign(&self, acc: &mut Tensor, x: &Tensor) -> Result<()> {
        same_shape(acc, x, "add_assign")?;
        let xd = data(x)?;
        elementwise::add_assign(acc.cpu_data_mut()?, xd);
        Ok(())
    }
    fn sum_all(&self, x: &Tensor) -> Result<Tensor> {
        Ok(Tensor::scalar(elementwise::sum_all(data(x)?)))
    }

    fn sum_rows(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        if n == 0 || !x.numel().is_multiple_of(n) {
            bail!("sum_rows: {:?} is not a multiple of rows of {n}", x.shape());
        }
        Ok(out(reduce::sum_rows(data(x)?, n), &[n]))
    }
    fn global_avg_pool_fwd(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = nchw(x, "global_avg_pool2d")?;
        Ok(out(reduce::global_avg_pool_fwd(data(x)?, h * w), &[n, c]))
    }
    fn global_avg_pool_bwd(&self, gy: &Tensor, x_shape: &[usize]) -> Result<Tensor> {
        let hw = x_shape[2] * x_shape[3];
        Ok(out(reduce::global_avg_pool_bwd(data(gy)?, hw), x_shape))
    }

    fn matmul(&self, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
        let (sa, sb) = (a.shape(), b.shape());
        if sa.len() != sb.len() || !(2..=3).contains(&sa.len()) {
            bail!("matmul: shapes {sa:?} and {sb:?} must both be 2-D or both 3-D");
        }
        let batch = if sa.len() == 3 { sa[0] } else { 1 };
        if sa.len() == 3 && sb[0] != batch {
            bail!("matmul: batch sizes differ in {sa:?} and {sb:?}");
        }
        let r = sa.len() - 2;
        let (m, k) = if trans_a {
            (sa[r + 1], sa[r])
        } else {
            (sa[r], sa[r + 1])
        };
        let (kb, n) = if trans_b {
            (sb[r + 1], sb[r])
        } else {
            (sb[r], sb[r + 1])
        };
        if k != kb {
            bail!(
                "matmul: inner dimensions differ ({sa:?}{} x {sb:?}{})",
                if trans_a { "ᵀ" } else { "" },
                if trans_b { "ᵀ" } else { "" }
            );
        }
        let (ad, bd) = (data(a)?, data(b)?);
        let mut c = vec![0.0f32; batch * m * n];
        use rayon::prelude::*;
        let outer = batch >= rayon::current_num_threads();
        let body = |(i, ci): (usize, &mut [f32])| {
            gemm::sgemm(
                m,
                n,
                k,
                &ad[i * m * k..],
                trans_a,
                &bd[i * k * n..],
                trans_b,
                ci,
                false,
                !outer,
            )
        };
        if outer {
            c.par_chunks_mut(m * n).enumerate().for_each(body);
        } else {
            c.chunks_mut(m * n).enumerate().for_each(body);
        }
        let shape: Vec<usize> = if r == 1 {
            vec![batch, m, n]
        } else {
            vec![m, n]
        };
        Ok(out(c, &shape))
    }
    fn linear_fwd(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let (xs, ws) = (x.shape(), w.shape());
        if xs.len() != 2 || ws.len() != 2 || xs[1] != ws[1] {
            bail!("linear: input {xs:?} does not fit weight {ws:?}");
        }
        let (n, o) = (xs[0], ws[0]);
        let mut y = vec![0.0f32; n * o];
        gemm::sgemm(
            n,
            o,
            xs[1],
            data(x)?,
            false,
            data(w)?,
            true,
            &mut y,
            false,
            true,
        );
        if let Some(b) = b {
            if b.shape() != [o] {
                bail!("linear: bias {:?} does not fit {o} outputs", b.shape());
            }
            let bd = data(b)?;
            y.chunks_mut(o)
                .for_each(|r| r.iter_mut().zip(bd).for_each(|(v, b)| *v += b));
        }
        Ok(out(y, &[n, o]))
    }

    fn conv2d_fwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        p: ConvParams,
    ) -> Result<Tensor> {
        let s = conv_shape(x, w, p)?;
        let bd = match b {
            Some(b) => {
                if b.shape() != [s.cout] {
                    bail!(
                        "conv2d: bias {:?} does not fit {} output channels",
                        b.shape(),
                        s.cout
                    );
                }
                Some(data(b)?)
            }
            None => None,
        };
        let y = conv::conv2d_fwd(&s, data(x)?, data(w)?, bd);
        Ok(out(y, &[s.n, s.cout, s.ho(), s.wo()]))
    }
    fn conv2d_bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        gy: &Tensor,
        p: ConvParams,
        need_x: bool,
        has_bias: bool,
    ) -> Result<ConvGrads> {
        let s = conv_shape(x, w, p)?;
        if gy.shape() != [s.n, s.cout, s.ho(), s.wo()] {
            bail!(
                "conv2d backward: gradient {:?} does not fit output {:?}",
                gy.shape(),
                [s.n, s.cout, s.ho(), s.wo()]
            );
        }
        let (gx, gw, gb) = conv::conv2d_bwd(&s, data(x)?, data(w)?, data(gy)?, need_x, has_bias);
        Ok(ConvGrads {
            x: gx.map(|g| out(g, x.shape())),
            weight: out(gw, w.shape()),
            bias: gb.map(|g| out(g, &[s.cout])),
        })
    }

    fn batch_norm_train_fwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<BnTrainOut> {
        let (n, c, h, w) = nchw(x, "batch_norm2d")?;
        if n * h * w < 2 {
            bail!(
                "batch_norm2d: training needs more than one value per channel, got input {:?}",
                x.shape()
            );
        }
        if gamma.shape() != [c] || beta.shape() != [c] {
            bail!(
                "batch_norm2d: weight/bias {:?}/{:?} do not fit {c} channels",
                gamma.shape(),
                beta.shape()
            );
        }
        let (y, mean, invstd, var) =
            norm::batch_norm_train_fwd(data(x)?, n, c, h * w, data(gamma)?, data(beta)?, eps);
        Ok(BnTrainOut {
            y: out(y, x.shape()),
            mean: out(mean, &[c]),
            invstd: out(invstd, &[c]),
            var_unbiased: out(var, &[c]),
        })
    }
    fn batch_norm_train_bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        mean: &Tensor,
        invstd: &Tensor,
        gy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, c, h, w) = nchw(x, "batch_norm2d backward")?;
        same_shape(x, gy, "batch_norm2d backward")?;
        let (gx, gg, gb) = norm::batch_norm_train_bwd(
            data(x)?,
            data(gy)?,
            n,
            c,
            h * w,
            data(gamma)?,
            data(mean)?,
            data(invstd)?,
        );
        Ok((out(gx, x.shape()), out(gg, &[c]), out(gb, &[c])))
    }
    fn batch_norm_eval_fwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        rm: &Tensor,
        rv: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        let (_, c, h, w) = nchw(x, "batch_norm2d")?;
        for (t, nm) in [
            (gamma, "weight"),
            (beta, "bias"),
            (rm, "running_mean"),
            (rv, "running_var"),
        ] {
            if t.shape() != [c] {
                bail!(
                    "batch_norm2d: {nm} {:?} does not fit {c} channels",
                    t.shape()
                );
            }
        }
        Ok(out(
            norm::batch_norm_eval_fwd(
                data(x)?,
                c,
                h * w,
                data(gamma)?,
                data(beta)?,
                data(rm)?,
                data(rv)?,
                eps,
            ),
            x.shape(),
        ))
    }
    fn batch_norm_eval_bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        rm: &Tensor,
        rv: &Tensor,
        eps: f32,
        gy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, c, h, w) = nchw(x, "batch_norm2d backward")?;
        same_shape(x, gy, "batch_norm2d backward")?;
        let (gx, gg, gb) = norm::batch_norm_eval_bwd(
            data(x)?,
            data(gy)?,
            n,
            c,
            h * w,
            data(gamma)?,
            data(rm)?,
            data(rv)?,
            eps,
        );
        Ok((out(gx, x.shape()), out(gg, &[c]), out(gb, &[c])))
    }
    fn l2_normalize_fwd(&self, x: &Tensor) -> Result<Tensor> {
        let d = last_dim(x, "l2_normalize")?;
        Ok(out(norm::l2_normalize_fwd(data(x)?, d), x.shape()))
    }
    fn l2_normalize_bwd(&self, x: &Tensor, gy: &Tensor) -> Result<Tensor> {
        same_shape(x, gy, "l2_normalize backward")?;
        let d = last_dim(x, "l2_normalize")?;
        Ok(out(
            norm::l2_normalize_bwd(data(x)?, data(gy)?, d),
            x.shape(),
        ))
    }

    fn max_pool2d_fwd(&self, x: &Tensor, p: PoolParams) -> Result<Tensor> {
        let (n, c, h, w) = nchw(x, "max_pool2d")?;
        let s = pool_shape(h, w, p)?;
        Ok(out(
            pool::max_pool2d_fwd(data(x)?, &s),
            &[n, c, s.ho(), s.wo()],
        ))
    }
    fn max_pool2d_bwd(&self, x: &Tensor, gy: &Tensor, p: PoolParams) -> Result<Tensor> {
        let (n, c, h, w) = nchw(x, "max_pool2d backward")?;
        let s = pool_shape(h, w, p)?;
        if gy.shape() != [n, c, s.ho(), s.wo()] {
            bail!(
                "max_pool2d backward: gradient {:?} does not fit the output",
                gy.shape()
            );
        }
        Ok(out(
            pool::max_pool2d_bwd(data(x)?, data(gy)?, &s),
            x.shape(),
        ))
    }

    fn softmax_fwd(&self, x: &Tensor) -> Result<Tensor> {
        let d = last_dim(x, "softmax")?;
        Ok(out(softmax_xent::softmax_fwd(data(x)?, d), x.shape()))
    }
    fn softmax_bwd(&self, y: &Tensor, gy: &Tensor) -> Result<Tensor> {
        same_shape(y, gy, "softmax backward")?;
        let d = last_dim(y, "softmax")?;
        Ok(out(
            softmax_xent::softmax_bwd(data(y)?, data(gy)?, d),
            y.shape(),
        ))
    }
    fn log_softmax_fwd(&self, x: &Tensor) -> Result<Tensor> {
        let d = last_dim(x, "log_softmax")?;
        Ok(out(softmax_xent::log_softmax_fwd(data(x)?, d), x.shape()))
    }
    fn log_softmax_bwd(&self, y: &Tensor, gy: &Tensor) -> Result<Tensor> {
        same_shape(y, gy, "log_softmax backward")?;
        let d = last_dim(y, "log_softmax")?;
        Ok(out(
            softmax_xent::log_softmax_bwd(data(y)?, data(gy)?, d),
            y.shape(),
        ))
    }
    fn cross_entropy_fwd(&self, logits: &Tensor, labels: &[usize]) -> Result<Tensor> {
        let (b, c) = rows2(logits, "cross_entropy")?;
        check_labels(labels, b, c, "cross_entropy")?;
        Ok(Tensor::scalar(softmax_xent::cross_entropy_fwd(
            data(logits)?,
            labels,
            c,
        )))
    }
    fn cross_entropy_bwd(&self, logits: &Tensor, labels: &[usize], g: &Tensor) -> Result<Tensor> {
        let (b, c) = rows2(logits, "cross_entropy")?;
        check_labels(labels, b, c, "cross_entropy")?;
        Ok(out(
            softmax_xent::cross_entropy_bwd(data(logits)?, labels, c, scalar_of(g)?),
            logits.shape(),
        ))
    }

    fn entropy_weight(&self, logits: &Tensor) -> Result<Tensor> {
        let (b, c) = rows2(logits, "entropy_weight")?;
        Ok(out(ssl_losses::entropy_weight(data(logits)?, c), &[b]))
    }
    fn weighted_consistency_fwd(&self, zs: &Tensor, zt: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (b, c) = consistency_shapes(zs, zt, w)?;
        let _ = b;
        Ok(Tensor::scalar(ssl_losses::weighted_consistency_fwd(
            data(zs)?,
            data(zt)?,
            data(w)?,
            c,
        )))
    }
    fn weighted_consistency_bwd(
        &self,
        zs: &Tensor,
        zt: &Tensor,
        w: &Tensor,
        g: &Tensor,
    ) -> Result<Tensor> {
        let (_, c) = consistency_shapes(zs, zt, w)?;
        Ok(out(
            ssl_losses::weighted_consistency_bwd(data(zs)?, data(zt)?, data(w)?, c, scalar_of(g)?),
            zs.shape(),
        ))
    }
    fn pgc_loss_fwd(
        &self,
        q: &Tensor,
        q_labels: &[usize],
        q_w: &Tensor,
        keys: &Tensor,
        k_labels: &[usize],
        k_w: &Tensor,
        tau: f32,
    ) -> Result<Tensor> {
        let e = pgc_shapes(q, q_labels, q_w, keys, k_labels, k_w)?;
        Ok(Tensor::scalar(ssl_losses::pgc_loss_fwd(
            data(q)?,
            q_labels,
            data(q_w)?,
            data(keys)?,
            k_labels,
            data(k_w)?,
            e,
            tau,
        )))
    }
    fn pgc_loss_bwd(
        &self,
        q: &Tensor,
        q_labels: &[usize],
        q_w: &Tensor,
        keys: &Tensor,
        k_labels: &[usize],
        k_w: &Tensor,
        tau: f32,
        g: &Tensor,
    ) -> Result<Tensor> {
        let e = pgc_shapes(q, q_labels, q_w, keys, k_labels, k_w)?;
        Ok(out(
            ssl_losses::pgc_loss_bwd(
                data(q)?,
                q_labels,
                data(q_w)?,
                data(keys)?,
                k_labels,
                data(k_w)?,
                e,
                tau,
                scalar_of(g)?,
            ),
            q.shape(),
        ))
    }
    fn dsr_alignment(
        &self,
        feat_lab: &Tensor,
        y_lab: &[usize],
        feat_unl: &Tensor,
        pseudo: &[usize],
        fc_w: &Tensor,
        fc_b: &Tensor,
    ) -> Result<Tensor> {
        let (bl, d) = rows2(feat_lab, "dsr_alignment labelled features")?;
        let (bu, du) = rows2(feat_unl, "dsr_alignment unlabelled features")?;
        let (c, dw) = rows2(fc_w, "dsr_alignment fc weight")?;
        if du != d || dw != d || fc_b.shape() != [c] {
            bail!(
                "dsr_alignment: feature dims {d}/{du}, fc {:?} + {:?} disagree",
                fc_w.shape(),
                fc_b.shape()
            );
        }
        check_labels(y_lab, bl, c, "dsr_alignment labels")?;
        check_labels(pseudo, bu, c, "dsr_alignment pseudo-labels")?;
        Ok(out(
            ssl_losses::dsr_alignment(
                data(feat_lab)?,
                y_lab,
                data(feat_unl)?,
                pseudo,
                data(fc_w)?,
                data(fc_b)?,
                d,
                c,
            ),
            &[bu],
        ))
    }

    fn similarity_fusion_fwd(&self, low: &Tensor, high: &Tensor) -> Result<Tensor> {
        let (d, np, nq) = fusion_shapes(low, high)?;
        Ok(out(
            fusion::similarity_fusion_fwd(data(low)?, data(high)?, d, np, nq),
            high.shape(),
        ))
    }
    fn similarity_fusion_bwd(
        &self,
        low: &Tensor,
        high: &Tensor,
        gy: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (d, np, nq) = fusion_shapes(low, high)?;
        same_shape(high, gy, "similarity_fusion backward")?;
        let (gl, gh) = fusion::similarity_fusion_bwd(data(low)?, data(high)?, data(gy)?, d, np, nq);
        Ok((out(gl, low.shape()), out(gh, high.shape())))
    }

    fn ema_update(&self, teacher: &mut Tensor, student: &Tensor, alpha: f32) -> Result<()> {
        same_shape(teacher, student, "ema_update")?;
        let s = data(student)?;
        optim::ema_update(teacher.cpu_data_mut()?, s, alpha);
        Ok(())
    }
    fn sgd_step(
        &self,
        param: &mut Tensor,
        grad: &Tensor,
        buf: &mut Tensor,
        p: SgdParams,
    ) -> Result<()> {
        same_shape(param, grad, "sgd_step")?;
        same_shape(param, buf, "sgd_step")?;
        optim::sgd_step(param.cpu_data_mut()?, data(grad)?, buf.cpu_data_mut()?, p);
        Ok(())
    }
    fn adam_step(
        &self,
        param: &mut Tensor,
        grad: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        p: AdamParams,
    ) -> Result<()> {
        same_shape(param, grad, "adam_step")?;
        same_shape(param, m, "adam_step")?;
        same_shape(param, v, "adam_step")?;
        optim::adam_step(
            param.cpu_data_mut()?,
            data(grad)?,
            m.cpu_data_mut()?,
            v.cpu_data_mut()?,
            p,
        );
        Ok(())
    }
}

fn rows2(t: &Tensor, op: &str) -> Result<(usize, usize)> {
    match t.shape() {
        &[b, c] if c > 0 => Ok((b, c)),
        s => bail!("{op}: expected a [rows, cols] tensor, got {s:?}"),
    }
}

fn consistency_shapes(zs: &Tensor, zt: &Tensor, w: &Tensor) -> Result<(usize, usize)> {
    let (b, c) = rows2(zs, "weighted_consistency")?;
    same_shape(zs, zt, "weighted_consistency")?;
    if w.shape() != [b] {
        bail!(
            "weighted_consistency: weights {:?} do not fit batch {b}",
            w.shape()
        );
    }
    Ok((b, c))
}

fn pgc_shapes(
    q: &Tensor,
    ql: &[usize],
    qw: &Tensor,
    k: &Tensor,
    kl: &[usize],
    kw: &Tensor,
) -> Result<usize> {
    let (b, e) = rows2(q, "pgc_loss queries")?;
    let (nk, ek) = rows2(k, "pgc_loss keys")?;
    if e != ek || ql.len() != b || qw.shape() != [b] || kl.len() != nk || kw.shape() != [nk] {
        bail!(
            "pgc_loss: queries {:?} ({} labels, weights {:?}) and keys {:?} ({} labels, weights {:?}) disagree",
            q.shape(), ql.len(), qw.shape(), k.shape(), kl.len(), kw.shape()
        );
    }
    Ok(e)
}

fn fusion_shapes(low: &Tensor, high: &Tensor) -> Result<(usize, usize, usize)> {
    let (b, d, hp, wp) = nchw(low, "similarity_fusion low")?;
    let (bq, dq, hq, wq) = nchw(high, "similarity_fusion high")?;
    if b != bq || d != dq {
        bail!(
            "similarity_fusion: low {:?} and high {:?} differ in batch or channels",
            low.shape(),
            high.shape()
        );
    }
    Ok((d, hp * wp, hq * wq))
}

fn pool_shape(h: usize, w: usize, p: PoolParams) -> Result<pool::PoolShape> {
    if p.kernel == 0
        || p.stride == 0
        || 2 * p.padding > p.kernel
        || h + 2 * p.padding < p.kernel
        || w + 2 * p.padding < p.kernel
    {
        bail!("max_pool2d: kernel {} stride {} padding {} invalid for {h}x{w} (padding at most half the kernel)", p.kernel, p.stride, p.padding);
    }
    Ok(pool::PoolShape {
        h,
        w,
        k: p.kernel,
        stride: p.stride,
        pad: p.padding,
    })
}
