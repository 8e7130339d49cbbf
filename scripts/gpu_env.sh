# Sourced by the scripts/gpu_*.sh checks (run from the repo root): installs the wheels in
# .whl/ (../shared/tools/gpu-wheels, carried) beside the machine's jax into .gpu-site,
# says which of mmgen's imports are missing, and sets the XLA memory, compilation-cache
# and scheduler settings every GPU check uses; prints the card and the jax version.
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
