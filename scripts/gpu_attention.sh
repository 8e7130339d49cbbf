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
timeout 420 python3 bench/attention.py ${SWEEP:+--sweep} --iters 10 --json "$out/attention.json" \
  2> "$out/attention.log"
rc=$?
tail -n 25 "$out/attention.log"
exit $rc
