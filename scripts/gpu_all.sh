#!/usr/bin/env bash
# Every GPU check of the open issues, in one device call, within a time budget:
#   bash scripts/gpu_all.sh OUT_DIR [CHECKS] [BUDGET_S]
# CHECKS (default "attention_train decode train_step attention small"), in order of
# priority (the attention table was measured on 2026-11-27; what is still unmeasured first):
#   attention_train  scripts/gpu_attention_train.sh: 50-step losses per attention impl (6)
#   decode           scripts/gpu_decode.sh: 1B decode latency vs the bandwidth floor (9)
#   train_step       scripts/gpu_train_step.sh: 1B train step MFU over the levers (11)
#   attention        scripts/gpu_attention.sh: kernel correctness + the side-by-side table (6)
#   small            scripts/gpu_small.sh: configs/small.py trained and evaluated (12)
# BUDGET_S (default 560, under the device's 600 s per call): a check starts only if the
# time it needs at least (MIN below) is left; each writes OUT_DIR/<check>.out. Carry .whl/
# (../shared/tools/gpu-wheels, no extra names: the image's flax, optax and orbax work,
# a carried flax 0.12.8 does not import under its jax 0.11.2).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/gpu_all.sh OUT_DIR [CHECKS] [BUDGET_S]}
checks=${2:-attention_train decode train_step attention small}
budget=${3:-560}
mkdir -p "$out"
declare -A MIN=([attention_train]=100 [decode]=150 [train_step]=300 [attention]=300 [small]=400)
start=$(date +%s)
source scripts/xla_cpu_probe.sh   # once for every check (they inherit its result)
status=0
for c in $checks; do
  [ -n "${MIN[$c]:-}" ] || { echo "unknown check $c (attention_train decode train_step attention small)"; exit 2; }
  left=$(( budget - ($(date +%s) - start) ))
  if [ "$left" -lt "${MIN[$c]}" ]; then
    echo "== $c: skipped, ${left}s left of ${budget}s (needs ${MIN[$c]}s)"
    status=1
    continue
  fi
  echo "== $c (${left}s left)"
  timeout "$left" bash "scripts/gpu_$c.sh" "$out/$c" > "$out/$c.out" 2>&1
  rc=$?
  tail -n 40 "$out/$c.out"
  echo "== $c: exit $rc after $(( $(date +%s) - start ))s"
  [ "$rc" -eq 0 ] || status=1
done
exit "$status"
