#!/usr/bin/env bash
# Compiles every CUDA source without a GPU, so CUDA code cannot rot unseen: each csrc/cuda/*.cu
# with nvcc for sm_80 and sm_90 (object files to a temporary directory, the flags torch's
# CUDAExtension and setup.py use), then the torch binding csrc/cuda/*.cpp with g++ -fsyntax-only
# against torch's headers (it needs no CUDA header, so a CPU build of torch suffices).
# Warnings are errors, and so is any register spill or local-memory use that ptxas reports: a
# kernel that starts spilling has lost its performance even though it still builds.
# Fails on the first error. NVCC, CXX and PYTHON override the tools; -j N compiles N files at once.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=2
[ "${1:-}" = "-j" ] && jobs=$2

NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
CXX=${CXX:-g++}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
[ -x "$NVCC" ] || { echo "compile_cuda: nvcc not found (set NVCC)"; exit 1; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

nvcc_flags=(-c -O3 -std=c++17 --use_fast_math -lineinfo --expt-relaxed-constexpr
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ -Icsrc
  -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
  -Werror=all-warnings -Xptxas -warn-spills,-warn-lmem-usage)

echo "compile_cuda: $("$NVCC" --version | tail -1)"
shopt -s nullglob
sources=(csrc/cuda/*.cu)
[ ${#sources[@]} -gt 0 ] || { echo "compile_cuda: no csrc/cuda/*.cu"; exit 1; }

compile_one() {  # nvcc flags... -- source
  local src=${*: -1}
  local log
  if log=$("$NVCC" "${@:1:$#-1}" "$src" -o "$out/$(basename "$src").o" 2>&1); then
    echo "compile_cuda: ok  $src (sm_80, sm_90)"
  else
    echo "$log"
    echo "compile_cuda: FAILED $src"
    return 1
  fi
}
export -f compile_one
export NVCC out

status=0
printf '%s\n' "${sources[@]}" | xargs -P "$jobs" -I{} bash -c 'compile_one "$@" {}' _ "${nvcc_flags[@]}" || status=1
[ $status -eq 0 ] || { echo "compile_cuda: nvcc failed"; exit 1; }

torch_include=$("$PYTHON" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
for src in csrc/cuda/*.cpp; do
  "$CXX" -fsyntax-only -std=c++17 -Wall -Wextra -Werror -DLENSERVE_WITH_CUDA=1 -Icsrc \
    -isystem "$torch_include" -isystem "$torch_include/torch/csrc/api/include" "$src"
  echo "compile_cuda: ok  $src (g++ -fsyntax-only against torch $("$PYTHON" -c 'import torch; print(torch.__version__)'))"
done
echo "compile_cuda: all CUDA sources compile"
