#!/usr/bin/env bash
# One GPU session for the fused MoE (bf16): build, the fused specs (not the quantised ones),
# SASS instruction counts of the GEMM kernels, the decode bench (Qwen3-30B-A3B T = 1, 16, 64,
# each also timed with MOE_FUSED_FOLD=0), the fused GPU spec again with 2-CTA clusters, and
# T = 4096 for the three shapes with the PyTorch baseline, also timed with MOE_FUSED_CLUSTER=1.
# Usage (on the GPU machine, repo root): scripts/bench/fused_check.sh   (logs to $OUT)
set -o pipefail
OUT=${OUT:-fused-check-out}
mkdir -p "$OUT"
[ -f .gpu-deps/activate.sh ] && source .gpu-deps/activate.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
cmake -S . -B build-gpu -DMOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release >/dev/null &&
  cmake --build build-gpu -j"$(nproc)" 2>&1 | grep -E "rror|warning" | tee "$OUT/build.log"
export MOE_LIB=build-gpu/libmoe.so MOE_CDEF=build-gpu/moe_cdef.h
obj=$(find build-gpu -name 'fused_moe.cu.o' | head -1)
if command -v cuobjdump >/dev/null && [ -n "$obj" ]; then
  cuobjdump -sass "$obj" | awk '/Function :/{f=$3} f ~ /k_fm_gemm/ {
      for (i = 1; i <= NF; i++) if ($i ~ /^(HGMMA|UTMALDG|LDGSTS|STL|LDL|SYNCS|USETMAXREG|HMMA)/) { split($i, p, "."); n[f " " p[1]]++ } }
      END { for (k in n) print k, n[k] }' | sort | tee "$OUT/sass_counts.txt"
fi
(cd build-gpu && ctest --timeout 150 --output-on-failure -R fused -E quant 2>&1 | tail -60 | tee "$OUT/ctest.log")
(cd build-gpu && MOE_FUSED_CLUSTER=1 ctest --timeout 150 --output-on-failure -R fused_gpu 2>&1 | tail -40 |
  tee "$OUT/ctest_cluster.log")
timeout 100 luajit scripts/moe bench fused --shape qwen3-30b-a3b --t 1,16,64 --compare-env MOE_FUSED_FOLD=0 \
  --no-torch --json "$OUT/qwen.json" 2>&1 | tee "$OUT/bench_qwen.log"
timeout 120 luajit scripts/moe bench fused --shape mixtral-8x7b --t 4096 --reps 10 --compare-env MOE_FUSED_CLUSTER=1 \
  --json "$OUT/mixtral.json" 2>&1 | tee "$OUT/bench_mixtral.log"
timeout 150 luajit scripts/moe bench fused --shape deepseek-v3,qwen3-30b-a3b --t 4096 --reps 10 \
  --compare-env MOE_FUSED_CLUSTER=1 --json "$OUT/big.json" 2>&1 | tee "$OUT/bench_big.log"
