#!/usr/bin/env bash
# Decode latency of the 1B model at batch 1 against the memory-bandwidth floor on one GPU
# (bench/decode.py --gpu-1b), then the CPU-mode comparison for reference. Needs jax[cuda].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
"$PY" bench/decode.py --gpu-1b "$@"
