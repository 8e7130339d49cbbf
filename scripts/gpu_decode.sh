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
# XLA flags are per process: the loop once more (XLA attention) with command buffers
# (CUDA graphs) also around while loops and conditionals, so that the decode loop can run
# as one graph rather than some hundreds of kernel launches per token; compare its latency
# and matrix-vector chain lines with the first run's.
flags=--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL
echo "== XLA_FLAGS += $flags" | tee -a "$out/decode.txt"
XLA_FLAGS="$XLA_FLAGS $flags" timeout 150 python3 bench/decode.py --gpu-1b "$@" \
  --attention xla 2>> "$out/decode.log" | grep "^per-token\|^matvec" | tee -a "$out/decode.txt"
rc2=${PIPESTATUS[0]}
# a flag XLA does not know aborts the run at start: say so instead of printing nothing
[ "$rc2" -eq 0 ] || echo "== that run exited $rc2 (see decode.log)" | tee -a "$out/decode.txt"
tail -n 5 "$out/decode.log"
[ "$rc" -ne 0 ] || rc=$rc2
exit "$rc"
