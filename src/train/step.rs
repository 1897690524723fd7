//! One training iteration (SPEC §1): objective, backward, optimiser step, teacher EMA, queue and
//! meta-weight updates. Shared by the trainer and `medssl-bench step`.

use crate::autograd::Graph;
use crate::bail;
use crate::error::Result;
use crate::nn::{Binding, Kind, MedFuseNet, ModelConfig};
use crate::optim::{OptimKind, Optimizer};
use crate::ssl::{self, Batch, ClassPrior, DsrBalance, DsrMode, LossConfig, Queue, Terms};
use crate::tensor::{Device, Tensor};

/// Which objective a run optimises (baselines and the method share this code path).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Cross-entropy on labelled images only.
    Supervised,
    /// Supervised + unweighted consistency with an EMA teacher.
    MeanTeacher,
    /// The full method.
    Dsrpgc,
}

impl std::str::FromStr for Method {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Method> {
        Ok(match s {
            "supervised" => Method::Supervised,
            "mean-teacher" => Method::MeanTeacher,
            "dsrpgc" => Method::Dsrpgc,
            _ => bail!("--method '{s}': expected supervised, mean-teacher or dsrpgc"),
        })
    }
}

/// Step hyper-parameters that do not change during a run.
#[derive(Clone, Copy, Debug)]
pub struct StepConfig {
    pub method: Method,
    pub dsr: DsrMode,
    /// Optional class balancing inside DSR (`--dsr-balance`; DSRPGC only, `Off` = SPEC §1).
    pub balance: DsrBalance,
    pub pgc: bool,
    pub lambda_cons_max: f32,
    pub lambda_pgc_max: f32,
    pub temperature: f32,
    pub meta_beta: f32,
    pub ema_alpha: f32,
    /// Ramp length `T` in steps.
    pub ramp_steps: u64,
    /// Replay the step from a device graph once its shapes have settled (CUDA; `--cuda-graph`).
    pub cuda_graph: bool,
}

impl Default for StepConfig {
    fn default() -> Self {
        StepConfig {
            method: Method::Dsrpgc,
            dsr: DsrMode::Both,
            balance: DsrBalance::Off,
            pgc: true,
            lambda_cons_max: 1.0,
            lambda_pgc_max: 0.5,
            temperature: 0.1,
            meta_beta: 0.1,
            ema_alpha: 0.99,
            ramp_steps: 1,
            cuda_graph: false,
        }
    }
}

/// Everything that evolves during training.
pub struct TrainState {
    pub student: MedFuseNet,
    pub teacher: MedFuseNet,
    pub opt: Optimizer,
    pub queue: Queue,
    /// Persistent meta weight per unlabelled sample.
    pub meta: Vec<f32>,
    /// Running class prior of `--dsr-balance` (`p̄` for `align`, `f̂` for `class`; stays uniform
    /// and unused with `off`).
    pub dsr_prior: ClassPrior,
    /// Optimiser steps taken.
    pub step: u64,
    /// Identifies this training loop to the backend's step graph (`StepConfig::cuda_graph`).
    pub graph_owner: u64,
    /// The last step issued by [`train_step_overlapped`] whose closing read is still queued on
    /// the device (collect it with [`TrainState::finish_pending`]).
    pending: Option<PendingStep>,
}

impl TrainState {
    /// Student and teacher start from the same initialisation.
    pub fn new(
        cfg: ModelConfig,
        seed: u64,
        device: Device,
        opt: OptimKind,
        weight_decay: f32,
        queue_size: usize,
        n_unlabeled: usize,
    ) -> Result<TrainState> {
        let mut student = MedFuseNet::new(cfg, seed);
        student.store.to_device(device)?;
        let teacher = student.deep_clone()?;
        let opt = Optimizer::new(opt, weight_decay, &student.store);
        Ok(TrainState {
            student,
            teacher,
            opt,
            queue: Queue::new(queue_size, cfg.emb, device)?,
            meta: vec![1.0; n_unlabeled],
            dsr_prior: ClassPrior::uniform(cfg.classes),
            step: 0,
            graph_owner: next_graph_owner(),
            pending: None,
        })
    }

    /// Collects the step left pending by [`train_step_overlapped`], if any: waits for its read,
    /// applies its meta-weight updates and checks its loss. The optimiser, teacher and queue
    /// state already include the step (it was issued); what waits is what the host learns of
    /// it. Call before anything reads [`TrainState::meta`] (a checkpoint) or the run ends.
    pub fn finish_pending(&mut self) -> Result<Option<StepStats>> {
        match self.pending.take() {
            None => Ok(None),
            Some(p) => p.finish(self).map(Some),
        }
    }

    /// Whether a step's results are still to be collected ([`TrainState::finish_pending`]).
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }
}

/// Scalars of one step (host values).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StepStats {
    /// The step's number (1 = the run's first step).
    #[serde(skip)]
    pub step: u64,
    pub loss: f32,
    pub loss_sup: f32,
    pub loss_cons: f32,
    pub loss_pgc: f32,
    pub lambda_cons: f32,
    pub lambda_pgc: f32,
    pub mean_weight: f32,
    pub lr: f32,
    /// The teacher's pseudo-labels of the batch (empty for the supervised baseline).
    #[serde(skip)]
    pub pseudo_labels: Vec<usize>,
}

fn next_graph_owner() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The host state a step changes before its end, to undo a step that never ran.
struct HostSnapshot {
    opt: crate::optim::OptimizerSnapshot,
    queue: (usize, usize),
    prior: ClassPrior,
}

impl HostSnapshot {
    fn take(st: &TrainState) -> HostSnapshot {
        HostSnapshot {
            opt: st.opt.snapshot(),
            queue: (st.queue.ptr, st.queue.len),
            prior: st.dsr_prior.clone(),
        }
    }
    fn restore(self, st: &mut TrainState) {
        st.opt.restore(&self.opt);
        (st.queue.ptr, st.queue.len) = self.queue;
        st.dsr_prior = self.prior;
    }
}

/// One optimiser step. `unl_idx` are the unlabelled-set indices of the batch (for meta weights).
///
/// With `cfg.cuda_graph` on a CUDA device the backend records the step once its shapes have
/// settled (the key queue is full) and then replays it from a device graph, checking each step's
/// work against the recording (see `backend/cuda/graph.rs`); a step that differs runs as usual.
/// The results are those of the plain step.
pub fn train_step(
    st: &mut TrainState,
    batch: &Batch,
    unl_idx: &[usize],
    cfg: &StepConfig,
    lr: f32,
) -> Result<StepStats> {
    if st.pending.is_some() {
        bail!("train_step: an earlier step's results are still pending (collect them with TrainState::finish_pending first)");
    }
    issue_step(st, batch, unl_idx, cfg, lr)?.finish(st)
}

/// Like [`train_step`], but on a device whose reads are queued (CUDA, unless
/// `MEDSSL_CUDA_STEP_READ=wait`) it returns as soon as the step is issued: the step's closing
/// read stays pending in `st`, and the host goes on to the next step while the device still
/// runs this one. Returns the steps finished meanwhile, oldest first: usually the previous
/// one; none for the first step; on the CPU this one. A step whose unlabelled samples were in
/// the pending step waits for it first (their meta weights are the pending step's result), so
/// every step computes what [`train_step`] computes, bit for bit. Collect the last step with
/// [`TrainState::finish_pending`].
pub fn train_step_overlapped(
    st: &mut TrainState,
    batch: &Batch,
    unl_idx: &[usize],
    cfg: &StepConfig,
    lr: f32,
) -> Result<Vec<StepStats>> {
    let mut done = Vec::new();
    if st
        .pending
        .as_ref()
        .is_some_and(|p| p.updates_meta_of(unl_idx))
    {
        done.extend(st.finish_pending()?);
    }
    let p = issue_step(st, batch, unl_idx, cfg, lr)?;
    // This step's work is queued behind the pending one's read: collecting it now waits for
    // the pending step's device work only.
    done.extend(st.finish_pending()?);
    if p.read.is_ready() {
        done.push(p.finish(st)?);
    } else {
        st.pending = Some(p);
    }
    Ok(done)
}

/// Issues one step: everything up to its closing read, which may still be queued.
fn issue_step(
    st: &mut TrainState,
    batch: &Batch,
    unl_idx: &[usize],
    cfg: &StepConfig,
    lr: f32,
) -> Result<PendingStep> {
    let bk = batch.x_lab.backend()?;
    if !cfg.cuda_graph {
        return run_step(st, batch, unl_idx, cfg, lr);
    }
    let queue_in_use = cfg.method == Method::Dsrpgc && cfg.pgc && st.queue.capacity > 0;
    let stable = !queue_in_use || st.queue.len == st.queue.capacity;
    let graph_step = bk
        .step_graph_begin(st.graph_owner, stable)
        .unwrap_or_else(|e| {
            // The graph is off for the rest of the run (see `step_graph_abort`).
            eprintln!(
                "cuda graph: step {} runs without the graph: {e}",
                st.step + 1
            );
            false
        });
    if !graph_step {
        // Not a graph step (a backend without graphs, the queue still filling, or the graph
        // off): as usual, without the staging copies below.
        return run_step(st, batch, unl_idx, cfg, lr);
    }
    let snap = HostSnapshot::take(st);
    // The step's images are copied into the step's own buffers by a kernel first: a new batch
    // then changes only that kernel's source pointer (an updated graph node), not the pointers
    // of the convolutions that read the images.
    let staged = (|| -> Result<Batch> {
        let unlabelled = |t: &Tensor| match cfg.method {
            Method::Supervised => Ok(t.clone()),
            _ => bk.scale(t, 1.0),
        };
        Ok(Batch {
            x_lab: bk.scale(&batch.x_lab, 1.0)?,
            y_lab: batch.y_lab.clone(),
            u_weak: unlabelled(&batch.u_weak)?,
            u_strong: unlabelled(&batch.u_strong)?,
        })
    })();
    let result = staged.and_then(|b| run_step(st, &b, unl_idx, cfg, lr));
    let result = result.and_then(|p| bk.step_graph_end().map(|()| p));
    match result {
        Ok(p) => Ok(p),
        Err(e) => {
            let diverged = e.is_graph_divergence();
            if !bk.step_graph_abort(diverged) {
                return Err(e);
            }
            // Nothing of the step ran on the device: undo its host-side changes and run it
            // without the graph (after a divergence the next steps capture a new one; after a
            // failed capture the run goes on without graphs).
            snap.restore(st);
            if !diverged || std::env::var_os("MEDSSL_CUDA_GRAPH_LOG").is_some() {
                eprintln!(
                    "cuda graph: step {} runs without the graph: {e}",
                    st.step + 1
                );
            }
            run_step(st, batch, unl_idx, cfg, lr)
        }
    }
}

fn run_step(
    st: &mut TrainState,
    batch: &Batch,
    unl_idx: &[usize],
    cfg: &StepConfig,
    lr: f32,
) -> Result<PendingStep> {
    let t = st.step as f64;
    let lambda_cons = ssl::ramp(cfg.lambda_cons_max, t, cfg.ramp_steps as f64);
    let lambda_pgc = ssl::ramp(cfg.lambda_pgc_max, t, cfg.ramp_steps as f64);
    let mut g = Graph::new();
    let mut bind = Binding::new(true);
    let stats = StepStats {
        step: st.step + 1,
        lambda_cons,
        lambda_pgc,
        lr,
        mean_weight: 1.0,
        ..Default::default()
    };
    // The DSR weights, updated meta weights and pseudo-labels stay on the device until the end of
    // the step.
    let (loss, terms, dsr, enqueue) = match cfg.method {
        Method::Supervised => {
            let x = g.constant(batch.x_lab.clone());
            let o = st.student.forward(&mut g, &mut bind, x, true)?;
            let l = g.cross_entropy(o.logits, &batch.y_lab)?;
            let terms = Terms {
                sup: g.value(l).clone(),
                cons: None,
                pgc: None,
            };
            (l, terms, None, None)
        }
        Method::MeanTeacher | Method::Dsrpgc => {
            let dsrpgc = cfg.method == Method::Dsrpgc;
            let hp = LossConfig {
                lambda_cons,
                lambda_pgc,
                temperature: cfg.temperature,
                dsr: if dsrpgc { cfg.dsr } else { DsrMode::Off },
                meta_beta: cfg.meta_beta,
                consistency: true,
                pgc: dsrpgc && cfg.pgc,
                balance: if dsrpgc { cfg.balance } else { DsrBalance::Off },
            };
            let meta: Vec<f32> = unl_idx.iter().map(|&i| st.meta[i]).collect();
            let qv = if hp.pgc {
                st.queue.view()?
            } else {
                Default::default()
            };
            let o = ssl::dsrpgc_loss(
                &mut g,
                &mut st.student,
                &mut bind,
                &mut st.teacher,
                batch,
                &qv,
                Some(&meta),
                (hp.balance != DsrBalance::Off).then_some(&mut st.dsr_prior),
                &hp,
            )?;
            let dsr = Some((o.weights.clone(), o.meta_updated, o.pseudo_labels.clone()));
            let enqueue = hp
                .pgc
                .then_some((o.teacher_keys, o.pseudo_labels, o.weights));
            (o.loss, o.terms, dsr, enqueue)
        }
    };
    // The loss, its terms, the DSR weights, the updated meta weights and the pseudo-labels are
    // read only at the end, together, once the backward pass, the optimiser step, the teacher's
    // EMA update and the queue write are queued as well (on a GPU that one read waits for the
    // device, which then has the whole step's work in hand; or it stays queued until the next
    // step has been issued, see `train_step_overlapped`). A non-finite loss still stops the
    // run before anything is written: the caller saves no checkpoint for a failed step, so the
    // last good checkpoint stays intact.
    let loss_value = g.value(loss).clone();
    g.backward(loss)?;
    let grads = bind.take_grads(&mut g);
    drop(g);
    drop(bind);
    st.opt.step(&mut st.student.store, &grads, lr)?;
    // Teacher EMA on parameters; its BN running statistics come from its own passes.
    // A supervised baseline has no teacher and runs no teacher pass: its teacher slot is kept an
    // exact copy of the student, parameters and BN statistics (α = 0: 0·ξ + 1·θ = θ), so that
    // evaluation, model selection, checkpoints, `eval` and `predict` all see the trained model.
    let (alpha, buffers_too) = match cfg.method {
        Method::Supervised => (0.0, true),
        _ => (cfg.ema_alpha, false),
    };
    let mut pairs: Vec<(&mut Tensor, &Tensor)> = st
        .teacher
        .store
        .entries_mut()
        .iter_mut()
        .zip(st.student.store.entries())
        .filter(|(_, se)| se.kind == Kind::Param || buffers_too)
        .map(|(te, se)| (&mut te.value, &se.value))
        .collect();
    if let Some((_, s)) = pairs.first() {
        let bk = s.backend()?;
        bk.ema_update_multi(&mut pairs, alpha)?;
    }
    if let Some((k, l, w)) = enqueue {
        st.queue.push(&k, &l, &w)?;
    }
    let (w, m, pl) = match &dsr {
        Some((w, m, pl)) => (Some(w), m.as_ref(), Some(pl)),
        None => (None, None, None),
    };
    let slots = [
        Some(&loss_value),
        Some(&terms.sup),
        terms.cons.as_ref(),
        terms.pgc.as_ref(),
        w,
        m,
        pl,
    ];
    let wanted: Vec<&Tensor> = slots.iter().flatten().copied().collect();
    let read = crate::tensor::read_many_later(&wanted)?;
    st.step += 1;
    Ok(PendingStep {
        stats,
        read,
        present: slots.map(|s| s.is_some()),
        unl_idx: unl_idx.to_vec(),
    })
}

/// A step issued to the device whose closing read (loss, its terms, DSR weights, updated meta
/// weights, pseudo-labels) may still be queued.
struct PendingStep {
    /// What the host knew when it issued the step.
    stats: StepStats,
    read: crate::backend::HostRead,
    /// Which of the seven values were read (a term that is off is not).
    present: [bool; 7],
    unl_idx: Vec<usize>,
}

impl PendingStep {
    /// Whether collecting this step changes the meta weight of one of `unl_idx`.
    fn updates_meta_of(&self, unl_idx: &[usize]) -> bool {
        self.present[5] && unl_idx.iter().any(|i| self.unl_idx.contains(i))
    }

    /// Waits for the read, applies the meta-weight updates, checks the loss.
    fn finish(self, st: &mut TrainState) -> Result<StepStats> {
        let PendingStep {
            mut stats,
            read,
            present,
            unl_idx,
        } = self;
        let mut read = read.wait()?.into_iter();
        let [loss_v, sup, cons, pgc, w, m, pl] = present.map(|p| p.then(|| read.next()).flatten());
        // A term that is off reads 0; one that is on is a `[1]` tensor.
        let scalar = |v: Option<Vec<f32>>| -> Result<f32> {
            match v {
                None => Ok(0.0),
                Some(v) => match v[..] {
                    [x] => Ok(x),
                    _ => bail!("a loss term read back {} values", v.len()),
                },
            }
        };
        stats.loss = scalar(loss_v)?;
        stats.loss_sup = scalar(sup)?;
        stats.loss_cons = scalar(cons)?;
        stats.loss_pgc = scalar(pgc)?;
        if let Some(pl) = pl {
            stats.pseudo_labels = crate::backend::label_values(&pl, "pseudo-labels")?;
        }
        if let Some(w) = w {
            stats.mean_weight = w.iter().sum::<f32>() / w.len().max(1) as f32;
        }
        if let Some(m) = m {
            if m.len() != unl_idx.len() {
                bail!(
                    "{} updated meta weights for {} unlabelled samples",
                    m.len(),
                    unl_idx.len()
                );
            }
            for (&i, &v) in unl_idx.iter().zip(&m) {
                st.meta[i] = v;
            }
        }
        if !stats.loss.is_finite() {
            // The first non-finite term, else the total.
            let (term, v) = [
                ("supervised", stats.loss_sup),
                ("consistency", stats.loss_cons),
                ("pgc", stats.loss_pgc),
            ]
            .into_iter()
            .find(|(_, v)| !v.is_finite())
            .unwrap_or(("total", stats.loss));
            bail!(
                "non-finite loss at step {}: {term} term is {v} (total {})",
                stats.step,
                stats.loss
            );
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::OptimKind;

    fn batch(seed: u64, bl: usize, bu: usize, hw: usize) -> Batch {
        let mut rng = crate::rng::stream(seed, "step-test");
        let mut img = |n: usize| {
            let v = (0..n * 3 * hw * hw)
                .map(|_| rand::Rng::random_range(&mut rng, -1.0f32..1.0))
                .collect();
            Tensor::from_vec(v, &[n, 3, hw, hw]).unwrap()
        };
        Batch {
            x_lab: img(bl),
            y_lab: (0..bl).map(|i| i % 5).collect(),
            u_weak: img(bu),
            u_strong: img(bu),
        }
    }

    /// On the CPU (reads are never queued) an overlapped step finishes at once: the same
    /// results as `train_step`, nothing left pending.
    #[test]
    fn overlapped_steps_on_the_cpu_finish_at_once() {
        let model = ModelConfig {
            in_ch: 3,
            width: 4,
            d: 8,
            emb: 8,
            classes: 5,
            small_stem: true,
            fusion: true,
        };
        let cfg = StepConfig::default();
        let new =
            || TrainState::new(model, 3, Device::Cpu, OptimKind::adam(), 5e-4, 16, 8).unwrap();
        let (mut a, mut b) = (new(), new());
        for s in 0..3u64 {
            let x = batch(s, 4, 8, 10);
            let idx: Vec<usize> = (0..8).collect();
            let want = train_step(&mut a, &x, &idx, &cfg, 1e-3).unwrap();
            let got = train_step_overlapped(&mut b, &x, &idx, &cfg, 1e-3).unwrap();
            assert_eq!(got.len(), 1, "step {s}");
            assert!(!b.has_pending());
            let got = &got[0];
            assert_eq!((want.step, got.step), (s + 1, s + 1));
            for (x, y) in [
                (want.loss, got.loss),
                (want.loss_sup, got.loss_sup),
                (want.loss_cons, got.loss_cons),
                (want.loss_pgc, got.loss_pgc),
                (want.mean_weight, got.mean_weight),
            ] {
                assert_eq!(x.to_bits(), y.to_bits(), "step {s}");
            }
            assert_eq!(want.pseudo_labels, got.pseudo_labels);
        }
        assert_eq!(a.meta, b.meta);
        assert!(b.finish_pending().unwrap().is_none());
    }
}
