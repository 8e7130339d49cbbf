#!/usr/bin/env bash
# Trains every stage of configs/small.py (tokenizer, joint model, diffusion decoder) and
# evaluates the joint model on 500 held-out prompts per category, with the tokenizer's
# decoder and with the diffusion decoder. Outputs under OUT (default runs/small); every
# stage resumes or is skipped when finished, so a rerun continues.
#   bash scripts/small.sh [OUT]    (OUT relative to where you run it; default runs/small
#   in the repository)
# Environment: MMGEN (default .venv/bin/mmgen), NUM (prompts per category, default 500),
#   ARG_SUFFIX ("-smoke" runs the CPU-sized variants, for tests).
set -euo pipefail
abs() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }  # from the caller's directory
out=${1:+$(abs "$1")}
cd "$(dirname "$0")/.."
out=${out:-runs/small}
mmgen=${MMGEN:-.venv/bin/mmgen}
num=${NUM:-500}
sfx=${ARG_SUFFIX:-}
start=$(date +%s)
stamp() { echo "[small +$(( $(date +%s) - start ))s] $*"; }
common=(--config.data.cache_dir="$out/cache")

stamp "1/4 tokenizer"
$mmgen train --config "configs/small.py:tokenizer$sfx" --workdir "$out/tokenizer" "${common[@]}"
stamp "2/4 joint model"
t0=$(date +%s)
$mmgen train --config "configs/small.py:joint$sfx" --workdir "$out/joint" "${common[@]}" \
  --config.tokenizer.checkpoint="$out/tokenizer"
stamp "joint model: $(( $(date +%s) - t0 )) s wall (token cache, compile and training)"
stamp "3/4 diffusion decoder"
$mmgen train --config "configs/small.py:decoder$sfx" --workdir "$out/decoder" "${common[@]}" \
  --config.tokenizer.checkpoint="$out/tokenizer"
stamp "4/4 eval ($num prompts per category)"
[ -f "$out/eval/report.json" ] || $mmgen eval --checkpoint "$out/joint" --num "$num" \
  --out "$out/eval"
[ -f "$out/eval_decoder/report.json" ] || $mmgen eval --checkpoint "$out/joint" \
  --suite scenes,text --num "$num" --decoder "$out/decoder" --out "$out/eval_decoder"
stamp "done: $out/eval/report.md, $out/eval_decoder/report.md"
