#!/usr/bin/env bash
# Compiles the GPU path (`--features cuda`: candle's CUDA backend + NCCL communicator) on a
# machine without CUDA, so it cannot silently rot. nvcc and the CUDA headers come from NVIDIA's
# PyPI wheels (~490 MB) in a venv under target/; nothing is installed system-wide. Nothing is
# linked or run: `cargo check` only.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/cuda-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check \
  nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl nvidia-cuda-crt
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
nvcc=$(find "$site/nvidia" -type f -name nvcc -path '*/bin/*' | head -n1)
[ -n "$nvcc" ] || { echo "check_cuda: nvcc not found in the wheels under $site/nvidia" >&2; exit 1; }
cuda_root=$(dirname "$(dirname "$nvcc")")
# The wheels split the toolkit: gather every include dir so nvcc finds cuda_runtime.h, cccl, crt.
includes=$(find "$site/nvidia" -maxdepth 3 -type d -name include | sed 's/^/-I/' | tr '\n' ' ')
echo "check_cuda: nvcc $("$nvcc" --version | tail -n1) at $cuda_root"
export PATH="$cuda_root/bin:$PATH" CUDA_ROOT="$cuda_root" CUDA_PATH="$cuda_root"
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} $includes"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13040}"
cargo check -p colossal-core --features cuda,mpi --all-targets
echo "check_cuda: colossal-core --features cuda compiles"
