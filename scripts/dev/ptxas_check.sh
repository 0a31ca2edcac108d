#!/usr/bin/env bash
# ptxas_check.sh -- compile every kernels/*.cu for sm_90a (no GPU needed) and list what ptxas
# reports as a potential performance loss (e.g. C7514: wgmma serialised because accumulator
# registers are read while a wgmma is in flight) and any register spills.  Exits 1 when ptxas
# reports a performance loss.  Usage (repo root): scripts/dev/ptxas_check.sh
set -o pipefail
found=0
for f in kernels/*.cu; do
  out=$(nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -DMOE_HAVE_CUDA=1 -DMOE_BUILDING_LIB=1 \
        -Iengine/include -Iengine/src -Ikernels -Xptxas -v -c "$f" -o /dev/null 2>&1) || { echo "$f: nvcc failed"; echo "$out"; exit 2; }
  loss=$(echo "$out" | grep "Performance Loss" | sed 's/.*(\(C[0-9]*\)).*function .\([^ ]*\).$/\1 \2/')
  spills=$(echo "$out" | grep -B1 " [1-9][0-9]* bytes spill stores" | grep -c "Function properties for")
  [ -n "$loss" ] && { echo "$f: performance loss reported:"; echo "$loss" | sed 's/^/  /'; found=1; }
  [ "$spills" -gt 0 ] && echo "$f: $spills kernel(s) with register spills"
done
exit $found
