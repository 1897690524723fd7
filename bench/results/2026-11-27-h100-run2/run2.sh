#!/usr/bin/env bash
# Second device run of 2026-11-27 (H100): the fixed tests, the graph-vs-plain comparison under a
# fixed algorithm choice, batch-norm kernels with unrolled walks, the ops bench's amortised timing,
# and the step against the peer. Workloads are gpu-run.sh's, narrowed through its overrides.
H="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
R="--repeats 30"
export BENCH_CUDA_CONFIGS="--device cuda --width 16 --fill-queue $R|--device cuda --width 16 --cuda-graph $R|--device cuda --width 64 --fill-queue $R|--device cuda --width 64 --cuda-graph $R|--device cuda --width 16 $R|--device cuda --width 64 $R|--device cuda --width 16 --method supervised --batch-l 48 $R|--device cuda --width 64 --method supervised --batch-l 48 $R|MEDSSL_CUDA_BN_STATS=welford --device cuda --width 16 $R|MEDSSL_CUDA_BN_STATS=welford --device cuda --width 64 $R|MEDSSL_CUDNN_DETERMINISTIC=0 --device cuda --width 16 $R|MEDSSL_CUDNN_DETERMINISTIC=0 --device cuda --width 64 $R|--device cuda --width 64 --image-size 112 --repeats 10"
export BENCH_CPU_CONFIGS=""
B="--device cuda --width 64 --batch 256"
export OPS_CUDA_CONFIGS="$B --op relu,batch_norm,max_pool2d,global_avg_pool,adam_step,ema_update|$B --calls 1 --op relu,batch_norm,adam_step,ema_update|MEDSSL_CUDA_BN_STATS=welford $B --op batch_norm|MEDSSL_CUDA_BN_SPLIT=12 $B --op batch_norm|MEDSSL_CUDA_BN_SPLIT=24 $B --op batch_norm|MEDSSL_CUDA_BN_SPLIT=12 MEDSSL_CUDA_BN_STATS=welford $B --op batch_norm|--device cuda --width 16"
export PEER_CONFIGS="--device cuda --width 16 --fill-queue|--device cuda --width 64 --fill-queue|--device cuda --width 16|--device cuda --width 64|--device cuda --width 64 --method supervised --batch-l 48"
export PROFILE_CUDA_CONFIGS="--device cuda --width 64 --profile"
export PROFILE_PEER_CONFIGS="--device cuda --width 64 --profile"
exec bash "$H/gpu-run.sh" "$@"
