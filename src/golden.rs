//! Safetensors I/O and the golden conformance runner (SPEC §5).
//!
//! A case file holds `in.*` inputs, `grad_out.*` upstream gradients, `out.*` expected outputs and
//! `grad.*` expected gradients, plus metadata `op`, `params` (JSON) and `tol` (JSON
//! `{"rel","abs"}`). The runner dispatches on `op` alone, computes every output the op defines,
//! and then checks every `out.*` / `grad.*` tensor present in the file: one that the op did not
//! produce is a failure, so a case can never pass by omission.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::autograd::{Act, Graph};
use crate::backend::{AdamParams, ConvParams, PoolParams, SgdParams};
use crate::bail;
use crate::error::{Error, Result};
use crate::nn::{Binding, MedFuseNet, ModelConfig};
use crate::ssl;
use crate::tensor::{Device, Tensor};

/// An in-memory safetensors file.
pub struct SafeFile {
    path: String,
    bytes: Vec<u8>,
}

impl SafeFile {
    pub fn open(path: &Path) -> Result<SafeFile> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let f = SafeFile {
            path: path.display().to_string(),
            bytes,
        };
        f.parsed()?;
        Ok(f)
    }

    fn parsed(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.bytes)
            .map_err(|e| Error::msg(format!("{}: not a valid safetensors file: {e}", self.path)))
    }

    /// The `__metadata__` map.
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, md) = SafeTensors::read_metadata(&self.bytes)
            .map_err(|e| Error::msg(format!("{}: bad header: {e}", self.path)))?;
        Ok(md.metadata().clone().unwrap_or_default())
    }

    pub fn names(&self) -> Result<Vec<String>> {
        Ok(self
            .parsed()?
            .names()
            .into_iter()
            .map(String::from)
            .collect())
    }

    /// An F32 tensor (or I64, converted) as `(data, shape)`.
    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let st = self.parsed()?;
        let v = st
            .tensor(name)
            .map_err(|_| Error::msg(format!("{}: missing tensor '{name}'", self.path)))?;
        let shape = v.shape().to_vec();
        let data = match v.dtype() {
            Dtype::F32 => v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::I64 => self.i64(name)?.into_iter().map(|x| x as f32).collect(),
            d => bail!(
                "{}: tensor '{name}' has dtype {d:?}, expected F32",
                self.path
            ),
        };
        Ok((data, shape))
    }

    /// An I64 tensor.
    pub fn i64(&self, name: &str) -> Result<Vec<i64>> {
        let st = self.parsed()?;
        let v = st
            .tensor(name)
            .map_err(|_| Error::msg(format!("{}: missing tensor '{name}'", self.path)))?;
        if v.dtype() != Dtype::I64 {
            bail!(
                "{}: tensor '{name}' has dtype {:?}, expected I64",
                self.path,
                v.dtype()
            );
        }
        Ok(v.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect())
    }

    /// Non-negative integer labels.
    /// An integer tensor as a label tensor on `dev` (see [`crate::backend::label_tensor`]).
    pub fn label_tensor(&self, name: &str, dev: Device) -> Result<Tensor> {
        crate::backend::label_tensor(crate::backend::get(dev)?, &self.labels(name)?)
    }

    pub fn labels(&self, name: &str) -> Result<Vec<usize>> {
        self.i64(name)?
            .into_iter()
            .map(|x| {
                usize::try_from(x).map_err(|_| {
                    Error::msg(format!("{}: '{name}' holds negative label {x}", self.path))
                })
            })
            .collect()
    }

    /// A tensor on `device`.
    pub fn tensor(&self, name: &str, device: Device) -> Result<Tensor> {
        let (d, s) = self.f32(name)?;
        Tensor::from_vec(d, &s)?.to_device(device)
    }

    pub fn has(&self, name: &str) -> bool {
        self.parsed()
            .map(|s| s.tensor(name).is_ok())
            .unwrap_or(false)
    }

    /// Every F32 tensor by name.
    pub fn all_f32(&self) -> Result<crate::tensor::TensorMap> {
        let mut m = HashMap::new();
        for n in self.names()? {
            m.insert(n.clone(), self.f32(&n)?);
        }
        Ok(m)
    }
}

/// Writes named f32 tensors as safetensors, atomically (temp file in the same folder, fsync,
/// rename), so a crash never leaves a half-written file under the final name.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<f32>, Vec<usize>)],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, d, _)| d.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, _, s), b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::msg(format!("{}: tensor '{n}': {e}", path.display())))
        })
        .collect::<Result<_>>()?;
    let md = if metadata.is_empty() {
        None
    } else {
        Some(metadata.clone())
    };
    let buf = safetensors::serialize(views, md)
        .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    atomic_write(path, &buf)
}

/// Writes `bytes` to `path` via a temporary file and a rename.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|s| s.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Result of comparing one tensor.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub max_abs: f64,
    pub max_rel: f64,
    pub pass: bool,
    /// Set when the tensor was not produced or had the wrong shape.
    pub problem: Option<String>,
}

/// Result of one case.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaseReport {
    pub file: String,
    pub op: String,
    pub device: String,
    pub checks: Vec<Check>,
    /// Set when the case could not be run at all.
    pub error: Option<String>,
    pub pass: bool,
}

/// Tolerance from the metadata.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub rel: f64,
    pub abs: f64,
}

/// Compares `got` with `want` elementwise: pass when `|got − want| ≤ abs + rel·|want|`.
pub fn compare(name: &str, got: &[f32], want: &[f32], tol: Tol) -> Check {
    if got.len() != want.len() {
        return Check {
            name: name.into(),
            max_abs: f64::INFINITY,
            max_rel: f64::INFINITY,
            pass: false,
            problem: Some(format!(
                "{} elements produced, {} expected",
                got.len(),
                want.len()
            )),
        };
    }
    let (mut max_abs, mut max_rel, mut pass) = (0.0f64, 0.0f64, true);
    for (&g, &w) in got.iter().zip(want) {
        let (g, w) = (g as f64, w as f64);
        let d = (g - w).abs();
        if d.is_nan() || d > tol.abs + tol.rel * w.abs() {
            pass = false;
        }
        let d = if d.is_nan() { f64::INFINITY } else { d };
        max_abs = max_abs.max(d);
        max_rel = max_rel.max(d / w.abs().max(1e-12));
    }
    Check {
        name: name.into(),
        max_abs,
        max_rel,
        pass,
        problem: None,
    }
}

/// Outputs produced by running a case: expected-tensor name → (data, shape).
type Produced = BTreeMap<String, (Vec<f32>, Vec<usize>)>;

fn put(p: &mut Produced, name: &str, t: &Tensor) -> Result<()> {
    p.insert(name.to_string(), (t.to_vec()?, t.shape().to_vec()));
    Ok(())
}

fn param_f(params: &Value, key: &str, default: Option<f64>) -> Result<f64> {
    match params.get(key).and_then(Value::as_f64) {
        Some(v) => Ok(v),
        None => default.ok_or_else(|| Error::msg(format!("params has no number '{key}'"))),
    }
}

fn param_u(params: &Value, key: &str, default: Option<usize>) -> Result<usize> {
    match params.get(key).and_then(Value::as_u64) {
        Some(v) => Ok(v as usize),
        None => default.ok_or_else(|| Error::msg(format!("params has no integer '{key}'"))),
    }
}

/// Only the last dimension is supported for row-wise ops; any other `dim` is an error.
fn check_last_dim(params: &Value, rank: usize) -> Result<()> {
    if let Some(d) = params.get("dim").and_then(Value::as_i64) {
        if d != -1 && d != rank as i64 - 1 {
            bail!("dim {d} is not supported (only the last dimension)");
        }
    }
    Ok(())
}

/// Parses a model description from case params.
pub fn model_config(v: &Value) -> Result<ModelConfig> {
    let m = v
        .get("model")
        .ok_or_else(|| Error::msg("params has no 'model'"))?;
    Ok(ModelConfig {
        in_ch: param_u(m, "in_ch", None)?,
        width: param_u(m, "width", None)?,
        d: param_u(m, "d", None)?,
        emb: param_u(m, "emb", None)?,
        classes: param_u(m, "classes", None)?,
        small_stem: m.get("small_stem").and_then(Value::as_bool).unwrap_or(true),
        fusion: m.get("fusion").and_then(Value::as_bool).unwrap_or(true),
    })
}

/// Applies a unary row/elementwise op through the tape and collects `out.y` and `grad.x`.
fn unary(
    f: &SafeFile,
    dev: Device,
    p: &mut Produced,
    op: impl Fn(&mut Graph, crate::autograd::Var) -> Result<crate::autograd::Var>,
) -> Result<()> {
    let mut g = Graph::new();
    let x = g.leaf(f.tensor("in.x", dev)?, true);
    let y = op(&mut g, x)?;
    put(p, "out.y", g.value(y))?;
    if f.has("grad_out.y") {
        g.backward_with(y, f.tensor("grad_out.y", dev)?)?;
        put(
            p,
            "grad.x",
            g.grad(x)
                .ok_or_else(|| Error::msg("no gradient reached x"))?,
        )?;
    }
    Ok(())
}

/// Runs the op of one case and returns what it produced.
fn run_op(f: &SafeFile, op: &str, params: &Value, dev: Device) -> Result<Produced> {
    let mut p = Produced::new();
    match op {
        "relu" => unary(f, dev, &mut p, |g, x| g.relu(x))?,
        "softmax" | "log_softmax" | "l2_normalize" => {
            let rank = f.f32("in.x")?.1.len();
            check_last_dim(params, rank)?;
            unary(f, dev, &mut p, |g, x| match op {
                "softmax" => g.softmax(x),
                "log_softmax" => g.log_softmax(x),
                _ => g.l2_normalize(x),
            })?
        }
        "global_avg_pool2d" => unary(f, dev, &mut p, |g, x| g.global_avg_pool(x))?,
        "max_pool2d" => {
            let k = param_u(params, "kernel", None)?;
            let pp = PoolParams {
                kernel: k,
                stride: param_u(params, "stride", Some(k))?,
                padding: param_u(params, "padding", Some(0))?,
            };
            unary(f, dev, &mut p, |g, x| g.max_pool2d(x, pp))?
        }
        "conv2d" => {
            let cp = ConvParams {
                stride: param_u(params, "stride", Some(1))?,
                padding: param_u(params, "padding", Some(0))?,
            };
            if param_u(params, "dilation", Some(1))? != 1
                || param_u(params, "groups", Some(1))? != 1
            {
                bail!("conv2d: dilation and groups other than 1 are not supported");
            }
            let mut g = Graph::new();
            let x = g.leaf(f.tensor("in.x", dev)?, true);
            let w = g.leaf(f.tensor("in.weight", dev)?, true);
            let b = if f.has("in.bias") {
                Some(g.leaf(f.tensor("in.bias", dev)?, true))
            } else {
                None
            };
            let y = g.conv2d(x, w, b, cp)?;
            put(&mut p, "out.y", g.value(y))?;
            g.backward_with(y, f.tensor("grad_out.y", dev)?)?;
            put(&mut p, "grad.x", g.grad(x).unwrap())?;
            put(&mut p, "grad.weight", g.grad(w).unwrap())?;
            if let Some(b) = b {
                put(&mut p, "grad.bias", g.grad(b).unwrap())?;
            }
        }
        "linear" => {
            let mut g = Graph::new();
            let x = g.leaf(f.tensor("in.x", dev)?, true);
            let w = g.leaf(f.tensor("in.weight", dev)?, true);
            let b = if f.has("in.bias") {
                Some(g.leaf(f.tensor("in.bias", dev)?, true))
            } else {
                None
            };
            let y = g.linear(x, w, b)?;
            put(&mut p, "out.y", g.value(y))?;
            g.backward_with(y, f.tensor("grad_out.y", dev)?)?;
            put(&mut p, "grad.x", g.grad(x).unwrap())?;
            put(&mut p, "grad.weight", g.grad(w).unwrap())?;
            if let Some(b) = b {
                put(&mut p, "grad.bias", g.grad(b).unwrap())?;
            }
        }
        "bmm" => {
            let mut g = Graph::new();
            let a = g.leaf(f.tensor("in.a", dev)?, true);
            let b = g.leaf(f.tensor("in.b", dev)?, true);
            let y = g.matmul(a, b, false, false)?;
            put(&mut p, "out.y", g.value(y))?;
            g.backward_with(y, f.tensor("grad_out.y", dev)?)?;
            put(&mut p, "grad.a", g.grad(a).unwrap())?;
            put(&mut p, "grad.b", g.grad(b).unwrap())?;
        }
        "batch_norm2d" => {
            let training = params
                .get("training")
                .and_then(Value::as_bool)
                .unwrap_or(true);
            let eps = param_f(params, "eps", Some(1e-5))? as f32;
            let momentum = param_f(params, "momentum", Some(0.1))? as f32;
            let mut g = Graph::new();
            let x = g.leaf(f.tensor("in.x", dev)?, true);
            let w = g.leaf(f.tensor("in.weight", dev)?, true);
            let b = g.leaf(f.tensor("in.bias", dev)?, true);
            let rm = f.tensor("in.running_mean", dev)?;
            let rv = f.tensor("in.running_var", dev)?;
            let y = if training {
                let (y, mean, var) = g.batch_norm_train(x, w, b, eps)?;
                let bk = mean.backend()?;
                put(
                    &mut p,
                    "out.running_mean",
                    &bk.axpby(1.0 - momentum, &rm, momentum, &mean)?,
                )?;
                put(
                    &mut p,
                    "out.running_var",
                    &bk.axpby(1.0 - momentum, &rv, momentum, &var)?,
                )?;
                y
            } else {
                put(&mut p, "out.running_mean", &rm)?;
                put(&mut p, "out.running_var", &rv)?;
                g.batch_norm_eval(x, w, b, &rm, &rv, eps, Act::None)?
            };
            put(&mut p, "out.y", g.value(y))?;
            g.backward_with(y, f.tensor("grad_out.y", dev)?)?;
            put(&mut p, "grad.x", g.grad(x).unwrap())?;
            put(&mut p, "grad.weight", g.grad(w).unwrap())?;
            put(&mut p, "grad.bias", g.grad(b).unwrap())?;
        }
        "cross_entropy" => {
            if params
                .get("reduction")
                .and_then(Value::as_str)
                .unwrap_or("mean")
                != "mean"
            {
                bail!("cross_entropy: only reduction 'mean' is supported");
            }
            let mut g = Graph::new();
            let z = g.leaf(f.tensor("in.logits", dev)?, true);
            let l = g.cross_entropy(z, &f.labels("in.target")?)?;
            put(&mut p, "out.loss", g.value(l))?;
            g.backward(l)?;
            put(&mut p, "grad.logits", g.grad(z).unwrap())?;
        }
        "entropy_weight" => {
            let z = f.tensor("in.logits", dev)?;
            put(&mut p, "out.weights", &z.backend()?.entropy_weight(&z)?)?;
        }
        "weighted_consistency" => {
            let mut g = Graph::new();
            let zs = g.leaf(f.tensor("in.student_logits", dev)?, true);
            let l = g.weighted_consistency(
                zs,
                &f.tensor("in.teacher_logits", dev)?,
                &f.tensor("in.weights", dev)?,
            )?;
            put(&mut p, "out.loss", g.value(l))?;
            g.backward(l)?;
            put(&mut p, "grad.student_logits", g.grad(zs).unwrap())?;
        }
        "similarity_fusion" => {
            let mut g = Graph::new();
            let lo = g.leaf(f.tensor("in.low", dev)?, true);
            let hi = g.leaf(f.tensor("in.high", dev)?, true);
            let y = g.similarity_fusion(lo, hi)?;
            put(&mut p, "out.y", g.value(y))?;
            g.backward_with(y, f.tensor("grad_out.y", dev)?)?;
            put(&mut p, "grad.low", g.grad(lo).unwrap())?;
            put(&mut p, "grad.high", g.grad(hi).unwrap())?;
        }
        "pgc_loss" => {
            let tau = param_f(params, "temperature", Some(0.1))? as f32;
            let mut g = Graph::new();
            let q = g.leaf(f.tensor("in.queries", dev)?, true);
            let l = g.pgc_loss(
                q,
                &f.label_tensor("in.query_labels", dev)?,
                &f.tensor("in.query_weights", dev)?,
                &f.tensor("in.keys", dev)?,
                &f.label_tensor("in.key_labels", dev)?,
                &f.tensor("in.key_weights", dev)?,
                tau,
            )?;
            put(&mut p, "out.loss", g.value(l))?;
            g.backward(l)?;
            put(&mut p, "grad.queries", g.grad(q).unwrap())?;
        }
        "dsr_alignment" => {
            let fl = f.tensor("in.feat_lab", dev)?;
            let a = fl.backend()?.dsr_alignment(
                &fl,
                &f.labels("in.y_lab")?,
                &f.tensor("in.feat_unl", dev)?,
                &f.label_tensor("in.pseudo_labels", dev)?,
                &f.tensor("in.fc_weight", dev)?,
                &f.tensor("in.fc_bias", dev)?,
            )?;
            put(&mut p, "out.alignment", &a)?;
        }
        "ema_update" => {
            let alpha = param_f(params, "alpha", None)? as f32;
            let mut t = f.tensor("in.teacher", dev)?;
            let s = f.tensor("in.student", dev)?;
            s.backend()?.ema_update(&mut t, &s, alpha)?;
            put(&mut p, "out.teacher", &t)?;
        }
        "sgd_step" => {
            let mut param = f.tensor("in.param", dev)?;
            let bk = param.backend()?;
            let mut buf = bk.full(param.shape(), 0.0)?;
            let mut k = 1;
            while f.has(&format!("in.grad{k}")) {
                let h = SgdParams {
                    lr: param_f(params, "lr", None)? as f32,
                    momentum: param_f(params, "momentum", Some(0.0))? as f32,
                    weight_decay: param_f(params, "weight_decay", Some(0.0))? as f32,
                    first_step: k == 1,
                };
                bk.sgd_step(
                    &mut param,
                    &f.tensor(&format!("in.grad{k}"), dev)?,
                    &mut buf,
                    h,
                )?;
                put(&mut p, &format!("out.param{k}"), &param)?;
                put(&mut p, &format!("out.momentum{k}"), &buf)?;
                k += 1;
            }
            put(&mut p, "out.param", &param)?;
            put(&mut p, "out.momentum", &buf)?;
        }
        "adam_step" => {
            let mut param = f.tensor("in.param", dev)?;
            let bk = param.backend()?;
            let mut m = bk.full(param.shape(), 0.0)?;
            let mut v = bk.full(param.shape(), 0.0)?;
            let mut k = 1;
            while f.has(&format!("in.grad{k}")) {
                let h = AdamParams {
                    lr: param_f(params, "lr", None)? as f32,
                    beta1: param_f(params, "beta1", Some(0.9))? as f32,
                    beta2: param_f(params, "beta2", Some(0.999))? as f32,
                    eps: param_f(params, "eps", Some(1e-8))? as f32,
                    weight_decay: param_f(params, "weight_decay", Some(0.0))? as f32,
                    step: k as u64,
                };
                bk.adam_step(
                    &mut param,
                    &f.tensor(&format!("in.grad{k}"), dev)?,
                    &mut m,
                    &mut v,
                    h,
                )?;
                put(&mut p, &format!("out.param{k}"), &param)?;
                k += 1;
            }
            put(&mut p, "out.param", &param)?;
            put(&mut p, "out.exp_avg", &m)?;
            put(&mut p, "out.exp_avg_sq", &v)?;
        }
        "medfusenet_forward_backward" => {
            let cfg = model_config(params)?;
            let train = params
                .get("mode")
                .and_then(Value::as_str)
                .unwrap_or("train")
                == "train";
            let mut model = MedFuseNet::new(cfg, 0);
            model
                .store
                .load_named(&f.path, &f.all_f32()?, "in.param.")?;
            model.store.to_device(dev)?;
            let mut g = Graph::new();
            let mut bind = Binding::new(true);
            let x = g.leaf(f.tensor("in.x", dev)?, true);
            let out = model.forward(&mut g, &mut bind, x, train)?;
            put(&mut p, "out.logits", g.value(out.logits))?;
            put(&mut p, "out.embedding", g.value(out.embedding))?;
            if f.has("in.target") {
                let loss = g.no_grad(|g| g.cross_entropy(out.logits, &f.labels("in.target")?))?;
                put(&mut p, "out.loss", g.value(loss))?;
            }
            g.backward_with(out.logits, f.tensor("grad_out.logits", dev)?)?;
            g.backward_with(out.embedding, f.tensor("grad_out.embedding", dev)?)?;
            put(&mut p, "grad.x", g.grad(x).unwrap())?;
            for (i, gr) in bind.take_grads(&mut g) {
                put(
                    &mut p,
                    &format!("grad.param.{}", model.store.entries()[i].name),
                    &gr,
                )?;
            }
            for e in model.store.entries() {
                put(&mut p, &format!("out.state.{}", e.name), &e.value)?;
            }
        }
        "dsrpgc_loss" => {
            let cfg = model_config(params)?;
            let all = f.all_f32()?;
            let mut student = MedFuseNet::new(cfg, 0);
            student.store.load_named(&f.path, &all, "in.student.")?;
            student.store.to_device(dev)?;
            let mut teacher = MedFuseNet::new(cfg, 0);
            teacher.store.load_named(&f.path, &all, "in.teacher.")?;
            teacher.store.to_device(dev)?;
            let hp = ssl::LossConfig {
                lambda_cons: param_f(params, "lambda_cons", Some(1.0))? as f32,
                lambda_pgc: param_f(params, "lambda_pgc", Some(0.5))? as f32,
                temperature: param_f(params, "temperature", Some(0.1))? as f32,
                ..ssl::LossConfig::default()
            };
            let labels = f.labels("in.queue_labels")?;
            let queue = if labels.is_empty() {
                ssl::QueueView::default()
            } else {
                let bk = crate::backend::get(dev)?;
                let w = f.f32("in.queue_weights")?.0;
                if w.len() != labels.len() {
                    bail!(
                        "{}: {} queue weights for {} queue labels",
                        f.path,
                        w.len(),
                        labels.len()
                    );
                }
                ssl::QueueView {
                    len: labels.len(),
                    keys: Some(f.tensor("in.queue_keys", dev)?),
                    labels: Some(crate::backend::label_tensor(bk, &labels)?),
                    weights: Some(bk.from_host(&w, &[w.len()])?),
                }
            };
            let meta = if f.has("in.meta_weights") {
                Some(f.f32("in.meta_weights")?.0)
            } else {
                None
            };
            let mut g = Graph::new();
            let mut bind = Binding::new(true);
            let batch = ssl::Batch {
                x_lab: f.tensor("in.x_lab", dev)?,
                y_lab: f.labels("in.y_lab")?,
                u_weak: f.tensor("in.x_weak", dev)?,
                u_strong: f.tensor("in.x_strong", dev)?,
            };
            let o = ssl::dsrpgc_loss(
                &mut g,
                &mut student,
                &mut bind,
                &mut teacher,
                &batch,
                &queue,
                meta.as_deref(),
                None,
                &hp,
            )?;
            put(&mut p, "out.loss", g.value(o.loss))?;
            let (sup, cons, pgc) = o.terms.read()?;
            put(&mut p, "out.loss_sup", &Tensor::scalar(sup))?;
            put(&mut p, "out.loss_cons", &Tensor::scalar(cons))?;
            put(&mut p, "out.loss_pgc", &Tensor::scalar(pgc))?;
            put(&mut p, "out.weights", &o.weights)?;
            put(&mut p, "out.pseudo_labels", &o.pseudo_labels)?;
            g.backward(o.loss)?;
            for (i, gr) in bind.take_grads(&mut g) {
                put(
                    &mut p,
                    &format!("grad.student.{}", student.store.entries()[i].name),
                    &gr,
                )?;
            }
        }
        _ => bail!("unknown op '{op}'"),
    }
    Ok(p)
}

/// Runs one case file on `device`.
pub fn run_case(path: &Path, device: Device) -> CaseReport {
    let file = path.display().to_string();
    let mut report = CaseReport {
        file: file.clone(),
        op: String::new(),
        device: device.to_string(),
        checks: Vec::new(),
        error: None,
        pass: false,
    };
    let result = (|| -> Result<Vec<Check>> {
        let f = SafeFile::open(path)?;
        let md = f.metadata()?;
        let op = md
            .get("op")
            .ok_or_else(|| Error::msg(format!("{file}: metadata has no 'op'")))?
            .clone();
        report.op = op.clone();
        let params: Value =
            serde_json::from_str(md.get("params").map(String::as_str).unwrap_or("{}"))
                .map_err(|e| Error::msg(format!("{file}: metadata 'params' is not JSON: {e}")))?;
        let tolv: Value = serde_json::from_str(
            md.get("tol")
                .ok_or_else(|| Error::msg(format!("{file}: metadata has no 'tol'")))?,
        )
        .map_err(|e| Error::msg(format!("{file}: metadata 'tol' is not JSON: {e}")))?;
        let tol = Tol {
            rel: param_f(&tolv, "rel", None)?,
            abs: param_f(&tolv, "abs", None)?,
        };
        let produced = run_op(&f, &op, &params, device)?;
        let mut checks = Vec::new();
        let mut expected: Vec<String> = f
            .names()?
            .into_iter()
            .filter(|n| n.starts_with("out.") || n.starts_with("grad."))
            .collect();
        expected.sort();
        if expected.is_empty() {
            bail!("{file}: case has no out.* or grad.* tensor to check");
        }
        for name in expected {
            let (want, wshape) = f.f32(&name)?;
            match produced.get(&name) {
                None => checks.push(Check {
                    name: name.clone(),
                    max_abs: f64::INFINITY,
                    max_rel: f64::INFINITY,
                    pass: false,
                    problem: Some(format!("op '{op}' did not produce it")),
                }),
                Some((got, gshape)) => {
                    let mut c = compare(&name, got, &want, tol);
                    if got.len() == want.len()
                        && gshape != &wshape
                        && !(gshape.len() <= 1 && wshape.len() <= 1)
                    {
                        c.pass = false;
                        c.problem = Some(format!("shape {gshape:?}, expected {wshape:?}"));
                    }
                    checks.push(c);
                }
            }
        }
        Ok(checks)
    })();
    match result {
        Ok(c) => {
            report.pass = c.iter().all(|c| c.pass);
            report.checks = c;
        }
        Err(e) => report.error = Some(e.to_string()),
    }
    report
}

/// All `*.safetensors` files in `dir`, sorted.
pub fn case_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|s| s.to_str()) == Some("safetensors"))
        .collect();
    v.sort();
    Ok(v)
}
