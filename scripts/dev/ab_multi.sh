#!/usr/bin/env bash
# ab_multi.sh -- developer A/B of several trees in one GPU call. Each NAME=TAR (a `git archive`
# of a revision, e.g. `git archive -o scripts/dev/ab-main.tar main`) is built into build-ab-NAME,
# checked (qgmma_check.lua's exact/tile lines; AB_CTEST=regex also runs those ctest entries for
# every tree but the first, the base),
# then the same `moe bench` command runs with each library, alternating for AB_ROUNDS rounds (2).
# Usage: scripts/dev/ab_multi.sh NAME=TAR [NAME=TAR ...] -- bench-arguments...
set -e
names=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  n=${1%%=*}; t=${1#*=}; names+=("$n")
  rm -rf "/tmp/ab-src-$n" && mkdir -p "/tmp/ab-src-$n" && tar -xf "$t" -C "/tmp/ab-src-$n"
  shift
done
[ "$1" = "--" ] && shift
[ -f .gpu-deps/activate.sh ] && source .gpu-deps/activate.sh
for n in "${names[@]}"; do
  cmake -S "/tmp/ab-src-$n" -B "build-ab-$n" -DMOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release >/dev/null
done
for n in "${names[@]}"; do
  ( cmake --build "build-ab-$n" -j8 2>&1 | grep -E "error|warning" || true ) &
done
wait
for n in "${names[@]}"; do
  echo "== check $n"
  ( cd "/tmp/ab-src-$n" && MOE_LIB=$OLDPWD/build-ab-$n/libmoe.so MOE_CDEF=$OLDPWD/build-ab-$n/moe_cdef.h \
      luajit scripts/moe run scripts/dev/qgmma_check.lua 2>&1 | grep -E "exact/tile|rror" || true )
  if [ -n "$AB_CTEST" ] && [ "$n" != "${names[0]}" ]; then
    ( cd "build-ab-$n" && ctest -j4 -R "$AB_CTEST" 2>&1 | grep -E "tests passed|Failed|\*\*\*" || true )
  fi
done
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  for n in "${names[@]}"; do
    echo "== $n (round $round)"
    MOE_LIB=$PWD/build-ab-$n/libmoe.so MOE_CDEF=$PWD/build-ab-$n/moe_cdef.h luajit scripts/moe bench "$@" 2>&1 |
      grep -E "^(deepseek|qwen3|mixtral)" | grep -v " bf16 " || true
  done
done
