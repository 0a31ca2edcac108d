#!/usr/bin/env bash
# ci-fuzz.sh -- build the libFuzzer targets with clang and fuzz the safetensors and .npy
# parsers for FUZZ_SECONDS each (default 60).  Exits non-zero on any finding; crash inputs
# are left in build-fuzz/findings/.  Called from .ci/run; runs from any directory.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
secs="${FUZZ_SECONDS:-60}"
build="${FUZZ_BUILD_DIR:-build-fuzz}"

# clang with its libFuzzer runtime (Debian 12: clang-14 + libclang-rt-14-dev)
have_fuzzer() {
    command -v clang >/dev/null 2>&1 || return 1
    echo 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { (void)d; (void)n; return 0; }' \
        > "${TMPDIR:-/tmp}/moe_fuzz_probe.c"
    clang -fsanitize=fuzzer "${TMPDIR:-/tmp}/moe_fuzz_probe.c" -o "${TMPDIR:-/tmp}/moe_fuzz_probe" \
        >/dev/null 2>&1
}
if ! have_fuzzer; then
    echo "ci-fuzz: installing clang (libFuzzer)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq clang >/dev/null
    if ! have_fuzzer; then
        ver="$(clang --version | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -1)"
        apt-get install -y -qq "libclang-rt-${ver}-dev" >/dev/null || true
    fi
    have_fuzzer || { echo "ci-fuzz: clang cannot link -fsanitize=fuzzer" >&2; exit 1; }
fi
clang --version | head -1

CC=clang cmake -S . -B "$build" -DMOE_FUZZ=ON -DMOE_CUDA=OFF -DBUILD_TESTING=OFF >/dev/null
cmake --build "$build" -j"$(nproc)" --target fuzz_safetensors fuzz_npy

mkdir -p "$build/findings"
status=0
for target in safetensors npy; do
    case "$target" in safetensors) corpus=st ;; *) corpus=npy ;; esac
    work="$build/corpus-$corpus"   # new inputs go here, the committed seeds stay untouched
    mkdir -p "$work"
    echo "ci-fuzz: fuzz_$target for ${secs}s"
    if ! "$build/fuzz_$target" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
            -dict="spec/fuzz/$target.dict" -artifact_prefix="$build/findings/$target-" \
            -print_final_stats=1 "$work" "spec/fuzz/corpus/$corpus" 2>"$build/fuzz_$target.log"; then
        echo "ci-fuzz: fuzz_$target FOUND A PROBLEM:" >&2
        tail -60 "$build/fuzz_$target.log" >&2
        status=1
    else
        grep -E "stat::number_of_executed_units|Done" "$build/fuzz_$target.log" || true
    fi
done
[ "$status" -eq 0 ] && echo "ci-fuzz: no findings"
exit "$status"
