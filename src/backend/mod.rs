//! The primitive ops, forward and backward, behind one trait.
//!
//! `cpu` is the reference implementation: plain loops plus a fast GEMM, threaded with rayon.
//! `cuda` (feature `cuda`) implements the same trait with hand-written kernels, cuBLAS and cuDNN,
//! and is checked op by op against `cpu`. Each method states the formula it computes once; the
//! autograd layer (`crate::autograd`) composes them and owns no arithmetic of its own.
//!
//! Conventions: all tensors are contiguous row-major f32; images are NCHW; "rows" are the leading
//! dimensions of a tensor viewed as `[rows, last_dim]`. Integer labels are passed as host slices
//! (`&[usize]`), which a device backend uploads itself, except where the training step produces
//! them on the device (pseudo-labels, the key queue's labels): there they are label tensors, `[n]`
//! f32 tensors holding each class index as a value (see [`label_tensor`]). Scalar losses are `[1]` tensors and the
//! upstream gradient of a scalar loss is a `[1]` tensor on the same device (no host sync).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod shapes;

use crate::error::Result;
use crate::tensor::{Device, Tensor};

/// Parameters of a 2-D convolution (square kernel implied by the weight shape).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvParams {
    pub stride: usize,
    pub padding: usize,
}

/// [`Backend::projected_fusion_fwd`] as the 1×1 projection and then the similarity fusion (the
/// trait's default), keeping `[P̂, Sᵀ]` for the backward.
pub fn projected_fusion_two_ops_fwd<B: Backend + ?Sized>(
    be: &B,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    high: &Tensor,
) -> Result<(Tensor, Vec<Tensor>)> {
    shapes::projected_fusion(x, w, b, high)?;
    let p = be.conv2d_fwd(x, w, b, POINTWISE)?;
    let (y, st) = be.similarity_fusion_fwd(&p, high)?;
    Ok((y, vec![p, st]))
}

/// The backward of [`projected_fusion_two_ops_fwd`] from its `[P̂, Sᵀ]`.
pub fn projected_fusion_two_ops_bwd<B: Backend + ?Sized>(
    be: &B,
    x: &Tensor,
    w: &Tensor,
    has_bias: bool,
    high: &Tensor,
    saved: &[Tensor],
    gy: &Tensor,
) -> Result<(ConvGrads, Tensor)> {
    let [p, st] = saved else {
        crate::bail!(
            "projected_fusion backward: {} saved tensors, expected the projection and S",
            saved.len()
        );
    };
    let (gp, gh) = be.similarity_fusion_bwd(p, high, st, gy)?;
    let gr = be.conv2d_bwd(x, w, &gp, POINTWISE, true, has_bias)?;
    Ok((gr, gh))
}

/// A 1×1 convolution's parameters (stride 1, no padding).
pub const POINTWISE: ConvParams = ConvParams {
    stride: 1,
    padding: 0,
};

/// Parameters of a 2-D max pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PoolParams {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

/// Output of a training-mode batch-norm forward pass.
pub struct BnTrainOut {
    /// Normalised, scaled and shifted output, same shape as the input.
    pub y: Tensor,
    /// Per-channel batch mean `[C]`.
    pub mean: Tensor,
    /// Per-channel `1 / sqrt(var_biased + eps)` `[C]` (kept for the backward pass).
    pub invstd: Tensor,
    /// Per-channel unbiased batch variance `[C]` (for the running-variance update).
    pub var_unbiased: Tensor,
}

/// What follows a train-mode batch norm in the same pass (ResNet's `bn → relu` and
/// `relu(bn + shortcut)`): fused into the normalising kernel on CUDA.
#[derive(Clone, Copy)]
pub enum BnAct<'a> {
    /// The normalised output itself.
    None,
    /// `max(y, 0)`.
    Relu,
    /// `max(y + r, 0)` (a residual join; `r` has the input's shape).
    AddRelu(&'a Tensor),
}

/// Gradients of a convolution.
pub struct ConvGrads {
    pub x: Option<Tensor>,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// Hyper-parameters of one Adam step (PyTorch semantics, L2 weight decay added to the gradient).
#[derive(Clone, Copy, Debug)]
pub struct AdamParams {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number (for bias correction).
    pub step: u64,
}

impl AdamParams {
    /// PyTorch's `torch.optim.Adam` defaults (β = (0.9, 0.999), ε = 1e-8) with the given
    /// learning rate, L2 weight decay and 1-based step.
    pub fn pytorch(lr: f32, weight_decay: f32, step: u64) -> AdamParams {
        AdamParams {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step,
        }
    }
}

/// Hyper-parameters of one SGD step (PyTorch semantics: `buf = μ·buf + (g + wd·p)`, first step
/// `buf = g + wd·p`; `p -= lr·buf`).
#[derive(Clone, Copy, Debug)]
pub struct SgdParams {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    /// True on the first step (momentum buffer initialised to the gradient).
    pub first_step: bool,
}

/// The factors of the DSR weights of `n` unlabelled samples (SPEC §1.4), each a `[n]` vector on
/// the backend's device; an absent factor counts as all ones (see [`Backend::dsr_weights`]).
#[derive(Clone, Copy)]
pub struct DsrFactors<'a> {
    pub n: usize,
    /// Entropy confidence `c`.
    pub conf: Option<&'a Tensor>,
    /// Current meta weights `m` of the batch's samples.
    pub meta: Option<&'a Tensor>,
    /// Alignment scores `a` and step size β of the meta-weight update (used with `meta` only).
    pub align: Option<(&'a Tensor, f32)>,
    /// Class-balance factors `b` (`--dsr-balance class`).
    pub balance: Option<&'a Tensor>,
}

/// Largest class index a label tensor holds exactly (f32 integers are exact below 2^24).
pub const LABEL_MAX: usize = 1 << 24;

/// The values of a label tensor holding `labels`: each class index as an f32 value.
pub fn label_floats(labels: &[usize]) -> Result<Vec<f32>> {
    if let Some(&l) = labels.iter().find(|&&l| l >= LABEL_MAX) {
        crate::bail!(
            "label {l} does not fit a label tensor (at most {})",
            LABEL_MAX - 1
        );
    }
    Ok(labels.iter().map(|&l| l as f32).collect())
}

/// `labels` as a label tensor on `bk`'s device: `[n]`, each class index as an f32 value.
pub fn label_tensor(bk: &dyn Backend, labels: &[usize]) -> Result<Tensor> {
    bk.from_host(&label_floats(labels)?, &[labels.len()])
}

/// The class indices held by the values of a label tensor (`what` names it in errors).
pub fn label_values(v: &[f32], what: &str) -> Result<Vec<usize>> {
    v.iter()
        .enumerate()
        .map(|(i, &x)| {
            if x >= 0.0 && x < LABEL_MAX as f32 && x.fract() == 0.0 {
                Ok(x as usize)
            } else {
                crate::bail!("{what}: element {i} is {x}, not a class index")
            }
        })
        .collect()
}

/// Counters of a backend's whole-step device graphs on the calling thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GraphStats {
    /// Graphs captured.
    pub captures: u64,
    /// Steps launched from a graph (each capture step included).
    pub replays: u64,
    /// Kernel nodes whose scalar arguments were updated before a replay.
    pub node_updates: u64,
    /// Steps that did not match their graph (run again without it).
    pub divergences: u64,
    /// Steps run eagerly to fill the graph's memory arena.
    pub warm_steps: u64,
    /// Work items in the current graph.
    pub nodes: u64,
    /// Shadow steps launched from the graph, and the host time they took from their start to
    /// the graph's launch (their Rust code, checking every work item against the graph). The
    /// device runs none of the step meanwhile, so this time adds to the graph's own.
    pub shadow_steps: u64,
    pub shadow_host_ns: u64,
}

impl GraphStats {
    /// The counts since `before` (an earlier reading on the same thread); `nodes` as now.
    pub fn since(&self, before: &GraphStats) -> GraphStats {
        GraphStats {
            captures: self.captures - before.captures,
            replays: self.replays - before.replays,
            node_updates: self.node_updates - before.node_updates,
            divergences: self.divergences - before.divergences,
            warm_steps: self.warm_steps - before.warm_steps,
            nodes: self.nodes,
            shadow_steps: self.shadow_steps - before.shadow_steps,
            shadow_host_ns: self.shadow_host_ns - before.shadow_host_ns,
        }
    }
}

/// A device-to-host copy issued without waiting for it ([`Backend::to_host_many_later`]).
pub enum HostRead {
    /// The values are on the host already (the CPU backend).
    Ready(Vec<Vec<f32>>),
    /// The copy is queued behind the device's work; [`HostRead::wait`] blocks until it is done.
    Later(Box<dyn PendingRead>),
}

/// The device side of a [`HostRead::Later`].
pub trait PendingRead: Send {
    /// Waits for the copy and returns the tensors' values, in the order they were asked for.
    fn wait(self: Box<Self>) -> Result<Vec<Vec<f32>>>;
}

impl HostRead {
    /// The values, waiting for the copy if it is still queued.
    pub fn wait(self) -> Result<Vec<Vec<f32>>> {
        match self {
            HostRead::Ready(v) => Ok(v),
            HostRead::Later(p) => p.wait(),
        }
    }
    /// Whether the values are on the host already.
    pub fn is_ready(&self) -> bool {
        matches!(self, HostRead::Ready(_))
    }
}

/// The primitive ops. Every method allocates its outputs on the backend's device.
pub trait Backend: Send + Sync {
    /// Short name (`cpu`, `cuda:0`).
    fn name(&self) -> String;
    /// The device this backend computes on.
    fn device(&self) -> Device;

    // ---- memory ----
    /// Copies host data into a new tensor.
    #[allow(clippy::wrong_self_convention)]
    fn from_host(&self, data: &[f32], shape: &[usize]) -> Result<Tensor>;
    /// Copies a tensor to the host.
    fn to_host(&self, t: &Tensor) -> Result<Vec<f32>>;
    /// Copies several tensors to the host at once (on a GPU: packed on the device, then one
    /// transfer and one wait). Each tensor must be on this backend's device.
    fn to_host_many(&self, ts: &[&Tensor]) -> Result<Vec<Vec<f32>>> {
        ts.iter().map(|t| self.to_host(t)).collect()
    }
    /// Like [`Backend::to_host_many`], but the host does not wait: the copy is queued behind
    /// the work issued so far and the caller collects the values later (a training step reads
    /// its loss this way, so that the next step's host work overlaps this step's device work).
    /// The tensors may be dropped as soon as this returns. Backends without a queue read at
    /// once ([`HostRead::Ready`]).
    fn to_host_many_later(&self, ts: &[&Tensor]) -> Result<HostRead> {
        self.to_host_many(ts).map(HostRead::Ready)
    }
    /// A tensor filled with `value`.
    fn full(&self, shape: &[usize], value: f32) -> Result<Tensor>;
    /// Waits until all queued work is done (for timing).
    fn synchronize(&self) -> Result<()>;
    /// Most bytes of tensor (and workspace) memory handed out at once since the last
    /// [`Backend::reset_memory_peak`], where the backend tracks it (the CUDA caching allocator);
    /// `None` where it does not (the CPU backend: use the process's resident set instead).
    fn memory_peak(&self) -> Option<usize> {
        None
    }
    /// Starts a new [`Backend::memory_peak`] window at the bytes in use now.
    fn reset_memory_peak(&self) {}

    // ---- whole-step device graphs (CUDA; no-ops elsewhere) ----
    /// Starts a training step that the backend may capture once and replay as one device graph
    /// (see `backend/cuda/graph.rs`). `owner` identifies the training loop; `stable`: the step
    /// has the shapes of the steps that follow. Every such step ends with
    /// [`Backend::step_graph_end`], or [`Backend::step_graph_abort`] after an error; an
    /// [`Error::GraphDiverged`](crate::Error::GraphDiverged) from the step means that it did not
    /// match its graph, nothing of it ran, and it must be run again without the graph. Returns
    /// whether the step runs under the graph; `false`: an ordinary step, with nothing to end or
    /// abandon.
    fn step_graph_begin(&self, _owner: u64, _stable: bool) -> Result<bool> {
        Ok(false)
    }
    /// Ends a step begun by [`Backend::step_graph_begin`].
    fn step_graph_end(&self) -> Result<()> {
        Ok(())
    }
    /// Abandons a step begun by [`Backend::step_graph_begin`] after an error (`diverged`: an
    /// `Error::GraphDiverged`) and drops its graph. Returns whether none of the step's device
    /// work was issued, i.e. whether the step may be run again without the graph.
    fn step_graph_abort(&self, _diverged: bool) -> bool {
        false
    }
    /// The calling thread's step-graph counters (`None`: no graphs on this backend).
    fn step_graph_stats(&self) -> Option<GraphStats> {
        None
    }

    // ---- elementwise (elementwise.rs / elementwise.cu) ----
    /// `a·x + b·y` (same shapes).
    fn axpby(&self, a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor>;
    /// `s·x`.
    fn scale(&self, x: &Tensor, s: f32) -> Result<Tensor>;
    /// `x ⊙ y` (same shapes).
    fn mul(&self, x: &Tensor, y: &Tensor) -> Result<Tensor>;
    /// `y = max(x, 0)`.
    fn relu_fwd(&self, x: &Tensor) -> Result<Tensor>;
    /// `gx = gy · [y > 0]` (uses the forward output).
    fn relu_bwd(&self, y: &Tensor, gy: &Tensor) -> Result<Tensor>;
    /// `relu(a + b)` (a residual join). The default is `axpby` then `relu_fwd`; the CUDA backend
    /// does it in one pass with the same arithmetic.
    fn add_relu_fwd(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.relu_fwd(&self.axpby(1.0, a, 1.0, b)?)
    }
    /// In place `acc += x` (gradient accumulation; `acc` uniquely owned).
    fn add_assign(&self, acc: &mut Tensor, x: &Tensor) -> Result<()>;
    /// `[1]` tensor holding the sum of all elements.
    fn sum_all(&self, x: &Tensor) -> Result<Tensor>;

    // ---- reductions (reduce.rs / reduce.cu) ----
    /// Column sums of `x` viewed as `[rows, n]` → `[n]` (bias gradients).
    fn sum_rows(&self, x: &Tensor, n: usize) -> Result<Tensor>;
    /// `[N,C,H,W]` → `[N,C]` mean over H·W.
    fn global_avg_pool_fwd(&self, x: &Tensor) -> Result<Tensor>;
    /// Spreads `gy [N,C]` evenly over `[N,C,H,W]`.
    fn global_avg_pool_bwd(&self, gy: &Tensor, x_shape: &[usize]) -> Result<Tensor>;

    // ---- GEMM (gemm.rs: CPU GEMM crate / cuBLAS) ----
    /// Batched matrix product. `a` is `[.., M, K]` (or `[.., K, M]` when `trans_a`), `b` is
    /// `[.., K, N]` (or `[.., N, K]` when `trans_b`); leading dims (0 or 1 of them) must agree.
    /// Returns `[.., M, N]`.
    fn matmul(&self, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor>;
    /// `y = x Wᵀ + b` for `x [N, in]`, `W [out, in]`, `b [out]`.
    fn linear_fwd(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor>;

    // ---- convolution (conv.rs: im2col + GEMM / cuDNN) ----
    /// Cross-correlation of `x [N,Cin,H,W]` with `w [Cout,Cin,k,k]` plus optional bias `[Cout]`.
    fn conv2d_fwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        p: ConvParams,
    ) -> Result<Tensor>;
    /// Gradients of `conv2d_fwd` for upstream `gy`; `gx` only when `need_x`, `gb` only when
    /// `has_bias`.
    fn conv2d_bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        gy: &Tensor,
        p: ConvParams,
        need_x: bool,
        has_bias: bool,
    ) -> Result<ConvGrads>;

    // ---- normalisation (norm.rs / norm.cu) ----
    /// Train-mode batch norm over N·H·W per channel: `y = γ (x − μ)/√(σ²_b + ε) + β`.
    fn batch_norm_train_fwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<BnTrainOut>;
    /// [`Backend::batch_norm_train_fwd`] plus PyTorch's running-statistics update of
    /// `running_mean` and `running_var`: `(1 − m)·running_mean + m·μ` and
    /// `(1 − m)·running_var + m·σ²_unbiased` (the CUDA backend updates them in place), and the
    /// activation `act` applied to the output (`BnTrainOut::y` is then the activation's output).
    /// The default is the forward pass, two `axpby` and `relu_fwd` / `add_relu_fwd(y, r)`; the
    /// CUDA backend does the update inside its statistics kernel and the activation inside its
    /// normalising kernel (four launches fewer per `bn → relu` layer), with the same arithmetic.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_train_fwd_running(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
        running_mean: &mut Tensor,
        running_var: &mut Tensor,
        momentum: f32,
        act: BnAct<'_>,
    ) -> Result<BnTrainOut> {
        let mut o = self.batch_norm_train_fwd(x, gamma, beta, eps)?;
        let m = momentum;
        let rm = self.axpby(1.0 - m, running_mean, m, &o.mean)?;
        let rv = self.axpby(1.0 - m, running_var, m, &o.var_unbiased)?;
        o.y = match act {
            BnAct::None => o.y,
            BnAct::Relu => self.relu_fwd(&o.y)?,
            BnAct::AddRelu(r) => self.add_relu_fwd(&o.y, r)?,
        };
        *running_mean = rm;
        *running_var = rv;
        Ok(o)
    }
    /// Gradients `(gx, gγ, gβ)` of the train-mode forward (batch statistics depend on x).
    fn batch_norm_train_bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        mean: &Tensor,
        invstd: &Tensor,
        gy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)>;
    /// Gradients `(gx, gγ, gβ)` of `relu(batch_norm_train(x) [+ r])` from the ReLU's output `y`
    /// and its output gradient `gy`, plus, when `keep_masked` (a residual join), the masked
    /// gradient `gy · [y > 0]` that is also `r`'s gradient. The default is `relu_bwd` then
    /// [`Backend::batch_norm_train_bwd`]; the CUDA backend applies the ReLU mask inside the
    /// batch-norm kernels (same arithmetic, one launch fewer).
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_train_relu_bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        mean: &Tensor,
        invstd: &Tensor,
        y: &Tensor,
        gy: &Tensor,
        keep_masked: bool,
    ) -> Result<(Tensor, Tensor, Tensor, Option<Tensor>)> {
        let gm = self.relu_bwd(y, gy)?;
        let (gx, gg, gb) = self.batch_norm_train_bwd(x, gamma, mean, invstd, &gm)?;
        Ok((gx, gg, gb, keep_masked.then_some(gm)))
    }
    /// Eval-mode batch norm with running statistics, followed by `act` (the CUDA backend applies
    /// it in the same launch, with the bits of a separate `relu_fwd` / `add_relu_fwd`).
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_eval_fwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        running_mean: &Tensor,
        running_var: &Tensor,
        eps: f32,
        act: BnAct<'_>,
    ) -> Result<Tensor>;
    /// Gradients `(gx, gγ, gβ)` of the eval-mode forward (statistics are constants).
    fn batch_norm_eval_bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        running_mean: &Tensor,
        running_var: &Tensor,
        eps: f32,
        gy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)>;
    /// `[rows, n]` L2-normalise each row: `y = x / max(‖x‖, 1e-12)` (PyTorch `F.normalize`).
    fn l2_normalize_fwd(&self, x: &Tensor) -> Result<Tensor>;
    /// Gradient of `l2_normalize_fwd`.
    fn l2_normalize_bwd(&self, x: &Tensor, gy: &Tensor) -> Result<Tensor>;

    // ---- pooling (pool.rs / pool.cu) ----
    /// Max pool with implicit −∞ padding.
    fn max_pool2d_fwd(&self, x: &Tensor, p: PoolParams) -> Result<Tensor>;
    /// Routes `gy` to the first maximum of each window (recomputed from `x`).
    fn max_pool2d_bwd(&self, x: &Tensor, gy: &Tensor, p: PoolParams) -> Result<Tensor>;

    // ---- softmax and cross-entropy (softmax_xent.rs / softmax_xent.cu), over the last dim ----
    fn softmax_fwd(&self, x: &Tensor) -> Result<Tensor>;
    /// `gx = y ⊙ (gy − Σ gy⊙y)`.
    fn softmax_bwd(&self, y: &Tensor, gy: &Tensor) -> Result<Tensor>;
    fn log_softmax_fwd(&self, x: &Tensor) -> Result<Tensor>;
    /// `gx = gy − softmax(x) Σ gy` (uses the forward output `y`).
    fn log_softmax_bwd(&self, y: &Tensor, gy: &Tensor) -> Result<Tensor>;
    /// Mean cross-entropy of `logits [B,C]` against `labels` → `[1]`.
    fn cross_entropy_fwd(&self, logits: &Tensor, labels: &[usize]) -> Result<Tensor>;
    /// `glogits = g · (softmax(logits) − onehot) / B`, `g` the `[1]` upstream gradient.
    fn cross_entropy_bwd(&self, logits: &Tensor, labels: &[usize], g: &Tensor) -> Result<Tensor>;

    // ---- SSL losses (ssl_losses.rs / ssl_losses.cu) ----
    /// `c_i = 1 − H(softmax(z_i)) / ln C` → `[B]`.
    fn entropy_weight(&self, logits: &Tensor) -> Result<Tensor>;
    /// `(1/B) Σ_i w_i ‖softmax(zs_i) − softmax(zt_i)‖²` → `[1]`.
    fn weighted_consistency_fwd(&self, zs: &Tensor, zt: &Tensor, w: &Tensor) -> Result<Tensor>;
    /// Gradient with respect to the student logits `zs` (teacher and weights are constants).
    fn weighted_consistency_bwd(
        &self,
        zs: &Tensor,
        zt: &Tensor,
        w: &Tensor,
        g: &Tensor,
    ) -> Result<Tensor>;
    /// Pseudo-labels: the index of the first largest element of each row of `z [B, C]` (NaN never
    /// wins) → a `[B]` label tensor.
    fn argmax_rows(&self, z: &Tensor) -> Result<Tensor>;
    /// Pseudo-label guided contrastive loss (SPEC §1.5) → `[1]`; labels are label tensors.
    #[allow(clippy::too_many_arguments)]
    fn pgc_loss_fwd(
        &self,
        q: &Tensor,
        q_labels: &Tensor,
        q_w: &Tensor,
        keys: &Tensor,
        k_labels: &Tensor,
        k_w: &Tensor,
        tau: f32,
    ) -> Result<Tensor>;
    /// Gradient of the PGC loss with respect to the queries `q` (keys are constants).
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<Tensor>;
    /// `[a; b[..b_rows]]` for `a [Ra, E]` and `b [Rb, E]`, `b_rows ≤ Rb`: the PGC key set, the
    /// batch's keys followed by the valid rows of the key queue.
    fn concat_rows(&self, a: &Tensor, b: &Tensor, b_rows: usize) -> Result<Tensor>;
    /// DSR weights with the meta-weight update: `m'_i = clamp(m_i + β a_i, 0, 1)` (`m' = m`
    /// without `align`), `w_i = (c_i · m'_i) · b_i` → `(w [n], m' [n])`, `m'` only when `meta` is
    /// given. Each operation rounded once, so every backend gives the same bits.
    fn dsr_weights(&self, f: &DsrFactors<'_>) -> Result<(Tensor, Option<Tensor>)>;
    /// Key-queue enqueue, in place: row `r` of `src [R, E]` goes to row `(start + r) mod K` of the
    /// ring `dst [K, E]`; `R ≤ K` (a larger batch would overwrite its own rows).
    fn ring_write_rows(&self, dst: &mut Tensor, src: &Tensor, start: usize) -> Result<()>;
    /// DSR alignment `a_i = (1/B_l) Σ_j ((p_j − e_{y_j})·(p_i − e_{ŷ_i})) (f_j·f_i + 1)` with
    /// `p = softmax(fc(f))` → `[B_u]`; the pseudo-labels `ŷ` are a label tensor.
    #[allow(clippy::too_many_arguments)]
    fn dsr_alignment(
        &self,
        feat_lab: &Tensor,
        y_lab: &[usize],
        feat_unl: &Tensor,
        pseudo: &Tensor,
        fc_w: &Tensor,
        fc_b: &Tensor,
    ) -> Result<Tensor>;

    // ---- fusion (fusion.rs; on CUDA cuBLAS products and the softmax_xent.cu row softmax) ----
    /// MedFuseNet similarity fusion: `low [B,d,Hp,Wp]`, `high [B,d,Hq,Wq]`;
    /// `S = softmax_i(P̂ᵀQ̂/√d)` over low positions `i`; `y = Q̂ + P̂ S` shaped like `high`.
    /// Returns `(y, Sᵀ)`, `Sᵀ [B, Hq·Wq, Hp·Wp]` (each softmax a row) for the backward; zeros
    /// where the maps have no channels or no low positions (the backward then uses none).
    fn similarity_fusion_fwd(&self, low: &Tensor, high: &Tensor) -> Result<(Tensor, Tensor)>;
    /// Gradients `(glow, ghigh)`, from the forward's `Sᵀ` `st`.
    fn similarity_fusion_bwd(
        &self,
        low: &Tensor,
        high: &Tensor,
        st: &Tensor,
        gy: &Tensor,
    ) -> Result<(Tensor, Tensor)>;

    /// The similarity fusion of a projected low-level map, `similarity_fusion(conv2d(x, w, b),
    /// high)` with the 1×1 projection `w [d, c, 1, 1]` (`b [d]`) of `x [B, c, Hp, Wp]`: returns `y`
    /// and what the backward needs. By default the two ops in turn (keeping the projection and
    /// `Sᵀ`); the CPU computes it without the projected map (`cpu/fusion.rs`).
    fn projected_fusion_fwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        high: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        projected_fusion_two_ops_fwd(self, x, w, b, high)
    }
    /// Gradients `(x, w, b)` and of `high` of [`Backend::projected_fusion_fwd`] from its saved
    /// tensors, for upstream `gy`.
    fn projected_fusion_bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        has_bias: bool,
        high: &Tensor,
        saved: &[Tensor],
        gy: &Tensor,
    ) -> Result<(ConvGrads, Tensor)> {
        projected_fusion_two_ops_bwd(self, x, w, has_bias, high, saved, gy)
    }

    // ---- optimisers and EMA (optim.rs / optim.cu), in place ----
    /// `teacher ← α·teacher + (1 − α)·student`.
    fn ema_update(&self, teacher: &mut Tensor, student: &Tensor, alpha: f32) -> Result<()>;
    /// One SGD step on `param` with momentum buffer `buf`.
    fn sgd_step(
        &self,
        param: &mut Tensor,
        grad: &Tensor,
        buf: &mut Tensor,
        p: SgdParams,
    ) -> Result<()>;
    /// One Adam step on `param` with moments `m`, `v`.
    fn adam_step(
        &self,
        param: &mut Tensor,
        grad: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        p: AdamParams,
    ) -> Result<()>;

    // ---- multi-tensor forms: one call for a whole model (CUDA: a few launches in all) ----
    /// [`Backend::add_assign`] on every `(acc, x)` pair (gradient accumulation of a model's
    /// parameters). The default calls `add_assign` per pair; results are identical either way.
    fn add_assign_multi(&self, pairs: &mut [(&mut Tensor, &Tensor)]) -> Result<()> {
        for (acc, x) in pairs.iter_mut() {
            self.add_assign(acc, x)?;
        }
        Ok(())
    }
    /// [`Backend::ema_update`] on every `(teacher, student)` pair, with the same `α`. The
    /// default calls `ema_update` per pair; results are identical either way.
    fn ema_update_multi(&self, pairs: &mut [(&mut Tensor, &Tensor)], alpha: f32) -> Result<()> {
        for (t, s) in pairs.iter_mut() {
            self.ema_update(t, s, alpha)?;
        }
        Ok(())
    }
    /// [`Backend::adam_step`] on every slot (`state2` is `v`), with the same hyper-parameters.
    fn adam_step_multi(&self, slots: &mut [OptSlot<'_>], p: AdamParams) -> Result<()> {
        for s in slots.iter_mut() {
            let v = s
                .state2
                .as_deref_mut()
                .ok_or_else(|| crate::error::Error::msg("adam_step_multi: a slot has no v"))?;
            self.adam_step(s.param, s.grad, s.state, v, p)?;
        }
        Ok(())
    }
    /// [`Backend::sgd_step`] on every slot (`state` is the momentum buffer), with the same
    /// hyper-parameters.
    fn sgd_step_multi(&self, slots: &mut [OptSlot<'_>], p: SgdParams) -> Result<()> {
        for s in slots.iter_mut() {
            self.sgd_step(s.param, s.grad, s.state, p)?;
        }
        Ok(())
    }
}

/// One parameter tensor of a multi-tensor optimiser step: the parameter, its gradient and its
/// state (Adam: `state` = m, `state2` = v; SGD: `state` = momentum buffer, `state2` unused).
pub struct OptSlot<'a> {
    pub param: &'a mut Tensor,
    pub grad: &'a Tensor,
    pub state: &'a mut Tensor,
    pub state2: Option<&'a mut Tensor>,
}

/// The backend for `device`. CPU always exists; CUDA needs the `cuda` feature, a driver and a
/// device, and otherwise returns an error that says which is missing.
pub fn get(device: Device) -> Result<&'static dyn Backend> {
    match device {
        Device::Cpu => Ok(cpu::CpuBackend::get()),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => cuda::CudaBackend::get(i),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(crate::error::Error::msg(
            "this build has no CUDA support: rebuild with `--features cuda`",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_tensors_hold_class_indices_as_values() {
        let bk = get(Device::Cpu).unwrap();
        let t = label_tensor(bk, &[0, 6, 3, LABEL_MAX - 1]).unwrap();
        assert_eq!(t.shape(), &[4]);
        let v = t.to_vec().unwrap();
        assert_eq!(v, vec![0.0, 6.0, 3.0, (LABEL_MAX - 1) as f32]);
        assert_eq!(label_values(&v, "t").unwrap(), vec![0, 6, 3, LABEL_MAX - 1]);
        assert!(label_tensor(bk, &[LABEL_MAX]).is_err());
        for bad in [-1.0, 0.5, f32::NAN, f32::INFINITY, LABEL_MAX as f32] {
            let e = label_values(&[1.0, bad], "queue labels")
                .unwrap_err()
                .to_string();
            assert!(e.contains("queue labels") && e.contains("element 1"), "{e}");
        }
    }
    /// The fusion's forward hands its similarity `Sᵀ [B, Nq, Np]` (each row a softmax) to the
    /// backward, which refuses one of another shape by name; maps with no channels give zeros.
    #[test]
    fn fusion_similarity_goes_from_forward_to_backward() {
        let bk = get(Device::Cpu).unwrap();
        let val = |n: usize, s: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + s) % 101) as f32 / 50.0 - 1.0)
                .collect()
        };
        let low = Tensor::from_vec(val(2 * 4 * 15, 1), &[2, 4, 3, 5]).unwrap();
        let high = Tensor::from_vec(val(2 * 4 * 2, 2), &[2, 4, 2, 1]).unwrap();
        let (y, st) = bk.similarity_fusion_fwd(&low, &high).unwrap();
        assert_eq!(
            (y.shape(), st.shape()),
            (&[2, 4, 2, 1][..], &[2, 2, 15][..])
        );
        for row in st.to_vec().unwrap().chunks(15) {
            let s: f32 = row.iter().sum();
            assert!(
                (s - 1.0).abs() < 1e-6 && row.iter().all(|&v| v > 0.0),
                "{row:?}"
            );
        }
        let gy = Tensor::from_vec(val(16, 3), &[2, 4, 2, 1]).unwrap();
        let (gl, gh) = bk.similarity_fusion_bwd(&low, &high, &st, &gy).unwrap();
        assert_eq!((gl.shape(), gh.shape()), (low.shape(), high.shape()));
        let wrong = Tensor::from_vec(vec![0.0; 60], &[2, 15, 2]).unwrap();
        let e = bk
            .similarity_fusion_bwd(&low, &high, &wrong, &gy)
            .unwrap_err()
            .to_string();
        assert!(e.contains("similarity") && e.contains("[2, 2, 15]"), "{e}");
        let none = Tensor::from_vec(vec![], &[2, 0, 3, 5]).unwrap();
        let hnone = Tensor::from_vec(vec![], &[2, 0, 2, 1]).unwrap();
        let (_, st) = bk.similarity_fusion_fwd(&none, &hnone).unwrap();
        assert_eq!(st.shape(), &[2, 2, 15]);
        assert!(st.to_vec().unwrap().iter().all(|&v| v == 0.0));
    }
    /// The CPU's projected fusion (computed without the projected map) against the two ops in
    /// turn (the trait's default, which the CUDA backend runs): the output, the gradients of the
    /// low-level map, the projection's weight and bias and the high-level map, relative to each
    /// one's largest value, on odd sizes, batch 1, a batch in several weight-gradient parts (37
    /// images) and no bias; the same bits on 1, 2 and 3 threads. Inputs the two ops refuse are refused with their messages.
    #[test]
    fn projected_fusion_matches_the_two_ops() {
        let bk = get(Device::Cpu).unwrap();
        let val = |n: usize, s: usize, a: f32| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + s * 104_729) % 2003) as f32 / 1001.0 - 1.0) * a)
                .collect()
        };
        let t = |v: Vec<f32>, s: &[usize]| Tensor::from_vec(v, s).unwrap();
        for (b, c, d, hp, wp, hq, wq, bias) in [
            (2, 5, 8, 6, 7, 3, 2, true),
            (1, 3, 4, 5, 5, 1, 1, true),
            (37, 4, 6, 3, 4, 2, 2, true),
            (3, 16, 128, 28, 28, 4, 4, true),
            (2, 5, 8, 6, 7, 3, 2, false),
        ] {
            let what = format!("b{b} c{c} d{d} {hp}x{wp} -> {hq}x{wq} bias {bias}");
            let x = t(val(b * c * hp * wp, 1, 1.0), &[b, c, hp, wp]);
            let w = t(val(d * c, 2, 0.5), &[d, c, 1, 1]);
            let bv = t(val(d, 3, 0.5), &[d]);
            let q = t(val(b * d * hq * wq, 4, 1.0), &[b, d, hq, wq]);
            let gy = t(val(b * d * hq * wq, 5, 1.0), &[b, d, hq, wq]);
            let bo = bias.then_some(&bv);
            let p = bk.conv2d_fwd(&x, &w, bo, POINTWISE).unwrap();
            let (y0, st) = bk.similarity_fusion_fwd(&p, &q).unwrap();
            let (gp, gq0) = bk.similarity_fusion_bwd(&p, &q, &st, &gy).unwrap();
            let g0 = bk.conv2d_bwd(&x, &w, &gp, POINTWISE, true, bias).unwrap();
            let run = || {
                let (y, saved) = bk.projected_fusion_fwd(&x, &w, bo, &q).unwrap();
                let (g, gq) = bk
                    .projected_fusion_bwd(&x, &w, bias, &q, &saved, &gy)
                    .unwrap();
                (y, g, gq)
            };
            let (y1, g1, gq1) = run();
            let mut pairs = vec![
                ("y", y1.clone(), y0),
                ("gx", g1.x.clone().unwrap(), g0.x.unwrap()),
                ("gw", g1.weight.clone(), g0.weight),
                ("gq", gq1.clone(), gq0),
            ];
            if bias {
                pairs.push(("gb", g1.bias.clone().unwrap(), g0.bias.unwrap()));
            } else {
                assert!(g1.bias.is_none());
            }
            for (name, got, want) in pairs {
                assert_eq!(got.shape(), want.shape(), "{name} of {what}");
                let (got, want) = (got.to_vec().unwrap(), want.to_vec().unwrap());
                let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                for (i, (a, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - e).abs() <= 2e-5 * scale,
                        "{name}[{i}] of {what}: {a} against {e} (scale {scale})"
                    );
                }
            }
            let bits = |v: &Tensor| -> Vec<u32> {
                v.to_vec().unwrap().iter().map(|f| f.to_bits()).collect()
            };
            let one = [
                bits(&y1),
                bits(g1.x.as_ref().unwrap()),
                bits(&g1.weight),
                bits(&gq1),
            ];
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let (y, g, gq) = pool.install(run);
                let got = [
                    bits(&y),
                    bits(g.x.as_ref().unwrap()),
                    bits(&g.weight),
                    bits(&gq),
                ];
                assert!(got == one, "{what}: bits differ on {threads} threads");
            }
        }
        let x = t(vec![], &[2, 5, 0, 7]);
        let (w, q) = (
            t(val(40, 2, 0.5), &[8, 5, 1, 1]),
            t(val(96, 4, 1.0), &[2, 8, 3, 2]),
        );
        let e = bk
            .projected_fusion_fwd(&x, &w, None, &q)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("conv2d") && e.contains("does not fit input"),
            "{e}"
        );
        let x = t(val(2 * 5 * 42, 1, 1.0), &[2, 5, 6, 7]);
        let q = t(val(108, 4, 1.0), &[2, 9, 3, 2]);
        let e = bk
            .projected_fusion_fwd(&x, &w, None, &q)
            .unwrap_err()
            .to_string();
        assert!(e.contains("differ in batch or channels"), "{e}");
        let w3 = t(val(8 * 5 * 9, 2, 0.5), &[8, 5, 3, 3]);
        let q = t(val(96, 4, 1.0), &[2, 8, 3, 2]);
        let e = bk
            .projected_fusion_fwd(&x, &w3, None, &q)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1×1"), "{e}");
    }
}
