//! Shape and argument validation shared by every backend: one function per check, each returning
//! the validated geometry, so the CPU reference and the device backends accept and reject exactly
//! the same inputs with the same messages.

use crate::backend::{ConvParams, PoolParams};
use crate::bail;
use crate::error::Result;
use crate::tensor::Tensor;

/// Validated convolution geometry (square kernel `k`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvGeom {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvGeom {
    pub fn ho(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    pub fn wo(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
    /// `[n, cout, ho, wo]`.
    pub fn out_shape(&self) -> [usize; 4] {
        [self.n, self.cout, self.ho(), self.wo()]
    }
    /// `n36 c16 28x28 -> c32 k3 s2 p1`, as the cuDNN log names a shape.
    pub fn describe(&self) -> String {
        format!(
            "n{} c{} {}x{} -> c{} k{} s{} p{}",
            self.n, self.cin, self.h, self.w, self.cout, self.k, self.stride, self.pad
        )
    }
}

/// Validated max-pool geometry of one `[H, W]` plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PoolGeom {
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl PoolGeom {
    pub fn ho(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    pub fn wo(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
}

/// Validated matrix-product geometry: `batch` products `[m, k]·[k, n]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatmulGeom {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// `[m, n]` or `[batch, m, n]`, following the inputs' rank.
    pub out_shape: Vec<usize>,
}

/// Validated similarity-fusion geometry: batch, channels, low and high positions per image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusionGeom {
    pub b: usize,
    pub d: usize,
    pub np: usize,
    pub nq: usize,
}

/// Validated DSR-alignment geometry: labelled rows, unlabelled rows, feature dim, classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DsrGeom {
    pub bl: usize,
    pub bu: usize,
    pub d: usize,
    pub c: usize,
}

/// Fails unless two tensors have the same shape.
pub fn same_shape(a: &Tensor, b: &Tensor, op: &str) -> Result<()> {
    if a.shape() != b.shape() {
        bail!("{op}: shapes {:?} and {:?} differ", a.shape(), b.shape());
    }
    Ok(())
}

/// The non-empty last dimension of a tensor.
pub fn last_dim(t: &Tensor, op: &str) -> Result<usize> {
    match t.shape().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => bail!(
            "{op}: needs a non-empty last dimension, got {:?}",
            t.shape()
        ),
    }
}

/// `(rows, last)` of any tensor viewed as `[rows, last_dim]` (non-empty last dimension).
pub fn rows_last(t: &Tensor, op: &str) -> Result<(usize, usize)> {
    let d = last_dim(t, op)?;
    Ok((t.numel() / d, d))
}

/// `(rows, cols)` of a 2-D tensor with a non-empty last dimension.
pub fn rows2(t: &Tensor, op: &str) -> Result<(usize, usize)> {
    match t.shape() {
        &[b, c] if c > 0 => Ok((b, c)),
        s => bail!("{op}: expected a [rows, cols] tensor, got {s:?}"),
    }
}

/// `(n, c, h, w)` of an NCHW tensor.
pub fn nchw(t: &Tensor, op: &str) -> Result<(usize, usize, usize, usize)> {
    match t.shape() {
        &[n, c, h, w] => Ok((n, c, h, w)),
        s => bail!("{op}: expected an NCHW tensor, got shape {s:?}"),
    }
}

/// Checks one label per row, each `< classes`.
pub fn labels(labels: &[usize], rows: usize, classes: usize, op: &str) -> Result<()> {
    if labels.len() != rows {
        bail!("{op}: {} labels for {rows} rows", labels.len());
    }
    if let Some(l) = labels.iter().find(|&&l| l >= classes) {
        bail!("{op}: label {l} out of range for {classes} classes");
    }
    Ok(())
}

/// Checks a `[1]` upstream gradient.
pub fn scalar_grad(g: &Tensor, op: &str) -> Result<()> {
    if g.numel() != 1 {
        bail!(
            "{op}: expected a [1] upstream gradient, got {:?}",
            g.shape()
        );
    }
    Ok(())
}

/// `sum_rows`: the tensor splits into `n > 0` equal rows.
pub fn sum_rows(x: &Tensor, n: usize) -> Result<()> {
    if n == 0 || !x.numel().is_multiple_of(n) {
        bail!("sum_rows: {:?} is not a multiple of rows of {n}", x.shape());
    }
    Ok(())
}

/// Global average pool backward: `gy [n, c]` fits the NCHW input shape; returns `h·w`.
pub fn global_avg_pool_bwd(gy: &Tensor, x_shape: &[usize]) -> Result<usize> {
    if x_shape.len() != 4 || gy.shape() != [x_shape[0], x_shape[1]] {
        bail!(
            "global_avg_pool2d backward: gradient {:?} does not fit input {x_shape:?}",
            gy.shape()
        );
    }
    no_positions(x_shape, "global_avg_pool2d backward")?;
    Ok(x_shape[2] * x_shape[3])
}

/// `(N, C, H·W)` of a global average pool's NCHW input, which needs at least one position per
/// channel (as PyTorch's adaptive average pool does; an empty batch is fine).
pub fn global_avg_pool_fwd(x: &Tensor) -> Result<(usize, usize, usize)> {
    let (n, c, h, w) = nchw(x, "global_avg_pool2d")?;
    no_positions(x.shape(), "global_avg_pool2d")?;
    Ok((n, c, h * w))
}

fn no_positions(shape: &[usize], op: &str) -> Result<()> {
    if shape[2] * shape[3] == 0 {
        bail!("{op}: input {shape:?} has no spatial positions to average over");
    }
    Ok(())
}

/// Matrix product of two 2-D or two 3-D (batched) tensors, optionally transposed.
pub fn matmul(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<MatmulGeom> {
    let (sa, sb) = (a.shape(), b.shape());
    if sa.len() != sb.len() || !(2..=3).contains(&sa.len()) {
        bail!("matmul: shapes {sa:?} and {sb:?} must both be 2-D or both 3-D");
    }
    let batch = if sa.len() == 3 { sa[0] } else { 1 };
    if sa.len() == 3 && sb[0] != batch {
        bail!("matmul: batch sizes differ in {sa:?} and {sb:?}");
    }
    let r = sa.len() - 2;
    let (m, k) = if trans_a {
        (sa[r + 1], sa[r])
    } else {
        (sa[r], sa[r + 1])
    };
    let (kb, n) = if trans_b {
        (sb[r + 1], sb[r])
    } else {
        (sb[r], sb[r + 1])
    };
    if k != kb {
        bail!(
            "matmul: inner dimensions differ ({sa:?}{} x {sb:?}{})",
            if trans_a { "ᵀ" } else { "" },
            if trans_b { "ᵀ" } else { "" }
        );
    }
    let out_shape = if r == 1 {
        vec![batch, m, n]
    } else {
        vec![m, n]
    };
    Ok(MatmulGeom {
        batch,
        m,
        n,
        k,
        out_shape,
    })
}

/// `y = x·wᵀ (+ b)`: returns `(rows, outputs, inputs)`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<(usize, usize, usize)> {
    let (xs, ws) = (x.shape(), w.shape());
    if xs.len() != 2 || ws.len() != 2 || xs[1] != ws[1] {
        bail!("linear: input {xs:?} does not fit weight {ws:?}");
    }
    let (n, o) = (xs[0], ws[0]);
    if let Some(b) = b {
        if b.shape() != [o] {
            bail!("linear: bias {:?} does not fit {o} outputs", b.shape());
        }
    }
    Ok((n, o, xs[1]))
}

/// Convolution of an NCHW input by a `[cout, cin, k, k]` weight.
pub fn conv(x: &Tensor, w: &Tensor, p: ConvParams) -> Result<ConvGeom> {
    let (n, cin, h, wd) = nchw(x, "conv2d input")?;
    let (cout, wc, kh, kw) = nchw(w, "conv2d weight")?;
    if wc != cin || kh != kw {
        bail!(
            "conv2d: weight {:?} does not fit input {:?} (square kernels, same channels)",
            w.shape(),
            x.shape()
        );
    }
    if p.stride == 0 || h + 2 * p.padding < kh || wd + 2 * p.padding < kw {
        bail!(
            "conv2d: kernel {kh} stride {} padding {} does not fit input {:?}",
            p.stride,
            p.padding,
            x.shape()
        );
    }
    Ok(ConvGeom {
        n,
        cin,
        h,
        w: wd,
        cout,
        k: kh,
        stride: p.stride,
        pad: p.padding,
    })
}

/// An optional conv bias must be `[cout]`.
pub fn conv_bias(s: &ConvGeom, b: Option<&Tensor>) -> Result<()> {
    if let Some(b) = b {
        if b.shape() != [s.cout] {
            bail!(
                "conv2d: bias {:?} does not fit {} output channels",
                b.shape(),
                s.cout
            );
        }
    }
    Ok(())
}

/// The conv output gradient must have the output's shape.
pub fn conv_grad(s: &ConvGeom, gy: &Tensor) -> Result<()> {
    if gy.shape() != s.out_shape() {
        bail!(
            "conv2d backward: gradient {:?} does not fit output {:?}",
            gy.shape(),
            s.out_shape()
        );
    }
    Ok(())
}

/// Max-pool window on an `h × w` plane (padding at most half the kernel).
pub fn pool(h: usize, w: usize, p: PoolParams) -> Result<PoolGeom> {
    if p.kernel == 0
        || p.stride == 0
        || 2 * p.padding > p.kernel
        || h + 2 * p.padding < p.kernel
        || w + 2 * p.padding < p.kernel
    {
        bail!(
            "max_pool2d: kernel {} stride {} padding {} invalid for {h}x{w} (padding at most half the kernel)",
            p.kernel,
            p.stride,
            p.padding
        );
    }
    Ok(PoolGeom {
        h,
        w,
        k: p.kernel,
        stride: p.stride,
        pad: p.padding,
    })
}

/// Max-pool forward: `(n, c, geometry)` of an NCHW input.
pub fn max_pool2d_fwd(x: &Tensor, p: PoolParams) -> Result<(usize, usize, PoolGeom)> {
    let (n, c, h, w) = nchw(x, "max_pool2d")?;
    Ok((n, c, pool(h, w, p)?))
}

/// Max-pool backward: as the forward, and `gy` must have the output's shape.
pub fn max_pool2d_bwd(x: &Tensor, gy: &Tensor, p: PoolParams) -> Result<(usize, usize, PoolGeom)> {
    let (n, c, h, w) = nchw(x, "max_pool2d backward")?;
    let s = pool(h, w, p)?;
    if gy.shape() != [n, c, s.ho(), s.wo()] {
        bail!(
            "max_pool2d backward: gradient {:?} does not fit the output",
            gy.shape()
        );
    }
    Ok((n, c, s))
}

/// Every per-channel batch-norm parameter must be `[c]`.
pub fn batch_norm_params(c: usize, ts: &[(&Tensor, &str)]) -> Result<()> {
    for (t, nm) in ts {
        if t.shape() != [c] {
            bail!(
                "batch_norm2d: {nm} {:?} does not fit {c} channels",
                t.shape()
            );
        }
    }
    Ok(())
}

/// Training-mode batch norm forward: `(n, c, h, w)`; needs more than one value per channel.
pub fn batch_norm_train_fwd(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
) -> Result<(usize, usize, usize, usize)> {
    let (n, c, h, w) = nchw(x, "batch_norm2d")?;
    if n * h * w < 2 {
        bail!(
            "batch_norm2d: training needs more than one value per channel, got input {:?}",
            x.shape()
        );
    }
    batch_norm_params(c, &[(gamma, "weight"), (beta, "bias")])?;
    Ok((n, c, h, w))
}

/// Training-mode batch norm backward: `(n, c, h, w)`.
pub fn batch_norm_train_bwd(
    x: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    invstd: &Tensor,
    gy: &Tensor,
) -> Result<(usize, usize, usize, usize)> {
    let (n, c, h, w) = nchw(x, "batch_norm2d backward")?;
    same_shape(x, gy, "batch_norm2d backward")?;
    batch_norm_params(c, &[(gamma, "weight"), (mean, "mean"), (invstd, "invstd")])?;
    Ok((n, c, h, w))
}

/// Eval-mode batch norm forward: `(n, c, h, w)`.
pub fn batch_norm_eval_fwd(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    rm: &Tensor,
    rv: &Tensor,
) -> Result<(usize, usize, usize, usize)> {
    let (n, c, h, w) = nchw(x, "batch_norm2d")?;
    batch_norm_params(
        c,
        &[
            (gamma, "weight"),
            (beta, "bias"),
            (rm, "running_mean"),
            (rv, "running_var"),
        ],
    )?;
    Ok((n, c, h, w))
}

/// Eval-mode batch norm backward: `(n, c, h, w)`.
pub fn batch_norm_eval_bwd(
    x: &Tensor,
    gamma: &Tensor,
    rm: &Tensor,
    rv: &Tensor,
    gy: &Tensor,
) -> Result<(usize, usize, usize, usize)> {
    let (n, c, h, w) = nchw(x, "batch_norm2d backward")?;
    same_shape(x, gy, "batch_norm2d backward")?;
    batch_norm_params(
        c,
        &[(gamma, "weight"), (rm, "running_mean"), (rv, "running_var")],
    )?;
    Ok((n, c, h, w))
}

/// Weighted consistency: `zs`, `zt` `[b, c]` and weights `[b]`; returns `(b, c)`.
pub fn consistency(zs: &Tensor, zt: &Tensor, w: &Tensor) -> Result<(usize, usize)> {
    let (b, c) = rows2(zs, "weighted_consistency")?;
    same_shape(zs, zt, "weighted_consistency")?;
    if w.shape() != [b] {
        bail!(
            "weighted_consistency: weights {:?} do not fit batch {b}",
            w.shape()
        );
    }
    Ok((b, c))
}

/// PGC loss: queries `[B, E]` with `[B]` labels and weights, keys `[Nk, E]` with `[Nk]` labels
/// and weights; returns `(B, Nk, E)`.
pub fn pgc(
    q: &Tensor,
    ql: &Tensor,
    qw: &Tensor,
    k: &Tensor,
    kl: &Tensor,
    kw: &Tensor,
) -> Result<(usize, usize, usize)> {
    let (b, e) = rows2(q, "pgc_loss queries")?;
    let (nk, ek) = rows2(k, "pgc_loss keys")?;
    if e != ek || ql.shape() != [b] || qw.shape() != [b] || kl.shape() != [nk] || kw.shape() != [nk]
    {
        bail!(
            "pgc_loss: queries {:?} (labels {:?}, weights {:?}) and keys {:?} (labels {:?}, weights {:?}) disagree",
            q.shape(),
            ql.shape(),
            qw.shape(),
            k.shape(),
            kl.shape(),
            kw.shape()
        );
    }
    Ok((b, nk, e))
}

/// DSR alignment: labelled/unlabelled features `[bl, d]`/`[bu, d]`, fc `[c, d]` + `[c]`, one
/// label `< c` per labelled row and a `[bu]` pseudo-label tensor (its values are checked where
/// they are read: on the CPU).
pub fn dsr_alignment(
    feat_lab: &Tensor,
    y_lab: &[usize],
    feat_unl: &Tensor,
    pseudo: &Tensor,
    fc_w: &Tensor,
    fc_b: &Tensor,
) -> Result<DsrGeom> {
    let (bl, d) = rows2(feat_lab, "dsr_alignment labelled features")?;
    let (bu, du) = rows2(feat_unl, "dsr_alignment unlabelled features")?;
    let (c, dw) = rows2(fc_w, "dsr_alignment fc weight")?;
    if du != d || dw != d || fc_b.shape() != [c] {
        bail!(
            "dsr_alignment: feature dims {d}/{du}, fc {:?} + {:?} disagree",
            fc_w.shape(),
            fc_b.shape()
        );
    }
    labels(y_lab, bl, c, "dsr_alignment labels")?;
    if pseudo.shape() != [bu] {
        bail!(
            "dsr_alignment: pseudo-labels {:?} for {bu} unlabelled rows",
            pseudo.shape()
        );
    }
    Ok(DsrGeom { bl, bu, d, c })
}

/// DSR weights: every factor given is a `[n]` vector.
pub fn dsr_weights(f: &crate::backend::DsrFactors<'_>) -> Result<()> {
    let parts = [
        ("confidence", f.conf),
        ("meta weights", f.meta),
        ("alignment scores", f.align.map(|(a, _)| a)),
        ("class-balance factors", f.balance),
    ];
    for (what, t) in parts {
        if let Some(t) = t {
            if t.shape() != [f.n] {
                bail!("dsr_weights: {what} {:?} for {} samples", t.shape(), f.n);
            }
        }
    }
    Ok(())
}

/// Similarity fusion: low `[b, d, hp, wp]` and high `[b, d, hq, wq]`.
pub fn fusion(low: &Tensor, high: &Tensor) -> Result<FusionGeom> {
    let (b, d, hp, wp) = nchw(low, "similarity_fusion low")?;
    let (bq, dq, hq, wq) = nchw(high, "similarity_fusion high")?;
    if b != bq || d != dq {
        bail!(
            "similarity_fusion: low {:?} and high {:?} differ in batch or channels",
            low.shape(),
            high.shape()
        );
    }
    Ok(FusionGeom {
        b,
        d,
        np: hp * wp,
        nq: hq * wq,
    })
}

/// The projected fusion (a 1×1 convolution's output fused with `high`): `x [b, c, hp, wp]`,
/// `w [d, c, 1, 1]`, `bias [d]`, `high [b, d, hq, wq]` → `(b, c, d, np, nq)`; what [`conv`],
/// [`conv_bias`] and [`fusion`] refuse for the two ops in turn is refused with their messages.
pub fn projected_fusion(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    high: &Tensor,
) -> Result<(usize, usize, usize, usize, usize)> {
    let s = conv(x, w, crate::backend::POINTWISE)?;
    if s.k != 1 {
        bail!(
            "projected_fusion: weight {:?} is not a 1×1 convolution's",
            w.shape()
        );
    }
    conv_bias(&s, bias)?;
    let (bq, d, hq, wq) = nchw(high, "similarity_fusion high")?;
    if bq != s.n || d != s.cout {
        bail!(
            "similarity_fusion: low {:?} and high {:?} differ in batch or channels",
            [s.n, s.cout, s.h, s.w],
            high.shape()
        );
    }
    Ok((s.n, s.cin, d, s.h * s.w, hq * wq))
}

/// The projected fusion's backward computed without the projected map: the dims of
/// [`projected_fusion`], `gy` of `high`'s shape, and the forward's saved `[Sᵀ, M, Z]`
/// (`Sᵀ [b, nq, np]`, `M` and `Z` `[b, c, nq]`).
#[allow(clippy::type_complexity)]
pub fn projected_fusion_saved<'a>(
    x: &Tensor,
    w: &Tensor,
    high: &Tensor,
    saved: &'a [Tensor],
    gy: &Tensor,
) -> Result<((usize, usize, usize, usize, usize), [&'a Tensor; 3])> {
    let dims = projected_fusion(x, w, None, high)?;
    let (b, c, _, np, nq) = dims;
    same_shape(high, gy, "projected_fusion backward")?;
    let [st, m, z] = saved else {
        bail!(
            "projected_fusion backward: {} saved tensors, expected S, M and Z",
            saved.len()
        );
    };
    for (t, want, what) in [
        (st, [b, nq, np], "S"),
        (m, [b, c, nq], "M"),
        (z, [b, c, nq], "Z"),
    ] {
        if t.shape() != want {
            bail!(
                "projected_fusion backward: saved {what} {:?}, expected {want:?}",
                t.shape()
            );
        }
    }
    Ok((dims, [st, m, z]))
}

/// The similarity fusion's saved `Sᵀ`: `[b, nq, np]` for the maps of `g`.
pub fn fusion_similarity(st: &Tensor, g: &FusionGeom) -> Result<()> {
    if st.shape() != [g.b, g.nq, g.np] {
        bail!(
            "similarity_fusion backward: the forward's similarity is {:?}, expected [{}, {}, {}] \
             for these maps",
            st.shape(),
            g.b,
            g.nq,
            g.np
        );
    }
    Ok(())
}

/// `concat_rows`: `a [ra, e]`, `b [rb, e]`, `b_rows ≤ rb` → `(ra, e)`.
pub fn concat_rows(a: &Tensor, b: &Tensor, b_rows: usize) -> Result<(usize, usize)> {
    let (&[ra, e], &[rb, eb]) = (a.shape(), b.shape()) else {
        bail!(
            "concat_rows: expected two matrices, got {:?} and {:?}",
            a.shape(),
            b.shape()
        );
    };
    if e != eb || b_rows > rb {
        bail!(
            "concat_rows: {:?} and the first {b_rows} rows of {:?} do not stack",
            a.shape(),
            b.shape()
        );
    }
    Ok((ra, e))
}

/// `ring_write_rows`: ring `dst [k, e]`, `src [r, e]` with `r ≤ k`, `start < k` (or `k = 0`)
/// → `(k, r, e)`.
pub fn ring_write_rows(dst: &Tensor, src: &Tensor, start: usize) -> Result<(usize, usize, usize)> {
    let (&[k, e], &[r, es]) = (dst.shape(), src.shape()) else {
        bail!(
            "ring_write_rows: expected two matrices, got {:?} and {:?}",
            dst.shape(),
            src.shape()
        );
    };
    if e != es || r > k || (k > 0 && start >= k) {
        bail!(
            "ring_write_rows: cannot write {:?} at row {start} of the ring {:?}",
            src.shape(),
            dst.shape()
        );
    }
    Ok((k, r, e))
}
