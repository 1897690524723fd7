//! Checkpoints: one safetensors file holding the full training state (student, teacher,
//! optimiser moments, queue, DSR meta weights, `--dsr-balance` running prior, normalisation)
//! under torchvision-style names (`student.layer1.0.conv1.weight`, …), plus JSON metadata (step,
//! loader position, config, classes) and a SHA-256 checksum over every tensor, verified on load.
//! Written atomically.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bail;
use crate::data::Position;
use crate::error::{Error, Result};
use crate::golden::{write_safetensors, SafeFile};
use crate::nn::ModelConfig;
use crate::train::config::TrainConfig;
use crate::train::step::TrainState;

/// Scalars saved with a checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CkptState {
    /// Optimiser steps taken.
    pub step: u64,
    /// The loader position of the next batch.
    pub position: Position,
    pub queue_ptr: usize,
    pub queue_len: usize,
    /// Best validation macro-AUC so far (teacher) and its epoch.
    pub best_val_auc: f64,
    pub best_epoch: u64,
    /// Epochs fully completed.
    pub epochs_done: u64,
    /// Training wall time in seconds up to this checkpoint, summed over every invocation of the
    /// run (a resumed run continues the count). Absent in older checkpoints: 0.
    #[serde(default)]
    pub wall_seconds: f64,
}

type Named = Vec<(String, Vec<f32>, Vec<usize>)>;

fn checksum(tensors: &Named) -> String {
    let mut order: Vec<&(String, Vec<f32>, Vec<usize>)> = tensors.iter().collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    for (n, d, s) in order {
        h.update(n.as_bytes());
        for x in s {
            h.update((*x as u64).to_le_bytes());
        }
        h.update(bytemuck::cast_slice::<f32, u8>(d));
    }
    format!("{:x}", h.finalize())
}

/// Everything needed to restore a run.
pub struct Checkpoint {
    pub state: CkptState,
    pub config: TrainConfig,
    pub model: ModelConfig,
    pub classes: Vec<String>,
    pub norm_mean: Vec<f32>,
    pub norm_std: Vec<f32>,
    pub tensors: HashMap<String, (Vec<f32>, Vec<usize>)>,
}

/// Saves `st` and run metadata atomically to `path`.
#[allow(clippy::too_many_arguments)]
pub fn save(
    path: &Path,
    st: &TrainState,
    state: &CkptState,
    config: &TrainConfig,
    classes: &[String],
    norm_mean: &[f32],
    norm_std: &[f32],
) -> Result<()> {
    let mut t: Named = st.student.store.to_named("student.")?;
    t.extend(st.teacher.store.to_named("teacher.")?);
    for (n, d, s) in st.opt.state_named(&st.student.store)? {
        t.push((format!("opt.{n}"), d, s));
    }
    let q = &st.queue;
    t.push(("queue.keys".into(), q.keys_host()?, vec![q.capacity, q.dim]));
    t.push((
        "queue.labels".into(),
        q.labels_host()?.iter().map(|&l| l as f32).collect(),
        vec![q.capacity],
    ));
    t.push(("queue.weights".into(), q.weights_host()?, vec![q.capacity]));
    t.push(("meta".into(), st.meta.clone(), vec![st.meta.len()]));
    // The running class prior of `--dsr-balance` and its update count (exact in f32 far beyond
    // the count that matters, which saturates in `ClassPrior::update`).
    let pr = &st.dsr_prior;
    t.push(("dsr_balance.prior".into(), pr.p.clone(), vec![pr.p.len()]));
    t.push((
        "dsr_balance.updates".into(),
        vec![pr.updates as f32],
        vec![1],
    ));
    t.push((
        "norm.mean".into(),
        norm_mean.to_vec(),
        vec![norm_mean.len()],
    ));
    t.push(("norm.std".into(), norm_std.to_vec(), vec![norm_std.len()]));
    let mut md = HashMap::new();
    md.insert("format".into(), "medssl-checkpoint-1".into());
    md.insert("state".into(), serde_json::to_string(state).unwrap());
    md.insert("config".into(), config.to_toml());
    md.insert(
        "model".into(),
        serde_json::to_string(&st.student.cfg).unwrap(),
    );
    md.insert("classes".into(), serde_json::to_string(classes).unwrap());
    md.insert("checksum".into(), checksum(&t));
    write_safetensors(path, &t, &md)
}

/// Loads and verifies a checkpoint.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let f = SafeFile::open(path)?;
    let md = f.metadata()?;
    let p = path.display();
    let get = |k: &str| -> Result<&String> {
        md.get(k).ok_or_else(|| {
            Error::msg(format!(
                "{p}: not a medssl checkpoint (metadata '{k}' missing)"
            ))
        })
    };
    if get("format")? != "medssl-checkpoint-1" {
        bail!("{p}: unsupported checkpoint format '{}'", get("format")?);
    }
    let tensors = f.all_f32()?;
    let named: Named = tensors
        .iter()
        .map(|(n, (d, s))| (n.clone(), d.clone(), s.clone()))
        .collect();
    let want = get("checksum")?;
    let got = checksum(&named);
    if &got != want {
        bail!("{p}: checksum mismatch (file is corrupt or was modified): stored {want}, computed {got}");
    }
    let js = |k: &str| -> Result<serde_json::Value> {
        serde_json::from_str(get(k)?).map_err(|e| Error::msg(format!("{p}: metadata '{k}': {e}")))
    };
    let vec_of = |k: &str| -> Result<Vec<f32>> {
        tensors
            .get(k)
            .map(|(d, _)| d.clone())
            .ok_or_else(|| Error::msg(format!("{p}: tensor '{k}' missing")))
    };
    Ok(Checkpoint {
        state: serde_json::from_value(js("state")?)
            .map_err(|e| Error::msg(format!("{p}: state: {e}")))?,
        config: toml::from_str(get("config")?)
            .map_err(|e| Error::msg(format!("{p}: config: {e}")))?,
        model: serde_json::from_value(js("model")?)
            .map_err(|e| Error::msg(format!("{p}: model: {e}")))?,
        classes: serde_json::from_value(js("classes")?)
            .map_err(|e| Error::msg(format!("{p}: classes: {e}")))?,
        norm_mean: vec_of("norm.mean")?,
        norm_std: vec_of("norm.std")?,
        tensors,
    })
}

impl Checkpoint {
    /// Restores student, teacher, optimiser, queue, meta weights and the DSR balance prior into
    /// `st` (built with the same model configuration).
    pub fn restore(&self, st: &mut TrainState) -> Result<()> {
        st.student
            .store
            .load_named("checkpoint", &self.tensors, "student.")?;
        st.teacher
            .store
            .load_named("checkpoint", &self.tensors, "teacher.")?;
        // One optimiser step per training step, so the step count restores both.
        st.opt
            .load_state_named(&st.student.store, &self.tensors, "opt.", self.state.step)?;
        let q = &mut st.queue;
        let (keys, ks) = &self.tensors["queue.keys"];
        if ks != &vec![q.capacity, q.dim] {
            bail!(
                "checkpoint queue {ks:?} does not match the configured queue [{}, {}]",
                q.capacity,
                q.dim
            );
        }
        q.set_keys_host(keys)?;
        q.set_labels_host(&crate::backend::label_values(
            &self.tensors["queue.labels"].0,
            "checkpoint queue.labels",
        )?)?;
        q.set_weights_host(&self.tensors["queue.weights"].0)?;
        q.ptr = self.state.queue_ptr;
        q.len = self.state.queue_len;
        let meta = &self.tensors["meta"].0;
        if meta.len() != st.meta.len() {
            bail!(
                "checkpoint has {} meta weights, the data has {} unlabelled images",
                meta.len(),
                st.meta.len()
            );
        }
        st.meta = meta.clone();
        // Checkpoints from before `--dsr-balance` existed have no prior (and ran with it off).
        if let Some((p, _)) = self.tensors.get("dsr_balance.prior") {
            if p.len() != st.dsr_prior.p.len() {
                bail!(
                    "checkpoint has a {}-class DSR balance prior, the model {} classes",
                    p.len(),
                    st.dsr_prior.p.len()
                );
            }
            st.dsr_prior.p = p.clone();
            st.dsr_prior.updates = self
                .tensors
                .get("dsr_balance.updates")
                .map_or(0, |(u, _)| u.first().copied().unwrap_or(0.0) as u64);
        }
        st.step = self.state.step;
        Ok(())
    }
}
