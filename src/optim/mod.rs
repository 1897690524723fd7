//! Optimisers (Adam with L2 weight decay, SGD with momentum; PyTorch semantics) and learning-rate
//! schedules. The arithmetic lives in the backends (`Backend::adam_step` / `sgd_step`); this
//! module owns the per-parameter state and the step counter.

use crate::backend::{AdamParams, OptSlot, SgdParams};
use crate::bail;
use crate::error::Result;
use crate::nn::{Kind, ParamStore};
use crate::tensor::Tensor;

/// Which update rule.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimKind {
    Adam { beta1: f32, beta2: f32, eps: f32 },
    Sgd { momentum: f32 },
}

impl OptimKind {
    pub fn adam() -> OptimKind {
        OptimKind::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// See [`Optimizer::snapshot`].
#[derive(Clone, Debug)]
pub struct OptimizerSnapshot {
    step: u64,
    has_m: Vec<bool>,
    has_v: Vec<bool>,
}

/// Per-parameter optimiser state, indexed like the parameter store.
pub struct Optimizer {
    pub kind: OptimKind,
    pub weight_decay: f32,
    /// Number of steps taken.
    pub step: u64,
    /// First moment / momentum buffer.
    m: Vec<Option<Tensor>>,
    /// Second moment (Adam).
    v: Vec<Option<Tensor>>,
}

impl Optimizer {
    pub fn new(kind: OptimKind, weight_decay: f32, store: &ParamStore) -> Optimizer {
        Optimizer {
            kind,
            weight_decay,
            step: 0,
            m: vec![None; store.len()],
            v: vec![None; store.len()],
        }
    }

    /// The step counter and which parameters have state, to undo a step that never ran (a
    /// training step that did not match its device graph, see `train::step`).
    pub fn snapshot(&self) -> OptimizerSnapshot {
        OptimizerSnapshot {
            step: self.step,
            has_m: self.m.iter().map(Option::is_some).collect(),
            has_v: self.v.iter().map(Option::is_some).collect(),
        }
    }

    /// Restores the step counter and drops state created since `s` was taken.
    pub fn restore(&mut self, s: &OptimizerSnapshot) {
        self.step = s.step;
        for (m, &had) in self.m.iter_mut().zip(&s.has_m) {
            if !had {
                *m = None;
            }
        }
        for (v, &had) in self.v.iter_mut().zip(&s.has_v) {
            if !had {
                *v = None;
            }
        }
    }

    /// One update of every parameter that has a gradient, at learning rate `lr`: one
    /// multi-tensor backend call for all of them (per first-step group for SGD, whose first step
    /// differs).
    pub fn step(
        &mut self,
        store: &mut ParamStore,
        grads: &[(usize, Tensor)],
        lr: f32,
    ) -> Result<()> {
        self.step += 1;
        let mut grad_of: Vec<Option<&Tensor>> = vec![None; store.len()];
        for (i, g) in grads {
            let e = store
                .entries()
                .get(*i)
                .ok_or_else(|| crate::error::Error::msg(format!("optimizer: no parameter {i}")))?;
            if e.kind != Kind::Param {
                bail!("optimizer: '{}' is a buffer, not a parameter", e.name);
            }
            grad_of[*i] = Some(g);
        }
        let Some(bk) = grads.first().map(|(_, g)| g.backend()).transpose()? else {
            return Ok(());
        };
        // State is created on a parameter's first update; `first` marks those (SGD's first
        // momentum step differs).
        let adam = matches!(self.kind, OptimKind::Adam { .. });
        let mut first = vec![false; store.len()];
        for (i, g) in grad_of.iter().enumerate() {
            let Some(g) = g else { continue };
            if self.m[i].is_none() {
                self.m[i] = Some(bk.full(g.shape(), 0.0)?);
                first[i] = true;
            }
            if adam && self.v[i].is_none() {
                self.v[i] = Some(bk.full(g.shape(), 0.0)?);
            }
        }
        let mut slots: Vec<(bool, OptSlot<'_>)> = Vec::with_capacity(grads.len());
        for (((e, g), (m, v)), f) in store
            .entries_mut()
            .iter_mut()
            .zip(&grad_of)
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            .zip(&first)
        {
            let (Some(g), Some(m)) = (g, m.as_mut()) else {
                continue;
            };
            slots.push((
                *f,
                OptSlot {
                    param: &mut e.value,
                    grad: g,
                    state: m,
                    state2: if adam { v.as_mut() } else { None },
                },
            ));
        }
        match self.kind {
            OptimKind::Adam { beta1, beta2, eps } => {
                let mut all: Vec<OptSlot<'_>> = slots.into_iter().map(|(_, s)| s).collect();
                bk.adam_step_multi(
                    &mut all,
                    AdamParams {
                        lr,
                        beta1,
                        beta2,
                        eps,
                        weight_decay: self.weight_decay,
                        step: self.step,
                    },
                )?;
            }
            OptimKind::Sgd { momentum } => {
                let (mut firsts, mut rest): (Vec<_>, Vec<_>) =
                    slots.into_iter().partition(|(f, _)| *f);
                for (group, first_step) in [(&mut firsts, true), (&mut rest, false)] {
                    let mut g: Vec<OptSlot<'_>> = group.drain(..).map(|(_, s)| s).collect();
                    if g.is_empty() {
                        continue;
                    }
                    bk.sgd_step_multi(
                        &mut g,
                        SgdParams {
                            lr,
                            momentum,
                            weight_decay: self.weight_decay,
                            first_step,
                        },
                    )?;
                }
            }
        }
        Ok(())
    }

    /// State as named host tensors (`m.<param>`, `v.<param>`) for checkpoints.
    pub fn state_named(&self, store: &ParamStore) -> Result<crate::tensor::NamedTensors> {
        let mut out = Vec::new();
        for (i, e) in store.entries().iter().enumerate() {
            for (pfx, slot) in [("m", &self.m[i]), ("v", &self.v[i])] {
                if let Some(t) = slot {
                    out.push((format!("{pfx}.{}", e.name), t.to_vec()?, t.shape().to_vec()));
                }
            }
        }
        Ok(out)
    }

    /// Restores state written by [`Optimizer::state_named`].
    pub fn load_state_named(
        &mut self,
        store: &ParamStore,
        tensors: &std::collections::HashMap<String, (Vec<f32>, Vec<usize>)>,
        prefix: &str,
        step: u64,
    ) -> Result<()> {
        self.step = step;
        for (i, e) in store.entries().iter().enumerate() {
            let dev = e.value.device();
            for (pfx, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                *slot = match tensors.get(&format!("{prefix}{pfx}.{}", e.name)) {
                    Some((d, s)) => Some(Tensor::from_vec(d.clone(), s)?.to_device(dev)?),
                    None => None,
                };
            }
        }
        Ok(())
    }
}

/// Learning-rate schedule over optimiser steps.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    /// Cosine decay from the base rate to 0 over `total` steps.
    Cosine {
        total: u64,
    },
    /// Multiply by `gamma` after every `every` steps (per-epoch decay).
    Step {
        every: u64,
        gamma: f32,
    },
}

impl Schedule {
    /// Learning rate for 0-based step `t`.
    pub fn lr(&self, base: f32, t: u64) -> f32 {
        match *self {
            Schedule::Constant => base,
            Schedule::Cosine { total } => {
                let p = (t as f64 / total.max(1) as f64).min(1.0);
                (base as f64 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())) as f32
            }
            Schedule::Step { every, gamma } => base * gamma.powi((t / every.max(1)) as i32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        let c = Schedule::Cosine { total: 100 };
        assert_eq!(c.lr(1.0, 0), 1.0);
        assert!((c.lr(1.0, 50) - 0.5).abs() < 1e-6);
        assert!(c.lr(1.0, 100).abs() < 1e-7);
        let s = Schedule::Step {
            every: 10,
            gamma: 0.9,
        };
        assert_eq!(s.lr(1.0, 9), 1.0);
        assert!((s.lr(1.0, 25) - 0.81).abs() < 1e-6);
    }

    #[test]
    fn adam_moves_parameters_against_the_gradient() {
        let mut store = ParamStore::default();
        store.add(
            "p",
            Tensor::from_vec(vec![1.0, -1.0], &[2]).unwrap(),
            Kind::Param,
        );
        let mut opt = Optimizer::new(OptimKind::adam(), 0.0, &store);
        let g = Tensor::from_vec(vec![0.5, -0.5], &[2]).unwrap();
        opt.step(&mut store, &[(0, g)], 0.1).unwrap();
        // First Adam step moves each coordinate by lr·sign(g) (up to eps).
        let p = store.value(0).to_vec().unwrap();
        assert!(
            (p[0] - 0.9).abs() < 1e-5 && (p[1] + 0.9).abs() < 1e-5,
            "{p:?}"
        );
        assert_eq!(opt.state_named(&store).unwrap().len(), 2);
    }

    /// `step` batches all tensors into one multi-tensor call; it must equal per-tensor updates,
    /// including SGD's first momentum step for a parameter whose first gradient comes late.
    #[test]
    fn step_equals_per_tensor_updates() {
        use crate::backend::cpu::CpuBackend;
        let bk = CpuBackend::get();
        let t = |v: Vec<f32>| {
            let n = v.len();
            Tensor::from_vec(v, &[n]).unwrap()
        };
        for kind in [OptimKind::adam(), OptimKind::Sgd { momentum: 0.9 }] {
            let mut store = ParamStore::default();
            store.add("a", t(vec![1.0, -2.0, 0.5]), Kind::Param);
            store.add("buf", t(vec![7.0]), Kind::Buffer);
            store.add("b", t(vec![0.25, 3.0]), Kind::Param);
            let mut opt = Optimizer::new(kind, 0.01, &store);
            // Reference state: (param, m, v) per parameter, updated one tensor at a time.
            let mut refs = [
                (t(vec![1.0, -2.0, 0.5]), None::<(Tensor, Tensor)>),
                (t(vec![0.25, 3.0]), None),
            ];
            let grads = [
                vec![(0usize, t(vec![0.5, -0.1, 0.2]))],
                vec![(0, t(vec![0.3, 0.3, -0.4])), (2, t(vec![-1.0, 0.5]))],
                vec![(2, t(vec![0.2, 0.1])), (0, t(vec![0.1, 0.0, 0.2]))],
            ];
            for (k, gs) in grads.iter().enumerate() {
                opt.step(&mut store, gs, 0.05).unwrap();
                for (i, g) in gs {
                    let r = &mut refs[usize::from(*i == 2)];
                    let first = r.1.is_none();
                    let (m, v) = r
                        .1
                        .get_or_insert_with(|| (t(vec![0.0; g.numel()]), t(vec![0.0; g.numel()])));
                    match kind {
                        OptimKind::Adam { beta1, beta2, eps } => bk
                            .adam_step(
                                &mut r.0,
                                g,
                                m,
                                v,
                                AdamParams {
                                    lr: 0.05,
                                    beta1,
                                    beta2,
                                    eps,
                                    weight_decay: 0.01,
                                    step: k as u64 + 1,
                                },
                            )
                            .unwrap(),
                        OptimKind::Sgd { momentum } => bk
                            .sgd_step(
                                &mut r.0,
                                g,
                                m,
                                SgdParams {
                                    lr: 0.05,
                                    momentum,
                                    weight_decay: 0.01,
                                    first_step: first,
                                },
                            )
                            .unwrap(),
                    }
                }
                assert_eq!(
                    store.value(0).to_vec().unwrap(),
                    refs[0].0.to_vec().unwrap()
                );
                assert_eq!(
                    store.value(2).to_vec().unwrap(),
                    refs[1].0.to_vec().unwrap()
                );
                assert_eq!(store.value(1).to_vec().unwrap(), vec![7.0]);
            }
        }
    }
}
