#!/usr/bin/env bash
# A focused GPU run for a session with little device time (packed as .gpu/gpu-focus.sh by
# tools/gpu-pack.sh): gpu-run.sh with every correctness step (parity tests, conformance, the
# training runs) but only the measurements of the open questions, each beside the default it
# would replace and the PyTorch peer it is judged against:
#   - loads in flight in the one-pass batch-norm statistics (MEDSSL_CUDA_BN_INFLIGHT=8|16, and
#     4|16 for the resident forward, whose own is 8) and L2 eviction priorities in the forward
#     and backward (MEDSSL_CUDA_BN_L2=hint), alone and together: ops rows at width 64, batch 256 (the
#     activations larger than L2, where bn_stats_split read x at half the normalising pass's
#     rate in runs 6 and 7) and the device profile per kernel there, and the width-64 step;
#   - the fusion as one op without the projected map (MEDSSL_CUDA_FUSION=projected): its ops row
#     and the width-16 step, plain and from a graph;
#   - MEDSSL_CUDNN_ALGO=time timing the device alone (2026-11-28): in runs 6 and 7 it gained
#     nothing from a CUDA graph because its events timed the host issuing each call (20-30 us
#     per cuDNN call against 4-30 us of device time), so it chose im2col where that was cheaper
#     to issue but slower on the device; now the timed calls queue behind a hold kernel and a
#     graph run ranks by device time. The width-16 step from a graph and plain (MEDSSL_CUDNN_LOG
#     prints each candidate's device/host time), and under the profiler, Find and time, device
#     busy time beside wall time; every graph row also reports the host's part of each replayed
#     step before the graph's launch (cuda_graph.shadow_host_ms_per_step).
#   - a training step that returns once issued (MEDSSL_CUDA_STEP_READ=later), so that the next
#     step's host work (in a graph step: all of it, before the launch) overlaps this step's
#     device work: steps issued back to back (--back-to-back) with the read waited for and
#     queued, from a graph and plain, at widths 16 and 64, beside the peer's back-to-back steps;
#   bash .gpu/gpu-focus.sh OUTDIR      (about 150-250 s of steps on an H100, from runs 6 and 7)
# Each variable below can still be overridden from the environment, as in gpu-run.sh.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RES="MEDSSL_CUDA_BN_FWD=resident MEDSSL_CUDA_BN_BWD=resident"
TIME="MEDSSL_CUDNN_ALGO=time"
IN8="MEDSSL_CUDA_BN_INFLIGHT=8"
IN16="MEDSSL_CUDA_BN_INFLIGHT=16"
IN4="MEDSSL_CUDA_BN_INFLIGHT=4"
L2="MEDSSL_CUDA_BN_L2=hint"
FUS="MEDSSL_CUDA_FUSION=projected"
LATER="MEDSSL_CUDA_STEP_READ=later"
B2B="--back-to-back"
W16="--device cuda --width 16"
W64="--device cuda --width 64"
BIG="--device cuda --width 64 --batch 256"
export BENCH_CUDA_CONFIGS="${BENCH_CUDA_CONFIGS-"$W16 --fill-queue $B2B|$W16 --cuda-graph $B2B|$W64 --fill-queue $B2B|$W64 --cuda-graph $B2B|$LATER $W16 --fill-queue $B2B|$LATER $W16 --cuda-graph $B2B|$LATER $TIME $W16 --cuda-graph $B2B|$LATER $W64 --fill-queue $B2B|$LATER $W64 --cuda-graph $B2B|$IN16 $W64 --cuda-graph|$L2 $IN16 $W64 --cuda-graph|$L2 $IN16 $W64 --fill-queue|$RES $L2 $IN16 $W64 --cuda-graph|$TIME $W16 --fill-queue|$TIME $W16 --cuda-graph|$TIME $W64 --cuda-graph|$FUS $W16 --fill-queue|$FUS $W16 --cuda-graph|$FUS $W64 --cuda-graph"}"
export BENCH_CPU_CONFIGS="${BENCH_CPU_CONFIGS-}"
export PEER_CONFIGS="${PEER_CONFIGS-"$W16 --fill-queue $B2B|$W64 --fill-queue $B2B"}"
BN="--op batch_norm"
export OPS_CUDA_CONFIGS="${OPS_CUDA_CONFIGS-"$BIG --op batch_norm,relu|$IN8 $BIG $BN|$IN16 $BIG $BN|$L2 $BIG $BN|$L2 $IN8 $BIG $BN|$L2 $IN16 $BIG $BN|$RES $BIG $BN|$RES $IN4 $BIG $BN|$RES $IN16 $BIG $BN|$RES $L2 $BIG $BN|$RES $L2 $IN16 $BIG $BN|$W16 $BN|$L2 $IN16 $W16 $BN|$W16 --op conv2d,fusion|$FUS $W16 --op fusion"}"
export PEER_OPS_CONFIGS="${PEER_OPS_CONFIGS-"$BIG --op batch_norm,relu"}"
P="--repeats 3 --profile"
export PROFILE_OPS_CONFIGS="${PROFILE_OPS_CONFIGS-"$BIG $BN $P|$IN16 $BIG $BN $P|$L2 $BIG $BN $P|$L2 $IN16 $BIG $BN $P|$RES $L2 $IN16 $BIG $BN $P"}"
export PEER_OPS_PROFILE_CONFIGS="${PEER_OPS_PROFILE_CONFIGS-}"
export PROFILE_CUDA_CONFIGS="${PROFILE_CUDA_CONFIGS-"$W16 --cuda-graph --profile|$TIME $W16 --cuda-graph --profile|$TIME $W16 --fill-queue --profile"}"
export PROFILE_PEER_CONFIGS="${PROFILE_PEER_CONFIGS-}"
exec bash "$HERE/gpu-run.sh" "$@"
