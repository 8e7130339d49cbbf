#!/usr/bin/env bash
# The README demo on CPU: install mmgen into .venv, train the image tokenizer, pretrain
# the tiny joint model on the synthetic world, sample a grid, evaluate.
# Outputs go to $MMGEN_DEMO_DIR (default runs/demo); re-running resumes/reuses them.
set -euo pipefail
abs() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }  # from the caller's directory
out=${MMGEN_DEMO_DIR:+$(abs "$MMGEN_DEMO_DIR")}
cd "$(dirname "$0")/.."
out=${out:-runs/demo}
py=${PYTHON:-python3}

start=$(date +%s)
stamp() { echo "[demo +$(( $(date +%s) - start ))s] $*"; }

stamp "installing mmgen into .venv"
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
mmgen=.venv/bin/mmgen

stamp "1/4 training the image tokenizer"
$mmgen train --config configs/tokenizer_tiny.py --workdir "$out/tokenizer" \
  --config.data.cache_dir="$out/cache"

stamp "2/4 pretraining the tiny joint model"
$mmgen train --config configs/tiny.py --workdir "$out/joint" \
  --config.tokenizer.checkpoint="$out/tokenizer" --config.data.cache_dir="$out/cache"

stamp "3/4 sampling a grid"
$mmgen sample --checkpoint "$out/joint" --prompt "a large red circle in the center" \
  --num 16 --scale 2 --out "$out/grid.png"

stamp "4/4 evaluating"
$mmgen eval --checkpoint "$out/joint" --num 64 --out "$out/eval"

stamp "done. Outputs:"
echo "  tokenizer run:      $out/tokenizer  (checkpoints/, metrics.jsonl, tb/)"
echo "  joint model run:    $out/joint      (checkpoints/, metrics.jsonl, tb/, samples/)"
echo "  sample grid:        $out/grid.png"
echo "  eval report:        $out/eval/report.json, $out/eval/report.md (+ example grids)"
