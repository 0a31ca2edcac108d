#!/usr/bin/env bash
# ab_route.sh -- developer A/B on a GPU machine: the working tree's kernels/route.cu against
# scripts/dev/route_base.cu (a saved version), both built and timed in the same session.
# Usage (GPU machine, repo root): scripts/dev/ab_route.sh [bench route options]
set -o pipefail
[ -f .gpu-deps/activate.sh ] && source .gpu-deps/activate.sh
J=$(nproc)
cmake -S . -B build-gpu -DMOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build-gpu -j"$J" 2>&1 | grep -E "rror|warning"
rm -rf /tmp/ab-base && mkdir -p /tmp/ab-base && cp -r CMakeLists.txt engine kernels bindings scripts spec /tmp/ab-base/ 2>/dev/null
cp scripts/dev/route_base.cu /tmp/ab-base/kernels/route.cu
cmake -S /tmp/ab-base -B /tmp/ab-base/build -DMOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build /tmp/ab-base/build -j"$J" --target moe moe_cdef 2>&1 | grep -E "rror|warning"
for v in new base new base; do
  if [ $v = new ]; then L=$PWD/build-gpu; else L=/tmp/ab-base/build; fi
  echo "== $v"
  MOE_LIB=$L/libmoe.so MOE_CDEF=$L/moe_cdef.h luajit scripts/moe bench route --no-torch "$@" 2>&1 | grep -E "^(deepseekv3|minimax2|kimi|renormalize|llama4) "
done
