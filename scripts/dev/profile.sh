#!/usr/bin/env bash
# profile.sh -- developer profiling session on a GPU machine (not part of the tests): build,
# SASS of the routing kernels, Nsight Compute sections for the routing kernel (deepseekv3,
# T = 16384), the warp-specialised GEMM (Mixtral 8x7B, T = 4096) and per-kernel durations of
# one Qwen3-30B-A3B T = 1 fused call.  Logs to $OUT.
# Usage (GPU machine, repo root): scripts/dev/profile.sh [route|fused|decode ...]
set -o pipefail
OUT=${OUT:-prof-out}
mkdir -p "$OUT"
[ -f .gpu-deps/activate.sh ] && source .gpu-deps/activate.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
cmake -S . -B build-gpu -DMOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release >/dev/null &&
  cmake --build build-gpu -j"$(nproc)" 2>&1 | grep -E "rror|warning" | tee "$OUT/build.log"
export MOE_LIB=$PWD/build-gpu/libmoe.so MOE_CDEF=$PWD/build-gpu/moe_cdef.h
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)
what=${*:-route fused decode}
for w in $what; do
  case $w in
  route)
    obj=$(find build-gpu -name 'route.cu.o' | head -1)
    cuobjdump -sass "$obj" | gzip > "$OUT/route_sass.txt.gz"
    cuobjdump -sass "$obj" | awk '/Function :/{f=$3; n[f]=0} /^ +\/\*[0-9a-f]+\*\//{n[f]++} END{for(k in n) print n[k], k}' |
      sort -k2 | tee "$OUT/route_sass_counts.txt"
    timeout 200 "$NCU" -k regex:k_route --launch-skip 3 --launch-count 1 --section SpeedOfLight \
      --section WarpStateStats --section InstructionStats --section Occupancy --section LaunchStats \
      --section SchedulerStats luajit scripts/moe bench route --cases deepseekv3 --T 16384 --no-torch --reps 3 \
      > "$OUT/ncu_route.txt" 2>&1
    tail -120 "$OUT/ncu_route.txt" ;;
  fused)
    timeout 300 "$NCU" -k regex:gemm_ws --launch-skip 2 --launch-count 2 --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy \
      luajit scripts/moe bench fused --shape mixtral-8x7b --t 4096 --reps 1 --no-torch > "$OUT/ncu_ws.txt" 2>&1
    grep -E "moe__k|Throughput|Duration|Stall|Issue|Eligible|Active Warps|L2|Hit|Bandwidth|Busy" "$OUT/ncu_ws.txt" | head -90 ;;
  decode)
    timeout 120 "$NCU" --metrics gpu__time_duration.sum --launch-skip 40 --launch-count 24 \
      luajit scripts/moe bench fused --shape qwen3-30b-a3b --t 1 --reps 3 --no-torch > "$OUT/ncu_decode.txt" 2>&1
    grep -E "moe__k|gpu__time_duration" "$OUT/ncu_decode.txt" | head -60 ;;
  esac
done
