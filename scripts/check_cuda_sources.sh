#!/usr/bin/env bash
# Compiles every CUDA source under kernels/cuda with NVRTC from NVIDIA's `nvidia-cuda-nvrtc`
# wheel (~60 MB, into target/nvrtc; no GPU or CUDA toolkit needed): what the `cuda` build
# compiles at run time, checked on any machine. CI runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/nvrtc
lib=$(find "$dir" -name 'libnvrtc.so*' ! -name '*builtins*' 2>/dev/null | head -n1 || true)
if [ -z "$lib" ]; then
  python3 -m pip install -q --no-cache-dir --disable-pip-version-check --target "$dir" nvidia-cuda-nvrtc
  lib=$(find "$dir" -name 'libnvrtc.so*' ! -name '*builtins*' | head -n1)
fi
[ -n "$lib" ] || { echo "check_cuda_sources: libnvrtc not found in the wheel under $dir" >&2; exit 1; }
python3 scripts/check_cuda_sources.py "$lib" kernels
