#!/usr/bin/env bash
# Third device run of 2026-11-27 (H100): cuDNN Find in three rounds (each algorithm at its
# fastest) and one-pass batch-norm statistics four values at a time. Workloads are gpu-run.sh's,
# narrowed through its overrides.
H="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
R="--repeats 30"
export BENCH_CUDA_CONFIGS="--device cuda --width 16 --fill-queue $R|--device cuda --width 16 --cuda-graph $R|--device cuda --width 64 --fill-queue $R|--device cuda --width 64 --cuda-graph $R|--device cuda --width 16 $R|--device cuda --width 64 $R|MEDSSL_CUDA_BN_STATS=welford --device cuda --width 16 $R|MEDSSL_CUDA_BN_STATS=welford --device cuda --width 64 $R"
export BENCH_CPU_CONFIGS=""
B="--device cuda --width 64 --batch 256"
export OPS_CUDA_CONFIGS="$B --op relu,batch_norm,adam_step,ema_update|MEDSSL_CUDA_BN_STATS=welford $B --op batch_norm"
export PEER_CONFIGS="--device cuda --width 16 --fill-queue|--device cuda --width 64 --fill-queue|--device cuda --width 16"
export PROFILE_CUDA_CONFIGS="--device cuda --width 16 --cuda-graph --profile|--device cuda --width 16 --profile|--device cuda --width 64 --profile"
export PROFILE_PEER_CONFIGS=""
exec bash "$H/gpu-run.sh" "$@"
