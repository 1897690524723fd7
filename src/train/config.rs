//! Training configuration: presets, TOML files and `--set key=value` overrides, resolved into one
//! [`TrainConfig`] that is written to the run directory.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bail;
use crate::error::{Error, Result};

/// Settings files and checkpoints written before `dsr_balance` existed mean `off`.
fn default_dsr_balance() -> String {
    "off".into()
}

/// Whether training steps replay from a CUDA graph (config key `cuda_graph`, written as
/// `"auto"`, `"on"` or `"off"`; `true` and `false`, as settings files wrote it before `auto`
/// existed, read as `on` and `off`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CudaGraph {
    /// On for a CUDA device, off on the CPU (which has no graphs).
    #[default]
    Auto,
    /// On; a CPU device is then an error.
    On,
    /// Every step runs plain.
    Off,
}

impl CudaGraph {
    pub fn name(self) -> &'static str {
        match self {
            CudaGraph::Auto => "auto",
            CudaGraph::On => "on",
            CudaGraph::Off => "off",
        }
    }

    /// Whether steps on `device` replay from a graph.
    pub fn enabled(self, device: crate::tensor::Device) -> bool {
        match self {
            CudaGraph::Auto => device != crate::tensor::Device::Cpu,
            CudaGraph::On => true,
            CudaGraph::Off => false,
        }
    }
}

impl std::str::FromStr for CudaGraph {
    type Err = Error;
    fn from_str(s: &str) -> Result<CudaGraph> {
        match s {
            "auto" => Ok(CudaGraph::Auto),
            "on" | "true" => Ok(CudaGraph::On),
            "off" | "false" => Ok(CudaGraph::Off),
            _ => Err(Error::msg(format!(
                "cuda_graph '{s}': expected auto (on for a CUDA device), on or off"
            ))),
        }
    }
}

impl Serialize for CudaGraph {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for CudaGraph {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<CudaGraph, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = CudaGraph;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("auto, on or off")
            }
            fn visit_bool<E: serde::de::Error>(self, b: bool) -> std::result::Result<CudaGraph, E> {
                Ok(if b { CudaGraph::On } else { CudaGraph::Off })
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> std::result::Result<CudaGraph, E> {
                s.parse().map_err(|e: Error| E::custom(e))
            }
        }
        d.deserialize_any(V)
    }
}

/// Every setting of a training run (flat; keys are the TOML keys and the `--set` names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Name of the preset the run started from.
    pub preset: String,
    // ---- data ----
    /// Dataset path (any supported layout).
    pub data: String,
    /// Layout (raw, npz, isic-csv, folder, jpeg-pack); detected when empty.
    pub format: String,
    pub image_size: usize,
    /// Fraction of each class's training images that keep their label (ignored with a protocol).
    pub labeled_ratio: f64,
    /// Named labelled-subset protocol (`srcmt`), or empty.
    pub labeled_protocol: String,
    // ---- model ----
    pub width: usize,
    pub fusion_dim: usize,
    pub emb: usize,
    pub fusion: bool,
    // ---- method ----
    /// supervised, mean-teacher or dsrpgc.
    pub method: String,
    /// off, entropy, meta or both.
    pub dsr: String,
    /// Optional class balancing inside DSR (not part of the paper's method): off, class
    /// (class-balanced DSR weights) or align (distribution alignment of the teacher). DSRPGC only.
    #[serde(default = "default_dsr_balance")]
    pub dsr_balance: String,
    pub pgc: bool,
    pub lambda_cons: f32,
    pub lambda_pgc: f32,
    pub temperature: f32,
    pub meta_beta: f32,
    pub ema_alpha: f32,
    pub queue: usize,
    /// Ramp length in epochs (capped at a third of the run).
    pub ramp_epochs: f64,
    // ---- optimisation ----
    pub epochs: u64,
    pub batch_labeled: usize,
    pub batch_unlabeled: usize,
    /// adam or sgd.
    pub optimizer: String,
    pub lr: f32,
    pub weight_decay: f32,
    pub momentum: f32,
    /// cosine, constant, or `step` (× `lr_gamma` per epoch).
    pub schedule: String,
    pub lr_gamma: f32,
    // ---- run ----
    pub seed: u64,
    pub device: String,
    /// Replay each training step from a CUDA graph once its shapes have settled (`auto`: on a
    /// CUDA device; the results are those of the plain step).
    #[serde(default)]
    pub cuda_graph: CudaGraph,
    /// Loader threads.
    pub workers: usize,
    pub eval_batch: usize,
    /// SRC-MT convention threshold.
    pub srcmt_threshold: f64,
    /// Log line every this many steps when not on a terminal (0: 10 per epoch).
    pub log_every: u64,
}

impl TrainConfig {
    /// A named preset: `fast` (default: width 16, quick on a CPU), `paper` (SPEC §1 exactly, a
    /// ResNet-18-width model) and `srcmt-isic2018` (the SRC-MT schedule).
    pub fn preset(name: &str) -> Result<TrainConfig> {
        let fast = TrainConfig {
            preset: "fast".into(),
            data: "../shared/data/ham10000".into(),
            format: String::new(),
            image_size: 28,
            labeled_ratio: 0.2,
            labeled_protocol: String::new(),
            width: 16,
            fusion_dim: 128,
            emb: 128,
            fusion: true,
            method: "dsrpgc".into(),
            dsr: "both".into(),
            dsr_balance: default_dsr_balance(),
            pgc: true,
            lambda_cons: 1.0,
            lambda_pgc: 0.5,
            temperature: 0.1,
            meta_beta: 0.1,
            ema_alpha: 0.99,
            queue: 4096,
            ramp_epochs: 30.0,
            epochs: 30,
            batch_labeled: 12,
            batch_unlabeled: 36,
            optimizer: "adam".into(),
            lr: 1e-3,
            weight_decay: 5e-4,
            momentum: 0.9,
            schedule: "cosine".into(),
            lr_gamma: 0.9,
            seed: 0,
            device: "cpu".into(),
            workers: 2,
            eval_batch: 256,
            srcmt_threshold: 0.18,
            log_every: 0,
            cuda_graph: CudaGraph::Auto,
        };
        Ok(match name {
            "fast" => fast,
            "paper" => TrainConfig {
                preset: "paper".into(),
                width: 64,
                epochs: 100,
                ..fast
            },
            "srcmt-isic2018" => TrainConfig {
                preset: "srcmt-isic2018".into(),
                labeled_protocol: "srcmt".into(),
                lr: 1e-4,
                schedule: "step".into(),
                lr_gamma: 0.9,
                epochs: 100,
                ..fast
            },
            _ => bail!("--preset '{name}': expected fast, paper or srcmt-isic2018"),
        })
    }

    /// Preset, then a TOML file's keys, then `key=value` overrides (values parsed as TOML,
    /// falling back to a string). Unknown keys are errors naming the key and where it came from.
    pub fn resolve(preset: &str, file: Option<&Path>, sets: &[String]) -> Result<TrainConfig> {
        let base = TrainConfig::preset(preset)?;
        let mut table = match toml::Value::try_from(&base) {
            Ok(toml::Value::Table(t)) => t,
            _ => bail!("internal: config is not a table"),
        };
        if let Some(p) = file {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            let t: toml::Table = text
                .parse()
                .map_err(|e| Error::msg(format!("{}: not valid TOML: {e}", p.display())))?;
            for (k, v) in t {
                if !table.contains_key(&k) {
                    bail!("{}: unknown setting '{k}'", p.display());
                }
                table.insert(k, v);
            }
        }
        for s in sets {
            let Some((k, v)) = s.split_once('=') else {
                bail!("--set '{s}': expected key=value");
            };
            let k = k.trim().replace('-', "_");
            let Some(old) = table.get(&k) else {
                bail!("--set '{s}': unknown setting '{k}'");
            };
            let parsed = match old {
                toml::Value::String(_) => toml::Value::String(v.trim().to_string()),
                _ => format!("x = {}", v.trim())
                    .parse::<toml::Table>()
                    .ok()
                    .and_then(|mut t| t.remove("x"))
                    .ok_or_else(|| {
                        Error::msg(format!(
                            "--set '{s}': '{}' is not a value for '{k}', which takes {}",
                            v.trim(),
                            value_kind(old)
                        ))
                    })?,
            };
            table.insert(k, parsed);
        }
        let cfg: TrainConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e| Error::msg(format!("invalid configuration: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges and enumerations; messages name the setting.
    pub fn validate(&self) -> Result<()> {
        self.method.parse::<crate::train::step::Method>()?;
        self.dsr.parse::<crate::ssl::DsrMode>()?;
        let balance = self.dsr_balance.parse::<crate::ssl::DsrBalance>()?;
        if balance != crate::ssl::DsrBalance::Off && self.method != "dsrpgc" {
            bail!(
                "dsr_balance '{}' applies to method dsrpgc only (method is '{}')",
                self.dsr_balance,
                self.method
            );
        }
        if !["adam", "sgd"].contains(&self.optimizer.as_str()) {
            bail!("optimizer '{}': expected adam or sgd", self.optimizer);
        }
        if !["cosine", "constant", "step"].contains(&self.schedule.as_str()) {
            bail!(
                "schedule '{}': expected cosine, constant or step",
                self.schedule
            );
        }
        if !(self.labeled_ratio > 0.0 && self.labeled_ratio <= 1.0) {
            bail!("labeled_ratio {}: must be in (0, 1]", self.labeled_ratio);
        }
        if !self.labeled_protocol.is_empty()
            && self
                .labeled_protocol
                .parse::<crate::data::LabeledProtocol>()
                .is_err()
        {
            bail!(
                "labeled_protocol '{}': expected srcmt, srcmt-full or empty",
                self.labeled_protocol
            );
        }
        for (v, n) in [
            (self.width, "width"),
            (self.fusion_dim, "fusion_dim"),
            (self.emb, "emb"),
            (self.batch_labeled, "batch_labeled"),
            (self.batch_unlabeled, "batch_unlabeled"),
            (self.image_size, "image_size"),
            (self.eval_batch, "eval_batch"),
        ] {
            if v == 0 {
                bail!("{n} must be positive");
            }
        }
        if self.epochs == 0 {
            bail!("epochs must be positive");
        }
        if !(0.0..1.0).contains(&self.ema_alpha) {
            bail!("ema_alpha {} must be in [0, 1)", self.ema_alpha);
        }
        if self.lr <= 0.0 || !self.lr.is_finite() {
            bail!("lr {} must be positive", self.lr);
        }
        let device = crate::tensor::Device::parse(&self.device)?;
        if self.cuda_graph == CudaGraph::On && device == crate::tensor::Device::Cpu {
            bail!(
                "cuda_graph = on (--cuda-graph) needs a CUDA device; device is '{}'",
                self.device
            );
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serialises")
    }
}

/// What a setting whose current value is `v` takes, for `--set` errors.
fn value_kind(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::Integer(_) => "a whole number (e.g. 3)",
        toml::Value::Float(_) => "a number (e.g. 0.001)",
        toml::Value::Boolean(_) => "true or false",
        toml::Value::Array(_) => "a TOML array (e.g. [1, 2])",
        _ => "a TOML value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_and_unknown_keys_are_named() {
        let c = TrainConfig::resolve(
            "fast",
            None,
            &[
                "epochs=3".into(),
                "method=supervised".into(),
                "lr=0.01".into(),
            ],
        )
        .unwrap();
        assert_eq!((c.epochs, c.method.as_str(), c.lr), (3, "supervised", 0.01));
        let e = TrainConfig::resolve("fast", None, &["epoch=3".into()]).unwrap_err();
        assert!(e.to_string().contains("unknown setting 'epoch'"), "{e}");
        for (set, takes) in [
            (
                "lr=abc",
                "'abc' is not a value for 'lr', which takes a number",
            ),
            (
                "width=",
                "'' is not a value for 'width', which takes a whole number",
            ),
            (
                "cuda_graph=yes",
                "expected auto (on for a CUDA device), on or off",
            ),
        ] {
            let e = TrainConfig::resolve("fast", None, &[set.into()]).unwrap_err();
            assert!(e.to_string().contains(takes), "{set}: {e}");
        }
        let e = TrainConfig::resolve("fast", None, &["method=magic".into()]).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
        let c = TrainConfig::resolve("srcmt-isic2018", None, &[]).unwrap();
        assert_eq!((c.lr, c.schedule.as_str(), c.epochs), (1e-4, "step", 100));
        let back: TrainConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn cuda_graph_defaults_to_auto_and_on_needs_a_cuda_device() {
        use crate::tensor::Device;
        let fast = TrainConfig::preset("fast").unwrap();
        assert_eq!(fast.cuda_graph, CudaGraph::Auto);
        // Auto: on for a CUDA device, off on the CPU (where the preset's device is valid).
        assert!(CudaGraph::Auto.enabled(Device::parse("cuda:0").unwrap()));
        assert!(!CudaGraph::Auto.enabled(Device::Cpu));
        assert!(!CudaGraph::Off.enabled(Device::parse("cuda").unwrap()));
        assert!(
            fast.to_toml().contains("cuda_graph = \"auto\""),
            "{}",
            fast.to_toml()
        );
        for on in ["cuda_graph=true", "cuda_graph=on"] {
            let e = TrainConfig::resolve("fast", None, &[on.into()]).unwrap_err();
            assert!(e.to_string().contains("needs a CUDA device"), "{on}: {e}");
            let c =
                TrainConfig::resolve("fast", None, &[on.into(), "device=cuda:1".into()]).unwrap();
            assert_eq!(c.cuda_graph, CudaGraph::On, "{on}");
        }
        for off in ["cuda_graph=false", "cuda_graph=off"] {
            let c = TrainConfig::resolve("fast", None, &[off.into()]).unwrap();
            assert_eq!(c.cuda_graph, CudaGraph::Off, "{off}");
        }
        // Settings files wrote booleans before `auto` existed; a file without the key is auto.
        let c = TrainConfig::resolve("fast", None, &["device=cuda".into()]).unwrap();
        let mut t: toml::Table = toml::from_str(&c.to_toml()).unwrap();
        t.insert("cuda_graph".into(), toml::Value::Boolean(false));
        let back: TrainConfig = toml::from_str(&toml::to_string(&t).unwrap()).unwrap();
        assert_eq!(back.cuda_graph, CudaGraph::Off);
        t.insert("cuda_graph".into(), toml::Value::Boolean(true));
        let back: TrainConfig = toml::from_str(&toml::to_string(&t).unwrap()).unwrap();
        assert_eq!(back.cuda_graph, CudaGraph::On);
        t.remove("cuda_graph");
        let back: TrainConfig = toml::from_str(&toml::to_string(&t).unwrap()).unwrap();
        assert_eq!(back.cuda_graph, CudaGraph::Auto);
        t.insert("cuda_graph".into(), toml::Value::String("sometimes".into()));
        let e = toml::from_str::<TrainConfig>(&toml::to_string(&t).unwrap()).unwrap_err();
        assert!(e.to_string().contains("cuda_graph 'sometimes'"), "{e}");
    }

    #[test]
    fn dsr_balance_defaults_off_and_is_validated() {
        for p in ["fast", "paper", "srcmt-isic2018"] {
            assert_eq!(TrainConfig::preset(p).unwrap().dsr_balance, "off");
        }
        let c = TrainConfig::resolve("paper", None, &["dsr_balance=align".into()]).unwrap();
        assert_eq!(c.dsr_balance, "align");
        let c = TrainConfig::resolve("fast", None, &["dsr-balance=class".into()]).unwrap();
        assert_eq!(c.dsr_balance, "class");
        let e = TrainConfig::resolve("fast", None, &["dsr_balance=maybe".into()]).unwrap_err();
        assert!(e.to_string().contains("--dsr-balance 'maybe'"), "{e}");
        let e = TrainConfig::resolve(
            "fast",
            None,
            &["dsr_balance=align".into(), "method=mean-teacher".into()],
        )
        .unwrap_err();
        assert!(e.to_string().contains("dsrpgc only"), "{e}");
        // A config written before the setting existed reads as `off`.
        let mut t: toml::Table = TrainConfig::preset("fast")
            .unwrap()
            .to_toml()
            .parse()
            .unwrap();
        t.remove("dsr_balance");
        let old: TrainConfig = toml::Value::Table(t).try_into().unwrap();
        assert_eq!(old, TrainConfig::preset("fast").unwrap());
    }
}
