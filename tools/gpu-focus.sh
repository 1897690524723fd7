#!/usr/bin/env bash
# A focused GPU run for a session with little device time (packed as .gpu/gpu-focus.sh by
# tools/gpu-pack.sh): gpu-run.sh with every correctness step (parity tests, conformance, the
# training runs) but only the measurements of the work not yet timed on a GPU, each beside the
# default it would replace and the PyTorch peer it is judged against:
#   - the resident one-launch batch norm (MEDSSL_CUDA_BN_FWD=resident MEDSSL_CUDA_BN_BWD=resident):
#     ops rows at width 64, batch 256 (the activations larger than L2) and at the model's width
#     16, the device profile per call at [256,64,28,28], and the DSRPGC step plain and from a graph;
#   - medssl's own convolution timing (MEDSSL_CUDNN_ALGO=time): the step at widths 16 and 64, and
#     the width-16 convolutions under the profiler with every timing logged, against the default
#     and PyTorch's convolutions.
#   bash .gpu/gpu-focus.sh OUTDIR      (about 200 s of steps on an H100, an estimate from run 4)
# Each variable below can still be overridden from the environment, as in gpu-run.sh.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RES="MEDSSL_CUDA_BN_FWD=resident MEDSSL_CUDA_BN_BWD=resident"
TIME="MEDSSL_CUDNN_ALGO=time"
W16="--device cuda --width 16"
W64="--device cuda --width 64"
BIG="--device cuda --width 64 --batch 256"
CONV="--device cuda --width 16 --batch 36 --op conv2d --repeats 3 --profile"
export BENCH_CUDA_CONFIGS="${BENCH_CUDA_CONFIGS-"$W16 --fill-queue|$W16 --cuda-graph|$W64 --fill-queue|$W64 --cuda-graph|$RES $W16 --fill-queue|$RES $W16 --cuda-graph|$RES $W64 --fill-queue|$RES $W64 --cuda-graph|$TIME $W16 --fill-queue|$TIME $W16 --cuda-graph|$TIME $W64 --cuda-graph"}"
export BENCH_CPU_CONFIGS="${BENCH_CPU_CONFIGS-}"
export PEER_CONFIGS="${PEER_CONFIGS-"$W16 --fill-queue|$W64 --fill-queue"}"
export OPS_CUDA_CONFIGS="${OPS_CUDA_CONFIGS-"$BIG --op batch_norm,relu|$RES $BIG --op batch_norm|$W16 --op batch_norm,conv2d|$RES $W16 --op batch_norm|$TIME $W16 --op conv2d"}"
export PEER_OPS_CONFIGS="${PEER_OPS_CONFIGS-"$BIG --op batch_norm,relu|$W16 --batch 36 --op batch_norm,conv2d"}"
export PROFILE_OPS_CONFIGS="${PROFILE_OPS_CONFIGS-"$BIG --op batch_norm --repeats 3 --profile|$RES $BIG --op batch_norm --repeats 3 --profile|MEDSSL_CUDNN_LOG=1 $CONV|$TIME MEDSSL_CUDNN_LOG=1 $CONV"}"
export PEER_OPS_PROFILE_CONFIGS="${PEER_OPS_PROFILE_CONFIGS-"$BIG --op batch_norm --repeats 3 --profile|$CONV"}"
export PROFILE_CUDA_CONFIGS="${PROFILE_CUDA_CONFIGS-"$W16 --cuda-graph --profile|$RES $W64 --profile"}"
export PROFILE_PEER_CONFIGS="${PROFILE_PEER_CONFIGS-"$W16 --fill-queue --profile"}"
exec bash "$HERE/gpu-run.sh" "$@"
