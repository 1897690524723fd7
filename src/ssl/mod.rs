//! The DSRPGC objective (SPEC §1): DSR weights, weighted Mean-Teacher consistency, pseudo-label
//! guided contrastive loss over a FIFO queue of teacher keys, and their ramped sum.

use crate::autograd::{Graph, Var};
use crate::backend::cpu::ssl_losses::argmax_rows;
use crate::backend::{label_tensor, DsrFactors};
use crate::bail;
use crate::error::Result;
use crate::nn::{Binding, MedFuseNet};
use crate::tensor::{Device, Tensor};

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

/// Optional class balancing inside DSR (`--dsr-balance`; not part of the paper's method, `off` in
/// every preset). See [`align_logits`], [`class_balance_weights`] and [`ClassPrior`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DsrBalance {
    /// SPEC §1 exactly.
    #[default]
    Off,
    /// Class-balanced DSR weight: `w_i ← w_i · b_i`, `b_i ∝ min(b_max, (1/C) / f̂(ŷ_i))` with `f̂`
    /// a running estimate of the pseudo-label class frequencies, normalised to batch mean 1.
    Class,
    /// Distribution alignment: the teacher probabilities become `p̃_i ∝ p_T,i ⊙ π / p̄` (π uniform,
    /// `p̄` a running mean of the teacher's class probabilities) before the pseudo-labels, the
    /// entropy confidence and the consistency target are computed.
    Align,
}

impl std::str::FromStr for DsrBalance {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<DsrBalance> {
        Ok(match s {
            "off" => DsrBalance::Off,
            "class" => DsrBalance::Class,
            "align" => DsrBalance::Align,
            _ => bail!("--dsr-balance '{s}': expected off, class or align"),
        })
    }
}

impl DsrBalance {
    /// Momentum of the running estimate this mode keeps (see [`ClassPrior::update`]).
    pub fn momentum(self) -> f32 {
        match self {
            DsrBalance::Off => 0.0,
            DsrBalance::Class => CLASS_FREQ_MOMENTUM,
            DsrBalance::Align => ALIGN_MOMENTUM,
        }
    }
}

/// Momentum of `p̄` (the teacher's mean class probabilities) for `--dsr-balance align`: the
/// FixMatch/USB distribution-alignment value (an effective window of ~1000 batches).
pub const ALIGN_MOMENTUM: f32 = 0.999;
/// Momentum of `f̂` (pseudo-label class frequencies) for `--dsr-balance class`: a window of ~100
/// batches (3600 pseudo-labels at `B_u = 36`), so the weights follow the current teacher.
pub const CLASS_FREQ_MOMENTUM: f32 = 0.99;
/// Clip `b_max` of the class-balance factor before it is normalised to batch mean 1.
pub const CLASS_WEIGHT_MAX: f32 = 5.0;
/// Floor on `p̄_j` / `f̂_j` where they divide.
const PRIOR_FLOOR: f64 = 1e-6;

/// A running estimate of a class distribution (`p̄` or `f̂`), part of the training state.
///
/// Update rule (per batch statistic `x`, a distribution over C classes): with `t` the number of
/// updates so far including this one, `p ← p + η_t (x − p)`, `η_t = max(1 − momentum, 1/t)`. For
/// the first `1/(1 − momentum)` updates this is the exact mean of all batches seen (so a short run
/// is aligned from its first step and the estimate does not start biased towards the uniform
/// initialisation); afterwards it is the usual EMA. `p` stays a distribution.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassPrior {
    /// The estimate (uniform before the first update).
    pub p: Vec<f32>,
    /// Updates so far (saturates; only `t < 1/(1 − momentum)` matters).
    pub updates: u64,
}

impl ClassPrior {
    pub fn uniform(classes: usize) -> ClassPrior {
        ClassPrior {
            p: vec![1.0 / classes.max(1) as f32; classes],
            updates: 0,
        }
    }

    /// One update with the batch statistic `x` (see the type's documentation).
    pub fn update(&mut self, x: &[f32], momentum: f32) {
        debug_assert_eq!(x.len(), self.p.len());
        self.updates = (self.updates + 1).min(1 << 20);
        if self.updates == 1 {
            self.p = x.to_vec();
            return;
        }
        let eta = (1.0 - momentum as f64).max(1.0 / self.updates as f64);
        for (p, &x) in self.p.iter_mut().zip(x) {
            *p = (*p as f64 + eta * (x as f64 - *p as f64)) as f32;
        }
    }
}

/// Row-wise mean of softmax(z) over a `[B, C]` logit matrix (f64 accumulation).
pub fn mean_softmax(z: &[f32], c: usize) -> Vec<f32> {
    let rows = z.len() / c.max(1);
    let mut acc = vec![0f64; c];
    for r in z.chunks(c) {
        let m = r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let e: Vec<f64> = r.iter().map(|&v| (v as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        for (a, v) in acc.iter_mut().zip(&e) {
            *a += v / s;
        }
    }
    acc.iter()
        .map(|a| (a / rows.max(1) as f64) as f32)
        .collect()
}

/// Distribution alignment of teacher logits `z` `[B, C]` (row-major) with the running prior `p̄`
/// and a uniform target π: returns `log p̃` with `p̃_i = normalize(softmax(z_i) ⊙ π / p̄)`.
/// Computed in log space (`log p̃_ij = z_ij − ln p̄_j − logsumexp_k(z_ik − ln p̄_k)`; π cancels in
/// the normalisation), so nothing underflows; `softmax(log p̃) = p̃`, so the result can be used
/// wherever teacher logits are expected.
pub fn align_logits(z: &[f32], pbar: &[f32], c: usize) -> Vec<f32> {
    let lp: Vec<f64> = pbar
        .iter()
        .map(|&p| (p as f64).max(PRIOR_FLOOR).ln())
        .collect();
    let mut out = Vec::with_capacity(z.len());
    for r in z.chunks(c) {
        let a: Vec<f64> = r.iter().zip(&lp).map(|(&v, l)| v as f64 - l).collect();
        let m = a.iter().fold(f64::NEG_INFINITY, |x, &y| x.max(y));
        let lse = m + a.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        out.extend(a.iter().map(|v| (v - lse) as f32));
    }
    out
}

/// Pseudo-label class histogram of a batch, as fractions.
pub fn label_fractions(labels: &[usize], c: usize) -> Vec<f32> {
    let mut h = vec![0f32; c];
    for &l in labels {
        h[l] += 1.0;
    }
    let n = labels.len().max(1) as f32;
    h.iter().map(|v| v / n).collect()
}

/// Class-balance factors of a batch: `b_i = min(b_max, (1/C) / f̂(ŷ_i))`, then divided by their
/// batch mean (so the mean of `b` is 1 and the overall scale of the DSR weights is unchanged).
pub fn class_balance_weights(pseudo: &[usize], freq: &[f32], c: usize, b_max: f32) -> Vec<f32> {
    let raw: Vec<f64> = pseudo
        .iter()
        .map(|&y| (1.0 / (c as f64 * (freq[y] as f64).max(PRIOR_FLOOR))).min(b_max as f64))
        .collect();
    let mean = raw.iter().sum::<f64>() / raw.len().max(1) as f64;
    raw.iter().map(|b| (b / mean) as f32).collect()
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
    /// Optional class balancing (needs a [`ClassPrior`] unless `Off`).
    pub balance: DsrBalance,
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
            balance: DsrBalance::Off,
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

/// The valid entries of the key queue, on the model's device.
#[derive(Clone, Debug, Default)]
pub struct QueueView {
    /// Number of valid entries: the first `len` rows of each field, in the queue's slot order.
    pub len: usize,
    /// `[rows ≥ len, E]`; `None` when there are no entries.
    pub keys: Option<Tensor>,
    /// Pseudo-labels, a `[rows ≥ len]` label tensor (see [`crate::backend::label_tensor`]).
    pub labels: Option<Tensor>,
    /// DSR weights `[rows ≥ len]`.
    pub weights: Option<Tensor>,
}

/// FIFO ring of teacher keys with their pseudo-labels and weights (SPEC §1.8), all on the
/// model's device (enqueued there by `ring_write_rows`, so none of it crosses to the host during
/// training).
#[derive(Clone, Debug)]
pub struct Queue {
    pub capacity: usize,
    pub dim: usize,
    /// `[capacity, dim]`; `None` when `capacity` or `dim` is 0.
    keys: Option<Tensor>,
    /// `[capacity, 1]` label tensor; `None` when `capacity` is 0.
    labels: Option<Tensor>,
    /// `[capacity, 1]`; `None` when `capacity` is 0.
    weights: Option<Tensor>,
    /// Next slot to overwrite.
    pub ptr: usize,
    /// Number of valid entries (≤ capacity).
    pub len: usize,
}

impl Queue {
    pub fn new(capacity: usize, dim: usize, device: Device) -> Result<Queue> {
        let bk = crate::backend::get(device)?;
        let keys = if capacity * dim > 0 {
            Some(bk.full(&[capacity, dim], 0.0)?)
        } else {
            None
        };
        let column = || -> Result<Option<Tensor>> {
            Ok(if capacity > 0 {
                Some(bk.full(&[capacity, 1], 0.0)?)
            } else {
                None
            })
        };
        Ok(Queue {
            capacity,
            dim,
            keys,
            labels: column()?,
            weights: column()?,
            ptr: 0,
            len: 0,
        })
    }

    /// Enqueues a batch (`keys [R, dim]`, a `[R]` label tensor and `weights [R]`, on the queue's
    /// device), overwriting the oldest entries. Of a batch larger than the queue only its last
    /// `capacity` rows stay, as with one-by-one enqueueing.
    pub fn push(&mut self, keys: &Tensor, labels: &Tensor, weights: &Tensor) -> Result<()> {
        let r = keys.shape().first().copied().unwrap_or(0);
        if keys.shape() != [r, self.dim] || labels.shape() != [r] || weights.shape() != [r] {
            bail!(
                "queue push: keys {:?}, labels {:?}, weights {:?} for a [{}, {}] queue",
                keys.shape(),
                labels.shape(),
                weights.shape(),
                self.capacity,
                self.dim
            );
        }
        if self.capacity == 0 || r == 0 {
            return Ok(());
        }
        let skip = r.saturating_sub(self.capacity);
        let start = (self.ptr + skip) % self.capacity;
        // Writes the last `r - skip` rows of `src [r, e]` into `ring` from row `start`.
        let write = |ring: &mut Tensor, src: &Tensor, e: usize| -> Result<()> {
            let bk = src.backend()?;
            let src = src.reshape(&[r, e])?;
            if skip == 0 {
                bk.ring_write_rows(ring, &src, start)
            } else {
                let tail = bk.from_host(&src.to_vec()?[skip * e..], &[r - skip, e])?;
                bk.ring_write_rows(ring, &tail, start)
            }
        };
        if let Some(q) = self.keys.as_mut() {
            write(q, keys, self.dim)?;
        }
        if let Some(q) = self.labels.as_mut() {
            write(q, labels, 1)?;
        }
        if let Some(q) = self.weights.as_mut() {
            write(q, weights, 1)?;
        }
        self.ptr = (self.ptr + r) % self.capacity;
        self.len = (self.len + r).min(self.capacity);
        Ok(())
    }

    /// The valid entries (order does not matter to the loss).
    pub fn view(&self) -> Result<QueueView> {
        if self.len == 0 {
            return Ok(QueueView::default());
        }
        let flat = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            t.as_ref().map(|t| t.reshape(&[self.capacity])).transpose()
        };
        Ok(QueueView {
            len: self.len,
            keys: self.keys.clone(),
            labels: flat(&self.labels)?,
            weights: flat(&self.weights)?,
        })
    }

    /// All `capacity` pseudo-labels in slot order (for checkpoints).
    pub fn labels_host(&self) -> Result<Vec<usize>> {
        crate::backend::label_values(&ring_host(&self.labels)?, "queue labels")
    }

    /// All `capacity · dim` key values, row-major (for checkpoints).
    pub fn keys_host(&self) -> Result<Vec<f32>> {
        ring_host(&self.keys)
    }

    /// All `capacity` weights in slot order (for checkpoints).
    pub fn weights_host(&self) -> Result<Vec<f32>> {
        ring_host(&self.weights)
    }

    /// Replaces all pseudo-labels (from a checkpoint) on the queue's device.
    pub fn set_labels_host(&mut self, labels: &[usize]) -> Result<()> {
        let v = crate::backend::label_floats(labels)?;
        set_ring(&mut self.labels, &v, [self.capacity, 1], "labels")
    }

    /// Replaces all key values (from a checkpoint) on the queue's device.
    pub fn set_keys_host(&mut self, keys: &[f32]) -> Result<()> {
        set_ring(&mut self.keys, keys, [self.capacity, self.dim], "keys")
    }

    /// Replaces all weights (from a checkpoint) on the queue's device.
    pub fn set_weights_host(&mut self, weights: &[f32]) -> Result<()> {
        set_ring(&mut self.weights, weights, [self.capacity, 1], "weights")
    }
}

/// The values of one of the queue's rings (none when it has no storage).
fn ring_host(ring: &Option<Tensor>) -> Result<Vec<f32>> {
    match ring {
        Some(t) => t.to_vec(),
        None => Ok(Vec::new()),
    }
}

/// Replaces the values of one of the queue's rings (`shape` `[capacity, e]`) on its device.
fn set_ring(ring: &mut Option<Tensor>, v: &[f32], shape: [usize; 2], what: &str) -> Result<()> {
    if v.len() != shape[0] * shape[1] {
        bail!("queue {what}: {} values for a {:?} ring", v.len(), shape);
    }
    if let Some(t) = ring {
        *ring = Some(t.backend()?.from_host(v, &shape)?);
    }
    Ok(())
}

/// Everything one evaluation of the objective produces.
pub struct LossOut {
    /// `L = L_sup + λ_c L_cons + λ_p L_pgc` (differentiable).
    pub loss: Var,
    /// The unweighted terms, on the device until read.
    pub terms: Terms,
    /// DSR weights `w` `[B_u]` (constants) on the device.
    pub weights: Tensor,
    /// Teacher pseudo-labels, a `[B_u]` label tensor on the device.
    pub pseudo_labels: Tensor,
    /// Teacher keys `[B_u, E]` (to enqueue).
    pub teacher_keys: Tensor,
    /// Updated meta weights `[B_u]` of the batch's unlabelled samples, on the device (when
    /// meta weights were given and `--dsr` uses them).
    pub meta_updated: Option<Tensor>,
}

/// The unweighted loss terms as scalar tensors on the device; a term that is off is `None`. The
/// trainer reads them (a host synchronisation on a GPU) once, at the end of the step, packed with
/// its other device results; [`Terms::read`] reads them alone.
#[derive(Clone, Debug)]
pub struct Terms {
    pub sup: Tensor,
    pub cons: Option<Tensor>,
    pub pgc: Option<Tensor>,
}

impl Terms {
    /// `(L_sup, L_cons, L_pgc)`; a term that is off reads 0.
    pub fn read(&self) -> Result<(f32, f32, f32)> {
        let opt = |t: &Option<Tensor>| t.as_ref().map_or(Ok(0.0), |t| t.item());
        Ok((self.sup.item()?, opt(&self.cons)?, opt(&self.pgc)?))
    }
}

/// The pieces of the objective that `--dsr-balance` changes (see [`balance_teacher`]).
#[derive(Clone, Debug, PartialEq)]
pub struct BalancedTeacher {
    /// Logits that stand for the teacher's from here on: aligned log-probabilities `log p̃`
    /// under `align`; `None` (use the teacher's own) otherwise.
    pub logits: Option<Vec<f32>>,
    /// Pseudo-labels `ŷ` (from `p̃` under `align`).
    pub pseudo: Vec<usize>,
    /// Class-balance factors `b` (mean 1) under `class`; `None` otherwise.
    pub factors: Option<Vec<f32>>,
}

/// Applies `--dsr-balance` to the teacher logits `zt` `[B_u, C]` on the host. Updates `prior`
/// with this batch first (`p̄` from the unaligned teacher probabilities, `f̂` from the batch's
/// pseudo-labels), then uses it. `Off` is the plain argmax of SPEC §1 and needs no prior.
pub fn balance_teacher(
    zt: &[f32],
    classes: usize,
    mode: DsrBalance,
    prior: Option<&mut ClassPrior>,
) -> Result<BalancedTeacher> {
    let prior = match (mode, prior) {
        (DsrBalance::Off, _) => {
            return Ok(BalancedTeacher {
                logits: None,
                pseudo: argmax_rows(zt, classes),
                factors: None,
            })
        }
        (_, None) => bail!("--dsr-balance {mode:?}: no running class prior given"),
        (_, Some(p)) => p,
    };
    if prior.p.len() != classes {
        bail!(
            "running class prior has {} classes, the model {classes}",
            prior.p.len()
        );
    }
    Ok(match mode {
        DsrBalance::Align => {
            prior.update(&mean_softmax(zt, classes), mode.momentum());
            let za = align_logits(zt, &prior.p, classes);
            BalancedTeacher {
                pseudo: argmax_rows(&za, classes),
                logits: Some(za),
                factors: None,
            }
        }
        _ => {
            let pseudo = argmax_rows(zt, classes);
            prior.update(&label_fractions(&pseudo, classes), mode.momentum());
            let b = class_balance_weights(&pseudo, &prior.p, classes, CLASS_WEIGHT_MAX);
            BalancedTeacher {
                logits: None,
                pseudo,
                factors: Some(b),
            }
        }
    })
}

/// One evaluation of the DSRPGC objective: teacher pass (no gradient, train-mode BN), student
/// passes on the labelled batch and on the strong views (separately, so BN statistics are per
/// pass), DSR weights, the three losses and their weighted sum, all left on the device. `meta`
/// holds the current meta weights `m_i` of the batch's unlabelled samples; without it `m = 1` and
/// nothing is updated.
/// With `hp.balance` other than `Off`, `prior` is the running estimate it needs (updated here).
#[allow(clippy::too_many_arguments)]
pub fn dsrpgc_loss(
    g: &mut Graph,
    student: &mut MedFuseNet,
    bind: &mut Binding,
    teacher: &mut MedFuseNet,
    batch: &Batch,
    queue: &QueueView,
    meta: Option<&[f32]>,
    prior: Option<&mut ClassPrior>,
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
    // `--dsr-balance`: under `align` the aligned log-probabilities stand for the teacher logits
    // from here on (pseudo-labels, entropy confidence, consistency target); `off` keeps SPEC §1.
    // Pseudo-labels. SPEC §1 (`--dsr-balance off`) computes them on the device, so the objective
    // never waits for it: pseudo-labels, DSR weights, meta-weight update, key set, labels and
    // weights all stay there, and the caller reads what it needs together at the end of the
    // step. `--dsr-balance` keeps its running prior on the host and reads the teacher logits
    // here (on CUDA, one wait for the device).
    let (pseudo, zt, balance) = if hp.balance == DsrBalance::Off {
        (bk.argmax_rows(&zt)?, zt, None)
    } else {
        let BalancedTeacher {
            logits: aligned,
            pseudo,
            factors,
        } = balance_teacher(&zt.to_vec()?, classes, hp.balance, prior)?;
        let zt = match aligned {
            Some(za) => bk.from_host(&za, zt.shape())?,
            None => zt,
        };
        (label_tensor(bk, &pseudo)?, zt, factors)
    };

    // DSR entropy confidence (from the teacher alone).
    let conf = match hp.dsr {
        DsrMode::Entropy | DsrMode::Both => Some(bk.entropy_weight(&zt)?),
        _ => None,
    };

    // Student passes.
    let xl = g.constant(batch.x_lab.clone());
    let ol = student.forward(g, bind, xl, true)?;
    let us = g.constant(batch.u_strong.clone());
    let os = student.forward(g, bind, us, true)?;
    // Meta weights and their alignment scores, when `--dsr` uses them.
    let meta = match (meta, hp.dsr) {
        (Some(m), DsrMode::Meta | DsrMode::Both) => {
            if m.len() != bu {
                bail!("{} meta weights for {bu} unlabelled samples", m.len());
            }
            let (fw, fb) = student.fc_indices();
            let a = bk.dsr_alignment(
                g.value(ol.feature),
                &batch.y_lab,
                g.value(os.feature),
                &pseudo,
                student.store.value(fw),
                student.store.value(fb),
            )?;
            Some((bk.from_host(m, &[bu])?, a))
        }
        _ => None,
    };
    let balance = balance.map(|b| bk.from_host(&b, &[bu])).transpose()?;
    let (weights, meta_updated) = bk.dsr_weights(&DsrFactors {
        n: bu,
        conf: conf.as_ref(),
        meta: meta.as_ref().map(|(m, _)| m),
        align: meta.as_ref().map(|(_, a)| (a, hp.meta_beta)),
        balance: balance.as_ref(),
    })?;

    // Losses.
    let sup = g.cross_entropy(ol.logits, &batch.y_lab)?;
    let mut loss = sup;
    let mut loss_cons = None;
    if hp.consistency {
        let cons = g.weighted_consistency(os.logits, &zt, &weights)?;
        loss_cons = Some(g.value(cons).clone());
        loss = g.axpby(1.0, loss, hp.lambda_cons, cons)?;
    }
    let mut loss_pgc = None;
    if hp.pgc {
        // Key set [batch keys; queue] with its labels and weights, assembled on the device.
        let n = queue.len;
        let (kt, kl, kw) = match (&queue.keys, &queue.labels, &queue.weights) {
            (Some(qk), Some(ql), Some(qw)) if n > 0 => {
                // A vector [rows] stacked as a column [rows, 1].
                let stack = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
                    let col = |t: &Tensor| t.reshape(&[t.numel(), 1]);
                    bk.concat_rows(&col(a)?, &col(b)?, n)?.reshape(&[bu + n])
                };
                (
                    bk.concat_rows(&keys, qk, n)?,
                    stack(&pseudo, ql)?,
                    stack(&weights, qw)?,
                )
            }
            _ if n > 0 => bail!("the key queue has {n} entries but no keys, labels or weights"),
            _ => (keys.clone(), pseudo.clone(), weights.clone()),
        };
        let pgc = g.pgc_loss(
            os.embedding,
            &pseudo,
            &weights,
            &kt,
            &kl,
            &kw,
            hp.temperature,
        )?;
        loss_pgc = Some(g.value(pgc).clone());
        loss = g.axpby(1.0, loss, hp.lambda_pgc, pgc)?;
    }
    Ok(LossOut {
        loss,
        terms: Terms {
            sup: g.value(sup).clone(),
            cons: loss_cons,
            pgc: loss_pgc,
        },
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
        let k = |v: &[f32]| Tensor::from_vec(v.to_vec(), &[v.len() / 2, 2]).unwrap();
        let w = |v: &[f32]| Tensor::from_vec(v.to_vec(), &[v.len()]).unwrap();
        let bk = crate::backend::get(Device::Cpu).unwrap();
        let l = |v: &[usize]| label_tensor(bk, v).unwrap();
        // The valid labels and weights of a view.
        let valid = |v: &QueueView| {
            let n = v.len;
            let lab = v.labels.as_ref().unwrap().to_vec().unwrap()[..n].to_vec();
            let wt = v.weights.as_ref().unwrap().to_vec().unwrap()[..n].to_vec();
            (lab, wt)
        };
        let mut q = Queue::new(3, 2, Device::Cpu).unwrap();
        let v = q.view().unwrap();
        assert!(v.keys.is_none() && v.weights.is_none() && v.labels.is_none() && v.len == 0);
        q.push(&k(&[1., 1., 2., 2.]), &l(&[1, 2]), &w(&[0.1, 0.2]))
            .unwrap();
        assert_eq!(valid(&q.view().unwrap()).0, vec![1., 2.]);
        q.push(&k(&[3., 3., 4., 4.]), &l(&[3, 4]), &w(&[0.3, 0.4]))
            .unwrap();
        let v = q.view().unwrap();
        assert_eq!(valid(&v), (vec![4., 2., 3.], vec![0.4, 0.2, 0.3]));
        assert_eq!(
            v.keys.as_ref().unwrap().to_vec().unwrap(),
            vec![4., 4., 2., 2., 3., 3.]
        );
        assert_eq!(q.ptr, 1);
        // A view shares the rings' storage, so the queue refuses to write while one is alive.
        assert!(q.push(&k(&[1., 1.]), &l(&[1]), &w(&[0.1])).is_err());
        drop(v);
        // A batch larger than the queue keeps its last rows, as one-by-one enqueueing would.
        q.push(
            &k(&[5., 5., 6., 6., 7., 7., 8., 8.]),
            &l(&[5, 6, 7, 8]),
            &w(&[0.5, 0.6, 0.7, 0.8]),
        )
        .unwrap();
        assert_eq!(q.labels_host().unwrap(), vec![7, 8, 6]);
        assert_eq!(q.keys_host().unwrap(), vec![7., 7., 8., 8., 6., 6.]);
        assert_eq!(q.weights_host().unwrap(), vec![0.7, 0.8, 0.6]);
        assert_eq!(q.ptr, 2);
        assert!(q.push(&k(&[1., 1.]), &l(&[1, 2]), &w(&[0.1, 0.2])).is_err());
        assert!(q.push(&k(&[1., 1.]), &l(&[1]), &w(&[0.1, 0.2])).is_err());
        // Checkpoint round trips; a wrong length is refused.
        q.set_weights_host(&[0.9, 0.8, 0.7]).unwrap();
        assert_eq!(q.weights_host().unwrap(), vec![0.9, 0.8, 0.7]);
        assert!(q.set_weights_host(&[0.9]).is_err());
        q.set_labels_host(&[2, 0, 1]).unwrap();
        assert_eq!(q.labels_host().unwrap(), vec![2, 0, 1]);
        assert!(q.set_labels_host(&[1]).is_err());
        // The key set of the PGC loss: batch keys, then the valid queue rows.
        let set = bk
            .concat_rows(&k(&[9., 9.]), &q.keys.clone().unwrap(), 2)
            .unwrap();
        assert_eq!(set.shape(), &[3, 2]);
        assert_eq!(set.to_vec().unwrap(), vec![9., 9., 7., 7., 8., 8.]);
    }

    #[test]
    fn dsr_weights_update_the_meta_weights_and_multiply_the_factors() {
        let bk = crate::backend::get(Device::Cpu).unwrap();
        let t = |v: &[f32]| Tensor::from_vec(v.to_vec(), &[v.len()]).unwrap();
        let (c, m, a, b) = (
            t(&[0.5, 1.0, 0.25, 0.0]),
            t(&[0.5, 0.95, 0.1, 0.6]),
            t(&[1.0, 2.0, -3.0, 0.5]),
            t(&[2.0, 0.5, 1.0, 4.0]),
        );
        let f = DsrFactors {
            n: 4,
            conf: Some(&c),
            meta: Some(&m),
            align: Some((&a, 0.1)),
            balance: Some(&b),
        };
        let (w, mn) = bk.dsr_weights(&f).unwrap();
        // m' = clamp(m + 0.1 a, 0, 1): 0.6, 1 (clamped), 0 (clamped), 0.65.
        let mn = mn.unwrap().to_vec().unwrap();
        let want_m = [0.5f32 + 0.1 * 1.0, 1.0, 0.0, 0.6 + 0.1 * 0.5];
        assert_eq!(mn, want_m);
        let want_w: Vec<f32> = (0..4)
            .map(|i| [0.5f32, 1.0, 0.25, 0.0][i] * want_m[i] * [2.0f32, 0.5, 1.0, 4.0][i])
            .collect();
        assert_eq!(w.to_vec().unwrap(), want_w);
        // Absent factors count as ones; without alignment the meta weights pass unchanged.
        let (w, mn) = bk
            .dsr_weights(&DsrFactors {
                n: 4,
                conf: None,
                meta: Some(&m),
                align: None,
                balance: None,
            })
            .unwrap();
        assert_eq!(w.to_vec().unwrap(), m.to_vec().unwrap());
        assert_eq!(mn.unwrap().to_vec().unwrap(), m.to_vec().unwrap());
        let none = DsrFactors {
            n: 3,
            conf: None,
            meta: None,
            align: None,
            balance: None,
        };
        let (w, mn) = bk.dsr_weights(&none).unwrap();
        assert_eq!(w.to_vec().unwrap(), vec![1.0; 3]);
        assert!(mn.is_none());
        // A factor of the wrong length is an error naming it.
        let e = bk
            .dsr_weights(&DsrFactors {
                conf: Some(&c),
                ..none
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("confidence"), "{e}");
    }

    fn softmax(z: &[f32]) -> Vec<f32> {
        let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let e: Vec<f32> = z.iter().map(|v| (v - m).exp()).collect();
        let s: f32 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    #[test]
    fn dsr_balance_parses() {
        assert_eq!("off".parse::<DsrBalance>().unwrap(), DsrBalance::Off);
        assert_eq!("class".parse::<DsrBalance>().unwrap(), DsrBalance::Class);
        assert_eq!("align".parse::<DsrBalance>().unwrap(), DsrBalance::Align);
        assert!("both".parse::<DsrBalance>().is_err());
        assert_eq!(DsrBalance::default(), DsrBalance::Off);
        assert_eq!(LossConfig::default().balance, DsrBalance::Off);
    }

    #[test]
    fn align_with_a_uniform_prior_leaves_the_probabilities_unchanged() {
        let c = 4;
        let z = [
            2.0f32, -1.0, 0.5, 0.0, -3.0, 4.0, 1.0, 1.5, 30.0, -30.0, 0.0, 0.0,
        ];
        let za = align_logits(&z, &[0.25; 4], c);
        for (r, ra) in z.chunks(c).zip(za.chunks(c)) {
            let (p, pa) = (softmax(r), softmax(ra));
            for (a, b) in p.iter().zip(&pa) {
                assert!((a - b).abs() < 1e-6, "{p:?} vs {pa:?}");
            }
            // Aligned logits are normalised log-probabilities.
            let s: f32 = ra.iter().map(|v| v.exp()).sum();
            assert!((s - 1.0).abs() < 1e-6);
        }
        assert_eq!(argmax_rows(&za, c), argmax_rows(&z, c));
    }

    #[test]
    fn align_with_a_skewed_prior_moves_the_argmax_off_the_over_predicted_class() {
        // p = (0.5, 0.3, 0.2): class 0 wins; the teacher predicts class 0 70 % of the time on
        // average, so p̃ ∝ (0.5/0.7, 0.3/0.15, 0.2/0.15) = (0.714, 2, 1.333) / 4.048.
        let p = [0.5f32, 0.3, 0.2];
        let z: Vec<f32> = p.iter().map(|v| v.ln()).collect();
        let pbar = [0.7f32, 0.15, 0.15];
        let za = align_logits(&z, &pbar, 3);
        let pa = softmax(&za);
        let want = [
            0.714_285_7f32 / 4.047_619,
            2.0 / 4.047_619,
            1.333_333_3 / 4.047_619,
        ];
        for (a, b) in pa.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{pa:?} vs {want:?}");
        }
        assert_eq!(argmax_rows(&z, 3), vec![0]);
        assert_eq!(argmax_rows(&za, 3), vec![1]);
        // The entropy confidence is computed from p̃ (it changes with the prior).
        let h = |p: &[f32]| -p.iter().map(|v| v * v.ln()).sum::<f32>();
        assert!((h(&pa) - h(&p)).abs() > 1e-3);
    }

    #[test]
    fn class_balance_weights_equal_the_hand_computed_values() {
        // f̂ = (0.7, 0.2, 0.08, 0.02), C = 4: (1/C)/f̂ = (0.357, 1.25, 3.125, 12.5 → clipped to 5).
        let freq = [0.7f32, 0.2, 0.08, 0.02];
        let pseudo = [0, 0, 1, 2, 3, 0];
        let b = class_balance_weights(&pseudo, &freq, 4, 5.0);
        // raw = (0.357, 0.357, 1.25, 3.125, 5, 0.357), mean 1.741071.
        let mean = (3.0 * 0.25 / 0.7 + 1.25 + 3.125 + 5.0) / 6.0;
        let want = [
            0.25 / 0.7 / mean,
            0.25 / 0.7 / mean,
            1.25 / mean,
            3.125 / mean,
            5.0 / mean,
            0.25 / 0.7 / mean,
        ];
        for (a, w) in b.iter().zip(&want) {
            assert!((*a as f64 - w).abs() < 1e-6, "{b:?} vs {want:?}");
        }
        assert!((b[0] - 0.205_128_2).abs() < 1e-6 && (b[4] - 2.871_795).abs() < 1e-6);
        let m: f32 = b.iter().sum::<f32>() / b.len() as f32;
        assert!((m - 1.0).abs() < 1e-6);
        // A balanced f̂ gives b = 1; a class never seen is clipped, not infinite.
        let b = class_balance_weights(&[0, 1, 2, 3], &[0.25; 4], 4, 5.0);
        assert!(b.iter().all(|&v| (v - 1.0).abs() < 1e-6), "{b:?}");
        let b = class_balance_weights(&[0, 1], &[1.0, 0.0, 0.0, 0.0], 4, 5.0);
        assert!((b[0] - 0.25 / 2.625).abs() < 1e-6 && (b[1] - 5.0 / 2.625).abs() < 1e-6);
    }

    #[test]
    fn class_prior_is_a_running_mean_then_an_ema() {
        let mut p = ClassPrior::uniform(2);
        assert_eq!(p.p, vec![0.5, 0.5]);
        p.update(&[1.0, 0.0], 0.75);
        assert_eq!((p.p.clone(), p.updates), (vec![1.0, 0.0], 1));
        p.update(&[0.0, 1.0], 0.75); // η = 1/2
        assert_eq!(p.p, vec![0.5, 0.5]);
        p.update(&[1.0, 0.0], 0.75); // η = 1/3
        assert!((p.p[0] - 2.0 / 3.0).abs() < 1e-6);
        p.update(&[0.0, 1.0], 0.75); // η = max(1/4, 1/4)
        assert!((p.p[0] - 0.5).abs() < 1e-6);
        p.update(&[1.0, 0.0], 0.75); // η = max(1/4, 1/5) = 1/4
        assert!((p.p[0] - 0.625).abs() < 1e-6);
        assert!((p.p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn balance_teacher_off_is_the_plain_argmax_and_the_modes_update_their_prior() {
        let z = [
            3.0f32, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.9, 0.0,
        ];
        let o = balance_teacher(&z, 3, DsrBalance::Off, None).unwrap();
        assert!(o.logits.is_none() && o.factors.is_none());
        assert_eq!(o.pseudo, vec![0, 0, 2, 0]);
        assert!(balance_teacher(&z, 3, DsrBalance::Align, None).is_err());
        // align: the first update makes p̄ the batch mean of softmax(z); the pseudo-labels then
        // come from p̃ (the over-predicted class 0 loses its close calls).
        let mut pr = ClassPrior::uniform(3);
        let o = balance_teacher(&z, 3, DsrBalance::Align, Some(&mut pr)).unwrap();
        assert!(o.factors.is_none());
        let mean = mean_softmax(&z, 3);
        assert_eq!(pr.p, mean);
        assert!(pr.p[0] > 0.5);
        assert_eq!(
            o.logits.as_deref().unwrap(),
            &align_logits(&z, &mean, 3)[..]
        );
        assert_eq!(o.pseudo, vec![0, 0, 2, 1]);
        // class: f̂ becomes the batch's pseudo-label histogram, b has mean 1.
        let mut pr = ClassPrior::uniform(3);
        let o = balance_teacher(&z, 3, DsrBalance::Class, Some(&mut pr)).unwrap();
        assert!(o.logits.is_none());
        assert_eq!(o.pseudo, vec![0, 0, 2, 0]);
        assert_eq!(pr.p, vec![0.75, 0.0, 0.25]);
        let b = o.factors.unwrap();
        let (r0, r2) = (1.0 / 3.0 / 0.75, 1.0 / 3.0 / 0.25);
        let m = (3.0 * r0 + r2) / 4.0;
        for (got, want) in b.iter().zip([r0 / m, r0 / m, r2 / m, r0 / m]) {
            assert!((got - want).abs() < 1e-6, "{b:?}");
        }
    }

    #[test]
    fn ramp_ends_at_max_and_starts_small() {
        assert!((ramp(1.0, 0.0, 10.0) - (-5.0f32).exp()).abs() < 1e-7);
        assert_eq!(ramp(0.5, 10.0, 10.0), 0.5);
        assert_eq!(ramp(0.5, 20.0, 10.0), 0.5);
    }
}
