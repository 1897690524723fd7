//! A small tape-based reverse-mode autograd.
//!
//! A [`Graph`] records every value produced in a step as a node. Ops that depend on a
//! gradient-requiring input also record a backward closure, next to their forward call, that maps
//! the upstream gradient to one gradient per input. [`Graph::backward`] walks the nodes in reverse
//! order of creation (a valid topological order, since inputs always precede outputs), sums the
//! gradients flowing into each node (shared subgraphs), and adds the gradients of leaves into
//! persistent per-leaf buffers (accumulation across several `backward` calls). Inside
//! [`Graph::no_grad`] nothing is recorded.

use crate::backend::{Backend, BnAct, BnTrainOut, ConvParams, PoolParams};
use crate::bail;
use crate::error::Result;
use crate::tensor::Tensor;

/// A handle to a value recorded in a [`Graph`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(usize);

impl Var {
    pub fn index(self) -> usize {
        self.0
    }
}

/// What [`Graph::batch_norm_train_running`] and [`Graph::batch_norm_eval`] apply to the normalised
/// output in the same node (see [`BnAct`]); the residual of `AddRelu` is a node of the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    AddRelu(Var),
}

/// Maps the upstream gradient to one optional gradient per parent; `needs[i]` says whether
/// parent `i` wants one (so expensive unused gradients are skipped).
type BackwardFn = Box<dyn Fn(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>>>;

struct Node {
    value: Tensor,
    parents: Vec<Var>,
    backward: Option<BackwardFn>,
    requires_grad: bool,
}

/// The tape of one step.
pub struct Graph {
    nodes: Vec<Node>,
    /// Accumulated gradients of leaves that require one.
    leaf_grads: Vec<Option<Tensor>>,
    grad_enabled: bool,
}

impl Default for Graph {
    fn default() -> Self {
        Self::new()
    }
}

impl Graph {
    pub fn new() -> Graph {
        Graph {
            nodes: Vec::new(),
            leaf_grads: Vec::new(),
            grad_enabled: true,
        }
    }

    /// Number of recorded nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Records an input. Leaves with `requires_grad` receive gradients in [`Graph::grad`].
    pub fn leaf(&mut self, value: Tensor, requires_grad: bool) -> Var {
        self.nodes.push(Node {
            value,
            parents: Vec::new(),
            backward: None,
            requires_grad,
        });
        self.leaf_grads.push(None);
        Var(self.nodes.len() - 1)
    }

    /// Records a constant (never receives a gradient).
    pub fn constant(&mut self, value: Tensor) -> Var {
        self.leaf(value, false)
    }

    pub fn value(&self, v: Var) -> &Tensor {
        &self.nodes[v.0].value
    }

    pub fn requires_grad(&self, v: Var) -> bool {
        self.nodes[v.0].requires_grad
    }

    /// The accumulated gradient of a leaf, if any `backward` reached it.
    pub fn grad(&self, v: Var) -> Option<&Tensor> {
        self.leaf_grads[v.0].as_ref()
    }

    /// Takes the accumulated gradient of a leaf out of the graph.
    pub fn take_grad(&mut self, v: Var) -> Option<Tensor> {
        self.leaf_grads[v.0].take()
    }

    /// Whether ops are currently recorded for differentiation.
    pub fn grad_enabled(&self) -> bool {
        self.grad_enabled
    }

    /// Runs `f` with recording switched off (values are still computed and stored).
    pub fn no_grad<R>(&mut self, f: impl FnOnce(&mut Graph) -> R) -> R {
        let prev = self.grad_enabled;
        self.grad_enabled = false;
        let r = f(self);
        self.grad_enabled = prev;
        r
    }

    /// Records an op output. The backward closure is kept only when some parent requires a
    /// gradient and recording is on.
    pub fn push(&mut self, value: Tensor, parents: &[Var], backward: BackwardFn) -> Var {
        let requires_grad =
            self.grad_enabled && parents.iter().any(|p| self.nodes[p.0].requires_grad);
        self.nodes.push(Node {
            value,
            parents: if requires_grad {
                parents.to_vec()
            } else {
                Vec::new()
            },
            backward: if requires_grad { Some(backward) } else { None },
            requires_grad,
        });
        self.leaf_grads.push(None);
        Var(self.nodes.len() - 1)
    }

    /// Back-propagates from a scalar (`[1]`) root with upstream gradient 1.
    pub fn backward(&mut self, root: Var) -> Result<()> {
        let v = self.value(root);
        if v.numel() != 1 {
            bail!(
                "backward() needs a scalar root, got shape {:?}; use backward_with",
                v.shape()
            );
        }
        let one = v.backend()?.full(v.shape(), 1.0)?;
        self.backward_with(root, one)
    }

    /// Back-propagates from `root` with the given upstream gradient.
    pub fn backward_with(&mut self, root: Var, grad: Tensor) -> Result<()> {
        if grad.shape() != self.value(root).shape() {
            bail!(
                "backward_with: gradient shape {:?} differs from the root's {:?}",
                grad.shape(),
                self.value(root).shape()
            );
        }
        if !self.nodes[root.0].requires_grad {
            bail!("backward: the root does not depend on any tensor that requires a gradient");
        }
        let mut grads: Vec<Option<Tensor>> = vec![None; root.0 + 1];
        grads[root.0] = Some(grad);
        // Contributions to leaves (parameters, inputs) are summed after the sweep, in arrival
        // order, by one multi-tensor call per round (`Backend::add_assign_multi`: a few launches
        // on CUDA instead of one per parameter used by two forward passes).
        let mut leaf_parts: Vec<Vec<Tensor>> = vec![Vec::new(); root.0 + 1];
        for i in (0..=root.0).rev() {
            let node = &self.nodes[i];
            let Some(f) = &node.backward else {
                // A leaf: the root itself when it is one, else its parts from its consumers.
                if let Some(g) = grads[i].take() {
                    leaf_parts[i].insert(0, g);
                }
                if !node.requires_grad {
                    leaf_parts[i].clear();
                }
                continue;
            };
            let Some(g) = grads[i].take() else { continue };
            let needs: Vec<bool> = node
                .parents
                .iter()
                .map(|p| self.nodes[p.0].requires_grad)
                .collect();
            let pg = f(&g, &needs)?;
            for ((p, need), gp) in node.parents.iter().zip(&needs).zip(pg) {
                if let (true, Some(gp)) = (need, gp) {
                    if gp.shape() != self.nodes[p.0].value.shape() {
                        bail!(
                            "internal: gradient {:?} for a value of shape {:?}",
                            gp.shape(),
                            self.nodes[p.0].value.shape()
                        );
                    }
                    if self.nodes[p.0].backward.is_none() {
                        leaf_parts[p.0].push(gp);
                    } else {
                        accumulate(&mut grads[p.0], gp)?;
                    }
                }
            }
        }
        self.sum_leaf_parts(leaf_parts)
    }

    /// Adds each leaf's gradient parts (in arrival order) into its accumulated gradient.
    fn sum_leaf_parts(&mut self, parts: Vec<Vec<Tensor>>) -> Result<()> {
        let mut sums: Vec<(usize, Tensor, std::vec::IntoIter<Tensor>)> = Vec::new();
        for (i, p) in parts.into_iter().enumerate() {
            let mut rest = p.into_iter();
            if let Some(mut first) = rest.next() {
                if rest.len() > 0 && first.storage_mut().is_err() {
                    // A part may share storage with another value (e.g. a pass-through): copy
                    // before adding in place.
                    first = first.backend()?.scale(&first, 1.0)?;
                }
                sums.push((i, first, rest));
            }
        }
        loop {
            let mut round: Vec<(&mut Tensor, Tensor)> = sums
                .iter_mut()
                .filter_map(|(_, acc, rest)| rest.next().map(|x| (acc, x)))
                .collect();
            let Some(bk) = round.first().map(|(_, x)| x.backend()).transpose()? else {
                break;
            };
            let mut pairs: Vec<(&mut Tensor, &Tensor)> =
                round.iter_mut().map(|(acc, x)| (&mut **acc, &*x)).collect();
            bk.add_assign_multi(&mut pairs)?;
        }
        for (i, g, _) in sums {
            accumulate(&mut self.leaf_grads[i], g)?;
        }
        Ok(())
    }
}

fn accumulate(slot: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    match slot {
        None => *slot = Some(g),
        Some(acc) => {
            let be = acc.backend()?;
            // Gradients handed out by backward closures may share storage with other values
            // (e.g. a pass-through); copy on first accumulation so the add is in place safely.
            if acc.storage_mut().is_err() {
                *acc = be.scale(acc, 1.0)?;
            }
            be.add_assign(acc, &g)?;
        }
    }
    Ok(())
}

fn be(t: &Tensor) -> Result<&'static dyn Backend> {
    t.backend()
}

/// Differentiable ops. Each states its backward rule next to its forward call.
impl Graph {
    /// `a + b` (same shapes).
    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let y = be(self.value(a))?.axpby(1.0, self.value(a), 1.0, self.value(b))?;
        // d(a+b) = (g, g)
        Ok(self.push(
            y,
            &[a, b],
            Box::new(|g, _| Ok(vec![Some(g.clone()), Some(g.clone())])),
        ))
    }

    /// `α·a + β·b` (same shapes).
    pub fn axpby(&mut self, alpha: f32, a: Var, beta: f32, b: Var) -> Result<Var> {
        let bk = be(self.value(a))?;
        let y = bk.axpby(alpha, self.value(a), beta, self.value(b))?;
        Ok(self.push(
            y,
            &[a, b],
            Box::new(move |g, n| {
                Ok(vec![
                    if n[0] {
                        Some(bk.scale(g, alpha)?)
                    } else {
                        None
                    },
                    if n[1] { Some(bk.scale(g, beta)?) } else { None },
                ])
            }),
        ))
    }

    /// `s·x`.
    pub fn scale(&mut self, x: Var, s: f32) -> Result<Var> {
        let bk = be(self.value(x))?;
        let y = bk.scale(self.value(x), s)?;
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _| Ok(vec![Some(bk.scale(g, s)?)])),
        ))
    }

    /// Same data, new shape.
    pub fn reshape(&mut self, x: Var, shape: &[usize]) -> Result<Var> {
        let old = self.value(x).shape().to_vec();
        let y = self.value(x).reshape(shape)?;
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _| Ok(vec![Some(g.reshape(&old)?)])),
        ))
    }

    /// ReLU; backward masks with the saved output.
    pub fn relu(&mut self, x: Var) -> Result<Var> {
        let bk = be(self.value(x))?;
        let y = bk.relu_fwd(self.value(x))?;
        let ys = y.clone();
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _| Ok(vec![Some(bk.relu_bwd(&ys, g)?)])),
        ))
    }

    /// `relu(a + b)` (same shapes), one node and, on CUDA, one launch.
    pub fn add_relu(&mut self, a: Var, b: Var) -> Result<Var> {
        let bk = be(self.value(a))?;
        let y = bk.add_relu_fwd(self.value(a), self.value(b))?;
        let ys = y.clone();
        // d relu(a+b) = (g·[y>0], g·[y>0])
        Ok(self.push(
            y,
            &[a, b],
            Box::new(move |g, _| {
                let gx = bk.relu_bwd(&ys, g)?;
                Ok(vec![Some(gx.clone()), Some(gx)])
            }),
        ))
    }

    /// 2-D convolution with optional bias.
    pub fn conv2d(&mut self, x: Var, w: Var, b: Option<Var>, p: ConvParams) -> Result<Var> {
        let (xt, wt) = (self.value(x).clone(), self.value(w).clone());
        let bk = be(&xt)?;
        let y = bk.conv2d_fwd(&xt, &wt, b.map(|b| self.value(b)), p)?;
        let mut parents = vec![x, w];
        parents.extend(b);
        let has_bias = b.is_some();
        Ok(self.push(
            y,
            &parents,
            Box::new(move |g, n| {
                let gr = bk.conv2d_bwd(&xt, &wt, g, p, n[0], has_bias)?;
                let mut v = vec![gr.x, Some(gr.weight)];
                if has_bias {
                    v.push(gr.bias);
                }
                Ok(v)
            }),
        ))
    }

    /// `y = x Wᵀ + b`.
    pub fn linear(&mut self, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
        let (xt, wt) = (self.value(x).clone(), self.value(w).clone());
        let bk = be(&xt)?;
        let y = bk.linear_fwd(&xt, &wt, b.map(|b| self.value(b)))?;
        let mut parents = vec![x, w];
        parents.extend(b);
        let out = wt.shape()[0];
        Ok(self.push(
            y,
            &parents,
            Box::new(move |g, n| {
                // gx = g W, gW = gᵀ x, gb = Σ_rows g
                let gx = if n[0] {
                    Some(bk.matmul(g, &wt, false, false)?)
                } else {
                    None
                };
                let gw = if n[1] {
                    Some(bk.matmul(g, &xt, true, false)?)
                } else {
                    None
                };
                let mut v = vec![gx, gw];
                if n.len() == 3 {
                    v.push(Some(bk.sum_rows(g, out)?));
                }
                Ok(v)
            }),
        ))
    }

    /// (Batched) matrix product with optional transposes (see `Backend::matmul`).
    pub fn matmul(&mut self, a: Var, b: Var, ta: bool, tb: bool) -> Result<Var> {
        let (at, bt) = (self.value(a).clone(), self.value(b).clone());
        let bk = be(&at)?;
        let y = bk.matmul(&at, &bt, ta, tb)?;
        Ok(self.push(
            y,
            &[a, b],
            Box::new(move |g, n| {
                // C = op(A) op(B): gop(A) = g op(B)ᵀ, gop(B) = op(A)ᵀ g, then undo the op.
                let ga = if !n[0] {
                    None
                } else if ta {
                    Some(bk.matmul(&bt, g, tb, true)?)
                } else {
                    Some(bk.matmul(g, &bt, false, !tb)?)
                };
                let gb = if !n[1] {
                    None
                } else if tb {
                    Some(bk.matmul(g, &at, true, ta)?)
                } else {
                    Some(bk.matmul(&at, g, !ta, false)?)
                };
                Ok(vec![ga, gb])
            }),
        ))
    }

    /// Train-mode batch norm. Returns the output and the batch statistics
    /// `(mean, unbiased var)` for the caller's running-stat update.
    pub fn batch_norm_train(
        &mut self,
        x: Var,
        gamma: Var,
        beta: Var,
        eps: f32,
    ) -> Result<(Var, Tensor, Tensor)> {
        let bk = be(self.value(x))?;
        let o = bk.batch_norm_train_fwd(self.value(x), self.value(gamma), self.value(beta), eps)?;
        Ok(self.push_batch_norm_train(bk, (x, gamma, beta), o))
    }

    /// Train-mode batch norm followed by `act`, one node; also updates the running statistics
    /// to `(1 − m)·running + m·batch` (mean, and unbiased variance), as PyTorch's layer does.
    /// The activation's backward is part of the node's (on CUDA, inside the batch-norm kernels
    /// for `Relu`).
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm_train_running(
        &mut self,
        x: Var,
        gamma: Var,
        beta: Var,
        eps: f32,
        running_mean: &mut Tensor,
        running_var: &mut Tensor,
        momentum: f32,
        act: Act,
    ) -> Result<Var> {
        let bk = be(self.value(x))?;
        let (bact, parents) = self.bn_act(act, [x, gamma, beta]);
        let o = bk.batch_norm_train_fwd_running(
            self.value(x),
            self.value(gamma),
            self.value(beta),
            eps,
            running_mean,
            running_var,
            momentum,
            bact,
        )?;
        if act == Act::None {
            let (y, _, _) = self.push_batch_norm_train(bk, (x, gamma, beta), o);
            return Ok(y);
        }
        let (xt, gt) = (self.value(x).clone(), self.value(gamma).clone());
        let (mean, invstd, ys) = (o.mean, o.invstd, o.y.clone());
        // d relu(bn(x) [+ r]): the masked gradient goes through the norm (and to r).
        let join = matches!(act, Act::AddRelu(_));
        let y = self.push(
            o.y,
            &parents,
            Box::new(move |g, _| {
                let (gx, gg, gb, gm) =
                    bk.batch_norm_train_relu_bwd(&xt, &gt, &mean, &invstd, &ys, g, join)?;
                let mut grads = vec![Some(gx), Some(gg), Some(gb)];
                if join {
                    grads.push(gm);
                }
                Ok(grads)
            }),
        );
        Ok(y)
    }

    /// The backend's form of a batch norm's `act`, and the node's parents: the norm's `x, gamma,
    /// beta`, then the residual of an `AddRelu`.
    fn bn_act(&self, act: Act, norm: [Var; 3]) -> (BnAct<'_>, Vec<Var>) {
        let mut parents = norm.to_vec();
        let bact = match act {
            Act::None => BnAct::None,
            Act::Relu => BnAct::Relu,
            Act::AddRelu(r) => {
                parents.push(r);
                BnAct::AddRelu(self.value(r))
            }
        };
        (bact, parents)
    }

    /// Records a train-mode batch-norm forward `o` of `x` computed by `bk` (its backward uses the
    /// batch statistics); returns the output and `(mean, unbiased variance)`.
    fn push_batch_norm_train(
        &mut self,
        bk: &'static dyn Backend,
        (x, gamma, beta): (Var, Var, Var),
        o: BnTrainOut,
    ) -> (Var, Tensor, Tensor) {
        let (xt, gt) = (self.value(x).clone(), self.value(gamma).clone());
        let (mean, invstd) = (o.mean.clone(), o.invstd.clone());
        let y = self.push(
            o.y,
            &[x, gamma, beta],
            Box::new(move |g, _| {
                let (gx, gg, gb) = bk.batch_norm_train_bwd(&xt, &gt, &mean, &invstd, g)?;
                Ok(vec![Some(gx), Some(gg), Some(gb)])
            }),
        );
        (y, o.mean, o.var_unbiased)
    }

    /// Eval-mode batch norm with running statistics (constants), followed by `act`, one node
    /// (on CUDA one launch). Its backward is the ReLU mask (when `act` has one), then the norm's.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm_eval(
        &mut self,
        x: Var,
        gamma: Var,
        beta: Var,
        running_mean: &Tensor,
        running_var: &Tensor,
        eps: f32,
        act: Act,
    ) -> Result<Var> {
        let (xt, gt) = (self.value(x).clone(), self.value(gamma).clone());
        let (rm, rv) = (running_mean.clone(), running_var.clone());
        let bk = be(&xt)?;
        let (bact, parents) = self.bn_act(act, [x, gamma, beta]);
        let y = bk.batch_norm_eval_fwd(&xt, &gt, self.value(beta), &rm, &rv, eps, bact)?;
        let ys = (act != Act::None).then(|| y.clone());
        let join = matches!(act, Act::AddRelu(_));
        Ok(self.push(
            y,
            &parents,
            Box::new(move |g, _| {
                // d relu(bn(x) [+ r]): the masked gradient goes through the norm (and to r).
                let gm = match &ys {
                    Some(ys) => Some(bk.relu_bwd(ys, g)?),
                    None => None,
                };
                let gn = gm.as_ref().unwrap_or(g);
                let (gx, gg, gb) = bk.batch_norm_eval_bwd(&xt, &gt, &rm, &rv, eps, gn)?;
                let mut grads = vec![Some(gx), Some(gg), Some(gb)];
                if join {
                    grads.push(gm);
                }
                Ok(grads)
            }),
        ))
    }

    pub fn max_pool2d(&mut self, x: Var, p: PoolParams) -> Result<Var> {
        let xt = self.value(x).clone();
        let bk = be(&xt)?;
        let y = bk.max_pool2d_fwd(&xt, p)?;
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _| Ok(vec![Some(bk.max_pool2d_bwd(&xt, g, p)?)])),
        ))
    }

    pub fn global_avg_pool(&mut self, x: Var) -> Result<Var> {
        let shape = self.value(x).shape().to_vec();
        let bk = be(self.value(x))?;
        let y = bk.global_avg_pool_fwd(self.value(x))?;
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _| Ok(vec![Some(bk.global_avg_pool_bwd(g, &shape)?)])),
        ))
    }

    /// Softmax over the last dimension; backward uses the saved output.
    pub fn softmax(&mut self, x: Var) -> Result<Var> {
        let bk = be(self.value(x))?;
        let y = bk.softmax_fwd(self.value(x))?;
        let ys = y.clone();
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _| Ok(vec![Some(bk.softmax_bwd(&ys, g)?)])),
        ))
    }

    /// Log-softmax over the last dimension; backward uses the saved output.
    pub fn log_softmax(&mut self, x: Var) -> Result<Var> {
        let bk = be(self.value(x))?;
        let y = bk.log_softmax_fwd(self.value(x))?;
        let ys = y.clone();
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _| Ok(vec![Some(bk.log_softmax_bwd(&ys, g)?)])),
        ))
    }

    /// Row-wise L2 normalisation over the last dimension.
    pub fn l2_normalize(&mut self, x: Var) -> Result<Var> {
        let xt = self.value(x).clone();
        let bk = be(&xt)?;
        let y = bk.l2_normalize_fwd(&xt)?;
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _| Ok(vec![Some(bk.l2_normalize_bwd(&xt, g)?)])),
        ))
    }

    /// Mean cross-entropy → `[1]`.
    pub fn cross_entropy(&mut self, logits: Var, labels: &[usize]) -> Result<Var> {
        let zt = self.value(logits).clone();
        let bk = be(&zt)?;
        let y = bk.cross_entropy_fwd(&zt, labels)?;
        let labels = labels.to_vec();
        Ok(self.push(
            y,
            &[logits],
            Box::new(move |g, _| Ok(vec![Some(bk.cross_entropy_bwd(&zt, &labels, g)?)])),
        ))
    }

    /// Weighted consistency (SPEC §1.5) → `[1]`; teacher logits and weights are constants.
    pub fn weighted_consistency(
        &mut self,
        student_logits: Var,
        teacher_logits: &Tensor,
        weights: &Tensor,
    ) -> Result<Var> {
        let zs = self.value(student_logits).clone();
        let (zt, w) = (teacher_logits.clone(), weights.clone());
        let bk = be(&zs)?;
        let y = bk.weighted_consistency_fwd(&zs, &zt, &w)?;
        Ok(self.push(
            y,
            &[student_logits],
            Box::new(move |g, _| Ok(vec![Some(bk.weighted_consistency_bwd(&zs, &zt, &w, g)?)])),
        ))
    }

    /// PGC loss (SPEC §1.5) → `[1]`; keys, labels (label tensors, see
    /// [`crate::backend::label_tensor`]) and weights are constants.
    #[allow(clippy::too_many_arguments)]
    pub fn pgc_loss(
        &mut self,
        queries: Var,
        q_labels: &Tensor,
        q_weights: &Tensor,
        keys: &Tensor,
        k_labels: &Tensor,
        k_weights: &Tensor,
        tau: f32,
    ) -> Result<Var> {
        let q = self.value(queries).clone();
        let bk = be(&q)?;
        let y = bk.pgc_loss_fwd(&q, q_labels, q_weights, keys, k_labels, k_weights, tau)?;
        let (ql, qw, k, kl, kw) = (
            q_labels.clone(),
            q_weights.clone(),
            keys.clone(),
            k_labels.clone(),
            k_weights.clone(),
        );
        Ok(self.push(
            y,
            &[queries],
            Box::new(move |g, _| {
                Ok(vec![Some(
                    bk.pgc_loss_bwd(&q, &ql, &qw, &k, &kl, &kw, tau, g)?,
                )])
            }),
        ))
    }

    /// MedFuseNet similarity fusion of the 1×1 projection `P̂ = conv2d(x, w, b)` of a low-level
    /// map with the high-level map `Q̂`: `similarity_fusion(conv2d(x, w, b), high)` as one node
    /// (see [`crate::backend::Backend::projected_fusion_fwd`]).
    pub fn projected_fusion(&mut self, x: Var, w: Var, b: Option<Var>, high: Var) -> Result<Var> {
        let (xt, wt, ht) = (
            self.value(x).clone(),
            self.value(w).clone(),
            self.value(high).clone(),
        );
        let bk = be(&xt)?;
        let (y, saved) = bk.projected_fusion_fwd(&xt, &wt, b.map(|b| self.value(b)), &ht)?;
        let mut parents = vec![x, w, high];
        parents.extend(b);
        let has_bias = b.is_some();
        Ok(self.push(
            y,
            &parents,
            Box::new(move |g, _| {
                let (gr, gh) = bk.projected_fusion_bwd(&xt, &wt, has_bias, &ht, &saved, g)?;
                let mut v = vec![gr.x, Some(gr.weight), Some(gh)];
                if has_bias {
                    v.push(gr.bias);
                }
                Ok(v)
            }),
        ))
    }

    /// MedFuseNet similarity fusion of low-level `P̂` and high-level `Q̂` maps.
    pub fn similarity_fusion(&mut self, low: Var, high: Var) -> Result<Var> {
        let (lt, ht) = (self.value(low).clone(), self.value(high).clone());
        let bk = be(&lt)?;
        let (y, st) = bk.similarity_fusion_fwd(&lt, &ht)?;
        Ok(self.push(
            y,
            &[low, high],
            Box::new(move |g, _| {
                let (gl, gh) = bk.similarity_fusion_bwd(&lt, &ht, &st, g)?;
                Ok(vec![Some(gl), Some(gh)])
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], s: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), s).unwrap()
    }

    #[test]
    fn shared_subgraph_sums_gradients() {
        // y = sum(relu(x) + relu(x)·3) → dy/dx = 4 where x > 0
        let mut g = Graph::new();
        let x = g.leaf(t(&[1.0, -2.0, 3.0], &[1, 3]), true);
        let r = g.relu(x).unwrap();
        let y = g.axpby(1.0, r, 3.0, r).unwrap();
        let ones = t(&[1.0, 1.0, 1.0], &[1, 3]);
        g.backward_with(y, ones).unwrap();
        assert_eq!(g.grad(x).unwrap().to_vec().unwrap(), vec![4.0, 0.0, 4.0]);
    }

    #[test]
    fn leaf_gradients_sum_every_use_in_arrival_order() {
        // A leaf used by three consumers (one of them twice) and a second leaf used once; the
        // root itself may be a leaf too.
        let mut g = Graph::new();
        let x = g.leaf(t(&[1.0, -2.0], &[1, 2]), true);
        let w = g.leaf(t(&[0.5, 0.25], &[1, 2]), true);
        let a = g.scale(x, 2.0).unwrap();
        let b = g.axpby(3.0, x, 1.0, w).unwrap();
        let c = g.axpby(1.0, x, 1.0, x).unwrap();
        let ab = g.axpby(1.0, a, 1.0, b).unwrap();
        let y = g.axpby(1.0, ab, 1.0, c).unwrap();
        g.backward_with(y, t(&[1.0, 10.0], &[1, 2])).unwrap();
        // dy/dx = 2 + 3 + 1 + 1 = 7, dy/dw = 1 (times the upstream gradient).
        assert_eq!(g.grad(x).unwrap().to_vec().unwrap(), vec![7.0, 70.0]);
        assert_eq!(g.grad(w).unwrap().to_vec().unwrap(), vec![1.0, 10.0]);
        let mut g = Graph::new();
        let z = g.leaf(t(&[3.0], &[1]), true);
        g.backward(z).unwrap();
        assert_eq!(g.grad(z).unwrap().to_vec().unwrap(), vec![1.0]);
    }

    #[test]
    fn gradients_accumulate_across_backward_calls() {
        let mut g = Graph::new();
        let x = g.leaf(t(&[2.0], &[1]), true);
        let y = g.scale(x, 5.0).unwrap();
        g.backward(y).unwrap();
        g.backward(y).unwrap();
        assert_eq!(g.grad(x).unwrap().to_vec().unwrap(), vec![10.0]);
    }

    #[test]
    fn no_grad_records_nothing_and_backward_refuses() {
        let mut g = Graph::new();
        let x = g.leaf(t(&[2.0], &[1]), true);
        let y = g.no_grad(|g| g.scale(x, 5.0)).unwrap();
        assert!(!g.requires_grad(y));
        assert_eq!(g.value(y).to_vec().unwrap(), vec![10.0]);
        assert!(g.backward(y).is_err());
    }

    #[test]
    fn constants_get_no_gradient() {
        let mut g = Graph::new();
        let x = g.leaf(t(&[2.0], &[1]), true);
        let c = g.constant(t(&[3.0], &[1]));
        let y = g.add(x, c).unwrap();
        g.backward(y).unwrap();
        assert_eq!(g.grad(x).unwrap().to_vec().unwrap(), vec![1.0]);
        assert!(g.grad(c).is_none());
    }

    #[test]
    fn matmul_transposes_backward() {
        // Compare every transpose combination's gradient with the untransposed product.
        let a = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
        let b = t(&[0.5, -1.0, 2.0, 0.0, 1.0, 3.0], &[3, 2]);
        let at = t(&[1.0, 4.0, 2.0, 5.0, 3.0, 6.0], &[3, 2]);
        let bt = t(&[0.5, 2.0, 1.0, -1.0, 0.0, 3.0], &[2, 3]);
        let gy = t(&[1.0, -2.0, 0.5, 3.0], &[2, 2]);
        let mut g0 = Graph::new();
        let (va, vb) = (g0.leaf(a.clone(), true), g0.leaf(b.clone(), true));
        let y0 = g0.matmul(va, vb, false, false).unwrap();
        g0.backward_with(y0, gy.clone()).unwrap();
        let (ga, gb) = (
            g0.grad(va).unwrap().to_vec().unwrap(),
            g0.grad(vb).unwrap().to_vec().unwrap(),
        );
        let transpose = |v: &[f32], r: usize, c: usize| -> Vec<f32> {
            (0..c)
                .flat_map(|j| (0..r).map(move |i| v[i * c + j]))
                .collect()
        };
        for (ta, tb) in [(true, false), (false, true), (true, true)] {
            let mut g = Graph::new();
            let xa = g.leaf(if ta { at.clone() } else { a.clone() }, true);
            let xb = g.leaf(if tb { bt.clone() } else { b.clone() }, true);
            let y = g.matmul(xa, xb, ta, tb).unwrap();
            assert_eq!(g.value(y).to_vec().unwrap(), g0.value(y0).to_vec().unwrap());
            g.backward_with(y, gy.clone()).unwrap();
            let gxa = g.grad(xa).unwrap().to_vec().unwrap();
            let gxb = g.grad(xb).unwrap().to_vec().unwrap();
            assert_eq!(if ta { transpose(&gxa, 3, 2) } else { gxa }, ga);
            assert_eq!(if tb { transpose(&gxb, 2, 3) } else { gxb }, gb);
        }
    }
}
