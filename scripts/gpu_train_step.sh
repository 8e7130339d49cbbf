#!/usr/bin/env bash
# The 1B train-step issue's GPU check in one run (about 8 minutes on one H100/H200):
# bench/train_step.py --levers on configs/gpu_1b.py:1gpu, one table of step time,
# tokens/s, MFU (vs 989 TFLOP/s and vs a measured bf16 matmul), compile time and memory
# for each lever, plus JSON in the output folder; then the config's step under two XLA
# flag sets, one process each.
#   bash scripts/gpu_train_step.sh [OUT_DIR]
# mmgen needs flax, optax, orbax-checkpoint, ml-collections, grain, ... beside the image's
# jax: wheels in .whl/ (../shared/tools/gpu-wheels, carried) are installed into .gpu-site.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/mmgen-gpu}}
mkdir -p "$out"
source scripts/gpu_env.sh
# The levers: 260 s at most; no new lever starts after 200 s (one lever: compile + 7
# steps, about a minute for the 1B step).
timeout 260 python3 bench/train_step.py --levers --budget-s 200 --json "$out/train_step.json" \
  2> "$out/train_step.log" | tee "$out/train_step.txt"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ] && [ -s "$out/train_step.json" ]; then  # cut short: the rows it finished
  echo "bench exited with $rc; table of the rows measured before that:"
  python3 bench/train_step.py --table-from "$out/train_step.json" | tee -a "$out/train_step.txt"
fi
tail -n 5 "$out/train_step.log"
# XLA flags are per process: the config's own step once more under each flag set, in a
# process of its own (rows appended to train_step.txt; compare with the first row above).
for flags in --xla_gpu_enable_triton_gemm=false --xla_gpu_enable_cublaslt=true; do
  echo "== XLA_FLAGS += $flags" | tee -a "$out/train_step.txt"
  XLA_FLAGS="$XLA_FLAGS $flags" timeout 110 python3 bench/train_step.py \
    2>> "$out/train_step.log" | grep "^| " | tail -n 1 | tee -a "$out/train_step.txt"
  rc2=${PIPESTATUS[0]}
  # a flag XLA does not know aborts the run at start: say so instead of printing nothing
  [ "$rc2" -eq 0 ] || echo "== that run exited $rc2 (see train_step.log)" \
    | tee -a "$out/train_step.txt"
  [ "$rc" -ne 0 ] || rc=$rc2
done
exit "$rc"
