#!/usr/bin/env bash
# The 1B train-step issue's GPU check in one run (under 8 minutes on one H100/H200):
# bench/train_step.py --levers on configs/gpu_1b.py:1gpu, one table of step time,
# tokens/s, MFU (vs 989 TFLOP/s and vs a measured bf16 matmul), compile time and memory
# for each lever, plus JSON in the output folder.
#   bash scripts/gpu_train_step.sh [OUT_DIR]
# mmgen needs flax, optax, orbax-checkpoint, ml-collections, grain, ... beside the image's
# jax: wheels in .whl/ (../shared/tools/gpu-wheels, carried) are installed into .gpu-site.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/mmgen-gpu}}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .gpu-site .whl/*.whl
  export PYTHONPATH=$PWD/.gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# Say up front which of mmgen's imports are missing, rather than a traceback later.
python3 - <<'PY'
import importlib.util
need = ["jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "grain", "numpy",
        "tensorstore", "treescope", "msgpack", "rich", "yaml", "etils", "humanize",
        "simplejson", "safetensors", "PIL", "absl", "array_record", "portpicker"]
missing = []
for m in need:
    try:
        found = importlib.util.find_spec(m) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        missing.append(m)
print("missing python modules:", ", ".join(missing) if missing else "none")
PY
# Memory: most of the card to JAX (the 1B state is ~17 GB; remat=none needs the rest).
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
# Compiled programs and autotuning results kept under runs/ (ignored by git, so they stay
# on a warm machine between calls; carry runs/jax-cache-gpu to bring them to a fresh one).
export JAX_COMPILATION_CACHE_DIR=$PWD/runs/jax-cache-gpu
mkdir -p "$JAX_COMPILATION_CACHE_DIR/autotune"
# XLA flags, each checked to exist (an unknown flag aborts XLA at start):
#  latency hiding scheduler: orders async work (copies, collectives) to overlap compute;
#    little to hide on one GPU, but it is what multi-GPU runs use, so timings carry over.
#  per-fusion autotune cache: GEMM/fusion autotuning results reused by later compiles.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_per_fusion_autotune_cache_dir=$JAX_COMPILATION_CACHE_DIR/autotune"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
# 450 s at most; no new lever starts after 330 s (one lever: compile + 7 steps, < 2 min).
timeout 450 python3 bench/train_step.py --levers --budget-s 330 --json "$out/train_step.json" \
  2> "$out/train_step.log" | tee "$out/train_step.txt"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ] && [ -s "$out/train_step.json" ]; then  # cut short: the rows it finished
  echo "bench exited with $rc; table of the rows measured before that:"
  python3 bench/train_step.py --table-from "$out/train_step.json" | tee "$out/train_step.txt"
fi
tail -n 5 "$out/train_step.log"
exit "$rc"
