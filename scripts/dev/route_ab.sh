#!/usr/bin/env bash
# route_ab.sh -- developer A/B of the routing kernels on a GPU machine: configurations of the
# working tree (environment settings) and a saved base route.cu, each built once and timed
# interleaved, twice (the pool's GPUs differ by up to ~8%, so only same-run numbers compare).
# Before the GPU run:  git show <rev>:kernels/route.cu > scripts/dev/route_base.cu  (untracked)
# Usage (GPU machine, repo root):
#   scripts/dev/route_ab.sh BASE.cu "ENV=VAL ENV=VAL ..." [moe bench route options]
# Each word of the second argument is one configuration of the tree ("-" = no setting).
set -o pipefail
base=${1:?usage: route_ab.sh BASE.cu "CONFIGS" [bench options]}
cfgs=${2:?configurations}
shift 2
[ -f "$base" ] || { echo "route_ab.sh: BASE.cu: no such file: $base" >&2; exit 2; }
[ -f .gpu-deps/activate.sh ] && source .gpu-deps/activate.sh
J=$(nproc)
cmake -S . -B build-gpu -DMOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build-gpu -j"$J" 2>&1 | grep -E "rror|warning"
rm -rf /tmp/ab-base && mkdir -p /tmp/ab-base && cp -r CMakeLists.txt engine kernels bindings scripts spec /tmp/ab-base/
cp "$base" /tmp/ab-base/kernels/route.cu
cmake -S /tmp/ab-base -B /tmp/ab-base/build -DMOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build /tmp/ab-base/build -j"$J" --target moe moe_cdef 2>&1 | grep -E "rror|warning"
for pass in 1 2; do
  for c in $cfgs base; do
    if [ "$c" = base ]; then L=/tmp/ab-base/build; envs=(); else L=$PWD/build-gpu; envs=(); [ "$c" != - ] && envs=("$c"); fi
    echo "== $c (pass $pass)"
    env "${envs[@]}" MOE_LIB=$L/libmoe.so MOE_CDEF=$L/moe_cdef.h luajit scripts/moe bench route --no-torch "$@" 2>&1 |
      grep -E "^(deepseekv3|minimax2|kimi-k2|renormalize|llama4) "
  done
done
