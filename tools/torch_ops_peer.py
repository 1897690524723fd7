#!/usr/bin/env python3
"""PyTorch peer of `medssl-bench ops` for the memory-bound ops and the convolutions, timed the same way.

The same ops at the same shapes as `medssl-bench ops --width W --batch B` (the MedFuseNet-ResNet
of tools/torch_peer.py, SPEC §2): training-mode batch norm forward and backward and ReLU forward
and backward at every distinct batch-norm input shape of the model, the Adam update of all the
student's parameters and the teacher EMA over them. Each is the call PyTorch eager makes in a
training step: `aten::cudnn_batch_norm` / `aten::cudnn_batch_norm_backward` on CUDA (where that
op is missing, `F.batch_norm` and its autograd backward; the row's "impl" says which ran),
`torch.relu` / `aten::threshold_backward`, `torch.optim.Adam` (its default multi-tensor
"foreach" path, which tools/torch_peer.py's step uses, and `fused=True`) and `torch._foreach_lerp_`.
With `--op conv2d` also every distinct convolution of the model (forward `F.conv2d`, backward
`aten::convolution_backward` with the gradients medssl computes: no input gradient for the stem,
the bias gradient where there is a bias), with cuDNN's algorithms timed per shape
(`cudnn.benchmark`, as tools/torch_peer.py's step) in full FP32 (TF32 off), rated by FLOPs ("gflop", "gflops") rather than
bytes.

`--profile` (CUDA): each row's calls of one sample again under torch.profiler, the device time per
call by kernel in the row's "profile" (the record of `medssl-bench ops --profile`), so that
tools/ops-table.py can pair the two sides' device time per call and kernels, free of the host.

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

from torch_peer import MedFuseNet, add_model_args, open_device, profile_steps

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


def layer_inputs(a, kind, key):
    """One forward pass of the model on two images: `key(module, name, input)` of every layer of
    type `kind`, the distinct keys in model order, each with the names of the layers that give it.
    Returns the dict and the model."""
    model = MedFuseNet(a.channels, a.width, a.fusion_dim, a.emb, a.classes, a.image_size <= 64)
    seen = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, kind):
            def hook(mod, inp, _out, name=name):
                seen.setdefault(key(mod, name, inp[0]), []).append(name)
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(2, a.channels, a.image_size, a.image_size))
    for h in hooks:
        h.remove()
    return seen, model


def bn_shapes(a):
    """Distinct batch-norm input shapes of the model at --batch, with the layers that have them."""
    seen, model = layer_inputs(a, nn.BatchNorm2d, lambda _m, _n, x: tuple(x.shape[1:]))
    return [((a.batch,) + chw, layers) for chw, layers in seen.items()], model


def conv_shapes(a):
    """Distinct convolutions of the model at --batch: (input shape, weight shape, stride, padding,
    bias, whether medssl computes the input gradient (not for the stem, whose input is the
    image)), with the layers that have them, in model order."""
    seen, _ = layer_inputs(a, nn.Conv2d, lambda m, name, x: (
        tuple(x.shape[1:]), tuple(m.weight.shape), m.stride[0], m.padding[0], m.bias is not None,
        name != "conv1"))
    return [((a.batch,) + chw, w, st, pd, bias, need_x, layers)
            for (chw, w, st, pd, bias, need_x), layers in seen.items()]


def conv_shape_str(x, w, stride, pad, bias):
    """medssl-bench ops' shape of a convolution row."""
    return (f"x=[{','.join(map(str, x))}] w=[{','.join(map(str, w))}] s={stride} p={pad}"
            + (" bias" if bias else ""))


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
    ap.add_argument("--peak-copy-mib", type=int, default=256, help="0: not measured (no %% of copy)")
    ap.add_argument("--op", default="batch_norm,relu,adam_step,ema_update",
                    help="comma-separated: batch_norm, relu, adam_step, ema_update, conv2d")
    ap.add_argument("--profile", action="store_true",
                    help="cuda: each row's calls of one sample again under torch.profiler (device time per "
                         "call by kernel, in the row's 'profile')")
    ap.add_argument("--profile-top", type=int, default=8, help="kernels listed per profiled row")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    a = ap.parse_args()
    ops = {o.strip() for o in a.op.split(",") if o.strip()}
    unknown = ops - {"batch_norm", "relu", "adam_step", "ema_update", "conv2d"}
    if unknown:
        ap.error(f"--op: unknown op(s) {sorted(unknown)}")

    dev, cuda = open_device(a.device)
    if a.profile and not cuda:
        ap.error("--profile needs a CUDA device (the device time of each kernel)")
    if cuda:
        # Full FP32, as medssl by default (PyTorch lets cuDNN use TF32 unless told not to).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    torch.manual_seed(0)
    run = lambda f: timed(f, sync, a.warmup, a.repeats, a.calls)  # noqa: E731

    # The device's copy bandwidth, read + write bytes (not measured with --peak-copy-mib 0, as in
    # medssl-bench: the memory-bound rows then have no % of copy).
    peak, peak_kind = None, None
    if a.peak_copy_mib > 0:
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

    def emit(op, d, shape, mbytes, t, impl, layers=None, f=None, gflop=None):
        """One row: rated by bytes against the copy (memory-bound ops), or by `gflop` (convolutions);
        with --profile, `f`'s calls of one sample again under the profiler."""
        med, mn, calls = t
        r = dict(base, op=op, dir=d, shape=shape, impl=impl, median_ms=med * 1e3, min_ms=mn * 1e3,
                 calls_per_sample=calls)
        if gflop is None:
            gbps = mbytes / med / 1e9
            pct = None if peak is None else 100.0 * gbps / peak
            r.update(mbytes=mbytes / 1e6, gbps=gbps, pct_of_peak=pct)
            rate = f"{gbps:8.1f} GB/s " + ("    - " if pct is None else f"{pct:5.1f} % of copy")
        else:
            r.update(gflop=gflop, gflops=gflop / med)
            r.pop("peak_kind")
            r.pop("peak_value")
            rate = f"{r['gflops']:8.1f} GFLOP/s"
        if layers:
            r["layers"] = ",".join(layers)
            r["uses"] = len(layers)
        if a.profile and f is not None:
            r["profile"] = profile_steps(f, sync, calls, a.profile_top)
        rows.append(r)
        if a.json:
            print(json.dumps(r), flush=True)
        else:
            dev_us = f", device {r['profile']['busy_ms_per_step'] * 1e3:.1f} us/call" if "profile" in r else ""
            print(f"{op:<18} {d:<4} {shape:<40} {med * 1e3:9.4f} ms {rate} ({impl}, {calls} calls/sample"
                  f"{dev_us})", flush=True)

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
                    emit("batch_norm_train", d, shape_str(shape), nb, run(f), impl, layers, f)
                except Exception as e:  # noqa: BLE001  (reported in the row)
                    failed("batch_norm_train", d, shape_str(shape), e)
        if "relu" in ops:
            y = torch.relu(x)
            try:
                rf = lambda: torch.relu(x)  # noqa: E731
                rb = lambda: torch.ops.aten.threshold_backward(gy, y, 0.0)  # noqa: E731
                emit("relu", "fwd", shape_str(shape), 8.0 * numel, run(rf), "torch.relu", f=rf)
                emit("relu", "bwd", shape_str(shape), 12.0 * numel, run(rb), "aten::threshold_backward", f=rb)
            except Exception as e:  # noqa: BLE001
                failed("relu", "fwd/bwd", shape_str(shape), e)
        del x, gy

    if "conv2d" in ops:
        if cuda:
            torch.backends.cudnn.benchmark = True
        for x_shape, w_shape, st, pd, bias, need_x, layers in conv_shapes(a):
            shape = conv_shape_str(x_shape, w_shape, st, pd, bias)
            try:
                x = torch.randn(x_shape, device=dev)
                w = torch.randn(w_shape, device=dev) * (1.0 / math.prod(w_shape[1:])) ** 0.5
                b = torch.randn(w_shape[0], device=dev) if bias else None
                cf = lambda: F.conv2d(x, w, b, st, pd)  # noqa: E731
                gy = torch.randn_like(cf())
                cb = lambda: torch.ops.aten.convolution_backward(  # noqa: E731
                    gy, x, w, [w_shape[0]] if bias else None, [st, st], [pd, pd], [1, 1], False, [0, 0], 1,
                    [need_x, True, bias])
                cb()
                ho, wo = gy.shape[2], gy.shape[3]
                gflop = 2.0 * x_shape[0] * w_shape[0] * ho * wo * w_shape[1] * w_shape[2] * w_shape[3] / 1e9
                emit("conv2d", "fwd", shape, 0.0, run(cf), "F.conv2d", layers, cf, gflop)
                emit("conv2d", "bwd", shape, 0.0, run(cb), "aten::convolution_backward", layers, cb,
                     gflop * (2.0 if need_x else 1.0))
            except Exception as e:  # noqa: BLE001  (reported in the row)
                failed("conv2d", "fwd/bwd", shape, e)

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
                     "torch.optim.Adam(fused=True)" if fused else "torch.optim.Adam (foreach)", f=opt.step)
            except Exception as e:  # noqa: BLE001
                failed("adam_step", "upd", pshape, e)
    if "ema_update" in ops:
        t = [p.detach().clone() for p in params]
        s = [p.detach().clone() + 0.01 for p in params]
        try:
            ef = lambda: torch._foreach_lerp_(t, s, 1.0 - 0.99)  # noqa: E731
            emit("ema_update", "upd", pshape, 4.0 * 3 * count, run(ef), "torch._foreach_lerp_", f=ef)
        except Exception as e:  # noqa: BLE001
            failed("ema_update", "upd", pshape, e)
    if not a.json:
        print(f"copy bandwidth ({peak_kind}): {peak:.1f} GB/s" if peak is not None
              else "copy bandwidth: not measured (--peak-copy-mib 0)")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
