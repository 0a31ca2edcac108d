#!/usr/bin/env bash
# One GPU session for the routing kernels: build, the route specs, `moe bench route` (with the
# PyTorch baseline), its JSON, and an instruction count of the deepseekv3 kernel at T = 16384.
# Optional: A/B against an older kernels/route.cu given as $1 (built in a copy of the tree).
# Usage (on the GPU machine, repo root): scripts/bench/route_check.sh [old_route.cu]
# Writes logs to $OUT (or ./route-check-out).
set -o pipefail
OUT=${OUT:-route-check-out}
mkdir -p "$OUT"
[ -f .gpu-deps/activate.sh ] && source .gpu-deps/activate.sh
build() { # dir
  cmake -S "$1" -B "$1/build-gpu" -DMOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release >/dev/null &&
    cmake --build "$1/build-gpu" -j"$(nproc)" 2>&1 | grep -E "rror|warning: .*route" ; return 0
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
build .
(cd build-gpu && ctest --output-on-failure -R route 2>&1 | tee "$OUT/route_ctest.log")
spec_rc=$?
echo "route specs rc=$spec_rc"
if [ $spec_rc -ne 0 ] && [ -n "$1" ] && [ -f "$1" ]; then
  echo "=== specs FAILED: falling back to the older kernel $1"
  cp "$1" kernels/route.cu
  build .
  (cd build-gpu && ctest --output-on-failure -R route 2>&1 | tee "$OUT/route_ctest_fallback.log")
  echo "fallback route specs rc=$?"
  set -- # no A/B then
fi
export MOE_LIB=build-gpu/libmoe.so MOE_CDEF=build-gpu/moe_cdef.h
luajit scripts/moe bench route 2>&1 | tee "$OUT/bench.log"
luajit scripts/moe bench route --json --no-torch --reps 100 > "$OUT/bench.json" 2>&1
if command -v ncu >/dev/null; then
  ncu --kernel-name regex:moe__k_route --launch-skip 1 --launch-count 1 --section SpeedOfLight \
    --section InstructionStats luajit -e 'package.path="bindings/?.lua;bindings/?/init.lua;"..package.path
      local moe=require("moe"); local x=moe.randn({16384,256},{device="cuda",seed=1})
      local b=moe.randn({256},{device="cuda",seed=2,std=0.05})
      for i=1,2 do moe.route{logits=x,bias=b,method="deepseekv3",top_k=8,n_group=8,topk_group=4,scale=2.5} end
      moe.synchronize("cuda")' 2>&1 | grep -E "Duration|Executed Instructions  |Issued Instructions  |Throughput" | tee "$OUT/ncu.log"
fi
if [ -n "$1" ] && [ -f "$1" ]; then
  echo "=== A/B: older kernel $1"
  rm -rf /tmp/route-ab && mkdir -p /tmp/route-ab &&
    cp -r CMakeLists.txt engine kernels bindings scripts spec /tmp/route-ab/ && cp "$1" /tmp/route-ab/kernels/route.cu
  build /tmp/route-ab
  MOE_LIB=/tmp/route-ab/build-gpu/libmoe.so MOE_CDEF=/tmp/route-ab/build-gpu/moe_cdef.h \
    luajit scripts/moe bench route --no-torch --cases deepseekv3,kimi-k2,renormalize --reps 100 2>&1 | tee "$OUT/bench_ab_old.log"
fi
exit $spec_rc
