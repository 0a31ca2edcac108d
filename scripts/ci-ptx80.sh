#!/usr/bin/env bash
# ci-ptx80.sh -- CI check: the compute_80 PTX the library embeds (for GPUs without its sm_90a
# binary) assembles for sm_80.  The build only embeds that PTX, so an sm_89+ / Hopper instruction
# outside the kernels' architecture guards would surface only when a pre-Hopper GPU loads the
# module; here the CMake target moe_ptx80 (CMakeLists.txt: every kernels/*.cu with the library's
# includes, definitions and per-file options) is built for sm_80.
# Usage: scripts/ci-ptx80.sh [BUILD_DIR]   (default build; configured if missing; skipped without nvcc)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
if ! command -v nvcc >/dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "ci-ptx80: no nvcc, skipped"
  exit 0
fi
jobs=$(nproc 2>/dev/null || echo 2)
if [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S . -B "$build" -DMOE_CUDA=ON >/dev/null
fi
if ! cmake --build "$build" --target moe_ptx80 -j"$jobs" >"$build/ci-ptx80.log" 2>&1; then
  grep -E "error|ptxas" "$build/ci-ptx80.log" | head -20 >&2 || true
  echo "ci-ptx80: the kernels do not assemble for sm_80 (log: $build/ci-ptx80.log)" >&2
  exit 1
fi
echo "ci-ptx80: every kernels/*.cu assembles for sm_80"
