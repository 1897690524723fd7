#!/usr/bin/env bash
# Installs nvcc from PyPI, pinned to CUDA 13.0 (all four pins matter: a newer nvvm emits PTX that
# a 13.0 driver rejects). With --print, prints the nvcc path instead.
set -euo pipefail
find_nvcc() {
  python3 - <<'PY'
import glob, os, site
for d in site.getsitepackages() + [site.getusersitepackages()]:
    for p in glob.glob(os.path.join(d, "nvidia", "*", "bin", "nvcc")):
        print(p); raise SystemExit
raise SystemExit(1)
PY
}
if [ "${1:-}" = "--print" ]; then
  find_nvcc
  exit
fi
if ! find_nvcc >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96
fi
find_nvcc >/dev/null || { echo "nvcc not found after installing the pinned wheels" >&2; exit 1; }
