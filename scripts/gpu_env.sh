# Sourced by the scripts/gpu_*.sh checks (run from the repo root): installs the wheels in
# .whl/ (../shared/tools/gpu-wheels with no extra names, carried) beside the machine's
# jax, flax, optax and orbax-checkpoint into .gpu-site, says which of mmgen's imports
# are missing or broken, and sets the XLA memory, compilation-cache
# and scheduler settings every GPU check uses; prints the card and the jax version.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .gpu-site .whl/*.whl
  export PYTHONPATH=$PWD/.gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# Say up front which of mmgen's imports are missing or broken, rather than a traceback
# later: a wheel built for another jax can be present and still fail to import (flax
# 0.12.8 under jax 0.11.2: jax.experimental.hijax has no HiPrimitive).
python3 - <<'PY'
import importlib
need = ["jax", "flax.nnx", "optax", "orbax.checkpoint", "ml_collections", "grain", "numpy",
        "tensorstore", "treescope", "msgpack", "rich", "yaml", "etils", "humanize",
        "simplejson", "safetensors", "PIL", "absl", "array_record", "portpicker"]
bad, versions = [], []
for m in need:
    try:
        importlib.import_module(m)
    except Exception as e:  # any failure to import is worth one line
        bad.append(f"{m} ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]})")
        continue
    if m in ("jax", "optax", "grain") or m == "flax.nnx":
        top = importlib.import_module(m.split(".")[0])
        versions.append(f"{m.split('.')[0]} {getattr(top, '__version__', '?')}")
print("python modules missing or not importable:", "; ".join(bad) if bad else "none")
print("versions:", ", ".join(versions))
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
source scripts/xla_cpu_probe.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
