#!/usr/bin/env bash
# Runs the packed GPU checks on a node without a Rust toolchain (made by tools/gpu-pack.sh).
#
#   bash .gpu/gpu-run.sh [OUTDIR]                       (OUTDIR defaults to $OUT, then ./gpu-out)
#   TABLE=1 bash .gpu/gpu-run.sh [OUTDIR]               the README results table only (below)
#   bash .gpu/gpu-run.sh --table [OUTDIR]               the same
#
# cuBLAS / cuDNN are found as pip wheels of the node's PyTorch environment
# (site-packages/nvidia/*/lib) and exported through LD_LIBRARY_PATH; libcuda.so comes from the
# driver. Every step runs under a timeout, its output goes to OUTDIR/logs/<step>.log, and its rc
# is recorded; one failing step never stops the others. OUTDIR/summary.json collects everything.
#
# Rehearsal without a GPU (checks the packed folder and this script before spending device time;
# about 2 minutes): the CPU emulation of the device with tiny workloads, e.g.
#   MEDSSL_CUDA_EMULATE=1 PEER_CONFIGS= PEER_OPS_CONFIGS= BENCH_CUDA_CONFIGS="--device cuda \
#     --width 4 --batch-l 4 --batch-u 8 --queue 64 --repeats 1 --warmup 0" \
#     BENCH_CPU_CONFIGS="--device cpu --width 4 --repeats 1" OPS_CUDA_CONFIGS="--device cuda \
#     --width 4 --batch 4 --op relu,adam_step" TRAIN_ARGS="train --data \
#     $PWD/.gpu/data/pneumoniamnist --device cuda --max-steps 3 --no-eval --set width=4 \
#     --out /tmp/rehearsal/train" TRAIN_GRAPH_ARGS= TRAIN_HAM_ARGS= TRAIN_HAM_GRAPH_ARGS= \
#     PROFILE_PEER_CONFIGS= PROFILE_OPS_CONFIGS="--device cuda --width 4 --batch 4 --op relu \
#     --repeats 1 --profile" PROFILE_CUDA_CONFIGS="--device cuda --width 4 --batch-l 4 \
#     --batch-u 8 --queue 64 --repeats 1 --warmup 0 --calib 0 --profile" \
#     bash .gpu/gpu-run.sh /tmp/rehearsal
# (every device name in the results then reads "cuda:0 (CPU emulation)").
#
# Env: STEP_TIMEOUT   seconds per step (default 240)
#      PYTHON         python with PyTorch (default: python3)
#      BENCH_CUDA_CONFIGS / BENCH_CPU_CONFIGS / PEER_CONFIGS / OPS_CUDA_CONFIGS / PEER_OPS_CONFIGS /
#      PROFILE_OPS_CONFIGS / PROFILE_CUDA_CONFIGS / PROFILE_PEER_CONFIGS / PEER_OPS_PROFILE_CONFIGS
#      (|-separated flag sets,
#      each optionally led by VAR=value words) / TRAIN_ARGS / TRAIN_GRAPH_ARGS / TRAIN_HAM_ARGS /
#      TRAIN_HAM_GRAPH_ARGS   override the workloads below (an empty value skips the step)
#      PROFILE_TIMEOUT  seconds per profiling step and for the profiler's parity test (default 90)
#      DEADLINE       seconds after the script's start past which no further step is started
#                     (each is recorded as skipped) and a running step's timeout is cut to what
#                     is left, so that the summary and the archive are still written inside a
#                     device command's limit (default: none)
#
# A device command brings back only a few files (8), so at the end (outside TABLE mode) OUTDIR
# keeps summary.json, profile.md, ops.md (medssl's ops against PyTorch's, wall time and, where
# both were profiled, device time per call; tools/ops-table.py) and the benchmarks' JSON lines
# (bench_cuda, bench_cpu, ops_cuda, torch_peer), 8 files with the archive, and everything else
# (logs/, steps.jsonl, gpu.txt, libs.txt, the profile rows, the peer's ops rows ops_torch.jsonl
# and ops_torch_profile.jsonl, conformance and training-run files, no checkpoints) goes into
# OUTDIR/gpu-run.tar.gz.
#
# Results-table mode (TABLE=1 or --table): nvidia-smi, then only results-table.sh (packed from
# tools/results-table.sh) with --device cuda: the 14 runs of the README table (HAM10000: 10,
# PneumoniaMNIST: 4), 100 epochs each, TABLE_JOBS at once, stopped after TABLE_BUDGET seconds
# (the trainings write a checkpoint and exit; the table is written from what finished). The run
# directories live in TABLE_RUNS, outside .gpu/ and outside OUTDIR, so a second call on the same
# (still warm) machine continues them; it needs the same TABLE_* settings. A device command may
# bring back only a few small files, so OUTDIR then holds just: table.md (the README table),
# table.json, table.txt, summary.json (this script's steps) and table-runs.tar.gz (per run
# config.toml, summary.json, metrics.jsonl, confusion.txt, the training logs, commands.txt, and
# this script's logs/, steps.jsonl, gpu.txt, libs.txt); no checkpoints.
# Expected time (an estimate, not yet measured): the 14 runs are about 38 min of GPU work back to
# back on an H200 (11.8 ms per DSRPGC step alone, 155 steps per HAM10000 epoch); run
# concurrently they are expected to need 10-15 min of wall time, i.e. one 600 s device command
# at the default budget plus a resumed second call, if concurrency gives the 3-4x expected for
# these latency-bound steps. The first session that runs it measures this: each run's log has
# its steps/s. Run it with a device timeout_s of at least TABLE_BUDGET + 90.
#      TABLE_BUDGET   seconds of training before the runs are stopped (default 480)
#      TABLE_JOBS     concurrent trainings (default 14: all runs at once)
#      TABLE_DATASET  ham10000, pneumoniamnist or all (default all)
#      TABLE_EPOCHS   epochs per run (default 100)
#      TABLE_RUNS     run directories (default <folder above .gpu>/runs/table-cuda)
#      TABLE_ARGS     more results-table.sh arguments, space-separated (e.g. "--set width=4")
#      TABLE_DEVICE   --device of the runs (default cuda; cpu only to try the plumbing)
set -u

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# gpu-pack.sh ships the executables gzipped (the pack travels under a size limit): unpacked in
# place once, before anything looks for them; where the pack cannot be written to, from a copy of
# it in a temporary folder.
if compgen -G "$HERE/bin/*.gz" >/dev/null || compgen -G "$HERE/tests/*.gz" >/dev/null; then
    if [ ! -w "$HERE/bin" ] || [ ! -w "$HERE/tests" ]; then
        COPY="$(mktemp -d)"
        cp -r "$HERE"/. "$COPY"/ && chmod -R u+w "$COPY" &&
            exec bash "$COPY/$(basename "${BASH_SOURCE[0]}")" "$@"
        echo "[gpu-run] cannot copy the read-only pack to $COPY" >&2
    fi
    for gz in "$HERE"/bin/*.gz "$HERE"/tests/*.gz; do
        [ -e "$gz" ] || continue
        gzip -d -f "$gz" && chmod +x "${gz%.gz}" || echo "[gpu-run] cannot unpack $gz" >&2
    done
fi
TABLE="${TABLE:-0}"
if [ "${1:-}" = --table ]; then
    TABLE=1
    shift
fi
OUTDIR="${1:-${OUT:-$PWD/gpu-out}}"
mkdir -p "$OUTDIR/logs"
OUTDIR="$(cd "$OUTDIR" && pwd)"
STEP_TIMEOUT="${STEP_TIMEOUT:-240}"
PY="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
STEPS="$OUTDIR/steps.jsonl"
: >"$STEPS"
T_START=$(date +%s)
DEADLINE="${DEADLINE:-}"

# ---------------------------------------------------------------- workloads ----
# medssl-bench runs, one per '|'-separated entry (CUDA and CPU in the same session, so ratios
# compare like with like), and the same workloads for the PyTorch peer when it is packed.
# An entry may start with VAR=value words: they become the program's environment. Full FP32 is
# the default on both sides (medssl: no MEDSSL_TF32; the peer: no --tf32); the TF32 rows compare
# tensor-core math on both sides, the MEDSSL_CUDNN_ALGO=heuristic rows measure what timing the
# cuDNN algorithms (the default) gains over cuDNN's heuristic choice, the MEDSSL_CUDNN_ALGO=find
# rows what medssl's own timing of Find's candidates and of the im2col engine per direction on the
# device (the default since runs 8 and 9) gains over Find's choice, and the
# MEDSSL_CUDA_CONV1X1=cudnn row what the cuBLAS path for 1x1 convolutions gains over cuDNN, the
# MEDSSL_CUDA_BN_FUSED_MAX_M=0 rows what one batch-norm launch per pass gains over two, the
# MEDSSL_CUDA_BN_SPLIT=1 rows what the split batch-norm reductions (several blocks per channel for
# the few-channel full-resolution layers, the default) gain over one block per channel, the
# MEDSSL_CUDA_BN_SPLIT=auto rows what the former count loses against one wave, the
# MEDSSL_CUDA_BN_STATS=two-pass rows what two-pass batch-norm statistics lose (or gain) against
# the default one pass, the MEDSSL_CUDA_BN_FWD=resident MEDSSL_CUDA_BN_BWD=resident rows what the
# one-launch forward and backward that read their inputs once (cooperative launches, not yet the
# default) gain or lose in the step, with and without the step graph, and the
# MEDSSL_CUDNN_DETERMINISTIC=0 rows what allowing
# non-deterministic cuDNN algorithms gains (the peer, PyTorch with cudnn.benchmark and its
# default cudnn.deterministic = False, allows them).
# The two supervised width-64 rows log each convolution shape's chosen cuDNN algorithms with their
# timed milliseconds (MEDSSL_CUDNN_LOG=1, in logs/bench_cuda_*.log): at 28 px the width-64 step
# costs far more than width 16 although 112 px costs little more than 28 px, so the wide
# small-spatial layers' algorithms are the first suspect.
# The --cuda-graph rows replay the whole step from a CUDA graph (medssl train --cuda-graph); the
# DSRPGC ones start with a full key queue (as training does after its first queue/batch steps),
# so they pair with the --fill-queue rows (the same step without the graph) and the peer's
# --fill-queue rows. Each graph row's JSON says how many timed steps ran from the graph.
BENCH_CUDA_CONFIGS="${BENCH_CUDA_CONFIGS-"--device cuda --width 16 --fill-queue|--device cuda --width 16 --cuda-graph|--device cuda --width 64 --fill-queue|--device cuda --width 64 --cuda-graph|--device cuda --width 16 --method supervised --batch-l 48 --cuda-graph|--device cuda --width 64 --method supervised --batch-l 48 --cuda-graph|--device cuda --width 16|--device cuda --width 64|--device cuda --width 16 --method supervised --batch-l 48|MEDSSL_CUDNN_LOG=1 --device cuda --width 64 --method supervised --batch-l 48|--device cuda --width 64 --image-size 112 --repeats 5|MEDSSL_CUDNN_ALGO=heuristic --device cuda --width 16|MEDSSL_CUDNN_ALGO=heuristic --device cuda --width 64|MEDSSL_CUDNN_ALGO=find --device cuda --width 16 --cuda-graph|MEDSSL_CUDNN_ALGO=find --device cuda --width 64 --cuda-graph|MEDSSL_CUDNN_ALGO=find --device cuda --width 16|MEDSSL_CUDA_CONV1X1=cudnn --device cuda --width 16|MEDSSL_CUDA_BN_FUSED_MAX_M=0 --device cuda --width 16|MEDSSL_CUDA_BN_FUSED_MAX_M=0 --device cuda --width 64|MEDSSL_CUDA_BN_SPLIT=1 --device cuda --width 16|MEDSSL_CUDA_BN_SPLIT=1 --device cuda --width 64|MEDSSL_CUDA_BN_STATS=two-pass --device cuda --width 16|MEDSSL_CUDA_BN_STATS=two-pass --device cuda --width 64|MEDSSL_CUDA_BN_SPLIT=auto MEDSSL_CUDA_BN_APPLY=flat --device cuda --width 16|MEDSSL_CUDA_BN_SPLIT=auto MEDSSL_CUDA_BN_APPLY=flat --device cuda --width 64|MEDSSL_CUDA_BN_FWD=resident MEDSSL_CUDA_BN_BWD=resident --device cuda --width 16|MEDSSL_CUDA_BN_FWD=resident MEDSSL_CUDA_BN_BWD=resident --device cuda --width 64|MEDSSL_CUDA_BN_FWD=resident MEDSSL_CUDA_BN_BWD=resident --device cuda --width 64 --cuda-graph|MEDSSL_CUDNN_DETERMINISTIC=0 --device cuda --width 64|MEDSSL_CUDNN_DETERMINISTIC=0 MEDSSL_CUDNN_LOG=1 --device cuda --width 64 --method supervised --batch-l 48|MEDSSL_TF32=1 --device cuda --width 64|MEDSSL_TF32=1 --device cuda --width 64 --method supervised --batch-l 48"}"
BENCH_CPU_CONFIGS="${BENCH_CPU_CONFIGS-"--device cpu --width 16 --repeats 5"}"
PEER_CONFIGS="${PEER_CONFIGS-"--device cuda --width 16 --fill-queue|--device cuda --width 64 --fill-queue|--device cuda --width 16|--device cuda --width 64|--device cuda --width 16 --method supervised --batch-l 48|--device cuda --width 64 --method supervised --batch-l 48|--device cuda --width 64 --image-size 112 --repeats 5|--device cuda --width 64 --tf32|--device cuda --width 64 --method supervised --batch-l 48 --tf32|--device cpu --width 16 --repeats 5"}"
# medssl-bench ops on CUDA: every op at the model's shapes (width 16), and the memory-bound ops at
# a size where they are bandwidth-bound (width 64, batch 256: 51 MiB per activation tensor), each
# rated against the device's streaming bandwidth measured in the same invocation. Batch norm also
# under its variant switches against the defaults (one wave of split blocks, the elementwise pass
# on the reduction's grid, one-pass statistics): the former defaults (MEDSSL_CUDA_BN_SPLIT=auto
# MEDSSL_CUDA_BN_APPLY=flat, also at the model's shapes, where the 16-channel layers take the
# split path), each of the two alone, one block per channel (MEDSSL_CUDA_BN_SPLIT=1) and two-pass
# statistics (MEDSSL_CUDA_BN_STATS=two-pass), and the one-launch resident forward and backward
# (MEDSSL_CUDA_BN_FWD=resident MEDSSL_CUDA_BN_BWD=resident: inputs read once from memory, what
# they keep in shared memory and L2 read back from there; at both sizes); the width-16
# convolutions also on the im2col +
# cuBLAS engine (MEDSSL_CUDA_CONV=im2col).
OPS_CUDA_CONFIGS="${OPS_CUDA_CONFIGS-"--device cuda --width 16|MEDSSL_CUDA_CONV1X1=cudnn MEDSSL_CUDNN_ALGO=heuristic --device cuda --width 16 --op conv2d,fusion|--device cuda --width 64 --batch 256 --op relu,batch_norm,max_pool2d,global_avg_pool,adam_step,ema_update|MEDSSL_CUDA_BN_SPLIT=auto MEDSSL_CUDA_BN_APPLY=flat --device cuda --width 64 --batch 256 --op batch_norm|MEDSSL_CUDA_BN_SPLIT=auto MEDSSL_CUDA_BN_APPLY=flat --device cuda --width 16 --op batch_norm|MEDSSL_CUDA_BN_SPLIT=auto --device cuda --width 64 --batch 256 --op batch_norm|MEDSSL_CUDA_BN_APPLY=flat --device cuda --width 64 --batch 256 --op batch_norm|MEDSSL_CUDA_BN_SPLIT=1 --device cuda --width 64 --batch 256 --op batch_norm|MEDSSL_CUDA_BN_STATS=two-pass --device cuda --width 64 --batch 256 --op batch_norm|MEDSSL_CUDA_BN_FWD=resident MEDSSL_CUDA_BN_BWD=resident --device cuda --width 64 --batch 256 --op batch_norm|MEDSSL_CUDA_BN_FWD=resident MEDSSL_CUDA_BN_BWD=resident --device cuda --width 16 --op batch_norm|MEDSSL_CUDA_CONV=im2col --device cuda --width 16 --op conv2d"}"
# Device profiles, run last with a short timeout each (PROFILE_TIMEOUT, default 90 s): they list
# what the device ran in each step, by kernel (cuDNN/cuBLAS internals included) with device
# times, and the device's busy time against the wall time: medssl through CUPTI (libcupti.so from
# the same pip folders; only when the parity test of the profiler passed), the peer through
# torch.profiler. They say whether a step is bound by the kernels or by the host, and which
# kernels differ; OUTDIR/profile.md pairs them (tools/profile-table.py).
PROFILE_CUDA_CONFIGS="${PROFILE_CUDA_CONFIGS-"--device cuda --width 16 --cuda-graph --profile|--device cuda --width 16 --profile|--device cuda --width 64 --profile|--device cuda --width 64 --method supervised --batch-l 48 --profile"}"
# The memory-bound ops at the bandwidth-bound size under the profiler too (medssl-bench ops
# --profile): the device time of each kernel of one call, e.g. a batch norm's statistics against
# its elementwise pass (the defaults, the former ones and the resident one-launch kernels), in
# OUTDIR/ops_cuda_profile.jsonl (in
# the archive); and every convolution of the width-16 model at batch 36, with cuDNN's Find results
# for each shape in its log (MEDSSL_CUDNN_LOG=1), against the same convolutions in PyTorch
# (PEER_OPS_PROFILE_CONFIGS; the second table of OUTDIR/ops.md): which shapes make medssl's
# convolutions take more device time per step than PyTorch's at width 16, and how much of that
# the im2col + cuBLAS engine, cuDNN's non-deterministic algorithms (PyTorch's default) or its
# precomputed-index implicit GEMM forward (MEDSSL_CUDNN_FWD_ALGO=IMPLICIT_PRECOMP_GEMM, against
# the implicit GEMM that its Find picks for most shapes) would win back, shape by shape, and what
# medssl's own timing per direction (the default; MEDSSL_CUDNN_ALGO=find for Find's choice)
# wins back.
PROFILE_OPS_CONFIGS="${PROFILE_OPS_CONFIGS-"--device cuda --width 64 --batch 256 --op batch_norm,relu,ema_update,adam_step --repeats 3 --profile|MEDSSL_CUDA_BN_FWD=resident MEDSSL_CUDA_BN_BWD=resident --device cuda --width 64 --batch 256 --op batch_norm --repeats 3 --profile|MEDSSL_CUDA_BN_SPLIT=auto MEDSSL_CUDA_BN_APPLY=flat --device cuda --width 64 --batch 256 --op batch_norm --repeats 3 --profile|MEDSSL_CUDNN_LOG=1 --device cuda --width 16 --batch 36 --op conv2d --repeats 3 --profile|MEDSSL_CUDA_CONV=im2col --device cuda --width 16 --batch 36 --op conv2d --repeats 3 --profile|MEDSSL_CUDNN_DETERMINISTIC=0 MEDSSL_CUDNN_LOG=1 --device cuda --width 16 --batch 36 --op conv2d --repeats 3 --profile|MEDSSL_CUDNN_FWD_ALGO=IMPLICIT_PRECOMP_GEMM MEDSSL_CUDNN_LOG=1 --device cuda --width 16 --batch 36 --op conv2d --repeats 3 --profile|MEDSSL_CUDNN_ALGO=find MEDSSL_CUDNN_LOG=1 --device cuda --width 16 --batch 36 --op conv2d --repeats 3 --profile"}"
PEER_OPS_PROFILE_CONFIGS="${PEER_OPS_PROFILE_CONFIGS-"--device cuda --width 64 --batch 256 --op batch_norm,relu,ema_update,adam_step --repeats 3 --profile|--device cuda --width 16 --batch 36 --op conv2d --repeats 3 --profile"}"
PROFILE_PEER_CONFIGS="${PROFILE_PEER_CONFIGS-"--device cuda --width 16 --fill-queue --profile|--device cuda --width 16 --profile|--device cuda --width 64 --profile|--device cuda --width 64 --method supervised --batch-l 48 --profile"}"
# A short training run on the packed PneumoniaMNIST.
# (A 1024-key queue, full after 29 of the epoch's 104 steps.) Both training runs take cuDNN's
# heuristic algorithm choice (MEDSSL_CUDNN_ALGO=heuristic): the default choice times the
# algorithms, so two processes can pick different ones for a shape (the two runs of 2026-11-27's
# first H100 run did, in 18 of their 132 choices) and then differ in the last bits from the first
# step on, which would hide what the graph comparison below is for.
TRAIN_ARGS="${TRAIN_ARGS-"train --data $HERE/data/pneumoniamnist --device cuda --epochs 1 --set queue=1024 --no-cuda-graph --out $OUTDIR/train"}"
# The same run with every step after the queue has filled (and 2-3 steps that fill the graph's
# memory arena) replayed from a CUDA graph (the default on CUDA; the run above has
# --no-cuda-graph); the summary says whether its last checkpoint equals the plain run's, tensor by
# tensor and bit for bit (train_graph_vs_plain).
TRAIN_GRAPH_ARGS="${TRAIN_GRAPH_ARGS-"train --data $HERE/data/pneumoniamnist --device cuda --epochs 1 --set queue=1024 --cuda-graph --out $OUTDIR/train_graph"}"
# The same pair on HAM10000 at 112 px (when it is packed), 120 steps without validation: whether
# the graph gives the plain run's bits at the larger images too (train_ham_graph_vs_plain), and
# the two runs' steps per second (train_runs in the summary: the graph, on by default since
# 2026-11-27's fourth H100 run measured it, against --no-cuda-graph).
if [ -f "$HERE/data/ham10000/images.u8" ]; then
    HAM_COMMON="train --data $HERE/data/ham10000 --device cuda --max-steps 120 --no-eval --set image_size=112 --set queue=1024"
else
    HAM_COMMON=""
fi
TRAIN_HAM_ARGS="${TRAIN_HAM_ARGS-${HAM_COMMON:+$HAM_COMMON --no-cuda-graph --out $OUTDIR/train_ham}}"
TRAIN_HAM_GRAPH_ARGS="${TRAIN_HAM_GRAPH_ARGS-${HAM_COMMON:+$HAM_COMMON --cuda-graph --out $OUTDIR/train_ham_graph}}"
# The PyTorch peer of the memory-bound ops rows above (tools/torch_ops_peer.py: cuDNN's batch norm,
# PyTorch's ReLU kernels, torch.optim.Adam foreach and fused, the EMA by torch._foreach_lerp_) at
# the same shapes, the bandwidth-bound size and the model's own (width 16, batch 36, where both
# sides are mostly launch cost; there also the convolutions), run right after them; OUTDIR/ops.md
# pairs the two (tools/ops-table.py).
PEER_OPS_CONFIGS="${PEER_OPS_CONFIGS-"--device cuda --width 64 --batch 256|--device cuda --width 16 --batch 36 --op batch_norm,relu,adam_step,ema_update,conv2d"}"
# -------------------------------------------------------------------------------------------------

json_str() { # JSON-escapes $1
    "$PY" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1" 2>/dev/null ||
        printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"
}

# step NAME CMD...: runs CMD under the timeout, logs to logs/NAME.log, records rc and seconds.
step() {
    local name=$1
    shift
    local log="$OUTDIR/logs/$name.log"
    local limit=$STEP_TIMEOUT
    if [ -n "$DEADLINE" ]; then
        local left=$((DEADLINE - ($(date +%s) - T_START)))
        if [ "$left" -lt 5 ]; then
            skip "$name" "DEADLINE of $DEADLINE s reached"
            return 0
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    echo "==== [$name] $*"
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')
    echo "{\"step\":$(json_str "$name"),\"rc\":$rc,\"seconds\":$secs,\"log\":\"logs/$name.log\",\"cmd\":$(json_str "$*")}" >>"$STEPS"
    tail -n 8 "$log" | sed 's/^/    /'
    echo "     -> rc=$rc (${secs}s)"
    return 0
}

skip() { # NAME REASON
    echo "==== [$1] skipped: $2"
    echo "{\"step\":$(json_str "$1"),\"rc\":null,\"skipped\":$(json_str "$2")}" >>"$STEPS"
}

# ---------------------------------------------------------------- libraries ----
LIBDIRS="$("$PY" - <<'EOF' 2>/dev/null
import glob, os, site, sys
roots = []
try:
    roots += site.getsitepackages()
except Exception:
    pass
try:
    roots.append(site.getusersitepackages())
except Exception:
    pass
roots += [p for p in sys.path if p]
dirs = []
for r in roots:
    for pat in ("nvidia/*/lib", "nvidia/*/lib64", "nvidia/cu*/lib", "torch/lib"):
        for d in sorted(glob.glob(os.path.join(r, pat))):
            if any(glob.glob(os.path.join(d, f"lib{n}*.so*")) for n in ("cublas", "cudnn", "cudart", "nvrtc", "nvJitLink", "cupti")):
                if d not in dirs:
                    dirs.append(d)
print(":".join(dirs))
EOF
)"
if [ -z "$LIBDIRS" ]; then
    # Fallback: a system CUDA install.
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
        ls "$d"/libcublas*.so* >/dev/null 2>&1 && LIBDIRS="${LIBDIRS:+$LIBDIRS:}$d"
    done
fi
export LD_LIBRARY_PATH="${LIBDIRS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{
    echo "python: $PY"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    for d in ${LIBDIRS//:/ }; do
        echo "## $d"
        # shellcheck disable=SC2010  # library file names, listing only
        ls "$d" | grep -E '^lib(cublas|cublasLt|cudnn|cudart|nvrtc|nvJitLink|cupti)[^/]*\.so' || true
    done
} >"$OUTDIR/libs.txt" 2>&1
echo "libraries: $(grep -c '\.so' "$OUTDIR/libs.txt") shared objects in ${LIBDIRS:-<none>}"

# ---------------------------------------------------------------- steps ----
step nvidia_smi nvidia-smi
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
    >"$OUTDIR/gpu.txt" 2>/dev/null || echo "unknown" >"$OUTDIR/gpu.txt"

if [ "$TABLE" = 1 ]; then
    # ------------------------------------------------------------ results table ----
    TABLE_BUDGET="${TABLE_BUDGET:-480}"
    TABLE_JOBS="${TABLE_JOBS:-14}"
    TABLE_DATASET="${TABLE_DATASET:-all}"
    TABLE_EPOCHS="${TABLE_EPOCHS:-100}"
    TABLE_RUNS="${TABLE_RUNS:-$(dirname "$HERE")/runs/table-cuda}"
    TABLE_DEVICE="${TABLE_DEVICE:-cuda}"
    if [ "$TABLE_DATASET" != pneumoniamnist ] && [ ! -f "$HERE/data/ham10000/images.u8" ]; then
        echo "warning: HAM10000 is not packed (over the pack's size cap?): PneumoniaMNIST only"
        TABLE_DATASET=pneumoniamnist
    fi
    echo "results table: $TABLE_DATASET, $TABLE_EPOCHS epochs, $TABLE_JOBS at once, budget $TABLE_BUDGET s, runs in $TABLE_RUNS"
    # shellcheck disable=SC2086  # TABLE_ARGS: space-separated extra arguments
    STEP_TIMEOUT=$((TABLE_BUDGET + 90)) step results_table bash "$HERE/results-table.sh" \
        --device "$TABLE_DEVICE" --jobs "$TABLE_JOBS" --budget "$TABLE_BUDGET" --epochs "$TABLE_EPOCHS" \
        --dataset "$TABLE_DATASET" --out "$TABLE_RUNS" --bin "$HERE/bin/medssl" \
        --data-root "$HERE/data" ${TABLE_ARGS:-}
    for f in table.md table.json table.txt; do
        [ -f "$TABLE_RUNS/$f" ] && cp "$TABLE_RUNS/$f" "$OUTDIR/$f"
    done
    [ -f "$OUTDIR/table.txt" ] && cat "$OUTDIR/table.txt"
else
    export MEDSSL_GOLDEN="$HERE/golden"
    # The CUDA backend reports each convolution shape's cuDNN algorithm choice on stderr (logs/).
    export MEDSSL_CUDNN_LOG="${MEDSSL_CUDNN_LOG:-1}"
    # The CUDA training-run test needs a dataset and the medssl binary from this folder, the
    # profiler test the medssl-bench binary.
    export MEDSSL_TEST_DATA="$HERE/data" MEDSSL_BIN="$HERE/bin/medssl" MEDSSL_BENCH_BIN="$HERE/bin/medssl-bench"
    for t in "$HERE"/tests/*; do
        [ -x "$t" ] || continue
        name="test_$(basename "$t")"
        # The device-profiler test runs alone below, under a short timeout: a CUPTI that hangs
        # or crashes must not take the other parity tests with it.
        extra=()
        [ "$(basename "$t")" = cuda_parity ] && extra=(--skip device_profile_records_what_ran)
        step "$name" "$t" --test-threads=1 --nocapture ${extra[@]+"${extra[@]}"}
    done
    PROFILER_OK=0
    if [ -x "$HERE/tests/cuda_parity" ]; then
        STEP_TIMEOUT="${PROFILE_TIMEOUT:-90}" step test_cuda_parity_profiler "$HERE/tests/cuda_parity" \
            device_profile_records_what_ran --exact --test-threads=1 --nocapture
        tail -n 1 "$STEPS" | grep -q '"rc":0,' &&
            grep -q "test result: ok. 1 passed" "$OUTDIR/logs/test_cuda_parity_profiler.log" &&
            ! grep -q SKIPPED "$OUTDIR/logs/test_cuda_parity_profiler.log" && PROFILER_OK=1
        # The convolution tests again on the im2col + cuBLAS fallback engine.
        step test_cuda_parity_conv_im2col env MEDSSL_CUDA_CONV=im2col "$HERE/tests/cuda_parity" conv2d --test-threads=1 --nocapture
        # And with cuDNN's heuristic algorithm choice instead of the timed one (the default), with
        # the 1x1 convolutions on cuDNN as well (by default they run on cuBLAS).
        step test_cuda_parity_conv_heuristic env MEDSSL_CUDNN_ALGO=heuristic MEDSSL_CUDA_CONV1X1=cudnn MEDSSL_CUDNN_LOG=1 "$HERE/tests/cuda_parity" conv2d --test-threads=1 --nocapture
        # And with medssl's own timing of the cuDNN algorithms and the im2col engine per direction
        # (MEDSSL_CUDNN_ALGO=time: a shape's directions may mix cuDNN and im2col), the 1x1
        # convolutions on cuDNN too, with the training steps (eager, from a graph, and against
        # the CPU) that make their plans inside warm-up steps.
        step test_cuda_parity_conv_time env MEDSSL_CUDNN_ALGO=time MEDSSL_CUDA_CONV1X1=cudnn MEDSSL_CUDNN_LOG=1 "$HERE/tests/cuda_parity" conv2d graph_steps_match_eager_steps training_steps_match_cpu --test-threads=1 --nocapture
    fi

    if [ -x "$HERE/bin/medssl" ]; then
        step conformance_cuda sh -c "\"$HERE/bin/medssl\" conformance --golden \"$HERE/golden\" --device cuda --json > \"$OUTDIR/conformance_cuda.jsonl\""
        step conformance_cpu sh -c "\"$HERE/bin/medssl\" conformance --golden \"$HERE/golden\" --device cpu --json > \"$OUTDIR/conformance_cpu.jsonl\""
        if [ -n "$TRAIN_ARGS" ]; then
            # shellcheck disable=SC2086
            step train_cuda env MEDSSL_CUDNN_ALGO=heuristic "$HERE/bin/medssl" $TRAIN_ARGS
            if [ -n "$TRAIN_GRAPH_ARGS" ]; then
                # shellcheck disable=SC2086
                step train_cuda_graph env MEDSSL_CUDA_GRAPH_LOG=1 MEDSSL_CUDNN_ALGO=heuristic \
                    "$HERE/bin/medssl" $TRAIN_GRAPH_ARGS
            fi
            if [ -n "$TRAIN_HAM_ARGS" ]; then
                # shellcheck disable=SC2086
                step train_ham_cuda env MEDSSL_CUDNN_ALGO=heuristic "$HERE/bin/medssl" $TRAIN_HAM_ARGS
            fi
            if [ -n "$TRAIN_HAM_GRAPH_ARGS" ]; then
                # shellcheck disable=SC2086
                step train_ham_cuda_graph env MEDSSL_CUDA_GRAPH_LOG=1 MEDSSL_CUDNN_ALGO=heuristic \
                    "$HERE/bin/medssl" $TRAIN_HAM_GRAPH_ARGS
            fi
        else
            skip train_cuda "TRAIN_ARGS not set (placeholder for the lead)"
        fi
    else
        skip conformance_cuda "bin/medssl missing"
    fi

    run_configs() { # NAME PROGRAM... ; configs from $CONFIGS, output appended to OUTDIR/NAME.jsonl
        local name=$1
        shift
        local i=0
        : >"$OUTDIR/$name.jsonl"
        IFS='|' read -r -a cfgs <<<"$CONFIGS"
        for c in "${cfgs[@]}"; do
            i=$((i + 1))
            # Leading VAR=value words are the environment of the program.
            local envs=() rest=() w words
            read -r -a words <<<"$c"
            for w in "${words[@]}"; do
                if [ ${#rest[@]} -eq 0 ] && [[ "$w" =~ ^[A-Z_][A-Z0-9_]*= ]]; then envs+=("$w"); else rest+=("$w"); fi
            done
            step "${name}_$i" sh -c "env ${envs[*]} $* ${rest[*]} --json >> \"$OUTDIR/$name.jsonl\""
        done
    }

    if [ -x "$HERE/bin/medssl-bench" ]; then
        CONFIGS="$BENCH_CUDA_CONFIGS" run_configs bench_cuda "\"$HERE/bin/medssl-bench\" step"
        CONFIGS="$BENCH_CPU_CONFIGS" run_configs bench_cpu "\"$HERE/bin/medssl-bench\" step"
        CONFIGS="$OPS_CUDA_CONFIGS" run_configs ops_cuda "\"$HERE/bin/medssl-bench\" ops"
        if [ -f "$HERE/torch_ops_peer.py" ]; then
            CONFIGS="$PEER_OPS_CONFIGS" run_configs ops_torch "\"$PY\" \"$HERE/torch_ops_peer.py\""
        else
            skip ops_torch "torch_ops_peer.py not packed"
        fi
    else
        skip bench "bin/medssl-bench missing"
    fi

    if [ -f "$HERE/torch_peer.py" ]; then
        CONFIGS="$PEER_CONFIGS" run_configs torch_peer "\"$PY\" \"$HERE/torch_peer.py\""
    else
        skip torch_peer "torch_peer.py not packed"
    fi

    # Device profiles last (see PROFILE_CUDA_CONFIGS).
    if [ -x "$HERE/bin/medssl-bench" ] && [ "$PROFILER_OK" = 1 ]; then
        STEP_TIMEOUT="${PROFILE_TIMEOUT:-90}" CONFIGS="$PROFILE_CUDA_CONFIGS" \
            run_configs bench_cuda_profile "\"$HERE/bin/medssl-bench\" step"
        STEP_TIMEOUT="${PROFILE_TIMEOUT:-90}" CONFIGS="$PROFILE_OPS_CONFIGS" \
            run_configs ops_cuda_profile "\"$HERE/bin/medssl-bench\" ops"
    else
        skip bench_cuda_profile "the profiler's parity test did not pass (logs/test_cuda_parity_profiler.log)"
    fi
    if [ -f "$HERE/torch_peer.py" ]; then
        STEP_TIMEOUT="${PROFILE_TIMEOUT:-90}" CONFIGS="$PROFILE_PEER_CONFIGS" \
            run_configs torch_peer_profile "\"$PY\" \"$HERE/torch_peer.py\""
    fi
    if [ -f "$HERE/torch_ops_peer.py" ]; then
        STEP_TIMEOUT="${PROFILE_TIMEOUT:-90}" CONFIGS="$PEER_OPS_PROFILE_CONFIGS" \
            run_configs ops_torch_profile "\"$PY\" \"$HERE/torch_ops_peer.py\""
    fi
fi

# ---------------------------------------------------------------- summary ----
"$PY" - "$OUTDIR" <<'EOF' || echo "summary.json could not be written (python failed); see steps.jsonl"
import json, os, re, sys
out = sys.argv[1]
steps = [json.loads(l) for l in open(os.path.join(out, "steps.jsonl")) if l.strip()]
for s in steps:
    log = s.get("log")
    if not log or not os.path.exists(os.path.join(out, log)):
        continue
    text = open(os.path.join(out, log), errors="replace").read()
    if s["step"].startswith("test_"):
        m = re.findall(r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", text)
        if m:
            p, f, i = (sum(int(x[k]) for x in m) for k in range(3))
            s["tests"] = {"passed": p, "failed": f, "ignored": i,
                          "skipped_no_device": text.count("SKIPPED (no CUDA device)")}
        fails = set(re.findall(r"^test (\S+) \.\.\. FAILED", text, re.M))
        for block in re.findall(r"\nfailures:\n((?:    \S+\n)+)", text):
            fails.update(l.strip() for l in block.splitlines() if l.strip())
        s["failures"] = sorted(fails)
    if s["step"].startswith("conformance_"):
        dev = s["step"].split("_", 1)[1]
        path = os.path.join(out, f"conformance_{dev}.jsonl")
        if os.path.exists(path):
            rows = []
            for l in open(path):
                try:
                    rows.append(json.loads(l))
                except ValueError:
                    pass
            summ = [r for r in rows if r.get("summary")]
            s["conformance"] = summ[-1] if summ else None
            s["failed_cases"] = [r.get("op") for r in rows if not r.get("summary") and not r.get("pass", True)]
def tensors(path):
    import struct
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    h.pop("__metadata__", None)
    return {k: b[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]] for k, v in h.items()}
def graph_vs_plain(plain, graph):
    pa, pb = os.path.join(out, plain, "last.safetensors"), os.path.join(out, graph, "last.safetensors")
    if not (os.path.exists(pa) and os.path.exists(pb)):
        return None
    try:
        a, b = tensors(pa), tensors(pb)
        return {"tensors": len(a), "bitwise_different": sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))}
    except Exception as e:
        return {"error": str(e)}
# Steps, wall seconds and steps per second of each training run (its own summary.json).
train_runs = {}
for run in ("train", "train_graph", "train_ham", "train_ham_graph"):
    p = os.path.join(out, run, "summary.json")
    if os.path.exists(p):
        try:
            r = json.load(open(p))
            wall = r.get("wall_seconds") or 0
            train_runs[run] = {"steps": r.get("steps"), "wall_seconds": wall,
                               "steps_per_s": r.get("steps", 0) / wall if wall else None}
        except Exception as e:
            train_runs[run] = {"error": str(e)}
summary = {
    "gpu": open(os.path.join(out, "gpu.txt")).read().strip() if os.path.exists(os.path.join(out, "gpu.txt")) else None,
    "train_graph_vs_plain": graph_vs_plain("train", "train_graph"),
    "train_ham_graph_vs_plain": graph_vs_plain("train_ham", "train_ham_graph"),
    "train_runs": train_runs,
    "ld_library_path": os.environ.get("LD_LIBRARY_PATH", ""),
    "all_ok": all(s.get("rc") in (0, None) for s in steps),
    "steps": steps,
}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(json.dumps({k: summary[k] for k in ("gpu", "all_ok", "train_graph_vs_plain", "train_ham_graph_vs_plain", "train_runs")}))
for s in steps:
    extra = s.get("tests") or s.get("conformance") or s.get("skipped") or ""
    print(f"  {s['step']:<32} rc={s.get('rc')}  {extra}")
EOF
# The --profile rows of both sides, paired by workload (OUTDIR/profile.md).
if [ "$TABLE" != 1 ] && [ -f "$HERE/profile-table.py" ] && [ -s "$OUTDIR/bench_cuda_profile.jsonl" ] &&
    [ -s "$OUTDIR/torch_peer_profile.jsonl" ]; then
    "$PY" "$HERE/profile-table.py" "$OUTDIR/bench_cuda_profile.jsonl" "$OUTDIR/torch_peer_profile.jsonl" \
        >"$OUTDIR/profile.md" 2>>"$OUTDIR/logs/profile_table.log" ||
        echo "profile.md: no workload profiled on both sides (see logs/profile_table.log)"
fi
# medssl's memory-bound ops paired with the peer's (OUTDIR/ops.md).
if [ "$TABLE" != 1 ] && [ -f "$HERE/ops-table.py" ] && [ -s "$OUTDIR/ops_cuda.jsonl" ] &&
    [ -s "$OUTDIR/ops_torch.jsonl" ]; then
    PROFILES=()
    if [ -s "$OUTDIR/ops_cuda_profile.jsonl" ] && [ -s "$OUTDIR/ops_torch_profile.jsonl" ]; then
        PROFILES=(--profiles "$OUTDIR/ops_cuda_profile.jsonl" "$OUTDIR/ops_torch_profile.jsonl")
    fi
    "$PY" "$HERE/ops-table.py" "$OUTDIR/ops_cuda.jsonl" "$OUTDIR/ops_torch.jsonl" \
        ${PROFILES[@]+"${PROFILES[@]}"} \
        >"$OUTDIR/ops.md" 2>>"$OUTDIR/logs/ops_table.log" ||
        echo "ops.md: no op measured by both sides (see logs/ops_table.log)"
fi
if [ "$TABLE" = 1 ]; then
    # Few files come back from a device command: everything but the tables and summary.json goes
    # into one archive (run files without checkpoints, training logs, this script's logs).
    mkdir -p "$OUTDIR/gpu-run"
    mv "$OUTDIR/logs" "$OUTDIR/steps.jsonl" "$OUTDIR/gpu.txt" "$OUTDIR/libs.txt" "$OUTDIR/gpu-run/" 2>/dev/null
    if [ -d "$TABLE_RUNS" ]; then
        (cd "$TABLE_RUNS" && find . -maxdepth 2 -type f \( -name config.toml -o -name summary.json \
            -o -name metrics.jsonl -o -name confusion.txt -o -name commands.txt -o -path './logs/*' \) \
            -print0 | tar czf "$OUTDIR/table-runs.tar.gz" --null -T - -C "$OUTDIR" gpu-run)
    else
        tar czf "$OUTDIR/table-runs.tar.gz" -C "$OUTDIR" gpu-run
    fi
    rm -rf "$OUTDIR/gpu-run"
    echo "outputs in $OUTDIR: $(cd "$OUTDIR" && echo *) (table-runs.tar.gz: run files, logs)"
else
    # Everything but the summary, the profile table and the benchmark JSON lines into one archive
    # (checkpoints left out: summary.json already says whether the two training runs agree).
    (
        cd "$OUTDIR" &&
            mapfile -d '' rest < <(find . -mindepth 1 -maxdepth 1 ! -name summary.json \
                ! -name profile.md ! -name ops.md ! -name bench_cuda.jsonl ! -name bench_cpu.jsonl \
                ! -name ops_cuda.jsonl ! -name torch_peer.jsonl ! -name gpu-run.tar.gz -printf '%P\0') &&
            tar czf gpu-run.tar.gz --exclude='*.safetensors' "${rest[@]}" &&
            rm -rf "${rest[@]}"
    ) || echo "gpu-run.tar.gz could not be written; the files stay in $OUTDIR"
    echo "outputs in $OUTDIR: $(cd "$OUTDIR" && echo *) (gpu-run.tar.gz: logs/, steps.jsonl, run files)"
fi
exit 0
