#!/usr/bin/env python3
"""PyTorch peer of `medssl-bench ops` for the memory-bound ops, rated the same way.

The same ops at the same shapes as `medssl-bench ops --width W --batch B` (the MedFuseNet-ResNet
of tools/torch_peer.py, SPEC §2): training-mode batch norm forward and backward and ReLU forward
and backward at every distinct batch-norm input shape of the model, the Adam update of all the
student's parameters and the teacher EMA over them. Each is the call PyTorch eager makes in a
training step: `aten::cudnn_batch_norm` / `aten::cudnn_batch_norm_backward` on CUDA (where that
op is missing, `F.batch_norm` and its autograd backward; the row's "impl" says which ran),
`torch.relu` / `aten::threshold_backward`, `torch.optim.Adam` (its default multi-tensor
"foreach" path, which tools/torch_peer.py's step uses, and `fused=True`) and `torch._foreach_lerp_`.

Timing and rating as `medssl-bench ops`: after warm-up calls, each sample times back-to-back
calls and one synchronisation (`--calls 0`: as many as fill about 1 ms, at most 200), the median
over `--repeats` samples per call; bytes are what the op must read and write once (the same
formulas: batch norm forward x and y plus 5 per-channel values, backward x, dy, dx plus 5, ReLU 2
and 3 tensors, Adam 7 and the EMA 3 per parameter), rated against a 256 MiB device-to-device copy
timed in the same invocation (read + write bytes). Rows are JSON lines with medssl's keys
("bench": "ops", "op", "dir", "shape", "median_ms", "gbps", "pct_of_peak", ...), "engine":
"torch-eager"; tools/ops-table.py pairs them with medssl's rows.

PyTorch is NOT a dependency of medssl (see tools/torch_peer.py).

    python3 tools/torch_ops_peer.py --device cuda --width 64 --batch 256 --json
"""

import argparse
import json
import math
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:  # pragma: no cover
    sys.stderr.write("torch_ops_peer.py needs PyTorch, which is not a dependency of medssl.\n")
    sys.exit(2)

from torch_peer import MedFuseNet, add_model_args, open_device

SAMPLE_S = 1e-3
MAX_CALLS = 200


def timed(f, sync, warmup, repeats, calls):
    """(median s, min s, calls per sample) per call of f, as medssl-bench ops' `time`."""
    for _ in range(warmup):
        f()
    sync()
    if calls <= 0:
        s = time.perf_counter()
        f()
        sync()
        one = max(time.perf_counter() - s, 1e-9)
        calls = max(1, min(MAX_CALLS, math.ceil(SAMPLE_S / one)))
    t = []
    for _ in range(max(1, repeats)):
        s = time.perf_counter()
        for _ in range(calls):
            f()
        sync()
        t.append((time.perf_counter() - s) / calls)
    return statistics.median(t), min(t), calls


def bn_shapes(a):
    """Distinct batch-norm input shapes of the model at --batch, with the layers that have them."""
    model = MedFuseNet(a.channels, a.width, a.fusion_dim, a.emb, a.classes, a.image_size <= 64)
    seen = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            def hook(mod, inp, _out, name=name):
                seen.setdefault(tuple(inp[0].shape[1:]), []).append(name)
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(2, a.channels, a.image_size, a.image_size))
    for h in hooks:
        h.remove()
    return [((a.batch,) + chw, layers) for chw, layers in seen.items()], model


def shape_str(s):
    return "x=[" + ",".join(str(v) for v in s) + "]"


def main():
    ap = argparse.ArgumentParser(description="PyTorch peer of `medssl-bench ops` (memory-bound ops)")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    # The defaults of `medssl-bench ops`: the same flags give the same shapes.
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=36)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--calls", type=int, default=0, help="calls per sample (0: about 1 ms of calls, at most 200)")
    ap.add_argument("--peak-copy-mib", type=int, default=256)
    ap.add_argument("--op", default="batch_norm,relu,adam_step,ema_update",
                    help="comma-separated: batch_norm, relu, adam_step, ema_update")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    a = ap.parse_args()
    ops = {o.strip() for o in a.op.split(",") if o.strip()}
    unknown = ops - {"batch_norm", "relu", "adam_step", "ema_update"}
    if unknown:
        ap.error(f"--op: unknown op(s) {sorted(unknown)}")

    dev, cuda = open_device(a.device)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    torch.manual_seed(0)
    run = lambda f: timed(f, sync, a.warmup, a.repeats, a.calls)  # noqa: E731

    # The device's copy bandwidth, read + write bytes.
    n = a.peak_copy_mib * 2**20 // 4
    src = torch.rand(n, device=dev)
    dst = torch.empty_like(src)
    med, _, _ = timed(lambda: dst.copy_(src), sync, 2, 10, 4)
    peak = 2.0 * n * 4 / med / 1e9
    peak_kind = f"memcpy_dtod_{a.peak_copy_mib}MiB" if cuda else f"copy_{a.peak_copy_mib}MiB"
    del src, dst

    base = {
        "bench": "ops",
        "engine": "torch-eager",
        "device": f"cuda:{dev.index}" if cuda else "cpu",
        "width": a.width,
        "batch": a.batch,
        "image_size": a.image_size,
        "repeats": a.repeats,
        "peak_kind": peak_kind,
        "peak_value": peak,
        "torch_version": torch.__version__,
    }
    if cuda:
        base["device_name"] = torch.cuda.get_device_name(dev)
        base["cudnn_version"] = torch.backends.cudnn.version()
    rows = []

    def emit(op, d, shape, mbytes, t, impl, layers=None):
        med, mn, calls = t
        r = dict(base, op=op, dir=d, shape=shape, impl=impl, mbytes=mbytes / 1e6, median_ms=med * 1e3,
                 min_ms=mn * 1e3, calls_per_sample=calls, gbps=mbytes / med / 1e9,
                 pct_of_peak=100.0 * mbytes / med / 1e9 / peak)
        if layers:
            r["layers"] = ",".join(layers)
            r["uses"] = len(layers)
        rows.append(r)
        if a.json:
            print(json.dumps(r), flush=True)
        else:
            print(f"{op:<18} {d:<4} {shape:<32} {med * 1e3:9.4f} ms {r['gbps']:8.1f} GB/s "
                  f"{r['pct_of_peak']:5.1f} % of copy ({impl}, {calls} calls/sample)", flush=True)

    def failed(op, d, shape, e):
        r = dict(base, op=op, dir=d, shape=shape, error=f"{type(e).__name__}: {e}")
        rows.append(r)
        print(json.dumps(r) if a.json else f"{op} {d} {shape}: FAILED {r['error']}", flush=True)

    shapes, model = bn_shapes(a)
    for shape, layers in shapes:
        numel = math.prod(shape)
        c = shape[1]
        x = torch.randn(shape, device=dev)
        gy = torch.randn(shape, device=dev)
        if "batch_norm" in ops:
            g = torch.rand(c, device=dev) + 0.5
            b = torch.randn(c, device=dev) * 0.5
            rm = torch.zeros(c, device=dev)
            rv = torch.ones(c, device=dev)
            fb, bb = 4.0 * (2 * numel + 5 * c), 4.0 * (3 * numel + 5 * c)
            try:
                if not cuda:
                    raise RuntimeError("cuDNN batch norm is CUDA only")
                fwd = lambda: torch.ops.aten.cudnn_batch_norm(x, g, b, rm, rv, True, 0.1, 1e-5)  # noqa: E731
                _, sm, sv, rs = fwd()
                bwd = lambda: torch.ops.aten.cudnn_batch_norm_backward(x, gy, g, rm, rv, sm, sv, 1e-5, rs)  # noqa: E731
                bwd()
                impl = "aten::cudnn_batch_norm"
            except Exception:  # the op or its signature is missing: what F.batch_norm dispatches to
                xr = x.clone().requires_grad_(True)
                gr, br = g.clone().requires_grad_(True), b.clone().requires_grad_(True)

                def fwd():
                    with torch.no_grad():
                        return F.batch_norm(x, rm, rv, g, b, True, 0.1, 1e-5)

                y = F.batch_norm(xr, rm, rv, gr, br, True, 0.1, 1e-5)
                bwd = lambda: torch.autograd.grad(y, (xr, gr, br), gy, retain_graph=True)  # noqa: E731
                impl = "F.batch_norm + autograd"
            for d, f, nb in (("fwd", fwd, fb), ("bwd", bwd, bb)):
                try:
                    emit("batch_norm_train", d, shape_str(shape), nb, run(f), impl, layers)
                except Exception as e:  # noqa: BLE001  (reported in the row)
                    failed("batch_norm_train", d, shape_str(shape), e)
        if "relu" in ops:
            y = torch.relu(x)
            try:
                emit("relu", "fwd", shape_str(shape), 8.0 * numel, run(lambda: torch.relu(x)), "torch.relu")
                emit("relu", "bwd", shape_str(shape), 12.0 * numel,
                     run(lambda: torch.ops.aten.threshold_backward(gy, y, 0.0)), "aten::threshold_backward")
            except Exception as e:  # noqa: BLE001
                failed("relu", "fwd/bwd", shape_str(shape), e)
        del x, gy

    params = [p.to(dev) for p in model.parameters()]
    count = sum(p.numel() for p in params)
    pshape = f"{len(params)} tensors, {count} params"
    if "adam_step" in ops:
        for fused in (False, True):
            ps = [p.detach().clone().requires_grad_(True) for p in params]
            for p in ps:
                p.grad = torch.randn_like(p) * 1e-2
            try:
                kw = {"fused": True} if fused else {}
                opt = torch.optim.Adam(ps, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=5e-4, **kw)
                emit("adam_step", "upd", pshape, 4.0 * 7 * count, run(opt.step),
                     "torch.optim.Adam(fused=True)" if fused else "torch.optim.Adam (foreach)")
            except Exception as e:  # noqa: BLE001
                failed("adam_step", "upd", pshape, e)
    if "ema_update" in ops:
        t = [p.detach().clone() for p in params]
        s = [p.detach().clone() + 0.01 for p in params]
        try:
            emit("ema_update", "upd", pshape, 4.0 * 3 * count, run(lambda: torch._foreach_lerp_(t, s, 1.0 - 0.99)),
                 "torch._foreach_lerp_")
        except Exception as e:  # noqa: BLE001
            failed("ema_update", "upd", pshape, e)
    if not a.json:
        print(f"copy bandwidth ({peak_kind}): {peak:.1f} GB/s")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
