#!/usr/bin/env bash
# The attention issue's GPU check in one run (under 8 minutes on one H100/H200):
# correctness of our GPU kernels (Triton; the Mosaic GPU forward on Hopper) against the
# f32 reference and the side-by-side table of bench/attention.py, with the kernels'
# default tiles (SWEEP=1 first picks the Triton kernel's tiles by timing a few shapes).
# Needs only jax (the GPU image's own); mmgen's kernels import nothing else.
#   bash scripts/gpu_attention.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/mmgen-gpu}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
timeout 360 python3 bench/attention.py ${SWEEP:+--sweep} --iters 10 --json "$out/attention.json" \
  2> "$out/attention.log"
rc=$?
tail -n 25 "$out/attention.log"
# The 50-step training run with each implementation (losses within 1e-2 of xla's). It
# needs flax and optax: carry .whl/ (../shared/tools/gpu-wheels) for it.
if compgen -G ".whl/*.whl" > /dev/null; then
  source scripts/gpu_env.sh > /dev/null
  timeout 150 python3 bench/attention_train.py --steps 50 2> "$out/attention_train.log" \
    | tee "$out/attention_train.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
else
  echo "attention_train: skipped (no .whl/ carried: flax and optax are needed)"
fi
exit $rc
