#!/usr/bin/env bash
# ab_route.sh -- developer A/B on a GPU machine: the working tree's kernels/route.cu against a
# saved version of it, both built and timed in the same session (the pool's GPUs differ by up
# to ~8%, so only same-machine numbers compare).
# Before the GPU run:  git show <rev>:kernels/route.cu > scripts/dev/route_base.cu  (untracked)
# Usage (GPU machine, repo root): scripts/dev/ab_route.sh BASE.cu [bench route options]
set -o pipefail
base=${1:?usage: scripts/dev/ab_route.sh BASE.cu [moe bench route options]}
shift
[ -f "$base" ] || { echo "ab_route.sh: BASE.cu: no such file: $base" >&2; exit 2; }
[ -f .gpu-deps/activate.sh ] && source .gpu-deps/activate.sh
J=$(nproc)
cmake -S . -B build-gpu -DMOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build-gpu -j"$J" 2>&1 | grep -E "rror|warning"
rm -rf /tmp/ab-base && mkdir -p /tmp/ab-base && cp -r CMakeLists.txt engine kernels bindings scripts spec /tmp/ab-base/
cp "$base" /tmp/ab-base/kernels/route.cu
cmake -S /tmp/ab-base -B /tmp/ab-base/build -DMOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build /tmp/ab-base/build -j"$J" --target moe moe_cdef 2>&1 | grep -E "rror|warning"
for v in new base new base; do
  if [ $v = new ]; then L=$PWD/build-gpu; else L=/tmp/ab-base/build; fi
  echo "== $v"
  MOE_LIB=$L/libmoe.so MOE_CDEF=$L/moe_cdef.h luajit scripts/moe bench route --no-torch "$@" 2>&1 | grep -E "^(deepseekv3|minimax2|kimi|renormalize|llama4) "
done
