#!/usr/bin/env bash
# Run 5 of 2026-11-27: gpu-run.sh's default workloads, trimmed to fit the device time left
# (fewer step switch rows and peer rows); everything else as committed.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OLD="MEDSSL_CUDA_BN_SPLIT=auto MEDSSL_CUDA_BN_APPLY=flat"
export BENCH_CUDA_CONFIGS="--device cuda --width 16 --fill-queue|--device cuda --width 16 --cuda-graph|--device cuda --width 64 --fill-queue|--device cuda --width 64 --cuda-graph|--device cuda --width 16|--device cuda --width 64|$OLD --device cuda --width 16|$OLD --device cuda --width 64|--device cuda --width 64 --method supervised --batch-l 48|--device cuda --width 64 --method supervised --batch-l 48 --cuda-graph"
export BENCH_CPU_CONFIGS=""
export PEER_CONFIGS="--device cuda --width 16 --fill-queue|--device cuda --width 64 --fill-queue|--device cuda --width 16|--device cuda --width 64|--device cuda --width 64 --method supervised --batch-l 48"
export PROFILE_CUDA_CONFIGS="--device cuda --width 16 --cuda-graph --profile|--device cuda --width 64 --profile"
export PROFILE_PEER_CONFIGS="--device cuda --width 16 --fill-queue --profile|--device cuda --width 64 --profile"
exec bash "$HERE/gpu-run.sh" "$@"
