#!/usr/bin/env python3
"""PyTorch peer of `medssl-bench step`: the same DSRPGC training step, timed the same way.

The step mirrors src/train/step.rs + src/ssl/mod.rs (SPEC §1) on the MedFuseNet-ResNet of SPEC §2
with torchvision-style parameter names:

  teacher forward (no_grad, train-mode BN) on the weak views -> p_T, pseudo-labels (on device),
  student forward on the labelled batch and on the strong views (two separate passes),
  DSR weights w = c * m (entropy confidence x persistent meta weight, meta weight updated first by
  the first-order last-layer alignment step), L = CE + lambda_c * weighted consistency +
  lambda_p * PGC over [batch keys ; queue] (tau = 0.1), ramped lambdas (T = 100 steps as the bench),
  backward, Adam (lr 1e-3, L2 weight decay 5e-4, torch.optim.Adam semantics), teacher EMA on
  parameters (alpha = 0.99), FIFO enqueue of (teacher key, pseudo-label, weight), K = 4096.
`--method supervised` is CE on the labelled batch only (the EMA still runs, as in our step);
`--method mean-teacher` is CE + unweighted consistency (no DSR, no PGC).

PyTorch is NOT a dependency of medssl or its CI. To run a comparison install it by hand:
    pip install torch --index-url https://download.pytorch.org/whl/cpu     # CPU-only wheel
    pip install torch                                                       # CUDA build (PyPI)

Examples:
    python3 tools/torch_peer.py --width 16 --image-size 28 --repeats 3 --json
    python3 tools/torch_peer.py --device cuda --width 64 --image-size 224 --json
    python3 tools/torch_peer.py --golden ../shared/golden/medfusenet_tiny.safetensors
    python3 tools/torch_peer.py --golden ../shared/golden/dsrpgc_tiny.safetensors

Host syncs: none inside the step (pseudo-labels, weights, meta update and the queue all stay on the
device; the queue pointer is a host integer because the batch size is fixed). Our engine reads the
loss back every step for its non-finite check; pass --sync-loss to make the peer do the same
(`loss.item()`).
"""

import argparse
import json
import math
import os
import statistics
import struct
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:  # pragma: no cover
    sys.stderr.write(
        "torch_peer.py needs PyTorch, which is not a dependency of medssl.\n"
        "Install it for a comparison run:\n"
        "  pip install torch --index-url https://download.pytorch.org/whl/cpu   (CPU)\n"
        "  pip install torch                                                    (CUDA)\n"
    )
    sys.exit(2)


# ----------------------------------------------------------------------------------------------
# Model (SPEC §2), torchvision resnet18 names.
# ----------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, 0, bias=False),
                nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1),
            )

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        sc = x if self.downsample is None else self.downsample(x)
        return F.relu(h + sc)


class Fuse(nn.Module):
    """Similarity fusion: S = softmax_i(P^T Q / sqrt(d)) over low-level positions, F = Q + P S."""

    def __init__(self, w, d):
        super().__init__()
        self.conv_p = nn.Conv2d(w, d, 1, bias=True)
        self.conv_q = nn.Conv2d(8 * w, d, 1, bias=True)
        self.d = d

    def forward(self, low, high):
        p = self.conv_p(low).flatten(2)  # [B, d, Np]
        q = self.conv_q(high)
        b, d, hq, wq = q.shape
        qf = q.flatten(2)  # [B, d, Nq]
        s = torch.softmax(torch.bmm(p.transpose(1, 2), qf) / math.sqrt(d), dim=1)  # [B, Np, Nq]
        return (qf + torch.bmm(p, s)).view(b, d, hq, wq)


class MedFuseNet(nn.Module):
    def __init__(self, in_ch=3, width=16, d=128, emb=128, classes=7, small_stem=True):
        super().__init__()
        w = width
        self.small_stem = small_stem
        if small_stem:
            self.conv1 = nn.Conv2d(in_ch, w, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_ch, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w, eps=1e-5, momentum=0.1)
        cin = w
        for li, mult in enumerate([1, 2, 4, 8]):
            cout = w * mult
            stride = 1 if li == 0 else 2
            setattr(self, f"layer{li + 1}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.fuse = Fuse(w, d)
        self.fc = nn.Linear(d, classes)
        self.proj = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, emb))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        """Returns (logits, embedding, pooled feature)."""
        h = F.relu(self.bn1(self.conv1(x)))
        if not self.small_stem:
            h = F.max_pool2d(h, 3, 2, 1)
        low = self.layer1(h)
        high = self.layer4(self.layer3(self.layer2(low)))
        f = self.fuse(low, high).mean(dim=(2, 3))
        logits = self.fc(f)
        emb = F.normalize(self.proj(f), dim=1, eps=1e-12)
        return logits, emb, f


def forward_flops(in_ch, width, d, emb, classes, small_stem, h, w):
    """Same formula as MedFuseNet::forward_flops in src/nn/mod.rs."""

    def conv(cin, cout, k, ho, wo):
        return 2.0 * cin * cout * k * k * ho * wo

    fl = 0.0
    hh, ww = h, w
    if small_stem:
        fl += conv(in_ch, width, 3, hh, ww)
    else:
        hh = (hh + 6 - 7) // 2 + 1
        ww = (ww + 6 - 7) // 2 + 1
        fl += conv(in_ch, width, 7, hh, ww)
        hh = (hh + 2 - 3) // 2 + 1
        ww = (ww + 2 - 3) // 2 + 1
    hp, wp = hh, ww
    cin = width
    for li, mult in enumerate([1, 2, 4, 8]):
        cout = width * mult
        for b in range(2):
            stride = 2 if (li > 0 and b == 0) else 1
            ho, wo = (hh + 2 - 3) // stride + 1, (ww + 2 - 3) // stride + 1
            fl += conv(cin, cout, 3, ho, wo) + conv(cout, cout, 3, ho, wo)
            if stride != 1 or cin != cout:
                fl += conv(cin, cout, 1, ho, wo)
            hh, ww, cin = ho, wo, cout
    fd = float(d)
    np_, nq = float(hp * wp), float(hh * ww)
    fl += conv(width, d, 1, hp, wp) + conv(8 * width, d, 1, hh, ww)
    fl += 2.0 * 2.0 * np_ * nq * d
    return fl + 2.0 * fd * (classes + fd + emb)


# ----------------------------------------------------------------------------------------------
# Losses (SPEC §1.3, §1.5).
# ----------------------------------------------------------------------------------------------


def entropy_weight(z):
    p = torch.softmax(z, dim=1)
    h = -(p * torch.log_softmax(z, dim=1)).sum(1)
    return 1.0 - h / math.log(z.shape[1])


def dsr_alignment(z_l, y, f_l, z_u, f_u, yhat, classes):
    """a_i = (1/B_l) sum_j ((p_j - e_{y_j}).(p_i - e_{yhat_i})) (f_j.f_i + 1), p = softmax(fc(f))."""
    rl = torch.softmax(z_l, 1) - F.one_hot(y, classes).to(z_l.dtype)
    ru = torch.softmax(z_u, 1) - F.one_hot(yhat, classes).to(z_u.dtype)
    return ((ru @ rl.t()) * (f_u @ f_l.t() + 1.0)).sum(1) / z_l.shape[0]


def weighted_consistency(z_s, z_t, w):
    d = torch.softmax(z_s, 1) - torch.softmax(z_t, 1)
    return (w * (d * d).sum(1)).sum() / z_s.shape[0]


def pgc_loss(q, q_labels, q_w, keys, k_labels, k_w, tau):
    logp = torch.log_softmax(q @ keys.t() / tau, dim=1)  # [B, K]
    pos = (q_labels[:, None] == k_labels[None, :]).to(q.dtype) * k_w[None, :]
    pi = pos / pos.sum(1, keepdim=True).clamp_min(1e-12)
    li = -(pi * logp).sum(1)
    return (q_w * li).sum() / q.shape[0]


def ramp(lmax, t, T):
    if T <= 0:
        return lmax
    r = 1.0 - min(1.0, t / T)
    return lmax * math.exp(-5.0 * r * r)


# ----------------------------------------------------------------------------------------------
# Training state and step.
# ----------------------------------------------------------------------------------------------


class Peer:
    def __init__(self, a, dev):
        self.a = a
        self.dev = dev
        small = a.image_size <= 64
        self.student = MedFuseNet(a.channels, a.width, a.fusion_dim, a.emb, a.classes, small).to(dev)
        self.teacher = MedFuseNet(a.channels, a.width, a.fusion_dim, a.emb, a.classes, small).to(dev)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if a.channels_last:
            self.student.to(memory_format=torch.channels_last)
            self.teacher.to(memory_format=torch.channels_last)
        self.student.train()
        self.teacher.train()
        self.s_params = list(self.student.parameters())
        self.t_params = list(self.teacher.parameters())
        self.opt = torch.optim.Adam(self.s_params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=5e-4)
        self.fs = self.student
        self.ft = self.teacher
        if a.compile:
            self.fs = torch.compile(self.student, dynamic=False)
            self.ft = torch.compile(self.teacher, dynamic=False)
        # Queue (FIFO ring) on the device; pointer and fill on the host (batch size is fixed).
        self.qk = torch.zeros(a.queue, a.emb, device=dev)
        self.ql = torch.zeros(a.queue, dtype=torch.long, device=dev)
        self.qw = torch.zeros(a.queue, device=dev)
        self.qptr = 0
        self.qlen = 0
        if a.fill_queue and a.queue > 0:
            # A full queue from the start (random unit keys, labels, weights 1), as medssl-bench
            # --fill-queue / --cuda-graph: the PGC term then runs over all queue keys every step.
            g = torch.Generator(device="cpu").manual_seed(0)
            k = torch.rand(a.queue, a.emb, generator=g) * 2 - 1
            self.qk.copy_(torch.nn.functional.normalize(k, dim=1).to(dev))
            self.ql.copy_(torch.randint(0, a.classes, (a.queue,), generator=g).to(dev))
            self.qw.fill_(1.0)
            self.qlen = a.queue
        self.meta = torch.ones(1000, device=dev)  # persistent meta weights (n_unl = 1000 as the bench)
        self.unl_idx = torch.arange(a.batch_u, device=dev)
        self.t = 0
        self.ramp_steps = 100
        self.lr = 1e-3

    def push(self, k, l, w):
        cap = self.a.queue
        if cap == 0:
            return
        b = k.shape[0]
        if b > cap:  # only the last `cap` survive, in ring order
            k, l, w = k[-cap:], l[-cap:], w[-cap:]
            start = (self.qptr + b - cap) % cap
            b = cap
        else:
            start = self.qptr
        idx = (torch.arange(b, device=self.dev) + start) % cap
        self.qk.index_copy_(0, idx, k)
        self.ql.index_copy_(0, idx, l)
        self.qw.index_copy_(0, idx, w)
        self.qptr = (start + b) % cap
        self.qlen = min(cap, self.qlen + b)

    def step(self, x, y, uw, us):
        a = self.a
        method = a.method
        lam_c = ramp(1.0, self.t, self.ramp_steps)
        lam_p = ramp(0.5, self.t, self.ramp_steps)
        enqueue = None
        if method == "supervised":
            z_l, _, _ = self.fs(x)
            loss = F.cross_entropy(z_l, y)
        else:
            dsrpgc = method == "dsrpgc"
            with torch.no_grad():
                z_t, keys, _ = self.ft(uw)
                yhat = z_t.argmax(1)
            z_l, _, f_l = self.fs(x)
            z_s, q, f_s = self.fs(us)
            if dsrpgc:
                with torch.no_grad():
                    c = entropy_weight(z_t)
                    al = dsr_alignment(z_l.detach(), y, f_l.detach(), z_s.detach(), f_s.detach(), yhat, a.classes)
                    m = (self.meta[self.unl_idx] + 0.1 * al).clamp_(0.0, 1.0)
                    self.meta.index_copy_(0, self.unl_idx, m)
                    w = c * m
            else:
                w = torch.ones(a.batch_u, device=self.dev)
            loss = F.cross_entropy(z_l, y) + lam_c * weighted_consistency(z_s, z_t, w)
            if dsrpgc:
                n = self.qlen
                all_k = torch.cat([keys, self.qk[:n]])
                all_l = torch.cat([yhat, self.ql[:n]])
                all_w = torch.cat([w, self.qw[:n]])
                loss = loss + lam_p * pgc_loss(q, yhat, w, all_k, all_l, all_w, 0.1)
                enqueue = (keys, yhat, w)
        if a.sync_loss:
            v = loss.item()
            if not math.isfinite(v):
                raise RuntimeError(f"non-finite loss at step {self.t + 1}: {v}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.t_params, self.s_params, 1.0 - 0.99)
        if enqueue is not None:
            self.push(*enqueue)
        self.t += 1
        return loss


# ----------------------------------------------------------------------------------------------
# Golden conformance (shared/golden/*.safetensors).
# ----------------------------------------------------------------------------------------------

_ST_DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}


def read_safetensors(path):
    with open(path, "rb") as fh:
        raw = fh.read()
    n = struct.unpack("<Q", raw[:8])[0]
    hdr = json.loads(raw[8 : 8 + n])
    meta = hdr.pop("__metadata__", {}) or {}
    base = 8 + n
    out = {}
    for k, v in hdr.items():
        s, e = v["data_offsets"]
        buf = bytearray(raw[base + s : base + e])
        t = torch.frombuffer(buf, dtype=_ST_DTYPES[v["dtype"]]) if buf else torch.empty(0, dtype=_ST_DTYPES[v["dtype"]])
        out[k] = t.reshape(v["shape"]).clone()
    return out, meta


def load_strict(model, tensors, prefix):
    """Loads `prefix<name>` tensors; every parameter/buffer must be present (except torch's own
    num_batches_tracked counters) and no unknown name may remain."""
    sd = model.state_dict()
    given = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = [k for k in sd if k not in given and not k.endswith("num_batches_tracked")]
    unknown = [k for k in given if k not in sd]
    if missing or unknown:
        raise SystemExit(f"golden names do not match the model: missing {missing}, unknown {unknown}")
    for k, v in given.items():
        if tuple(v.shape) != tuple(sd[k].shape):
            raise SystemExit(f"golden tensor {prefix}{k}: shape {tuple(v.shape)} vs model {tuple(sd[k].shape)}")
        sd[k] = v
    model.load_state_dict(sd, strict=True)
    return len(given)


def compare(name, got, want, tol, report):
    got = got.detach().to(torch.float32).reshape(want.shape)
    want = want.to(torch.float32)
    err = (got - want).abs()
    bound = tol["abs"] + tol["rel"] * want.abs()
    ok = bool((err <= bound).all())
    report.append({"tensor": name, "max_abs_err": float(err.max()) if err.numel() else 0.0, "ok": ok})
    return ok


def golden(path, dt=torch.float32, verbose=False):
    tensors, meta = read_safetensors(path)
    op = meta.get("op")
    params = json.loads(meta.get("params", "{}"))
    tol = json.loads(meta.get("tol", '{"rel": 1e-4, "abs": 1e-5}'))
    mc = params["model"]
    mk = lambda: MedFuseNet(mc["in_ch"], mc["width"], mc["d"], mc["emb"], mc["classes"], mc["small_stem"]).to(dt)
    report = []
    if op == "medfusenet_forward_backward":
        m = mk()
        n = load_strict(m, {k: (v.to(dt) if v.is_floating_point() else v) for k, v in tensors.items()}, "in.param.")
        m.train()
        x = tensors["in.x"].to(dt).requires_grad_(True)
        logits, emb, _ = m(x)
        compare("out.logits", logits, tensors["out.logits"], tol, report)
        compare("out.embedding", emb, tensors["out.embedding"], tol, report)
        compare("out.loss", F.cross_entropy(logits, tensors["in.target"]), tensors["out.loss"], tol, report)
        (logits * tensors["grad_out.logits"].to(dt)).sum().add((emb * tensors["grad_out.embedding"].to(dt)).sum()).backward()
        compare("grad.x", x.grad, tensors["grad.x"], tol, report)
        sd = m.state_dict()
        for k, v in tensors.items():
            if k.startswith("out.state."):
                compare(k, sd[k[len("out.state.") :]], v, tol, report)
        for k, v in tensors.items():
            if k.startswith("grad.param."):
                p = dict(m.named_parameters())[k[len("grad.param.") :]]
                compare(k, p.grad, v, tol, report)
        extra = {"params_loaded": n}
    elif op == "dsrpgc_loss":
        s, t = mk(), mk()
        n = load_strict(s, {k: (v.to(dt) if v.is_floating_point() else v) for k, v in tensors.items()}, "in.student.")
        load_strict(t, {k: (v.to(dt) if v.is_floating_point() else v) for k, v in tensors.items()}, "in.teacher.")
        s.train()
        t.train()
        with torch.no_grad():
            z_t, keys, _ = t(tensors["in.x_weak"].to(dt))
        yhat = z_t.argmax(1)
        y = tensors["in.y_lab"]
        z_l, _, _ = s(tensors["in.x_lab"].to(dt))
        z_s, q, _ = s(tensors["in.x_strong"].to(dt))
        w = entropy_weight(z_t)
        sup = F.cross_entropy(z_l, y)
        cons = weighted_consistency(z_s, z_t, w)
        all_k = torch.cat([keys, tensors["in.queue_keys"].to(dt)])
        all_l = torch.cat([yhat, tensors["in.queue_labels"]])
        all_w = torch.cat([w, tensors["in.queue_weights"].to(dt)])
        pgc = pgc_loss(q, yhat, w, all_k, all_l, all_w, params.get("temperature", 0.1))
        loss = sup + params.get("lambda_cons", 1.0) * cons + params.get("lambda_pgc", 0.5) * pgc
        report.append({"tensor": "out.pseudo_labels", "ok": bool((yhat == tensors["out.pseudo_labels"]).all())})
        compare("out.weights", w, tensors["out.weights"], tol, report)
        compare("out.loss_sup", sup, tensors["out.loss_sup"], tol, report)
        compare("out.loss_cons", cons, tensors["out.loss_cons"], tol, report)
        compare("out.loss_pgc", pgc, tensors["out.loss_pgc"], tol, report)
        compare("out.loss", loss, tensors["out.loss"], tol, report)
        loss.backward()
        named = dict(s.named_parameters())
        for k, v in tensors.items():
            if k.startswith("grad.student."):
                compare(k, named[k[len("grad.student.") :]].grad, v, tol, report)
        extra = {"params_loaded": n}
    else:
        raise SystemExit(f"{path}: op '{op}' is not a whole-model case (medfusenet_forward_backward or dsrpgc_loss)")
    ok = all(r["ok"] for r in report)
    worst = max((r for r in report if "max_abs_err" in r), key=lambda r: r["max_abs_err"])
    print(json.dumps({"golden": os.path.basename(path), "op": op, "tol": tol, "checked": len(report),
                      "dtype": str(dt).replace("torch.", ""), "ok": ok, "worst": worst, "failed": [r for r in report if not r["ok"]], **extra}))
    for r in report:
        if "max_abs_err" in r and (verbose or not r["ok"]):
            print(f"  {r['tensor']:<48} max|err| {r['max_abs_err']:.3e} {'ok' if r['ok'] else 'FAIL'}", file=sys.stderr)
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------
# Benchmark.
# ----------------------------------------------------------------------------------------------


def union_and_span(intervals):
    """(length of the union of the [start, end) intervals, last end - first start)."""
    if not intervals:
        return 0.0, 0.0
    iv = sorted(intervals)
    busy, (cs, ce), last = 0.0, iv[0], iv[0][1]
    for s, e in iv[1:]:
        last = max(last, e)
        if s > ce:
            busy += ce - cs
            cs, ce = s, e
        else:
            ce = max(ce, e)
    return busy + (ce - cs), last - iv[0][0]


def summarize_profile(items, steps, wall_s, top, source):
    """The `profile` record of medssl-bench step --profile, from (name, start_us, end_us) device items."""
    by = {}
    for name, s, e in items:
        c = by.setdefault(name, [0, 0.0])
        c[0] += 1
        c[1] += max(0.0, e - s)
    order = sorted(by.items(), key=lambda kv: (-kv[1][1], kv[0]))
    busy_us, span_us = union_and_span([(s, max(s, e)) for _, s, e in items])
    n = float(steps)
    rest = order[top:]
    return {
        "source": source,
        "steps": steps,
        "wall_ms_per_step": wall_s * 1e3 / n,
        "busy_ms_per_step": busy_us / 1e3 / n,
        "busy_pct_of_wall": 100.0 * busy_us / 1e6 / wall_s if wall_s > 0 else None,
        "span_ms_per_step": span_us / 1e3 / n,
        "items_per_step": sum(c for c, _ in by.values()) / n,
        "distinct_items": len(by),
        "dropped_records": None,
        "top": [{"name": k, "calls_per_step": c / n, "us_per_step": us / n,
                 "pct_of_busy": 100.0 * us / max(busy_us, 1e-9)} for k, (c, us) in order[:top]],
        "rest_items": len(rest),
        "rest_us_per_step": sum(us for _, (_, us) in rest) / n,
    }


def profile_steps(step, sync, steps, top):
    """Runs `step` `steps` times under torch.profiler (device activity only) and summarizes the
    kernels, copies and fills the GPU ran."""
    from torch.profiler import profile, ProfilerActivity
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = time.perf_counter() - t
    items = [(e.name, float(e.time_range.start), float(e.time_range.end))
             for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return summarize_profile(items, steps, wall, top, "torch.profiler")


def add_model_args(ap):
    """The model's shape flags, with medssl-bench's names and defaults."""
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--fusion-dim", type=int, default=128)
    ap.add_argument("--emb", type=int, default=128)


def open_device(name):
    """(torch.device, is CUDA) for --device NAME; on CUDA the device is made current (its index
    filled in) and cudnn.benchmark is on (cuDNN's algorithms timed per shape, as medssl does)."""
    dev = torch.device(name)
    cuda = dev.type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False (CPU-only torch or no GPU)")
        if dev.index is not None:
            torch.cuda.set_device(dev)
        else:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cudnn.benchmark = True
    return dev, cuda


def main():
    ap = argparse.ArgumentParser(description="PyTorch peer of `medssl-bench step`")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--method", default="dsrpgc", choices=["dsrpgc", "supervised", "mean-teacher"])
    add_model_args(ap)
    ap.add_argument("--batch-l", type=int, default=12)
    ap.add_argument("--batch-u", type=int, default=36)
    ap.add_argument("--queue", type=int, default=4096)
    ap.add_argument("--fill-queue", action="store_true",
                    help="start with a full key queue (as medssl-bench --fill-queue and --cuda-graph)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: RAYON_NUM_THREADS or torch default)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--compile", action="store_true", help="torch.compile the student and teacher (use more --warmup)")
    ap.add_argument("--channels-last", action="store_true", help="NHWC memory format for models and inputs")
    ap.add_argument("--sync-loss", action="store_true", help="read the loss back every step (as our non-finite check)")
    ap.add_argument("--back-to-back", action="store_true",
                    help="after the timed steps, time --repeats more with no wait between them and one after the last "
                         "(back_to_back_ms_per_step; as medssl-bench step --back-to-back)")
    ap.add_argument("--tf32", action="store_true",
                    help="allow TF32 tensor-core math in cuDNN convolutions and cuBLAS matmuls "
                         "(default off: full FP32, as medssl without MEDSSL_TF32=1; PyTorch's own "
                         "default allows TF32 in convolutions)")
    ap.add_argument("--profile", action="store_true",
                    help="cuda: after the timed steps, run as many again under torch.profiler and report the "
                         "device's busy time per step and the kernels that take it (as medssl-bench step --profile)")
    ap.add_argument("--profile-top", type=int, default=40, help="kernels listed by --profile (the rest are summed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--golden", metavar="SAFETENSORS", help="check the model/loss against a golden case and exit")
    ap.add_argument("--golden-f64", action="store_true", help="run the golden check in float64 (default float32)")
    ap.add_argument("--verbose", action="store_true", help="golden: list every compared tensor")
    a = ap.parse_args()

    threads = a.threads or int(os.environ.get("RAYON_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)

    if a.golden:
        sys.exit(golden(a.golden, torch.float64 if a.golden_f64 else torch.float32, a.verbose))

    dev, cuda = open_device(a.device)
    if cuda:
        # Set explicitly, both ways: PyTorch's default (TF32 convolutions, FP32 matmuls) matches
        # neither of medssl's modes.
        torch.backends.cudnn.allow_tf32 = a.tf32
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
    torch.manual_seed(a.seed)
    peer = Peer(a, dev)
    mf = torch.channels_last if a.channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(a.seed + 1)

    def imgs(n):
        t = torch.rand(n, a.channels, a.image_size, a.image_size, generator=g) * 2.0 - 1.0
        return t.to(dev).contiguous(memory_format=mf)

    x = imgs(a.batch_l)
    y = (torch.arange(a.batch_l) % a.classes).to(dev)
    uw = imgs(a.batch_u)
    us = imgs(a.batch_u)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(a.warmup):
        peer.step(x, y, uw, us)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(max(1, a.repeats)):
        s = time.perf_counter()
        peer.step(x, y, uw, us)
        sync()
        times.append(time.perf_counter() - s)
    med = statistics.median(times)
    b2b = None
    if a.back_to_back:
        sync()
        s = time.perf_counter()
        for _ in range(max(1, a.repeats)):
            peer.step(x, y, uw, us)
        sync()
        b2b = (time.perf_counter() - s) * 1e3 / max(1, a.repeats)
    prof = None
    if a.profile:
        if not cuda:
            ap.error("--profile needs --device cuda")
        prof = profile_steps(lambda: peer.step(x, y, uw, us), sync, max(1, a.repeats), a.profile_top)
    fwd = forward_flops(a.channels, a.width, a.fusion_dim, a.emb, a.classes, a.image_size <= 64, a.image_size, a.image_size)
    if a.method == "supervised":
        student_imgs, teacher_imgs, images = a.batch_l, 0, a.batch_l
    else:
        student_imgs, teacher_imgs, images = a.batch_l + a.batch_u, a.batch_u, a.batch_l + a.batch_u
    step_flops = fwd * (3 * student_imgs + teacher_imgs)
    rec = {
        "bench": "step",
        "engine": "torch-compile" if a.compile else "torch-eager",
        "device": f"cuda:{dev.index}" if cuda else "cpu",
        "method": a.method,
        "width": a.width,
        "image_size": a.image_size,
        "channels": a.channels,
        "classes": a.classes,
        "batch_l": a.batch_l,
        "batch_u": a.batch_u,
        "queue": a.queue,
        "queue_filled": bool(a.fill_queue),
        "threads": torch.get_num_threads(),
        "repeats": a.repeats,
        "median_ms": med * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "back_to_back_ms_per_step": b2b,
        "images_per_s": images / med,
        "gflop_per_step": step_flops / 1e9,
        "gflops": step_flops / med / 1e9,
        "torch_version": torch.__version__,
        "channels_last": a.channels_last,
        "sync_loss": a.sync_loss,
        "tf32": bool(a.tf32) if cuda else None,
        "profile": prof,
    }
    if cuda:
        rec["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        rec["device_name"] = torch.cuda.get_device_name(dev)
    if a.json:
        print(json.dumps(rec))
    else:
        print(
            f"step {a.method} w{a.width} {a.image_size}px {a.batch_l}+{a.batch_u} on {rec['device']} "
            f"({rec['threads']} threads, {rec['engine']} {torch.__version__}): median {med * 1e3:.1f} ms "
            f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}), {images / med:.1f} images/s, "
            f"{step_flops / 1e9:.2f} GFLOP/step, {step_flops / med / 1e9:.1f} GFLOP/s"
            + (f", peak {rec['peak_mem_mb']:.0f} MiB" if cuda else "")
        )
        if b2b is not None:
            print(f"  back to back: {b2b:.2f} ms per step ({max(1, a.repeats)} steps without a wait between them, one wait after the last)")
        if prof:
            print(f"  profile ({prof['source']}, {prof['steps']} steps): device busy {prof['busy_ms_per_step']:.2f} ms "
                  f"of {prof['wall_ms_per_step']:.2f} ms wall per step, {prof['items_per_step']:.0f} items per step")
            for e in prof["top"]:
                print(f"  {e['us_per_step']:9.1f} {e['calls_per_step']:7.1f} {e['pct_of_busy']:6.1f}  {e['name'][:100]}")


if __name__ == "__main__":
    main()
