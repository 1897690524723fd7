#!/usr/bin/env bash
# A focused GPU run for a session with little device time (packed as .gpu/gpu-focus.sh by
# tools/gpu-pack.sh): gpu-run.sh with every correctness step (parity tests, conformance, the
# training runs) but only the measurements of the open questions, each beside the default it
# would replace and the PyTorch peer it is judged against. Runs 8 and 9 (2026-11-28) made the
# device-timed convolution choice (MEDSSL_CUDNN_ALGO=time) and the queued step read
# (MEDSSL_CUDA_STEP_READ=later) the defaults; open after them:
#   - whole training runs under the queued read (gpu-run.sh's graph/plain training pair, now
#     under `later`), and the default steps back to back beside the peer's, against `wait`;
#   - 16 loads in flight in the batch-norm statistics (MEDSSL_CUDA_BN_INFLIGHT=16: +7 % on the
#     two-launch forward at [256,64,28,28] in run 8) in the step, from a graph and plain;
#   - the resident batch norms in the step again (run 9: 4 % faster at width 16, 7 % slower at
#     width 64, from a graph), and the batch norms at [256,64,28,28] (the 80 % target), with
#     the device time per kernel, beside a read-only and a write-only pass over the same bytes
#     (--op read_reference: run 8's statistics pass read x at 1.6-1.9 TB/s where mixed traffic
#     moved 2.8-2.96 TB/s; is that the device's read-only rate, or the statistics' walk?).
#   bash .gpu/gpu-focus.sh OUTDIR      (about 100 s of steps on an H100)
# Each variable below can still be overridden from the environment, as in gpu-run.sh.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RES="MEDSSL_CUDA_BN_FWD=resident MEDSSL_CUDA_BN_BWD=resident"
WAIT="MEDSSL_CUDA_STEP_READ=wait"
IN16="MEDSSL_CUDA_BN_INFLIGHT=16"
B2B="--back-to-back"
W16="--device cuda --width 16"
W64="--device cuda --width 64"
BIG="--device cuda --width 64 --batch 256"
BN="--op batch_norm"
export BENCH_CUDA_CONFIGS="${BENCH_CUDA_CONFIGS-"$W16 --fill-queue $B2B|$W16 --cuda-graph $B2B|$W64 --fill-queue $B2B|$W64 --cuda-graph $B2B|$WAIT $W16 --cuda-graph $B2B|$WAIT $W64 --cuda-graph $B2B|$IN16 $W16 --cuda-graph|$IN16 $W64 --cuda-graph|$IN16 $W64 --fill-queue|$RES $W16 --cuda-graph|$RES $W64 --cuda-graph|$RES $IN16 $W64 --cuda-graph"}"
export BENCH_CPU_CONFIGS="${BENCH_CPU_CONFIGS-}"
export PEER_CONFIGS="${PEER_CONFIGS-"$W16 --fill-queue $B2B|$W64 --fill-queue $B2B"}"
export OPS_CUDA_CONFIGS="${OPS_CUDA_CONFIGS-"$BIG --op batch_norm,relu,read_reference|$IN16 $BIG $BN|$RES $BIG $BN|$RES $IN16 $BIG $BN"}"
export PEER_OPS_CONFIGS="${PEER_OPS_CONFIGS-"$BIG --op batch_norm,relu"}"
P="--repeats 3 --profile"
export PROFILE_OPS_CONFIGS="${PROFILE_OPS_CONFIGS-"$BIG $BN $P|$RES $BIG $BN $P"}"
export PEER_OPS_PROFILE_CONFIGS="${PEER_OPS_PROFILE_CONFIGS-}"
export PROFILE_CUDA_CONFIGS="${PROFILE_CUDA_CONFIGS-"$W16 --cuda-graph --profile"}"
export PROFILE_PEER_CONFIGS="${PROFILE_PEER_CONFIGS-"$W16 --fill-queue --profile"}"
exec bash "$HERE/gpu-run.sh" "$@"
