#!/usr/bin/env bash
# Issue 12's GPU run in one call: configs/small.py on one GPU via scripts/small.sh, with
# the stage timings (the joint model's budget is 8 minutes) and the eval reports.
#   bash scripts/gpu_small.sh [OUT_DIR]
# Carry runs/small/tokenizer and runs/small/decoder, trained beforehand (e.g. on CPU with
# the commands in configs/small.py's docstring), to spend the device time on the joint
# model and the eval only: finished stages are skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/mmgen-gpu}}
mkdir -p "$out"
source scripts/gpu_env.sh
MMGEN="python3 -m mmgen.cli" timeout 560 bash scripts/small.sh runs/small 2>&1 \
  | grep -v "^  generated" | tee "$out/small.log"
rc=${PIPESTATUS[0]}
for d in eval eval_decoder; do
  [ -f "runs/small/$d/report.md" ] && cp -r "runs/small/$d" "$out/"
done
grep -h "overall\|single_object\|exact_word\|exact_scene" runs/small/eval*/report.md || true
exit "$rc"
