#!/usr/bin/env bash
# Compiles the GPU path (`--features cuda`: candle's CUDA backend + the NCCL communicator) on a
# machine without CUDA, so it cannot silently rot.
#
#   scripts/check_cuda.sh [CLIPPY ARGS]   clippy with scripts/nvcc-standin/nvcc: our Rust code
#                                         type-checked against candle's and cudarc's CUDA APIs;
#                                         candle's own kernels are not compiled. CI runs its
#                                         workspace clippy this way.
#   scripts/check_cuda.sh --real-nvcc …   also compiles candle's kernels, with real nvcc from
#                                         NVIDIA's PyPI wheels (~490 MB into target/cuda-venv,
#                                         ~30 min cold).
#
# CLIPPY ARGS default to `-p colossal-core --features cuda,mpi --all-targets`. Nothing is
# linked or run either way: that needs a GPU machine. NVCC is exported, and candle-kernels'
# build script reruns when it changes, so stand-in kernels never reach a real build.
set -euo pipefail
cd "$(dirname "$0")/.."
real=0
if [ "${1:-}" = --real-nvcc ]; then
  real=1
  shift
fi
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-p colossal-core --features cuda,mpi --all-targets)
if [ $real = 1 ]; then
  venv=target/cuda-venv
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl nvidia-cuda-crt
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  nvcc=$(find "$site/nvidia" -type f -name nvcc -path '*/bin/*' | head -n1)
  [ -n "$nvcc" ] || { echo "check_cuda: nvcc not found in the wheels under $site/nvidia" >&2; exit 1; }
  # The wheels split the toolkit: gather every include dir so nvcc finds cuda_runtime.h, cccl, crt.
  includes=$(find "$site/nvidia" -maxdepth 3 -type d -name include | sed 's/^/-I/' | tr '\n' ' ')
  export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} $includes"
else
  nvcc="$PWD/scripts/nvcc-standin/nvcc"
fi
cuda_root=$(dirname "$(dirname "$nvcc")")
echo "check_cuda: $("$nvcc" --version | tail -n1) at $cuda_root"
export PATH="$(dirname "$nvcc"):$PATH" NVCC="$nvcc" CUDA_ROOT="$cuda_root" CUDA_PATH="$cuda_root"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"
cargo clippy "${args[@]}" -- -D warnings
echo "check_cuda: clippy ${args[*]}: clean, the cuda feature included"
