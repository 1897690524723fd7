#!/usr/bin/env python3
"""Pairs `medssl-bench ops --json` rows with tools/torch_ops_peer.py rows: one markdown table.

    python3 tools/ops-table.py OUTDIR/ops_cuda.jsonl OUTDIR/ops_torch.jsonl

Rows are paired by (op, dir, shape, batch, width). Of medssl's rows the first one measured with
the CUDA backend's default switches is taken (a row names its build's defaults in "defaults";
rows without it are from builds whose defaults were those of OLD_DEFAULTS below); rows of other
settings (the variant runs of tools/gpu-run.sh) are listed in the last column by what they
change (e.g. "split 4 0.1047" ms, "im2col 0.0210"). Each side is rated
against its own device-to-device copy measured in its own invocation (the "% of copy" columns);
"medssl faster" is the peer's time over medssl's (above 1: medssl takes less time); rows rated by
FLOPs (the convolutions) show no "% of copy". Exits 1 when no row pairs.

    python3 tools/ops-table.py OUTDIR/ops_cuda.jsonl OUTDIR/ops_torch.jsonl \
        --profiles OUTDIR/ops_cuda_profile.jsonl OUTDIR/ops_torch_profile.jsonl

adds a second table from the rows of `medssl-bench ops --profile` and `torch_ops_peer.py
--profile`: each side's device time per call (CUPTI / torch.profiler) and its kernels, free of
the host's cost per call.
"""

import argparse
import sys

from jsonl import default_switches, read_rows, variant_label


def rows(path):
    return read_rows(path, lambda r: r.get("bench") == "ops")


def key(r):
    return (r.get("op"), r.get("dir"), r.get("shape"), r.get("batch"), r.get("width"))


def pct(r):
    """A row's "% of copy", or "–" for a row not rated against the copy (FLOPs, or a failure)."""
    if not str(r.get("peak_kind", "")).startswith(("memcpy", "copy")) or "pct_of_peak" not in r:
        return "–"
    return f"{r['pct_of_peak']:.1f} %"


def kernels(prof, n=3, width=44):
    """The first `n` kernels of a profile record: "name µs; ..." (per call)."""
    out = []
    for k in prof.get("top", [])[:n]:
        name = k["name"]
        name = name if len(name) <= width else name[:width - 1] + "…"
        out.append(f"`{name}` {k['us_per_step']:.1f}")
    return "; ".join(out)


def profile_table(medssl_path, peer_path):
    """Markdown lines pairing the profiled rows of both sides (default switches on medssl's)."""
    ours, variants = {}, {}
    for r in rows(medssl_path):
        if "profile" not in r:
            continue
        if default_switches(r):
            ours.setdefault(key(r), r)
        else:
            us = r["profile"]["busy_ms_per_step"] * 1e3
            variants.setdefault(key(r), []).append(f"{variant_label(r)} {us:.1f}")
    lines = []
    for p in rows(peer_path):
        m = ours.get(key(p))
        if m is None or "profile" not in p:
            continue
        mu, pu = m["profile"]["busy_ms_per_step"] * 1e3, p["profile"]["busy_ms_per_step"] * 1e3
        var = "; ".join(variants.get(key(p), []))
        lines.append(f"| {p['op']} | {p['dir']} | `{p['shape']}` | {mu:.1f} | {kernels(m['profile'])} "
                     f"| {pu:.1f} | {kernels(p['profile'])} | {pu / mu if mu > 0 else float('nan'):.2f}x "
                     f"| {var} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("medssl", help="JSON lines of medssl-bench ops --json")
    ap.add_argument("peer", help="JSON lines of tools/torch_ops_peer.py --json")
    ap.add_argument("--profiles", nargs=2, metavar=("MEDSSL", "PEER"),
                    help="JSON lines of medssl-bench ops --profile and torch_ops_peer.py --profile")
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
                         f"{pct(m)} | failed: {p.get('error', '?')} | | | | {var} |")
            continue
        lines.append(
            f"| {p['op']} | {p['dir']} | `{p['shape']}` | {m['median_ms']:.4f} | {pct(m)} "
            f"| {p['median_ms']:.4f} | {pct(p)} | {p.get('impl', '')} "
            f"| {p['median_ms'] / m['median_ms']:.2f}x | {var} |"
        )
    if not lines:
        print("no op measured by both sides", file=sys.stderr)
        sys.exit(1)
    # medssl's read-only / write-only references and read probes (`--op read_reference`), which
    # the peer has no counterpart of: listed after the paired rows, beside the batch norms they
    # stand for.
    paired = {key(p) for p in peer}
    for k, m in ours.items():
        if str(m.get("op", "")).startswith(("read_reference", "read_probe")) and k not in paired:
            var = "; ".join(variants.get(k, []))
            lines.append(f"| {m['op']} | {m['dir']} | `{m['shape']}` | {m['median_ms']:.4f} | "
                         f"{pct(m)} | – | – | (medssl only) | – | {var} |")
    dev = next((p.get("device_name") for p in peer if p.get("device_name")), None)
    ver = next((p.get("torch_version") for p in peer if p.get("torch_version")), None)
    print(f"### Ops: medssl against PyTorch {ver or ''}" + (f" on {dev}" if dev else ""))
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
    if a.profiles:
        prof = profile_table(*a.profiles)
        print()
        print("### Device time per call (medssl: CUPTI, PyTorch: torch.profiler; one sample's calls)")
        print()
        if not prof:
            print("No op was profiled by both sides.")
            return
        print("| op | dir | shape | medssl µs | medssl kernels (µs per call) | PyTorch µs "
              "| PyTorch kernels (µs per call) | medssl faster | medssl variants (µs) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for line in prof:
            print(line)


if __name__ == "__main__":
    main()
