#!/usr/bin/env bash
# The ablations of docs/results.md on a trained demo (or any) run, at its training budget:
#   1. guidance scale sweep (eval --cfg S for each S in $SCALES)
#   2. image pixels from the tokenizer's autoencoder vs a diffusion decoder trained on its ids
#   3. edit SFT with bidirectional vs causal prompt-image attention (model.bidirectional_prompts)
# Usage: bash scripts/ablations.sh RUN_ROOT [OUT]   (paths relative to where you run it)
#   RUN_ROOT holds tokenizer/, joint/ and cache/ as `bash scripts/demo.sh` writes them
#   (default runs/demo); results go to OUT (default RUN_ROOT/ablations), with a summary
#   table in OUT/results.md. Every step reuses finished outputs, so a rerun resumes.
# Environment: NUM (prompts per category, default 100), SCALES (default "1 2 3 5 8"),
#   MMGEN / PYTHON (default .venv/bin/mmgen / .venv/bin/python),
#   DECODER_STEPS / SFT_STEPS (training steps, defaults 3200 / 500).
set -euo pipefail
abs() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }  # from the caller's directory
root=${1:+$(abs "$1")}
out=${2:+$(abs "$2")}
cd "$(dirname "$0")/.."
root=${root:-runs/demo}
out=${out:-$root/ablations}
num=${NUM:-100}
scales=${SCALES:-1 2 3 5 8}
mmgen=${MMGEN:-.venv/bin/mmgen}
mkdir -p "$out"
start=$(date +%s)
stamp() { echo "[ablations +$(( $(date +%s) - start ))s] $*"; }
evaluate() {  # DIR ARGS...: one eval unless its report exists
  local dir=$1; shift
  [ -f "$dir/report.json" ] || $mmgen eval --out "$dir" "$@"
}

for s in $scales; do
  stamp "1/3 guidance scale $s"
  evaluate "$out/cfg_$s" --checkpoint "$root/joint" --suite scenes,text,colour --num "$num" \
    --cfg "$s"
done

stamp "2/3 diffusion decoder on the tokenizer's ids, then the same samples through it"
$mmgen train --config configs/decoder_tiny.py --workdir "$out/decoder" \
  --config.tokenizer.checkpoint="$root/tokenizer" --config.data.cache_dir="$root/cache" \
  --config.train.steps="${DECODER_STEPS:-3200}"
evaluate "$out/decoder_eval" --checkpoint "$root/joint" --suite scenes,text,colour \
  --num "$num" --decoder "$out/decoder"

for attn in bidirectional causal; do
  stamp "3/3 edit SFT, $attn prompt-image attention"
  flag=$([ "$attn" = bidirectional ] && echo True || echo False)
  $mmgen train --config configs/sft_edit.py --workdir "$out/sft_$attn" \
    --config.init.checkpoint="$root/joint" --config.tokenizer.checkpoint="$root/tokenizer" \
    --config.data.cache_dir="$root/cache" --config.model.bidirectional_prompts="$flag" \
    --config.train.steps="${SFT_STEPS:-500}"
  evaluate "$out/sft_${attn}_eval" --checkpoint "$out/sft_$attn" --suite edit_loss,edit \
    --num "$num"
done

stamp "summary -> $out/results.md"
${PYTHON:-.venv/bin/python} - "$out" "$scales" > "$out/results.md" <<'EOF'
import json, sys
from pathlib import Path

out, scales = Path(sys.argv[1]), sys.argv[2].split()
load = lambda d: json.loads((out / d / "report.json").read_text())  # noqa: E731
cols = ["scenes/overall", "scenes/single_object", "scenes/two_objects", "scenes/counting",
        "scenes/colours", "scenes/position", "scenes/colour_attribution", "text/exact_word",
        "colour/match_rate"]
short = [c.split("/")[1] for c in cols]
print("| run | " + " | ".join(short) + " |")
print("|---" * (len(cols) + 1) + "|")
rows = [(f"cfg {s}", f"cfg_{s}") for s in scales] + [("diffusion decoder (cfg of run)",
                                                      "decoder_eval")]
for name, d in rows:
    r = load(d)
    print(f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
print()
print("| edit SFT | edit_loss/nll | edit_loss/nll_image | edit/applied | edit/preserved "
      "| edit/exact |")
print("|---|---|---|---|---|---|")
for attn in ("bidirectional", "causal"):
    r = load(f"sft_{attn}_eval")
    print(f"| {attn} | " + " | ".join(f"{r[k]:.3f}" for k in (
        "edit_loss/nll", "edit_loss/nll_image", "edit/applied", "edit/preserved",
        "edit/exact")) + " |")
EOF
cat "$out/results.md"
stamp "done"
