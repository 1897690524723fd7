#!/usr/bin/env bash
# Builds everything the GPU node needs (it has no Rust toolchain) into .gpu/ (gitignored):
#   .gpu/bin/medssl, .gpu/bin/medssl-bench     release binaries, --features cuda, debug info stripped
#   .gpu/tests/<name>                           test executables (cuda_parity + any named in GPU_TESTS)
#                                               (both gzipped, .gz: gpu-run.sh unpacks them first)
#   .gpu/golden/                                ../shared/golden
#   .gpu/data/pneumoniamnist, .gpu/data/ham10000 raw datasets (ham10000 only while under the size cap)
#   .gpu/gpu-run.sh, .gpu/gpu-focus.sh (gpu-run.sh with only the measurements not yet made on a
#   GPU), .gpu/results-table.sh, .gpu/profile-table.py, .gpu/ops-table.py (both
#   read JSON lines through .gpu/jsonl.py),
#   .gpu/torch_peer.py and .gpu/torch_ops_peer.py (the PyTorch peers), .gpu/MANIFEST.txt
# Then: copy .gpu/ anywhere and run `bash .gpu/gpu-run.sh OUTDIR` on the node
# (or `TABLE=1 bash .gpu/gpu-run.sh OUTDIR` for the README results table only).
#
# Env: GPU_TESTS   extra integration-test target names to ship (space separated), e.g. "conformance"
#      PACK_CAP_MB size cap of .gpu/ (default 60). Where .gpu/ travels with the checkout under a
#                  limit on the whole (a remote runner that copies the working tree, 64 MiB),
#                  subtract the tracked files (`git ls-files -z | xargs -0 du -cb | tail -1`:
#                  12 MB on 2026-11-28, since the committed runs keep their logs gzipped, see
#                  bench/results/README.md): 50 fits everything, HAM10000 included (a 40 MB
#                  pack with the executables gzipped; 33 leaves HAM10000 out, 17 MB, and the
#                  PneumoniaMNIST training runs still run)
#      CARGO_TARGET_DIR where the builds go (the binaries are copied from there)
#      SHARED      path of the shared folder (default ../shared relative to the repo root)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SHARED="${SHARED:-$ROOT/../shared}"
CAP_MB="${PACK_CAP_MB:-60}"
DEST="$ROOT/.gpu"
WANT_TESTS="cuda_parity ${GPU_TESTS:-}"

echo "[pack] building release binaries with --features cuda"
cargo build --release --features cuda --bin medssl --bin medssl-bench

echo "[pack] building test executables"
TEST_JSON="$(mktemp)"
TEST_ARGS=()
for t in $WANT_TESTS; do TEST_ARGS+=(--test "$t"); done
cargo test --release --features cuda --no-run --message-format=json "${TEST_ARGS[@]}" >"$TEST_JSON"

rm -rf "$DEST"
mkdir -p "$DEST/bin" "$DEST/tests" "$DEST/data"

copy_bin() { # src dst: copy without debug info (keeps symbols for backtraces)
    cp "$1" "$2"
    strip --strip-debug "$2" 2>/dev/null || true
    chmod +x "$2"
}

# Where cargo put them (CARGO_TARGET_DIR when set: copying target/release then would ship
# whatever an earlier build left there, perhaps without the cuda feature).
BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"
copy_bin "$BIN_DIR/medssl" "$DEST/bin/medssl"
copy_bin "$BIN_DIR/medssl-bench" "$DEST/bin/medssl-bench"

# Test executables: integration-test targets (kind "test") whose name is wanted.
# shellcheck disable=SC2086  # WANT_TESTS: space-separated names, one argument each
python3 - "$TEST_JSON" $WANT_TESTS >"$DEST/.tests.txt" <<'EOF'
import json, sys
path, wanted = sys.argv[1], set(sys.argv[2:])
seen = {}
for line in open(path):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    if "test" in t.get("kind", []) and t["name"] in wanted:
        seen[t["name"]] = m["executable"]
for name, exe in sorted(seen.items()):
    print(f"{name}\t{exe}")
missing = wanted - set(seen)
if missing:
    print(f"[pack] warning: test targets not found: {sorted(missing)}", file=sys.stderr)
EOF
while IFS=$'\t' read -r name exe; do
    echo "[pack] test executable $name <- $exe"
    copy_bin "$exe" "$DEST/tests/$name"
done <"$DEST/.tests.txt"
rm -f "$DEST/.tests.txt" "$TEST_JSON"

# The executables travel gzipped (a third of their size; gpu-run.sh unpacks them in place first).
gzip -6 -f "$DEST"/bin/* "$DEST"/tests/*

echo "[pack] golden cases"
cp -r "$SHARED/golden" "$DEST/golden"
chmod -R u+w "$DEST/golden"

cp "$ROOT/tools/gpu-run.sh" "$DEST/gpu-run.sh"
cp "$ROOT/tools/gpu-focus.sh" "$DEST/gpu-focus.sh"
cp "$ROOT/tools/results-table.sh" "$DEST/results-table.sh"
cp "$ROOT/tools/profile-table.py" "$DEST/profile-table.py"
cp "$ROOT/tools/ops-table.py" "$DEST/ops-table.py"
cp "$ROOT/tools/jsonl.py" "$DEST/jsonl.py"
chmod +x "$DEST/gpu-run.sh" "$DEST/gpu-focus.sh" "$DEST/results-table.sh"
# The PyTorch peers (torch_ops_peer.py imports the model from torch_peer.py beside it).
cp "$ROOT/tools/torch_peer.py" "$DEST/torch_peer.py"
cp "$ROOT/tools/torch_ops_peer.py" "$DEST/torch_ops_peer.py"

size_mb() { du -sm "$DEST" | cut -f1; }

copy_dataset() { # name files...
    local name=$1
    shift
    local src="$SHARED/data/$name"
    local need
    need=$(du -cm "${@/#/$src/}" | tail -1 | cut -f1)
    if [ $(($(size_mb) + need)) -gt "$CAP_MB" ]; then
        echo "[pack] skipping dataset $name (${need} MB would exceed the ${CAP_MB} MB cap)"
        return
    fi
    mkdir -p "$DEST/data/$name"
    for f in "$@"; do
        cp "$src/$f" "$DEST/data/$name/$f"
    done
    chmod -R u+w "$DEST/data/$name"
    echo "[pack] dataset $name (${need} MB)"
}

copy_dataset pneumoniamnist images.u8 labels.u8 split.u8 meta.json
copy_dataset ham10000 images.u8 labels.u8 split.u8 split_racmt.u8 racmt_row.u16 meta.json

{
    echo "medssl GPU pack"
    echo "built:   $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git:     $(git rev-parse --short HEAD 2>/dev/null || echo 'no commit') $(git status --porcelain 2>/dev/null | grep -q . && echo '(dirty)')"
    echo "rustc:   $(rustc --version)"
    NVCC_BIN="${NVCC:-$(command -v nvcc || python3 -c 'import site,os; print(os.path.join(site.getsitepackages()[0], "nvidia/cu13/bin/nvcc"))')}"
    echo "kernels: sm_80 + sm_90 SASS, compute_80 PTX ($("$NVCC_BIN" --version 2>/dev/null | tail -1 || echo 'nvcc ?'))"
    echo
    (cd "$DEST" && find . -type f -printf '%10s  %p\n' | sort -k2)
} >"$DEST/MANIFEST.txt"

TOTAL=$(size_mb)
echo "[pack] .gpu/ is ${TOTAL} MB"
if [ "$TOTAL" -gt "$CAP_MB" ]; then
    echo "[pack] error: .gpu/ exceeds the ${CAP_MB} MB cap" >&2
    exit 1
fi
echo "[pack] done: run 'bash .gpu/gpu-run.sh OUTDIR' on the GPU node ('TABLE=1 bash .gpu/gpu-run.sh OUTDIR': results table)"
