"""JSON lines as the benchmarks write them (one object per line), for the tools that pair them,
and the CUDA switches a medssl row records (which of them differ from its build's defaults)."""

import json
import sys


def read_rows(path, keep):
    """The objects of the JSON-lines file `path` for which `keep(row)` is true, in file order;
    blank lines are skipped, and a line that is not JSON ends the program naming file and line."""
    with open(path) as f:
        return parse_rows(f.read(), path, keep)


def parse_rows(text, name, keep):
    """`read_rows` of JSON lines already read (`name` names them in errors)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            sys.exit(f"{name}:{n}: not JSON ({e})")
        if keep(r):
            out.append(r)
    return out


def workload(r):
    """What a `step` row measured, as both sides' rows name it: (method, width, image size,
    labelled batch, unlabelled batch, queue, whether the queue started full, TF32)."""
    return (r.get("method"), r.get("width"), r.get("image_size"), r.get("batch_l"), r.get("batch_u"),
            r.get("queue"), bool(r.get("queue_filled")), bool(r.get("tf32")))


# The switches' defaults of builds whose rows do not name them (before "defaults" existed; those
# rows do not record MEDSSL_CUDA_CONV or MEDSSL_CUDA_CONV1X1 either), and of CPU rows, whose
# "defaults" is null (their one switch, MEDSSL_CPU_CONV as "cpu_conv", defaults to "auto").
OLD_DEFAULTS = {"tf32": False, "cudnn_algo": "find", "cudnn_deterministic_first": True,
                "bn_fused_max_m": 65536, "bn_split": 0, "bn_stats": "two-pass", "bn_apply": "flat",
                "cpu_conv": "auto"}

# How a variant row names a switch that differs from the default.
LABELS = {
    "tf32": lambda v: "tf32" if v else "no tf32",
    "cudnn_algo": lambda v: f"cudnn {v}",
    "cudnn_deterministic_first": lambda v: "deterministic cudnn" if v else "non-deterministic cudnn",
    "cudnn_fwd_algo": lambda v: f"fwd {v}",
    "cudnn_bwd_data_algo": lambda v: f"data grad {v}",
    "cudnn_bwd_filter_algo": lambda v: f"filter grad {v}",
    "conv": str,
    "conv1x1": lambda v: f"1x1 {v}",
    "fusion": lambda v: f"fusion {v}",
    "step_read": lambda v: f"step read {v}",
    "bn_fused_max_m": lambda v: f"fused max {v}",
    "bn_split": lambda v: f"split {v}",
    "bn_stats": str,
    "bn_inflight": lambda v: f"{v} loads in flight",
    "bn_l2": lambda v: f"L2 {v}",
    "bn_apply": str,
    "bn_fwd": lambda v: f"bn fwd {v}",
    "bn_bwd": lambda v: f"bn bwd {v}",
    "bn_vec": lambda v: f"float4 bn {v}",
    "bn_pipe": lambda v: f"pipelined bn {v}",
    "bn_keep": lambda v: f"bn keep {v}",
    "cpu_conv": lambda v: f"cpu conv {v}",
}


def changed(r):
    """The switches of a medssl row that differ from its build's defaults, in LABELS' order."""
    d = r.get("defaults") or OLD_DEFAULTS
    return [(k, r[k]) for k in LABELS if k in d and r.get(k) is not None and r[k] != d[k]]


def default_switches(r):
    return not changed(r)


def variant_label(r):
    """What a medssl row's switches change from the defaults, e.g. "split 4, welford"."""
    return ", ".join(LABELS[k](v) for k, v in changed(r))
