#!/usr/bin/env python3
"""The figures of one tools/gpu-run.sh run as Markdown, for bench/results/<date>-<device>.md.

    python3 tools/gpu-report.py RUN_DIR [--code COMMIT] [--date YYYY-MM-DD]

RUN_DIR is the folder a device command brought back (summary.json, the benchmarks' JSON lines,
ops.md, gpu-run.tar.gz) or a committed run folder (the same files unpacked). Files missing from
the folder are read from its gpu-run.tar.gz. Prints, each figure taken from the files (nothing
typed by hand):

- the device and every step's exit status;
- correctness: each parity-test step's passed / failed counts and failures, conformance on
  cuda and cpu, whether the graph training runs equal the plain ones, each training run's steps
  per second;
- the training step against PyTorch eager: every medssl-bench step row paired with the peer's
  row of the same workload (method, width, image size, batches, queue, full queue, TF32), with
  the switches a row changes from its build's defaults, medians (fastest) and the ratio
  PyTorch / medssl;
- device profiles: busy time per step on both sides, and the device time per call of the
  batch-norm kernels (medssl's `bn_*`, cuDNN's `bn_*` under PyTorch);
- ops.md as the run wrote it.
"""

import argparse
import io
import json
import os
import sys
import tarfile

from jsonl import parse_rows, variant_label, workload


class Run:
    """The files of one run: from the folder, else from its gpu-run.tar.gz (as it came back) or
    its logs.tar.gz (a committed run's logs/ folder, see bench/results/README.md)."""

    def __init__(self, root):
        self.root = root
        self.tars = [
            tarfile.open(path)
            for path in (os.path.join(root, n) for n in ("gpu-run.tar.gz", "logs.tar.gz"))
            if os.path.exists(path)
        ]

    def text(self, name):
        path = os.path.join(self.root, name)
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                return f.read()
        for tar in self.tars:
            for m in tar.getmembers():
                if m.name.lstrip("./") == name:
                    return io.TextIOWrapper(tar.extractfile(m), errors="replace").read()
        return None

    def rows(self, name, keep=lambda r: True):
        text = self.text(name)
        return [] if text is None else parse_rows(text, name, keep)


def step_key(r):
    """`workload(r)` led by the device kind (cpu or cuda)."""
    dev = "cpu" if str(r.get("device", "")).startswith("cpu") else "cuda"
    return (dev,) + workload(r)


def describe(k):
    dev, method, width, size, bl, bu, queue, filled, tf32 = k
    s = f"{method}, width {width}, {size} px, {bl} + {bu}"
    if method != "supervised":
        s += f", queue {queue}" + (", full" if filled else "")
    if tf32:
        s += ", TF32 both sides"
    return ("CPU: " if dev == "cpu" else "") + s


def ms(r):
    return f"{r['median_ms']:.2f} ({r['min_ms']:.2f})"


def correctness(run, summary):
    out = ["## Correctness", ""]
    for s in summary.get("steps", []):
        if s["step"].startswith("test_") and "tests" in s:
            t = s["tests"]
            fails = ", ".join(s.get("failures") or []) or "none"
            out.append(f"- `{s['step']}`: {t['passed']} passed, {t['failed']} failed, "
                       f"{t['skipped_no_device']} skipped for want of a device (failures: {fails})")
        if s["step"].startswith("conformance_") and s.get("conformance"):
            c = s["conformance"]
            failed = ", ".join(s.get("failed_cases") or []) or "none"
            out.append(f"- `{s['step']}` on {c.get('device')}: {c.get('passed')} passed, "
                       f"{c.get('failed')} failed (failed cases: {failed})")
    for k in ("train_graph_vs_plain", "train_ham_graph_vs_plain"):
        v = summary.get(k)
        if v:
            diff = v.get("bitwise_different") or []
            out.append(f"- `{k}`: {v.get('tensors')} tensors, {len(diff)} differ bit for bit"
                       + (f" ({', '.join(diff[:5])}{', …' if len(diff) > 5 else ''})" if diff else ""))
    runs = summary.get("train_runs") or {}
    for name, t in runs.items():
        out.append(f"- training run `{name}`: {t['steps']} steps in {t['wall_seconds']:.2f} s, "
                   f"{t['steps_per_s']:.1f} steps/s")
    for plain, graph in (("train", "train_graph"), ("train_ham", "train_ham_graph")):
        if plain in runs and graph in runs:
            out.append(f"- `{graph}` against `{plain}`: "
                       f"{runs[graph]['steps_per_s'] / runs[plain]['steps_per_s']:.2f}× the steps per second")
    return out


def steps_table(run):
    ours = run.rows("bench_cuda.jsonl", lambda r: r.get("bench") == "step")
    ours += run.rows("bench_cpu.jsonl", lambda r: r.get("bench") == "step")
    peer = {}
    peer_b2b = {}
    for p in run.rows("torch_peer.jsonl", lambda r: r.get("bench") == "step" and "median_ms" in r):
        peer.setdefault(step_key(p), p)
        if p.get("back_to_back_ms_per_step") is not None:
            peer_b2b.setdefault(step_key(p), p["back_to_back_ms_per_step"])
    out = ["## Training step against PyTorch eager", "",
           "Medians of the timed steps, fastest in brackets; ratio = PyTorch ms / medssl ms. A "
           "CUDA-graph row (which starts with a full queue) is paired with the peer's full-queue "
           "row; a supervised row with the peer's supervised row whatever its queue.", "",
           "Back to back: `--back-to-back` rows, the ms per step of as many steps again issued "
           "with no wait between them and one after the last (medssl's queued read, "
           "`MEDSSL_CUDA_STEP_READ=later`, the default since 2026-11-28, overlaps a step's host "
           "work with the previous step's device work; `step read wait` rows wait for each "
           "step's read), against the peer's row of the same workload that has it.", "",
           "| workload | medssl | switches changed | medssl ms | PyTorch ms | ratio | back to back medssl / PyTorch ms | ratio |",
           "|---|---|---|---|---|---|---|---|"]
    for r in ours:
        if "median_ms" not in r:
            continue
        k = step_key(r)
        p = peer.get(k)
        if p is None and r.get("method") == "supervised":
            p = next((v for kk, v in peer.items() if kk[:7] == k[:7] and kk[8] == k[8]), None)
        mode = graph_mode(r)
        ratio = f"{p['median_ms'] / r['median_ms']:.2f}×" if p else ""
        b2b, b2b_ratio = "", ""
        ours_b2b = r.get("back_to_back_ms_per_step")
        if ours_b2b is not None:
            pb = peer_b2b.get(k)
            b2b = f"{ours_b2b:.2f} / " + (f"{pb:.2f}" if pb is not None else "-")
            b2b_ratio = f"{pb / ours_b2b:.2f}×" if pb is not None else ""
        out.append(f"| {describe(k)} | {mode} | {variant_label(r)} | {ms(r)} | "
                   f"{ms(p) if p else ''} | {ratio} | {b2b} | {b2b_ratio} |")
    return out


def graph_mode(r):
    """"plain", or "CUDA graph" with the host's part of each replayed step (before the graph's
    launch, the device idle) where the row has it."""
    g = r.get("cuda_graph")
    if not g:
        return "plain"
    host = g.get("shadow_host_ms_per_step")
    return f"CUDA graph (host {host:.2f} ms before launch)" if host is not None else "CUDA graph"


def per_call(profile, pred):
    """`name µs (calls)` per call of the kernels `pred` picks from a profile's top list."""
    out = []
    for t in profile.get("top", []):
        if pred(t["name"]) and t.get("calls_per_step"):
            name = t["name"] if len(t["name"]) <= 40 else t["name"][:39] + "…"
            out.append(f"`{name}` {t['us_per_step'] / t['calls_per_step']:.2f} µs ×{t['calls_per_step']:.0f}")
    return "; ".join(out)


def profiles(run):
    ours = run.rows("bench_cuda_profile.jsonl", lambda r: r.get("profile"))
    peer = {}
    for p in run.rows("torch_peer_profile.jsonl", lambda r: r.get("profile")):
        peer.setdefault(step_key(p)[1:], p)
    out = ["## Device profiles (busy time per step; batch-norm kernels per call)", "",
           "| workload | medssl | medssl wall / busy ms | PyTorch busy ms | medssl batch norm | PyTorch batch norm |",
           "|---|---|---|---|---|---|"]
    for r in ours:
        k = step_key(r)
        p = peer.get(k[1:])
        if p is None:  # a graph row starts full; the peer's profile may not
            p = next((v for kk, v in peer.items() if kk[:6] == k[1:7] and kk[7] == k[8]), None)
        mode = graph_mode(r)
        label = variant_label(r)
        mode += f" ({label})" if label else ""
        peer_busy = f"{p['profile']['busy_ms_per_step']:.2f}" if p else ""
        ours_bn = per_call(r["profile"], lambda n: n.startswith("bn_"))
        peer_bn = per_call(p["profile"], lambda n: "bn_fw" in n or "bn_bw" in n) if p else ""
        wall = r["profile"].get("wall_ms_per_step")
        wall = f"{wall:.2f} / " if wall is not None else ""
        out.append(f"| {describe(k)} | {mode} | {wall}{r['profile']['busy_ms_per_step']:.2f} | {peer_busy} "
                   f"| {ours_bn} | {peer_bn} |")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="the folder of one gpu-run.sh run")
    ap.add_argument("--code", default="", help="the commit the run's pack was built from")
    ap.add_argument("--date", default="", help="the run's date")
    a = ap.parse_args()
    run = Run(a.run)
    text = run.text("summary.json")
    if text is None:
        sys.exit(f"{a.run}: no summary.json (neither in the folder nor in gpu-run.tar.gz)")
    summary = json.loads(text)
    head = f"# GPU run: {summary.get('gpu', 'unknown device')}"
    head += f", {a.date}" if a.date else ""
    head += f", code of {a.code}" if a.code else ""
    out = [head, ""]
    steps = summary.get("steps", [])
    bad = [s["step"] for s in steps if s.get("rc") not in (0, None)]
    skipped = [s["step"] for s in steps if s.get("rc") is None]
    out.append(f"{len(steps)} steps; exit status other than 0: {', '.join(bad) or 'none'}; "
               f"not run: {', '.join(skipped) or 'none'}. all_ok: {summary.get('all_ok')}.")
    out.append("")
    out += correctness(run, summary) + [""]
    out += steps_table(run) + [""]
    out += profiles(run) + [""]
    ops = run.text("ops.md")
    if ops:
        out += ["## Ops (ops.md as the run wrote it)", "", ops.strip(), ""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
