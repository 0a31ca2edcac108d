#!/usr/bin/env bash
# gpu_check.sh -- one GPU session that proves the CUDA backend: build (Release, sm_90a), every
# ctest entry (GPU specs included), the main job at its full GPU shape (qwen3-30b-a3b, 48 layers,
# 4096 tokens, 5 quantisation modes) timed from process start, and the benchmarks.
# Usage (GPU machine, repo root): scripts/gpu_check.sh [--no-bench]
# Logs go to $OUT (or ./gpu-check-out).  Prints a short summary last.
set -o pipefail
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
[ -f .gpu-deps/activate.sh ] && source .gpu-deps/activate.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
cmake -S . -B build-gpu -DMOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release >/dev/null &&
  cmake --build build-gpu -j"$(nproc)" 2>&1 | grep -E "error|warning" | tee "$OUT/build.log"
echo "build: $(( $(date +%s) - t0 )) s"
(cd build-gpu && ctest --output-on-failure -j4 2>&1 | tee "$OUT/ctest.log" | tail -25)
export MOE_LIB=$PWD/build-gpu/libmoe.so MOE_CDEF=$PWD/build-gpu/moe_cdef.h
s=$(date +%s%N)
luajit scripts/moe run scripts/experiments/quant_drift.lua --out "$OUT/quant_drift" 2>"$OUT/main_progress.log" |
  tee "$OUT/main.log"
echo "main job wall (process start to end): $(( ($(date +%s%N) - s) / 1000000 )) ms" | tee -a "$OUT/main.log"
if [ "${1:-}" = "--bench-only" ]; then :; fi
if [ "${1:-}" != "--no-bench" ]; then
  luajit scripts/moe bench route 2>&1 | tee "$OUT/bench_route.log" | tail -35
  luajit scripts/moe bench fused 2>&1 | tee "$OUT/bench_fused.log" | tail -40
  luajit scripts/moe bench fused_quant 2>&1 | tee "$OUT/bench_fused_quant.log" | tail -60
fi
echo "== summary =="
grep -E "tests passed|tests failed" "$OUT/ctest.log"
grep -E "wall" "$OUT/main.log"
