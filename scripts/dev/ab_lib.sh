#!/usr/bin/env bash
# ab_lib.sh -- developer A/B on a GPU machine: build the working tree (build-gpu) and a base tree
# (build-ab) from a tar of it (e.g. `git archive -o scripts/dev/ab_base.tar <rev>` before the
# call), then run the same `moe bench` command with each library, alternating twice.
# Usage: scripts/dev/ab_lib.sh BASE.tar bench-arguments...
set -e
base=$1; shift
[ -f .gpu-deps/activate.sh ] && source .gpu-deps/activate.sh
rm -rf /tmp/ab-src && mkdir -p /tmp/ab-src && tar -xf "$base" -C /tmp/ab-src
cmake -S . -B build-gpu -DMOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake -S /tmp/ab-src -B build-ab -DMOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build-gpu -j16 2>&1 | grep -E "error|warning" || true
cmake --build build-ab -j16 2>&1 | grep -E "error|warning" || true
for round in 1 2; do
  for b in build-ab build-gpu; do
    echo "== $b (round $round)"
    MOE_LIB=$PWD/$b/libmoe.so MOE_CDEF=$PWD/$b/moe_cdef.h luajit scripts/moe bench "$@" 2>&1 |
      grep -E "^(deepseek|qwen3|mixtral)" | grep -v " bf16 " || true
  done
done
