//! Layers and MedFuseNet (SPEC §2), with torchvision `resnet18` parameter names.
//!
//! Parameters and buffers live in a [`ParamStore`] (name → tensor); layers hold indices into it.
//! A forward pass binds parameters to graph leaves through a [`Binding`], so several passes of the
//! same model in one graph (the student's labelled and strong-view passes) share leaves and their
//! gradients add up.

use std::collections::HashMap;
use std::path::Path;

use rand::Rng;
use rand_distr_free::normal;

use crate::autograd::{Act, Graph, Var};
use crate::backend::{ConvParams, PoolParams};
use crate::bail;
use crate::error::Result;
use crate::tensor::{Device, Tensor};

/// Trainable parameter or non-trainable buffer (BN running statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Param,
    Buffer,
}

/// One named tensor of a model.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub value: Tensor,
    pub kind: Kind,
}

/// Named parameters and buffers, in registration order.
#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
}

impl ParamStore {
    pub fn add(&mut self, name: &str, value: Tensor, kind: Kind) -> usize {
        assert!(
            !self.index.contains_key(name),
            "duplicate parameter name {name}"
        );
        self.entries.push(Entry {
            name: name.to_string(),
            value,
            kind,
        });
        self.index.insert(name.to_string(), self.entries.len() - 1);
        self.entries.len() - 1
    }
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
    pub fn entries_mut(&mut self) -> &mut [Entry] {
        &mut self.entries
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn find(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.find(name).map(|i| &self.entries[i].value)
    }
    pub fn value(&self, i: usize) -> &Tensor {
        &self.entries[i].value
    }
    /// The values of two different entries, both mutable.
    pub fn pair_mut(&mut self, i: usize, j: usize) -> (&mut Tensor, &mut Tensor) {
        assert_ne!(i, j, "pair_mut needs two different entries");
        if i < j {
            let (a, b) = self.entries.split_at_mut(j);
            (&mut a[i].value, &mut b[0].value)
        } else {
            let (a, b) = self.entries.split_at_mut(i);
            (&mut b[0].value, &mut a[j].value)
        }
    }
    pub fn set(&mut self, i: usize, t: Tensor) {
        self.entries[i].value = t;
    }
    /// Number of trainable scalars.
    pub fn num_params(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.kind == Kind::Param)
            .map(|e| e.value.numel())
            .sum()
    }

    /// Copies every tensor to `device`.
    pub fn to_device(&mut self, device: Device) -> Result<()> {
        for e in &mut self.entries {
            e.value = e.value.to_device(device)?;
        }
        Ok(())
    }

    /// Overwrites tensors from `(name, data, shape)` triples with `prefix` stripped from names;
    /// every entry of the store must be provided with its exact shape.
    pub fn load_named(
        &mut self,
        source: &str,
        tensors: &HashMap<String, (Vec<f32>, Vec<usize>)>,
        prefix: &str,
    ) -> Result<()> {
        for e in &mut self.entries {
            let key = format!("{prefix}{}", e.name);
            let Some((data, shape)) = tensors.get(&key) else {
                bail!("{source}: missing tensor '{key}'");
            };
            if shape.as_slice() != e.value.shape() {
                bail!(
                    "{source}: tensor '{key}' has shape {shape:?}, the model expects {:?}",
                    e.value.shape()
                );
            }
            let dev = e.value.device();
            e.value = Tensor::from_vec(data.clone(), shape)?.to_device(dev)?;
        }
        Ok(())
    }

    /// Host copies `(name, data, shape)` of every entry, names prefixed.
    pub fn to_named(&self, prefix: &str) -> Result<crate::tensor::NamedTensors> {
        self.entries
            .iter()
            .map(|e| {
                Ok((
                    format!("{prefix}{}", e.name),
                    e.value.to_vec()?,
                    e.value.shape().to_vec(),
                ))
            })
            .collect()
    }

    /// Saves as a safetensors file under torchvision names (atomic: temp file + rename).
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        crate::golden::write_safetensors(path, &self.to_named("")?, &HashMap::new())
    }

    /// Loads every entry from a safetensors file written by [`ParamStore::save_safetensors`]
    /// (or converted from PyTorch with the same names).
    pub fn load_safetensors(&mut self, path: &Path) -> Result<()> {
        let file = crate::golden::SafeFile::open(path)?;
        let all = file.all_f32()?;
        self.load_named(&path.display().to_string(), &all, "")
    }
}

/// Graph leaves bound to store entries for one graph.
#[derive(Default)]
pub struct Binding {
    vars: HashMap<usize, Var>,
    trainable: bool,
}

impl Binding {
    /// `trainable`: parameters become gradient-requiring leaves.
    pub fn new(trainable: bool) -> Binding {
        Binding {
            vars: HashMap::new(),
            trainable,
        }
    }
    fn var(&mut self, g: &mut Graph, store: &ParamStore, i: usize) -> Var {
        *self.vars.entry(i).or_insert_with(|| {
            let e = &store.entries[i];
            g.leaf(e.value.clone(), self.trainable && e.kind == Kind::Param)
        })
    }
    /// Takes the accumulated gradients `(store index, grad)` of all bound parameters.
    pub fn take_grads(&self, g: &mut Graph) -> Vec<(usize, Tensor)> {
        let mut v: Vec<(usize, Tensor)> = self
            .vars
            .iter()
            .filter_map(|(&i, &var)| g.take_grad(var).map(|t| (i, t)))
            .collect();
        v.sort_by_key(|(i, _)| *i);
        v
    }
}

/// Minimal normal sampler (Box–Muller) so init needs no extra crate.
mod rand_distr_free {
    use rand::Rng;
    pub fn normal<R: Rng>(rng: &mut R) -> f32 {
        let u1: f64 = rng.random::<f64>().max(1e-300);
        let u2: f64 = rng.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// 2-D convolution layer.
#[derive(Clone, Copy, Debug)]
pub struct Conv2d {
    w: usize,
    b: Option<usize>,
    p: ConvParams,
}

impl Conv2d {
    /// Kaiming-normal (fan_out, ReLU) init as torchvision's ResNet; bias (if any) PyTorch's
    /// default uniform.
    #[allow(clippy::too_many_arguments)]
    pub fn new<R: Rng>(
        store: &mut ParamStore,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        rng: &mut R,
    ) -> Conv2d {
        let std = (2.0 / (cout * k * k) as f32).sqrt();
        let wv: Vec<f32> = (0..cout * cin * k * k).map(|_| normal(rng) * std).collect();
        let w = store.add(
            &format!("{name}.weight"),
            Tensor::from_vec(wv, &[cout, cin, k, k]).unwrap(),
            Kind::Param,
        );
        let b = bias.then(|| {
            let bound = 1.0 / ((cin * k * k) as f32).sqrt();
            let bv: Vec<f32> = (0..cout).map(|_| rng.random_range(-bound..bound)).collect();
            store.add(
                &format!("{name}.bias"),
                Tensor::from_vec(bv, &[cout]).unwrap(),
                Kind::Param,
            )
        });
        Conv2d {
            w,
            b,
            p: ConvParams { stride, padding },
        }
    }
    pub fn forward(
        &self,
        g: &mut Graph,
        store: &ParamStore,
        bind: &mut Binding,
        x: Var,
    ) -> Result<Var> {
        let w = bind.var(g, store, self.w);
        let b = self.b.map(|b| bind.var(g, store, b));
        g.conv2d(x, w, b, self.p)
    }

    /// The graph variables of the weight and bias.
    pub fn vars(
        &self,
        g: &mut Graph,
        store: &ParamStore,
        bind: &mut Binding,
    ) -> (Var, Option<Var>) {
        let w = bind.var(g, store, self.w);
        (w, self.b.map(|b| bind.var(g, store, b)))
    }

    /// `similarity_fusion(self(x), high)` with this layer's variables `(w, b)` ([`Conv2d::vars`]):
    /// for a 1×1 convolution (stride 1, no padding) one graph node ([`Graph::projected_fusion`],
    /// which the CPU computes without the projected map), for others the two ops in turn.
    pub fn fused_with(
        &self,
        g: &mut Graph,
        (w, b): (Var, Option<Var>),
        x: Var,
        high: Var,
    ) -> Result<Var> {
        let k = g.value(w).shape().get(2..).map(|s| s.to_vec());
        if self.p != crate::backend::POINTWISE || k.as_deref() != Some(&[1, 1][..]) {
            let p = g.conv2d(x, w, b, self.p)?;
            return g.similarity_fusion(p, high);
        }
        g.projected_fusion(x, w, b, high)
    }
}

/// Batch norm over channels (eps 1e-5, momentum 0.1, PyTorch running-variance convention).
/// torchvision's integer `num_batches_tracked` is not kept: with a fixed momentum it does not
/// affect computation.
#[derive(Clone, Copy, Debug)]
pub struct BatchNorm2d {
    weight: usize,
    bias: usize,
    running_mean: usize,
    running_var: usize,
}

pub const BN_EPS: f32 = 1e-5;
pub const BN_MOMENTUM: f32 = 0.1;

impl BatchNorm2d {
    pub fn new(store: &mut ParamStore, name: &str, c: usize) -> BatchNorm2d {
        let one = || Tensor::from_vec(vec![1.0; c], &[c]).unwrap();
        let zero = || Tensor::zeros_cpu(&[c]);
        BatchNorm2d {
            weight: store.add(&format!("{name}.weight"), one(), Kind::Param),
            bias: store.add(&format!("{name}.bias"), zero(), Kind::Param),
            running_mean: store.add(&format!("{name}.running_mean"), zero(), Kind::Buffer),
            running_var: store.add(&format!("{name}.running_var"), one(), Kind::Buffer),
        }
    }
    /// Train mode normalises with batch statistics and updates the running ones in `store`.
    /// `act` follows the norm inside the same node (fused on CUDA) in both modes.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        g: &mut Graph,
        store: &mut ParamStore,
        bind: &mut Binding,
        x: Var,
        train: bool,
        act: Act,
    ) -> Result<Var> {
        let w = bind.var(g, store, self.weight);
        let b = bind.var(g, store, self.bias);
        if train {
            let (rm, rv) = store.pair_mut(self.running_mean, self.running_var);
            g.batch_norm_train_running(x, w, b, BN_EPS, rm, rv, BN_MOMENTUM, act)
        } else {
            g.batch_norm_eval(
                x,
                w,
                b,
                store.value(self.running_mean),
                store.value(self.running_var),
                BN_EPS,
                act,
            )
        }
    }
}

/// Fully connected layer with PyTorch's default init.
#[derive(Clone, Copy, Debug)]
pub struct Linear {
    w: usize,
    b: usize,
}

impl Linear {
    pub fn new<R: Rng>(
        store: &mut ParamStore,
        name: &str,
        din: usize,
        dout: usize,
        rng: &mut R,
    ) -> Linear {
        let bound = 1.0 / (din as f32).sqrt();
        let wv: Vec<f32> = (0..din * dout)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let bv: Vec<f32> = (0..dout).map(|_| rng.random_range(-bound..bound)).collect();
        Linear {
            w: store.add(
                &format!("{name}.weight"),
                Tensor::from_vec(wv, &[dout, din]).unwrap(),
                Kind::Param,
            ),
            b: store.add(
                &format!("{name}.bias"),
                Tensor::from_vec(bv, &[dout]).unwrap(),
                Kind::Param,
            ),
        }
    }
    pub fn forward(
        &self,
        g: &mut Graph,
        store: &ParamStore,
        bind: &mut Binding,
        x: Var,
    ) -> Result<Var> {
        let w = bind.var(g, store, self.w);
        let b = bind.var(g, store, self.b);
        g.linear(x, w, Some(b))
    }
    /// Store indices of `(weight, bias)`.
    pub fn indices(&self) -> (usize, usize) {
        (self.w, self.b)
    }
}

/// ResNet BasicBlock: conv3x3-bn-relu-conv3x3-bn (+ shortcut) → relu.
#[derive(Clone, Debug)]
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

impl BasicBlock {
    pub fn new<R: Rng>(
        store: &mut ParamStore,
        name: &str,
        cin: usize,
        cout: usize,
        stride: usize,
        rng: &mut R,
    ) -> BasicBlock {
        let conv1 = Conv2d::new(
            store,
            &format!("{name}.conv1"),
            cin,
            cout,
            3,
            stride,
            1,
            false,
            rng,
        );
        let bn1 = BatchNorm2d::new(store, &format!("{name}.bn1"), cout);
        let conv2 = Conv2d::new(
            store,
            &format!("{name}.conv2"),
            cout,
            cout,
            3,
            1,
            1,
            false,
            rng,
        );
        let bn2 = BatchNorm2d::new(store, &format!("{name}.bn2"), cout);
        let downsample = (stride != 1 || cin != cout).then(|| {
            (
                Conv2d::new(
                    store,
                    &format!("{name}.downsample.0"),
                    cin,
                    cout,
                    1,
                    stride,
                    0,
                    false,
                    rng,
                ),
                BatchNorm2d::new(store, &format!("{name}.downsample.1"), cout),
            )
        });
        BasicBlock {
            conv1,
            bn1,
            conv2,
            bn2,
            downsample,
        }
    }
    pub fn forward(
        &self,
        g: &mut Graph,
        store: &mut ParamStore,
        bind: &mut Binding,
        x: Var,
        train: bool,
    ) -> Result<Var> {
        let h = self.conv1.forward(g, store, bind, x)?;
        let h = self.bn1.forward(g, store, bind, h, train, Act::Relu)?;
        let h = self.conv2.forward(g, store, bind, h)?;
        // The shortcut first, so that the join relu(bn2(h) + shortcut) is part of bn2's node.
        let sc = match &self.downsample {
            Some((c, bn)) => {
                let s = c.forward(g, store, bind, x)?;
                bn.forward(g, store, bind, s, train, Act::None)?
            }
            None => x,
        };
        self.bn2.forward(g, store, bind, h, train, Act::AddRelu(sc))
    }
}

/// MedFuseNet hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    /// Input channels.
    pub in_ch: usize,
    /// Base width `w` (64 = ResNet-18).
    pub width: usize,
    /// Fusion dimension `d`.
    pub d: usize,
    /// Embedding dimension `E`.
    pub emb: usize,
    /// Number of classes `C`.
    pub classes: usize,
    /// 3×3 stride-1 stem without max-pool (for inputs ≤ 64 px) instead of 7×7 s2 + max-pool.
    pub small_stem: bool,
    /// Similarity fusion of layer1 and layer4 (false: heads on pooled layer4 features).
    pub fusion: bool,
}

impl ModelConfig {
    /// The SPEC default stem choice for an input size.
    pub fn small_stem_for(image_size: usize) -> bool {
        image_size <= 64
    }
    /// Dimension of the pooled feature the heads see.
    pub fn feat_dim(&self) -> usize {
        if self.fusion {
            self.d
        } else {
            8 * self.width
        }
    }
}

/// Output of a MedFuseNet forward pass.
pub struct ModelOut {
    /// Class logits `[B, C]`.
    pub logits: Var,
    /// L2-normalised embedding `[B, E]`.
    pub embedding: Var,
    /// Pooled (fused) feature `[B, feat_dim]` the heads read.
    pub feature: Var,
}

/// ResNet-18-style backbone + similarity fusion + classifier and projection heads.
#[derive(Clone, Debug)]
pub struct MedFuseNet {
    pub cfg: ModelConfig,
    pub store: ParamStore,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    layers: Vec<BasicBlock>,
    conv_p: Option<Conv2d>,
    conv_q: Option<Conv2d>,
    fc: Linear,
    proj0: Linear,
    proj2: Linear,
}

impl MedFuseNet {
    /// Builds the model with parameters initialised from `seed`.
    pub fn new(cfg: ModelConfig, seed: u64) -> MedFuseNet {
        let mut rng = crate::rng::stream(seed, "init");
        let mut s = ParamStore::default();
        let w = cfg.width;
        let conv1 = if cfg.small_stem {
            Conv2d::new(&mut s, "conv1", cfg.in_ch, w, 3, 1, 1, false, &mut rng)
        } else {
            Conv2d::new(&mut s, "conv1", cfg.in_ch, w, 7, 2, 3, false, &mut rng)
        };
        let bn1 = BatchNorm2d::new(&mut s, "bn1", w);
        let mut layers = Vec::new();
        let mut cin = w;
        for (li, mult) in [1usize, 2, 4, 8].iter().enumerate() {
            let cout = w * mult;
            let stride = if li == 0 { 1 } else { 2 };
            layers.push(BasicBlock::new(
                &mut s,
                &format!("layer{}.0", li + 1),
                cin,
                cout,
                stride,
                &mut rng,
            ));
            layers.push(BasicBlock::new(
                &mut s,
                &format!("layer{}.1", li + 1),
                cout,
                cout,
                1,
                &mut rng,
            ));
            cin = cout;
        }
        let (conv_p, conv_q) = if cfg.fusion {
            (
                Some(Conv2d::new(
                    &mut s,
                    "fuse.conv_p",
                    w,
                    cfg.d,
                    1,
                    1,
                    0,
                    true,
                    &mut rng,
                )),
                Some(Conv2d::new(
                    &mut s,
                    "fuse.conv_q",
                    8 * w,
                    cfg.d,
                    1,
                    1,
                    0,
                    true,
                    &mut rng,
                )),
            )
        } else {
            (None, None)
        };
        let fd = cfg.feat_dim();
        let fc = Linear::new(&mut s, "fc", fd, cfg.classes, &mut rng);
        let proj0 = Linear::new(&mut s, "proj.0", fd, fd, &mut rng);
        let proj2 = Linear::new(&mut s, "proj.2", fd, cfg.emb, &mut rng);
        MedFuseNet {
            cfg,
            store: s,
            conv1,
            bn1,
            layers,
            conv_p,
            conv_q,
            fc,
            proj0,
            proj2,
        }
    }

    /// An independent copy (no storage shared with `self`), e.g. the initial teacher.
    pub fn deep_clone(&self) -> Result<MedFuseNet> {
        let mut m = self.clone();
        for e in m.store.entries_mut() {
            e.value = e.value.backend()?.scale(&e.value, 1.0)?;
        }
        Ok(m)
    }

    /// Store indices of the classifier `(weight, bias)`.
    pub fn fc_indices(&self) -> (usize, usize) {
        self.fc.indices()
    }

    /// Forward pass. `train` selects batch statistics (and running-stat updates) in BatchNorm.
    pub fn forward(
        &mut self,
        g: &mut Graph,
        bind: &mut Binding,
        x: Var,
        train: bool,
    ) -> Result<ModelOut> {
        let xs = g.value(x).shape().to_vec();
        if xs.len() != 4 || xs[1] != self.cfg.in_ch {
            bail!(
                "model input: expected [N, {}, H, W], got {:?}",
                self.cfg.in_ch,
                xs
            );
        }
        let s = &mut self.store;
        let mut h = self.conv1.forward(g, s, bind, x)?;
        h = self.bn1.forward(g, s, bind, h, train, Act::Relu)?;
        if !self.cfg.small_stem {
            h = g.max_pool2d(
                h,
                PoolParams {
                    kernel: 3,
                    stride: 2,
                    padding: 1,
                },
            )?;
        }
        let mut low = h;
        for (i, blk) in self.layers.iter().enumerate() {
            h = blk.forward(g, s, bind, h, train)?;
            if i == 1 {
                low = h;
            }
        }
        let feat_map = match (&self.conv_p, &self.conv_q) {
            (Some(cp), Some(cq)) => {
                let pv = cp.vars(g, s, bind);
                let q = cq.forward(g, s, bind, h)?;
                cp.fused_with(g, pv, low, q)?
            }
            _ => h,
        };
        let f = g.global_avg_pool(feat_map)?;
        let logits = self.fc.forward(g, s, bind, f)?;
        let e = self.proj0.forward(g, s, bind, f)?;
        let e = g.relu(e)?;
        let e = self.proj2.forward(g, s, bind, e)?;
        let embedding = g.l2_normalize(e)?;
        Ok(ModelOut {
            logits,
            embedding,
            feature: f,
        })
    }

    /// Multiply-accumulate count ×2 (FLOPs) of one forward pass for one image of `h×w`.
    pub fn forward_flops(&self, h: usize, w: usize) -> f64 {
        let c = &self.cfg;
        let conv = |cin: usize, cout: usize, k: usize, ho: usize, wo: usize| {
            2.0 * (cin * cout * k * k * ho * wo) as f64
        };
        let mut fl = 0.0;
        let (mut hh, mut ww) = (h, w);
        if c.small_stem {
            fl += conv(c.in_ch, c.width, 3, hh, ww);
        } else {
            hh = (hh + 6 - 7) / 2 + 1;
            ww = (ww + 6 - 7) / 2 + 1;
            fl += conv(c.in_ch, c.width, 7, hh, ww);
            hh = (hh + 2 - 3) / 2 + 1;
            ww = (ww + 2 - 3) / 2 + 1;
        }
        let (hp, wp) = (hh, ww);
        let mut cin = c.width;
        for (li, mult) in [1usize, 2, 4, 8].iter().enumerate() {
            let cout = c.width * mult;
            for b in 0..2 {
                let stride = if li > 0 && b == 0 { 2 } else { 1 };
                let (ho, wo) = ((hh + 2 - 3) / stride + 1, (ww + 2 - 3) / stride + 1);
                fl += conv(cin, cout, 3, ho, wo) + conv(cout, cout, 3, ho, wo);
                if stride != 1 || cin != cout {
                    fl += conv(cin, cout, 1, ho, wo);
                }
                hh = ho;
                ww = wo;
                cin = cout;
            }
        }
        let fd = c.feat_dim() as f64;
        if c.fusion {
            let (np, nq) = ((hp * wp) as f64, (hh * ww) as f64);
            fl += conv(c.width, c.d, 1, hp, wp) + conv(8 * c.width, c.d, 1, hh, ww);
            fl += 2.0 * 2.0 * np * nq * c.d as f64;
        }
        fl + 2.0 * fd * (c.classes as f64 + fd + c.emb as f64)
    }
}
