#!/usr/bin/env python3
"""Pairs `medssl-bench ops --json` rows with tools/torch_ops_peer.py rows: one markdown table.

    python3 tools/ops-table.py OUTDIR/ops_cuda.jsonl OUTDIR/ops_torch.jsonl

Rows are paired by (op, dir, shape, batch, width). Of medssl's rows the first one measured with
the CUDA backend's default batch-norm switches (bn_split 0 = automatic, bn_stats two-pass,
bn_apply flat) is taken; rows of other settings (the variant runs of tools/gpu-run.sh) are
listed in the last column by what they change (e.g. "split 4 0.1047" ms). Each side is rated
against its own device-to-device copy measured in its own invocation (the "% of copy" columns);
"medssl faster" is the peer's time over medssl's (above 1: medssl takes less time). Exits 1 when
no row pairs.
"""

import argparse
import sys

from jsonl import read_rows


def rows(path):
    return read_rows(path, lambda r: r.get("bench") == "ops")


def key(r):
    return (r.get("op"), r.get("dir"), r.get("shape"), r.get("batch"), r.get("width"))


def default_switches(r):
    return (r.get("bn_split") in (0, None) and r.get("bn_stats") in ("two-pass", None)
            and r.get("bn_apply") in ("flat", None))


def variant_label(r):
    """What a medssl row's switches change from the defaults, e.g. "split 4, welford"."""
    parts = []
    if r.get("bn_split") not in (0, None):
        parts.append(f"split {r['bn_split']}")
    if r.get("bn_stats") not in ("two-pass", None):
        parts.append(str(r["bn_stats"]))
    if r.get("bn_apply") not in ("flat", None):
        parts.append(str(r["bn_apply"]))
    return ", ".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("medssl", help="JSON lines of medssl-bench ops --json")
    ap.add_argument("peer", help="JSON lines of tools/torch_ops_peer.py --json")
    a = ap.parse_args()
    ours, variants = {}, {}
    medssl_rows = rows(a.medssl)
    for r in medssl_rows:
        if "median_ms" not in r:
            continue
        if default_switches(r):
            ours.setdefault(key(r), r)
        else:
            variants.setdefault(key(r), []).append(f"{variant_label(r)} {r['median_ms']:.4f}")
    peer = rows(a.peer)
    lines = []
    for p in peer:
        m = ours.get(key(p))
        if m is None:
            continue
        var = "; ".join(variants.get(key(p), []))
        if "median_ms" not in p:
            lines.append(f"| {p['op']} | {p['dir']} | `{p['shape']}` | {m['median_ms']:.4f} | "
                         f"{m.get('pct_of_peak', float('nan')):.1f} % | failed: {p.get('error', '?')} | | | | {var} |")
            continue
        lines.append(
            f"| {p['op']} | {p['dir']} | `{p['shape']}` | {m['median_ms']:.4f} | {m.get('pct_of_peak', float('nan')):.1f} % "
            f"| {p['median_ms']:.4f} | {p.get('pct_of_peak', float('nan')):.1f} % | {p.get('impl', '')} "
            f"| {p['median_ms'] / m['median_ms']:.2f}x | {var} |"
        )
    if not lines:
        print("no op measured by both sides", file=sys.stderr)
        sys.exit(1)
    dev = next((p.get("device_name") for p in peer if p.get("device_name")), None)
    ver = next((p.get("torch_version") for p in peer if p.get("torch_version")), None)
    print(f"### Memory-bound ops: medssl against PyTorch {ver or ''}" + (f" on {dev}" if dev else ""))
    emulated = sorted({r.get("device") for r in medssl_rows if "emulation" in str(r.get("device", ""))})
    if emulated:
        print()
        print(f"medssl ran on {', '.join(emulated)}: its times say nothing about a GPU.")
    print()
    print("| op | dir | shape | medssl ms | medssl % of copy | PyTorch ms | PyTorch % of copy | PyTorch call "
          "| medssl faster | medssl variants (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
