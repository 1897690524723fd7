#!/usr/bin/env bash
# Side-by-side timing of our training step (`medssl-bench step`) and the PyTorch peer
# (tools/torch_peer.py) with identical flags, alternating rounds (ours, peer, ours, peer, ...) so
# that drifting machine load hits both equally. Prints a table of medians and the speed ratio
# ours/peer (= peer_ms / ours_ms; > 1 means we are faster), and writes every JSON line to --out.
#
# PyTorch is not a project dependency; install it by hand first:
#   pip install torch --index-url https://download.pytorch.org/whl/cpu   # CPU
#   pip install torch                                                    # CUDA (PyPI)
# Build ours first: cargo build --release   (add the CUDA feature for --device cuda if needed)
#
# Usage: tools/compare.sh [--device cpu|cuda] [--width 16] [--image-size 28] [--method dsrpgc]
#                         [--rounds 3] [--threads N] [--repeats 10] [--warmup 3]
#                         [--batch-l 12] [--batch-u 36] [--out FILE] [--bin PATH]
#                         [--peer-args "--compile --channels-last"]
set -euo pipefail

cd "$(dirname "$0")/.."

device=cpu width=16 image_size=28 method=dsrpgc rounds=3 threads="" repeats=10 warmup=3
batch_l=12 batch_u=36 out="" bin=target/release/medssl-bench peer_args="" python=${PYTHON:-python3}

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) device=$2; shift 2 ;;
        --width) width=$2; shift 2 ;;
        --image-size) image_size=$2; shift 2 ;;
        --method) method=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --threads) threads=$2; shift 2 ;;
        --repeats) repeats=$2; shift 2 ;;
        --warmup) warmup=$2; shift 2 ;;
        --batch-l) batch_l=$2; shift 2 ;;
        --batch-u) batch_u=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --peer-args) peer_args=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "compare.sh: unknown flag '$1' (see --help)" >&2; exit 2 ;;
    esac
done

[[ -x "$bin" ]] || { echo "compare.sh: $bin not found; run 'cargo build --release' first" >&2; exit 2; }
"$python" -c 'import torch' 2>/dev/null || {
    echo "compare.sh: PyTorch is not installed (pip install torch --index-url https://download.pytorch.org/whl/cpu)" >&2
    exit 2
}
if [[ -z "$threads" ]]; then threads=$(nproc); fi
out=${out:-compare-$(date +%Y%m%d-%H%M%S).jsonl}
: > "$out"

common=(--device "$device" --method "$method" --width "$width" --image-size "$image_size"
        --batch-l "$batch_l" --batch-u "$batch_u" --warmup "$warmup" --repeats "$repeats" --json)

export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads

for ((r = 1; r <= rounds; r++)); do
    echo "round $r/$rounds: medssl" >&2
    "$bin" step "${common[@]}" --calib 0 | tee -a "$out" >&2
    echo "round $r/$rounds: torch" >&2
    # shellcheck disable=SC2086
    "$python" tools/torch_peer.py "${common[@]}" --threads "$threads" $peer_args | tee -a "$out" >&2
done

"$python" - "$out" <<'EOF'
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
by = {}
for r in recs:
    by.setdefault(r["engine"], []).append(r)
ours = by.get("medssl", [])
peers = {k: v for k, v in by.items() if k != "medssl"}
if not ours or not peers:
    sys.exit("compare.sh: missing results (see the output above)")
r0 = ours[0]
print(f"\nstep {r0['method']} w{r0['width']} {r0['image_size']}px {r0['batch_l']}+{r0['batch_u']} "
      f"on {r0['device']}, {r0['threads']} threads, {r0['gflop_per_step']:.2f} GFLOP/step")
print(f"{'engine':<16}{'rounds':>7}{'median ms':>11}{'best ms':>10}{'img/s':>9}{'GFLOP/s':>9}  per-round medians")
def row(name, rs):
    meds = [r["median_ms"] for r in rs]
    m = statistics.median(meds)
    print(f"{name:<16}{len(rs):>7}{m:>11.1f}{min(r['min_ms'] for r in rs):>10.1f}"
          f"{rs[0]['images_per_s'] * rs[0]['median_ms'] / m:>9.1f}"
          f"{rs[0]['gflop_per_step'] * 1e3 / m:>9.1f}  " + " ".join(f"{x:.1f}" for x in meds))
    return m
mo = row("medssl", ours)
for name, rs in peers.items():
    mp = row(name, rs)
    extra = f" (torch {rs[0].get('torch_version', '?')}" + (f", peak {rs[0]['peak_mem_mb']:.0f} MiB" if "peak_mem_mb" in rs[0] else "") + ")"
    print(f"speed ours/{name} = {mp / mo:.2f}x  (peer_ms / ours_ms; >1: medssl faster){extra}")
print(f"JSON lines: {sys.argv[1]}")
EOF
