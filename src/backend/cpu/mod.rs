//! The CPU reference backend: plain loops, f64 accumulation where a sum decides accuracy, a fast
//! GEMM for products, rayon for threads. Deterministic, and the same bits for every thread count:
//! parallel work is cut by the data's shape alone.

pub mod conv;
mod direct;
pub mod elementwise;
pub mod fusion;
pub mod gemm;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod reduce;
pub mod scratch;
mod simd;
pub mod softmax_xent;
pub mod ssl_losses;
pub mod winograd;

use crate::backend::shapes::{self, last_dim, rows2, same_shape};
use crate::backend::{
    label_values, AdamParams, Backend, BnAct, BnTrainOut, ConvGrads, ConvParams, DsrFactors,
    PoolParams, SgdParams,
};
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

/// Checks the CPU backend's environment variables before any work, so that a typo in a job
/// script is an error naming the variable rather than a quiet default. `RAYON_NUM_THREADS`:
/// rayon quietly falls back to one thread per core on a value it cannot parse (`two`, `2 `);
/// unset, empty and `0` mean one thread per core, as in rayon. `MEDSSL_CPU_CONV`: `auto`,
/// `im2col`, `winograd` or `direct` (see [`conv::Algo`]).
pub fn check_env() -> Result<()> {
    match std::env::var("RAYON_NUM_THREADS") {
        Err(std::env::VarError::NotPresent) => {}
        Ok(v) if v.is_empty() || v.parse::<usize>().is_ok() => {}
        Ok(v) => crate::bail!(
            "RAYON_NUM_THREADS='{v}' is not a number of threads (a whole number; 0 or unset: one \
             per core)"
        ),
        Err(std::env::VarError::NotUnicode(v)) => {
            crate::bail!("RAYON_NUM_THREADS={v:?} is not a number of threads")
        }
    }
    match std::env::var("MEDSSL_CPU_CONV") {
        Err(std::env::VarError::NotPresent) => Ok(()),
        Ok(v) => match conv::parse_algo(Some(&v)) {
            Ok(_) => Ok(()),
            Err(e) => crate::bail!("{e}"),
        },
        Err(std::env::VarError::NotUnicode(v)) => {
            crate::bail!("MEDSSL_CPU_CONV={v:?} is not a CPU convolution algorithm")
        }
    }
}

fn data(t: &Tensor) -> Result<&[f32]> {
    t.cpu_data()
}

fn out(v: Vec<f32>, shape: &[usize]) -> Tensor {
    debug_assert_eq!(v.len(), numel(shape));
    Tensor::from_storage(Storage::Cpu(v), shape)
}

fn scalar_of(g: &Tensor, op: &str) -> Result<f32> {
    shapes::scalar_grad(g, op)?;
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
        shapes::sum_rows(x, n)?;
        Ok(out(reduce::sum_rows(data(x)?, n), &[n]))
    }
    fn global_avg_pool_fwd(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, hw) = shapes::global_avg_pool_fwd(x)?;
        Ok(out(reduce::global_avg_pool_fwd(data(x)?, hw), &[n, c]))
    }
    fn global_avg_pool_bwd(&self, gy: &Tensor, x_shape: &[usize]) -> Result<Tensor> {
        let hw = shapes::global_avg_pool_bwd(gy, x_shape)?;
        Ok(out(reduce::global_avg_pool_bwd(data(gy)?, hw), x_shape))
    }

    fn matmul(&self, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
        let shapes::MatmulGeom {
            batch,
            m,
            n,
            k,
            out_shape,
        } = shapes::matmul(a, b, trans_a, trans_b)?;
        let (ad, bd) = (data(a)?, data(b)?);
        let mut c = vec![0.0f32; batch * m * n];
        if c.is_empty() {
            return Ok(out(c, &out_shape));
        }
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
        Ok(out(c, &out_shape))
    }
    fn linear_fwd(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let (n, o, k) = shapes::linear(x, w, b)?;
        let mut y = vec![0.0f32; n * o];
        gemm::sgemm(
            n,
            o,
            k,
            data(x)?,
            false,
            data(w)?,
            true,
            &mut y,
            false,
            true,
        );
        if let Some(b) = b {
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
        let s = shapes::conv(x, w, p)?;
        shapes::conv_bias(&s, b)?;
        let bd = match b {
            Some(b) => Some(data(b)?),
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
        let s = shapes::conv(x, w, p)?;
        shapes::conv_grad(&s, gy)?;
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
        let (n, c, h, w) = shapes::batch_norm_train_fwd(x, gamma, beta)?;
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
        let (n, c, h, w) = shapes::batch_norm_train_bwd(x, gamma, mean, invstd, gy)?;
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
        act: BnAct<'_>,
    ) -> Result<Tensor> {
        let (_, c, h, w) = shapes::batch_norm_eval_fwd(x, gamma, beta, rm, rv)?;
        let y = out(
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
        );
        match act {
            BnAct::None => Ok(y),
            BnAct::Relu => self.relu_fwd(&y),
            BnAct::AddRelu(r) => self.add_relu_fwd(&y, r),
        }
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
        let (n, c, h, w) = shapes::batch_norm_eval_bwd(x, gamma, rm, rv, gy)?;
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
        let (n, c, s) = shapes::max_pool2d_fwd(x, p)?;
        Ok(out(
            pool::max_pool2d_fwd(data(x)?, &s),
            &[n, c, s.ho(), s.wo()],
        ))
    }
    fn max_pool2d_bwd(&self, x: &Tensor, gy: &Tensor, p: PoolParams) -> Result<Tensor> {
        let (_, _, s) = shapes::max_pool2d_bwd(x, gy, p)?;
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
        shapes::labels(labels, b, c, "cross_entropy")?;
        Ok(Tensor::scalar(softmax_xent::cross_entropy_fwd(
            data(logits)?,
            labels,
            c,
        )))
    }
    fn cross_entropy_bwd(&self, logits: &Tensor, labels: &[usize], g: &Tensor) -> Result<Tensor> {
        let (b, c) = rows2(logits, "cross_entropy")?;
        shapes::labels(labels, b, c, "cross_entropy")?;
        Ok(out(
            softmax_xent::cross_entropy_bwd(
                data(logits)?,
                labels,
                c,
                scalar_of(g, "cross_entropy backward")?,
            ),
            logits.shape(),
        ))
    }

    fn entropy_weight(&self, logits: &Tensor) -> Result<Tensor> {
        let (b, c) = rows2(logits, "entropy_weight")?;
        Ok(out(ssl_losses::entropy_weight(data(logits)?, c), &[b]))
    }
    fn weighted_consistency_fwd(&self, zs: &Tensor, zt: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (_, c) = shapes::consistency(zs, zt, w)?;
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
        let (_, c) = shapes::consistency(zs, zt, w)?;
        Ok(out(
            ssl_losses::weighted_consistency_bwd(
                data(zs)?,
                data(zt)?,
                data(w)?,
                c,
                scalar_of(g, "weighted_consistency backward")?,
            ),
            zs.shape(),
        ))
    }
    fn argmax_rows(&self, z: &Tensor) -> Result<Tensor> {
        let (b, c) = rows2(z, "argmax_rows")?;
        let v = if c == 0 {
            vec![0; b]
        } else {
            ssl_losses::argmax_rows(data(z)?, c)
        };
        Ok(out(v.iter().map(|&l| l as f32).collect(), &[b]))
    }
    fn pgc_loss_fwd(
        &self,
        q: &Tensor,
        q_labels: &Tensor,
        q_w: &Tensor,
        keys: &Tensor,
        k_labels: &Tensor,
        k_w: &Tensor,
        tau: f32,
    ) -> Result<Tensor> {
        let (_, _, e) = shapes::pgc(q, q_labels, q_w, keys, k_labels, k_w)?;
        let ql = label_values(data(q_labels)?, "pgc_loss query labels")?;
        let kl = label_values(data(k_labels)?, "pgc_loss key labels")?;
        Ok(Tensor::scalar(ssl_losses::pgc_loss_fwd(
            data(q)?,
            &ql,
            data(q_w)?,
            data(keys)?,
            &kl,
            data(k_w)?,
            e,
            tau,
        )))
    }
    fn pgc_loss_bwd(
        &self,
        q: &Tensor,
        q_labels: &Tensor,
        q_w: &Tensor,
        keys: &Tensor,
        k_labels: &Tensor,
        k_w: &Tensor,
        tau: f32,
        g: &Tensor,
    ) -> Result<Tensor> {
        let (_, _, e) = shapes::pgc(q, q_labels, q_w, keys, k_labels, k_w)?;
        let ql = label_values(data(q_labels)?, "pgc_loss query labels")?;
        let kl = label_values(data(k_labels)?, "pgc_loss key labels")?;
        Ok(out(
            ssl_losses::pgc_loss_bwd(
                data(q)?,
                &ql,
                data(q_w)?,
                data(keys)?,
                &kl,
                data(k_w)?,
                e,
                tau,
                scalar_of(g, "pgc_loss backward")?,
            ),
            q.shape(),
        ))
    }
    fn concat_rows(&self, a: &Tensor, b: &Tensor, b_rows: usize) -> Result<Tensor> {
        let (ra, e) = shapes::concat_rows(a, b, b_rows)?;
        let mut y = Vec::with_capacity((ra + b_rows) * e);
        y.extend_from_slice(data(a)?);
        y.extend_from_slice(&data(b)?[..b_rows * e]);
        Ok(out(y, &[ra + b_rows, e]))
    }
    fn dsr_weights(&self, f: &DsrFactors<'_>) -> Result<(Tensor, Option<Tensor>)> {
        shapes::dsr_weights(f)?;
        fn opt(t: Option<&Tensor>) -> Result<Option<&[f32]>> {
            t.map(data).transpose()
        }
        let align = match f.align {
            Some((a, beta)) => Some((data(a)?, beta)),
            None => None,
        };
        let (w, m) =
            ssl_losses::dsr_weights(f.n, opt(f.conf)?, opt(f.meta)?, align, opt(f.balance)?);
        Ok((out(w, &[f.n]), m.map(|m| out(m, &[f.n]))))
    }
    fn ring_write_rows(&self, dst: &mut Tensor, src: &Tensor, start: usize) -> Result<()> {
        let (k, r, e) = shapes::ring_write_rows(dst, src, start)?;
        let s = data(src)?;
        let d = dst.cpu_data_mut()?;
        for i in 0..r {
            let slot = (start + i) % k;
            d[slot * e..(slot + 1) * e].copy_from_slice(&s[i * e..(i + 1) * e]);
        }
        Ok(())
    }
    fn dsr_alignment(
        &self,
        feat_lab: &Tensor,
        y_lab: &[usize],
        feat_unl: &Tensor,
        pseudo: &Tensor,
        fc_w: &Tensor,
        fc_b: &Tensor,
    ) -> Result<Tensor> {
        let shapes::DsrGeom { bu, d, c, .. } =
            shapes::dsr_alignment(feat_lab, y_lab, feat_unl, pseudo, fc_w, fc_b)?;
        let pseudo = label_values(data(pseudo)?, "dsr_alignment pseudo-labels")?;
        shapes::labels(&pseudo, bu, c, "dsr_alignment pseudo-labels")?;
        Ok(out(
            ssl_losses::dsr_alignment(
                data(feat_lab)?,
                y_lab,
                data(feat_unl)?,
                &pseudo,
                data(fc_w)?,
                data(fc_b)?,
                d,
                c,
            ),
            &[bu],
        ))
    }

    fn similarity_fusion_fwd(&self, low: &Tensor, high: &Tensor) -> Result<(Tensor, Tensor)> {
        let shapes::FusionGeom { b, d, np, nq } = shapes::fusion(low, high)?;
        let (y, st) = fusion::similarity_fusion_fwd(data(low)?, data(high)?, (b, d, np, nq));
        Ok((out(y, high.shape()), out(st, &[b, nq, np])))
    }
    fn similarity_fusion_bwd(
        &self,
        low: &Tensor,
        high: &Tensor,
        st: &Tensor,
        gy: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let geom = shapes::fusion(low, high)?;
        shapes::fusion_similarity(st, &geom)?;
        let shapes::FusionGeom { d, np, nq, .. } = geom;
        same_shape(high, gy, "similarity_fusion backward")?;
        let (gl, gh) =
            fusion::similarity_fusion_bwd(data(low)?, data(high)?, data(st)?, data(gy)?, d, np, nq);
        Ok((out(gl, low.shape()), out(gh, high.shape())))
    }

    fn projected_fusion_fwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        high: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (bn, c, d, np, nq) = shapes::projected_fusion(x, w, b, high)?;
        let dims = fusion::ProjectedDims {
            b: bn,
            c,
            d,
            np,
            nq,
        };
        let bias = b.map(data).transpose()?;
        let (y, saved) = fusion::projected_fusion_fwd(data(x)?, data(w)?, bias, data(high)?, dims);
        let saved = vec![
            out(saved.st, &[bn, nq, np]),
            out(saved.m, &[bn, c, nq]),
            out(saved.z, &[bn, c, nq]),
        ];
        Ok((out(y, high.shape()), saved))
    }
    fn projected_fusion_bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        has_bias: bool,
        high: &Tensor,
        saved: &[Tensor],
        gy: &Tensor,
    ) -> Result<(ConvGrads, Tensor)> {
        let ((bn, c, d, np, nq), [st, m, z]) =
            shapes::projected_fusion_saved(x, w, high, saved, gy)?;
        let dims = fusion::ProjectedDims {
            b: bn,
            c,
            d,
            np,
            nq,
        };
        let saved = (data(st)?, data(m)?, data(z)?);
        let (gx, gw, gb, gh) =
            fusion::projected_fusion_bwd(data(x)?, data(w)?, data(high)?, saved, data(gy)?, dims);
        let grads = ConvGrads {
            x: Some(out(gx, x.shape())),
            weight: out(gw, w.shape()),
            bias: has_bias.then(|| out(gb, &[d])),
        };
        Ok((grads, out(gh, high.shape())))
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
