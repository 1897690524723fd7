#!/usr/bin/env python3
"""Side-by-side device profiles of medssl and the PyTorch peer, as Markdown.

Reads the JSON lines of `medssl-bench step --profile --json` and `tools/torch_peer.py --profile
--json` (as tools/gpu-run.sh writes them: OUTDIR/bench_cuda.jsonl and OUTDIR/torch_peer.jsonl),
pairs the records of the same workload (method, width, image size, labelled and unlabelled batch,
queue and whether it starts full, TF32) that both carry a `profile`, and prints for each pair: wall time, device busy time
and its share of the wall time, items per step, then the top kernels of each side with their
device time per step.

    python3 tools/profile-table.py OUTDIR/bench_cuda.jsonl OUTDIR/torch_peer.jsonl [--top 15]
"""
import argparse
import sys

from jsonl import read_rows, workload as key


def records(path):
    return read_rows(path, lambda r: r.get("bench") == "step" and r.get("profile"))




def short(name, n=70):
    return name if len(name) <= n else name[: n - 3] + "..."


def table(ours, peer, top):
    po, pp = ours["profile"], peer["profile"]
    method, width, size, bl, bu, queue, filled, tf32 = key(ours)
    notes = (", full queue" if filled else "") + (", TF32" if tf32 else "")
    notes += ", medssl from a CUDA graph" if ours.get("cuda_graph") else ""
    lines = [f"### {method}, width {width}, {size} px, {bl} + {bu}, queue {queue}{notes}", ""]
    lines += ["| | medssl | PyTorch eager |", "|---|---|---|"]
    for label, k, fmt in [
        ("wall ms per step (profiled steps)", "wall_ms_per_step", "{:.2f}"),
        ("device busy ms per step", "busy_ms_per_step", "{:.2f}"),
        ("device busy % of wall", "busy_pct_of_wall", "{:.0f} %"),
        ("device items per step", "items_per_step", "{:.0f}"),
        ("distinct items", "distinct_items", "{}"),
    ]:
        vals = [fmt.format(p[k]) if p.get(k) is not None else "—" for p in (po, pp)]
        lines.append(f"| {label} | {vals[0]} | {vals[1]} |")
    lines += ["", f"Top {top} items by device time per step (µs per step, calls per step):", "",
              "| # | medssl | µs | calls | PyTorch | µs | calls |", "|---|---|---|---|---|---|---|"]
    to, tp = po.get("top", [])[:top], pp.get("top", [])[:top]
    for i in range(max(len(to), len(tp))):
        row = [str(i + 1)]
        for t in (to, tp):
            if i < len(t):
                e = t[i]
                row += [f"`{short(e['name'])}`", f"{e['us_per_step']:.1f}", f"{e['calls_per_step']:.1f}"]
            else:
                row += ["", "", ""]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("medssl", help="JSON lines of medssl-bench step --profile --json")
    ap.add_argument("peer", help="JSON lines of tools/torch_peer.py --profile --json")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    ours, peer = records(a.medssl), records(a.peer)
    if not ours:
        sys.exit(f"{a.medssl}: no step record with a profile")
    by_key = {}
    for r in peer:
        by_key.setdefault(key(r), r)
    paired = 0
    for r in ours:
        p = by_key.get(key(r))
        if p is None:
            print(f"(no PyTorch profile for {key(r)})\n")
            continue
        print(table(r, p, a.top))
        paired += 1
    if paired == 0:
        sys.exit("no workload has a profile on both sides")


if __name__ == "__main__":
    main()
