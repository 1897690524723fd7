//! The SSL batch loader: deterministic, resumable, prefetched by background threads.
//!
//! Every batch is a pure function of (seed, global step), so batches do not depend on thread
//! timing, and a loader constructed at a [`Position`] yields exactly what an uninterrupted one
//! would from there on.
//!
//! - SSL mode: an epoch is one pass over the unlabelled set, `⌊N_u / B_u⌋` steps; epoch `e` visits
//!   the unlabelled slots in a permutation seeded by `(seed, e)` (the remainder is dropped). The
//!   labelled set is an endless stream of reshuffled passes: labelled draw `p = g·B_l + j` (global
//!   step g) takes element `p mod N_l` of pass `⌊p / N_l⌋`'s permutation.
//! - Supervised mode: an epoch is `⌊N_l / B_l⌋` steps over a fresh permutation of the labelled
//!   set; the unlabelled fields stay empty.
//!
//! View generators are seeded by (seed, global step, role, position in batch), roles: labelled
//! weak, unlabelled weak, unlabelled strong — independent per view.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::augment::{AugmentConfig, Augmenter, Normalize};
use super::dataset::Dataset;
use super::rng::{shuffle, view_rng};
use super::split::Partition;
use crate::bail;
use crate::error::Result;

/// What the loader yields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoaderMode {
    /// Labelled weak views + weak/strong views of unlabelled images.
    Ssl,
    /// Labelled weak views only.
    Supervised,
}

/// Loader settings (defaults: SPEC §1 batch sizes, 2 workers).
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// `B_l`.
    pub batch_labeled: usize,
    /// `B_u` (ignored in supervised mode).
    pub batch_unlabeled: usize,
    /// Run seed (order and augmentation streams derive from it).
    pub seed: u64,
    /// Background threads; 0 builds batches on the calling thread.
    pub workers: usize,
    /// Batches built ahead of the consumer (at least 1).
    pub prefetch: usize,
    pub mode: LoaderMode,
    pub augment: AugmentConfig,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_labeled: 12,
            batch_unlabeled: 36,
            seed: 0,
            workers: 2,
            prefetch: 4,
            mode: LoaderMode::Ssl,
            augment: AugmentConfig::default(),
        }
    }
}

/// Where a loader is: the next batch it yields is step `step` of epoch `epoch`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub epoch: u64,
    pub step: u64,
}

/// One training batch. Images are normalised f32 `[B, C, H, W]`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct SslBatch {
    /// Epoch and step-in-epoch of this batch.
    pub epoch: u64,
    pub step: u64,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Labelled weak views `[B_l, C, H, W]`.
    pub x_lab: Vec<f32>,
    /// Their labels.
    pub y_lab: Vec<usize>,
    /// Their dataset rows.
    pub lab_idx: Vec<usize>,
    /// Weak views of the unlabelled images `[B_u, C, H, W]` (teacher input).
    pub u_weak: Vec<f32>,
    /// Strong views of the same images, same order (student input).
    pub u_strong: Vec<f32>,
    /// Dataset rows of the unlabelled images.
    pub u_idx: Vec<usize>,
    /// Positions in [`Partition::unlabeled`] (`0..N_u`): the index of each image's persistent
    /// per-sample weight.
    pub u_slot: Vec<usize>,
    /// True labels of the unlabelled images (for diagnostics such as pseudo-label accuracy only;
    /// never for training).
    pub u_label: Vec<usize>,
}

struct Shared {
    ds: Arc<Dataset>,
    aug: Augmenter,
    labeled: Vec<usize>,
    unlabeled: Vec<usize>,
    cfg: LoaderConfig,
    steps_per_epoch: u64,
}

/// Per-thread permutation cache (one per stream).
#[derive(Default)]
struct Cache {
    unl: Option<(u64, Vec<usize>)>,
    lab: Vec<(u64, Vec<usize>)>,
}

fn perm(n: usize, seed: u64, label: &str) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut rng = crate::rng::stream(seed, label);
    shuffle(&mut v, &mut rng);
    v
}

impl Cache {
    fn unlabeled(&mut self, n: usize, seed: u64, epoch: u64) -> &[usize] {
        if self.unl.as_ref().map(|(e, _)| *e) != Some(epoch) {
            self.unl = Some((
                epoch,
                perm(n, seed, &format!("data/unlabeled-order/{epoch}")),
            ));
        }
        &self.unl.as_ref().unwrap().1
    }

    fn labeled(&mut self, n: usize, seed: u64, pass: u64) -> &[usize] {
        if let Some(i) = self.lab.iter().position(|(p, _)| *p == pass) {
            return &self.lab[i].1;
        }
        if self.lab.len() >= 2 {
            self.lab.remove(0);
        }
        self.lab
            .push((pass, perm(n, seed, &format!("data/labeled-order/{pass}"))));
        &self.lab.last().unwrap().1
    }
}

const ROLE_LAB: u64 = 0;
const ROLE_WEAK: u64 = 1;
const ROLE_STRONG: u64 = 2;

impl Shared {
    fn build(&self, g: u64, cache: &mut Cache) -> SslBatch {
        let cfg = &self.cfg;
        let (epoch, step) = (g / self.steps_per_epoch, g % self.steps_per_epoch);
        let n_l = self.labeled.len();
        let len = self.aug.image_len();
        let bl = cfg.batch_labeled;
        let lab_idx: Vec<usize> = match cfg.mode {
            LoaderMode::Ssl => (0..bl as u64)
                .map(|j| {
                    let p = g * bl as u64 + j;
                    let (pass, at) = (p / n_l as u64, (p % n_l as u64) as usize);
                    self.labeled[cache.labeled(n_l, cfg.seed, pass)[at]]
                })
                .collect(),
            LoaderMode::Supervised => {
                let pm = cache.labeled(n_l, cfg.seed, epoch);
                let s = step as usize * bl;
                pm[s..s + bl].iter().map(|&k| self.labeled[k]).collect()
            }
        };
        let mut x_lab = vec![0f32; bl * len];
        for (j, (&i, out)) in lab_idx.iter().zip(x_lab.chunks_exact_mut(len)).enumerate() {
            let mut rng = view_rng(cfg.seed, g, ROLE_LAB, j as u64);
            self.aug.weak(self.ds.image(i), &mut rng, out);
        }
        let y_lab = lab_idx.iter().map(|&i| self.ds.labels[i]).collect();
        let (mut u_weak, mut u_strong, mut u_idx, mut u_slot) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        if cfg.mode == LoaderMode::Ssl {
            let bu = cfg.batch_unlabeled;
            let s = step as usize * bu;
            u_slot = cache.unlabeled(self.unlabeled.len(), cfg.seed, epoch)[s..s + bu].to_vec();
            u_idx = u_slot.iter().map(|&k| self.unlabeled[k]).collect();
            u_weak = vec![0f32; bu * len];
            u_strong = vec![0f32; bu * len];
            for (j, &i) in u_idx.iter().enumerate() {
                let img = self.ds.image(i);
                let mut rw = view_rng(cfg.seed, g, ROLE_WEAK, j as u64);
                self.aug
                    .weak(img, &mut rw, &mut u_weak[j * len..(j + 1) * len]);
                let mut rs = view_rng(cfg.seed, g, ROLE_STRONG, j as u64);
                self.aug
                    .strong(img, &mut rs, &mut u_strong[j * len..(j + 1) * len]);
            }
        }
        let u_label = u_idx.iter().map(|&i| self.ds.labels[i]).collect();
        SslBatch {
            epoch,
            step,
            channels: self.aug.channels,
            height: self.aug.height,
            width: self.aug.width,
            x_lab,
            y_lab,
            lab_idx,
            u_weak,
            u_strong,
            u_idx,
            u_slot,
            u_label,
        }
    }
}

/// The SSL (or supervised) training batch loader. See the module docs.
pub struct SslLoader {
    shared: Arc<Shared>,
    next: u64,
    issued: u64,
    job_tx: Option<mpsc::Sender<u64>>,
    res_rx: Option<mpsc::Receiver<(u64, SslBatch)>>,
    pending: BTreeMap<u64, SslBatch>,
    workers: Vec<JoinHandle<()>>,
    cache: Cache,
}

impl SslLoader {
    /// A loader over `part`'s labelled/unlabelled sets, normalised by the mean/std of
    /// `part.train`, starting at `start` (use `Position::default()` for a fresh run).
    pub fn new(
        ds: Arc<Dataset>,
        part: &Partition,
        cfg: LoaderConfig,
        start: Position,
    ) -> Result<SslLoader> {
        let aug = Augmenter::for_dataset(&ds, &part.train, cfg.augment.clone());
        SslLoader::with_augmenter(ds, part, aug, cfg, start)
    }

    /// As [`SslLoader::new`] with an explicit augmenter (e.g. a saved normalisation).
    pub fn with_augmenter(
        ds: Arc<Dataset>,
        part: &Partition,
        aug: Augmenter,
        cfg: LoaderConfig,
        start: Position,
    ) -> Result<SslLoader> {
        let (n_l, n_u) = (part.labeled.len(), part.unlabeled.len());
        if cfg.batch_labeled == 0 {
            bail!("labelled batch size must be positive");
        }
        if n_l == 0 {
            bail!("{}: no labelled images", ds.source.display());
        }
        let steps_per_epoch = match cfg.mode {
            LoaderMode::Ssl => {
                if cfg.batch_unlabeled == 0 {
                    bail!("unlabelled batch size must be positive in SSL mode");
                }
                if n_u < cfg.batch_unlabeled {
                    bail!(
                        "{}: {n_u} unlabelled images, fewer than one unlabelled batch of {} ({}); lower the batch size or the labelled ratio, or use supervised mode",
                        ds.source.display(),
                        cfg.batch_unlabeled,
                        part.labeled_spec
                    );
                }
                (n_u / cfg.batch_unlabeled) as u64
            }
            LoaderMode::Supervised => {
                if n_l < cfg.batch_labeled {
                    bail!(
                        "{}: {n_l} labelled images, fewer than one batch of {}",
                        ds.source.display(),
                        cfg.batch_labeled
                    );
                }
                (n_l / cfg.batch_labeled) as u64
            }
        };
        if start.step >= steps_per_epoch {
            bail!(
                "resume position step {} is not below the {steps_per_epoch} steps per epoch",
                start.step
            );
        }
        if (aug.height, aug.width, aug.channels) != (ds.height, ds.width, ds.channels) {
            bail!("augmenter image shape does not match the dataset");
        }
        let next = start.epoch * steps_per_epoch + start.step;
        let workers_n = cfg.workers;
        let prefetch = cfg.prefetch.max(1);
        let shared = Arc::new(Shared {
            ds,
            aug,
            labeled: part.labeled.clone(),
            unlabeled: part.unlabeled.clone(),
            cfg,
            steps_per_epoch,
        });
        let mut loader = SslLoader {
            shared,
            next,
            issued: next,
            job_tx: None,
            res_rx: None,
            pending: BTreeMap::new(),
            workers: Vec::new(),
            cache: Cache::default(),
        };
        if workers_n > 0 {
            let (job_tx, job_rx) = mpsc::channel::<u64>();
            let (res_tx, res_rx) = mpsc::channel::<(u64, SslBatch)>();
            let job_rx = Arc::new(Mutex::new(job_rx));
            for w in 0..workers_n {
                let shared = Arc::clone(&loader.shared);
                let job_rx = Arc::clone(&job_rx);
                let res_tx = res_tx.clone();
                let h = std::thread::Builder::new()
                    .name(format!("medssl-data-{w}"))
                    .spawn(move || {
                        let mut cache = Cache::default();
                        loop {
                            let job = job_rx.lock().map(|rx| rx.recv());
                            let Ok(Ok(g)) = job else { break };
                            if res_tx.send((g, shared.build(g, &mut cache))).is_err() {
                                break;
                            }
                        }
                    })
                    .expect("spawn data loader thread");
                loader.workers.push(h);
            }
            loader.job_tx = Some(job_tx);
            loader.res_rx = Some(res_rx);
            for _ in 0..prefetch {
                loader.issue();
            }
        }
        Ok(loader)
    }

    fn issue(&mut self) {
        if let Some(tx) = &self.job_tx {
            // A send error means every worker is gone; `next_batch` reports it.
            let _ = tx.send(self.issued);
            self.issued += 1;
        }
    }

    /// Steps per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.shared.steps_per_epoch
    }

    /// The position of the next batch [`SslLoader::next_batch`] returns.
    pub fn position(&self) -> Position {
        Position {
            epoch: self.next / self.shared.steps_per_epoch,
            step: self.next % self.shared.steps_per_epoch,
        }
    }

    /// The augmenter (its `norm` is what evaluation should use).
    pub fn augmenter(&self) -> &Augmenter {
        &self.shared.aug
    }

    /// The normalisation (training-split mean/std).
    pub fn normalize(&self) -> &Normalize {
        &self.shared.aug.norm
    }

    /// Number of unlabelled images (length of the persistent weight vector).
    pub fn num_unlabeled(&self) -> usize {
        self.shared.unlabeled.len()
    }

    /// The next batch (the stream is endless; the caller counts epochs).
    pub fn next_batch(&mut self) -> SslBatch {
        let g = self.next;
        let batch = if self.workers.is_empty() {
            self.shared.build(g, &mut self.cache)
        } else {
            let b = loop {
                if let Some(b) = self.pending.remove(&g) {
                    break b;
                }
                let (k, b) = self
                    .res_rx
                    .as_ref()
                    .expect("workers have a channel")
                    .recv()
                    .expect("data loader worker thread died");
                self.pending.insert(k, b);
            };
            self.issue();
            b
        };
        self.next += 1;
        batch
    }
}

impl Iterator for SslLoader {
    type Item = SslBatch;
    fn next(&mut self) -> Option<SslBatch> {
        Some(self.next_batch())
    }
}

impl Drop for SslLoader {
    fn drop(&mut self) {
        self.job_tx = None;
        self.res_rx = None;
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// One evaluation batch: unaugmented, normalised `[B, C, H, W]`.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalBatch {
    pub x: Vec<f32>,
    pub y: Vec<usize>,
    /// Dataset rows.
    pub idx: Vec<usize>,
}

/// Iterator over `indices` in order, `batch` images at a time (last batch may be short).
pub struct EvalBatches<'a> {
    ds: &'a Dataset,
    indices: &'a [usize],
    norm: &'a Normalize,
    batch: usize,
    at: usize,
}

/// Plain (unaugmented) batches of the images `indices` of `ds`, normalised by `norm`.
pub fn eval_batches<'a>(
    ds: &'a Dataset,
    indices: &'a [usize],
    norm: &'a Normalize,
    batch: usize,
) -> EvalBatches<'a> {
    assert!(batch > 0, "eval batch size must be positive");
    EvalBatches {
        ds,
        indices,
        norm,
        batch,
        at: 0,
    }
}

impl Iterator for EvalBatches<'_> {
    type Item = EvalBatch;
    fn next(&mut self) -> Option<EvalBatch> {
        if self.at >= self.indices.len() {
            return None;
        }
        let end = (self.at + self.batch).min(self.indices.len());
        let idx = self.indices[self.at..end].to_vec();
        self.at = end;
        let len = self.ds.image_len();
        let mut x = vec![0f32; idx.len() * len];
        for (&i, out) in idx.iter().zip(x.chunks_exact_mut(len)) {
            self.norm.apply(self.ds.image(i), out);
        }
        let y = idx.iter().map(|&i| self.ds.labels[i]).collect();
        Some(EvalBatch { x, y, idx })
    }
}

impl EvalBatches<'_> {
    /// Number of batches.
    pub fn num_batches(&self) -> usize {
        self.indices.len().div_ceil(self.batch)
    }
}
