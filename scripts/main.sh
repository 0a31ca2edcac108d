#!/usr/bin/env bash
# main.sh -- the README's main job: installs missing Debian packages, builds moelab (with the
# CUDA backend when nvcc is found) and runs the default experiment,
# scripts/experiments/quant_drift.lua, on the GPU if there is one, else on the CPU.
# Usage: scripts/main.sh [experiment options]   (see: scripts/moe run scripts/experiments/quant_drift.lua --help)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh >&2
bash scripts/build.sh build >/dev/null
export MOE_LIB="$PWD/build/libmoe.so" MOE_CDEF="$PWD/build/moe_cdef.h"
exec luajit scripts/moe run scripts/experiments/quant_drift.lua "$@"
