#!/usr/bin/env bash
# Issue 9's GPU check: decode latency of the 1B model at batch 1 against the
# memory-bandwidth floor (bench/decode.py --gpu-1b), on one GPU.
#   bash scripts/gpu_decode.sh [OUT_DIR] [bench/decode.py args...]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/mmgen-gpu}}
shift || true
mkdir -p "$out"
source scripts/gpu_env.sh
timeout 300 python3 bench/decode.py --gpu-1b "$@" 2> "$out/decode.log" | tee "$out/decode.txt"
rc=${PIPESTATUS[0]}
tail -n 5 "$out/decode.log"
exit "$rc"
