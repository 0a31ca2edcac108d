#!/usr/bin/env bash
# test.sh -- the README's test command: installs missing Debian packages, builds, runs ctest.
# Usage: scripts/test.sh [--ci]
#   --ci  also builds and tests with AddressSanitizer + UBSan (CPU backend), assembles the
#         kernels' compute_80 PTX for sm_80 (scripts/ci-ptx80.sh) and runs the libFuzzer
#         targets for 60 s each (needs clang; installed by scripts/deps.sh --ci).
set -euo pipefail
cd "$(dirname "$0")/.."
ci=${1:-}
bash scripts/deps.sh $ci
jobs=$(nproc 2>/dev/null || echo 2)
echo "== build (Release, CUDA if nvcc is found) =="
bash scripts/build.sh build -DMOE_WERROR=ON
if [ "$ci" = "--ci" ]; then
  echo "== luacheck (clean: any warning fails) =="
  luacheck --no-color -q bindings scripts/moe scripts/*.lua scripts/cmd scripts/bench scripts/experiments \
    scripts/spec-examples spec
  echo "== sanitizer build (ASan + UBSan, CPU backend) =="
  cmake -S . -B build-asan -DMOE_CUDA=OFF -DMOE_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
  cmake --build build-asan -j"$jobs"
  (cd build-asan && ctest --output-on-failure -j"$jobs" -E gpu)
  echo "== compute_80 PTX assembles (ptxas sm_80) =="
  bash scripts/ci-ptx80.sh
  if [ -f scripts/ci-fuzz.sh ]; then
    echo "== fuzz (60 s per target) =="
    bash scripts/ci-fuzz.sh
  fi
fi
echo "== tests =="
(cd build && ctest --output-on-failure -j"$jobs")
