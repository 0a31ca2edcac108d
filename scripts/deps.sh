#!/usr/bin/env bash
# deps.sh -- make sure the Debian packages moelab needs are installed.
# Usage: scripts/deps.sh [--ci]      (--ci also installs clang for the fuzz targets)
# Installs what is missing with apt-get when run as root; otherwise prints the exact command.
set -euo pipefail
want=(cmake make gcc luajit libluajit-5.1-dev lua-busted libreadline8 python3)
[ "${1:-}" = "--ci" ] && want+=(clang libclang-rt-14-dev libxml2-utils lua-check)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "deps: all present (${want[*]})"
  exit 0
fi
echo "deps: missing: ${missing[*]}"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  echo "deps: installed ${missing[*]}"
else
  echo "deps: please run:  sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
