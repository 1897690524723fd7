//! The DSRPGC objective (SPEC §1): DSR weights, weighted Mean-Teacher consistency, pseudo-label
//! guided contrastive loss over a FIFO queue of teacher keys, and their ramped sum.

use crate::autograd::{Graph, Var};
use crate::bail;
use crate::error::Result;
use crate::nn::{Binding, MedFuseNet};
use crate::tensor::Tensor;

/// Which parts of the DSR weight `w_i = c_i · m_i` are used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DsrMode {
    /// `w = 1`.
    Off,
    /// `w = c` (entropy confidence only).
    Entropy,
    /// `w = m` (meta weight only).
    Meta,
    /// `w = c · m`.
    Both,
}

impl std::str::FromStr for DsrMode {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<DsrMode> {
        Ok(match s {
            "off" => DsrMode::Off,
            "entropy" => DsrMode::Entropy,
            "meta" => DsrMode::Meta,
            "both" => DsrMode::Both,
            _ => bail!("--dsr '{s}': expected off, entropy, meta or both"),
        })
    }
}

/// Loss hyper-parameters of one step (λ already ramped by the caller).
#[derive(Clone, Copy, Debug)]
pub struct LossConfig {
    pub lambda_cons: f32,
    pub lambda_pgc: f32,
    /// PGC temperature τ.
    pub temperature: f32,
    pub dsr: DsrMode,
    /// Meta-weight step size β.
    pub meta_beta: f32,
    /// Use the consistency term (false: supervised only / no-consistency ablation).
    pub consistency: bool,
    /// Use the PGC term.
    pub pgc: bool,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            lambda_cons: 1.0,
            lambda_pgc: 0.5,
            temperature: 0.1,
            dsr: DsrMode::Both,
            meta_beta: 0.1,
            consistency: true,
            pgc: true,
        }
    }
}

/// One SSL batch, already on the compute device.
pub struct Batch {
    /// Labelled weak views `[B_l, C, H, W]`.
    pub x_lab: Tensor,
    pub y_lab: Vec<usize>,
    /// Unlabelled weak views (teacher) `[B_u, C, H, W]`.
    pub u_weak: Tensor,
    /// Unlabelled strong views (student) of the same images.
    pub u_strong: Tensor,
}

/// The valid entries of the key queue, on the host.
#[derive(Clone, Debug, Default)]
pub struct QueueView {
    /// `[len, E]` row-major.
    pub keys: Vec<f32>,
    pub labels: Vec<usize>,
    pub weights: Vec<f32>,
}

/// FIFO ring of teacher keys with their pseudo-labels and weights (SPEC §1.8).
#[derive(Clone, Debug)]
pub struct Queue {
    pub capacity: usize,
    pub dim: usize,
    pub keys: Vec<f32>,
    pub labels: Vec<usize>,
    pub weights: Vec<f32>,
    /// Next slot to overwrite.
    pub ptr: usize,
    /// Number of valid entries (≤ capacity).
    pub len: usize,
}

impl Queue {
    pub fn new(capacity: usize, dim: usize) -> Queue {
        Queue {
            capacity,
            dim,
            keys: vec![0.0; capacity * dim],
            labels: vec![0; capacity],
            weights: vec![0.0; capacity],
            ptr: 0,
            len: 0,
        }
    }

    /// Enqueues a batch, overwriting the oldest entries.
    pub fn push(&mut self, keys: &[f32], labels: &[usize], weights: &[f32]) {
        if self.capacity == 0 {
            return;
        }
        for (i, (&l, &w)) in labels.iter().zip(weights).enumerate() {
            let s = self.ptr;
            self.keys[s * self.dim..(s + 1) * self.dim]
                .copy_from_slice(&keys[i * self.dim..(i + 1) * self.dim]);
            self.labels[s] = l;
            self.weights[s] = w;
            self.ptr = (self.ptr + 1) % self.capacity;
            self.len = (self.len + 1).min(self.capacity);
        }
    }

    /// The valid entries (order does not matter to the loss).
    pub fn view(&self) -> QueueView {
        QueueView {
            keys: self.keys[..self.len * self.dim].to_vec(),
            labels: self.labels[..self.len].to_vec(),
            weights: self.weights[..self.len].to_vec(),
        }
    }
}

/// Everything one evaluation of the objective produces.
pub struct LossOut {
    /// `L = L_sup + λ_c L_cons + λ_p L_pgc` (differentiable).
    pub loss: Var,
    pub loss_sup: f32,
    pub loss_cons: f32,
    pub loss_pgc: f32,
    /// DSR weights `w` `[B_u]` (constants).
    pub weights: Tensor,
    /// Teacher pseudo-labels.
    pub pseudo_labels: Vec<usize>,
    /// Teacher keys `[B_u, E]` (to enqueue).
    pub teacher_keys: Tensor,
    /// Updated meta weights of the batch's unlabelled samples (when meta weights were given).
    pub meta_updated: Option<Vec<f32>>,
}

fn argmax_rows(v: &[f32], c: usize) -> Vec<usize> {
    v.chunks(c)
        .map(|r| {
            r.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
                    if x > bv {
                        (i, x)
                    } else {
                        (bi, bv)
                    }
                })
                .0
        })
        .collect()
}

/// One evaluation of the DSRPGC objective: teacher pass (no gradient, train-mode BN), student
/// passes on the labelled batch and on the strong views (separately, so BN statistics are per
/// pass), DSR weights, the three losses and their weighted sum. `meta` holds the current meta
/// weights `m_i` of the batch's unlabelled samples; without it `m = 1` and nothing is updated.
#[allow(clippy::too_many_arguments)]
pub fn dsrpgc_loss(
    g: &mut Graph,
    student: &mut MedFuseNet,
    bind: &mut Binding,
    teacher: &mut MedFuseNet,
    batch: &Batch,
    queue: &QueueView,
    meta: Option<&[f32]>,
    hp: &LossConfig,
) -> Result<LossOut> {
    let bu = batch.u_weak.shape()[0];
    let classes = student.cfg.classes;
    let bk = batch.x_lab.backend()?;

    // Teacher: no gradient, train-mode BatchNorm (its running stats follow its own passes).
    let (zt, keys) = g.no_grad(|g| -> Result<(Tensor, Tensor)> {
        let mut tb = Binding::new(false);
        let uw = g.constant(batch.u_weak.clone());
        let o = teacher.forward(g, &mut tb, uw, true)?;
        Ok((g.value(o.logits).clone(), g.value(o.embedding).clone()))
    })?;
    let pseudo = argmax_rows(&zt.to_vec()?, classes);

    // Student passes.
    let xl = g.constant(batch.x_lab.clone());
    let ol = student.forward(g, bind, xl, true)?;
    let us = g.constant(batch.u_strong.clone());
    let os = student.forward(g, bind, us, true)?;

    // DSR weights.
    let c = match hp.dsr {
        DsrMode::Entropy | DsrMode::Both => Some(bk.entropy_weight(&zt)?.to_vec()?),
        _ => None,
    };
    let meta_updated = match (meta, hp.dsr) {
        (Some(m), DsrMode::Meta | DsrMode::Both) => {
            if m.len() != bu {
                bail!("{} meta weights for {bu} unlabelled samples", m.len());
            }
            let (fw, fb) = student.fc_indices();
            let a = bk
                .dsr_alignment(
                    g.value(ol.feature),
                    &batch.y_lab,
                    g.value(os.feature),
                    &pseudo,
                    student.store.value(fw),
                    student.store.value(fb),
                )?
                .to_vec()?;
            Some(
                m.iter()
                    .zip(&a)
                    .map(|(mi, ai)| (mi + hp.meta_beta * ai).clamp(0.0, 1.0))
                    .collect::<Vec<f32>>(),
            )
        }
        _ => None,
    };
    let w: Vec<f32> = (0..bu)
        .map(|i| {
            let ci = c.as_ref().map_or(1.0, |c| c[i]);
            let mi = meta_updated.as_ref().map_or(1.0, |m| m[i]);
            ci * mi
        })
        .collect();
    let weights = bk.from_host(&w, &[bu])?;

    // Losses.
    let sup = g.cross_entropy(ol.logits, &batch.y_lab)?;
    let mut loss = sup;
    let mut loss_cons = 0.0;
    if hp.consistency {
        let cons = g.weighted_consistency(os.logits, &zt, &weights)?;
        loss_cons = g.value(cons).item()?;
        loss = g.axpby(1.0, loss, hp.lambda_cons, cons)?;
    }
    let mut loss_pgc = 0.0;
    if hp.pgc {
        let e = keys.shape()[1];
        let mut all_keys = keys.to_vec()?;
        all_keys.extend_from_slice(&queue.keys);
        let mut all_labels = pseudo.clone();
        all_labels.extend_from_slice(&queue.labels);
        let mut all_w = w.clone();
        all_w.extend_from_slice(&queue.weights);
        let nk = all_labels.len();
        let kt = bk.from_host(&all_keys, &[nk, e])?;
        let kw = bk.from_host(&all_w, &[nk])?;
        let pgc = g.pgc_loss(
            os.embedding,
            &pseudo,
            &weights,
            &kt,
            &all_labels,
            &kw,
            hp.temperature,
        )?;
        loss_pgc = g.value(pgc).item()?;
        loss = g.axpby(1.0, loss, hp.lambda_pgc, pgc)?;
    }
    Ok(LossOut {
        loss,
        loss_sup: g.value(sup).item()?,
        loss_cons,
        loss_pgc,
        weights,
        pseudo_labels: pseudo,
        teacher_keys: keys,
        meta_updated,
    })
}

/// Loss-weight ramp `λ(t) = λ_max · exp(−5 (1 − min(1, t/T))²)`.
pub fn ramp(lambda_max: f32, t: f64, ramp_len: f64) -> f32 {
    if ramp_len <= 0.0 {
        return lambda_max;
    }
    let r = 1.0 - (t / ramp_len).min(1.0);
    lambda_max * (-5.0 * r * r).exp() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_is_a_fifo_ring() {
        let mut q = Queue::new(3, 2);
        q.push(&[1., 1., 2., 2.], &[1, 2], &[0.1, 0.2]);
        assert_eq!(q.view().labels, vec![1, 2]);
        q.push(&[3., 3., 4., 4.], &[3, 4], &[0.3, 0.4]);
        let v = q.view();
        assert_eq!(v.labels, vec![4, 2, 3]);
        assert_eq!(v.keys, vec![4., 4., 2., 2., 3., 3.]);
        assert_eq!(q.ptr, 1);
    }

    #[test]
    fn ramp_ends_at_max_and_starts_small() {
        assert!((ramp(1.0, 0.0, 10.0) - (-5.0f32).exp()).abs() < 1e-7);
        assert_eq!(ramp(0.5, 10.0, 10.0), 0.5);
        assert_eq!(ramp(0.5, 20.0, 10.0), 0.5);
    }
}
