#!/usr/bin/env bash
# Issue 6's last GPU must-show, alone: the same 50-step training run with each attention
# implementation (bench/attention_train.py: xla, pallas_gpu, pallas_mgpu from one init on
# one stream; exits 1 if any loss leaves xla's by more than 1e-2). About 2 minutes.
# Uses the image's jax, flax and optax; carry .whl/ (../shared/tools/gpu-wheels).
#   bash scripts/gpu_attention_train.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/mmgen-gpu}}
mkdir -p "$out"
source scripts/gpu_env.sh
timeout 150 python3 bench/attention_train.py --steps 50 2> "$out/attention_train.log" \
  | tee "$out/attention_train.txt"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || tail -n 5 "$out/attention_train.log"
exit "$rc"
