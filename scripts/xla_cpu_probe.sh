# Sourced by scripts/gpu_all.sh (once for all its checks, which inherit the result through
# MMGEN_XLA_CPU_PROBED) and by scripts/gpu_env.sh; run from the repo root.
# `import mmgen` adds an XLA:CPU flag (YNN_FLAG in mmgen/xla_cpu.py) that was run on
# jaxlib 0.10.2 only, and XLA aborts every process on a flag it does not know
# (tests/test_gpu_scripts.py ties the name below to YNN_FLAG). One probe on the CPU
# backend (a second or two) finds that before the checks start; they then run with XLA's
# own CPU defaults instead of all failing.
if [ -z "${MMGEN_XLA_CPU_PROBED:-}" ] && ! xla_probe=$(JAX_PLATFORMS=cpu \
    PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} python3 -c "import mmgen, jax; jax.devices()" 2>&1)
then
  if grep -q "Unknown flag.*xla_cpu_experimental_ynn_fusion_type" <<<"$xla_probe"; then
    export MMGEN_XLA_CPU_DEFAULTS=0
    echo "XLA does not know mmgen's XLA:CPU flag: running with MMGEN_XLA_CPU_DEFAULTS=0"
  else
    echo "import mmgen fails here: $(grep -m1 'Unknown flag' <<<"$xla_probe" \
      || tail -1 <<<"$xla_probe")"
  fi
fi
unset xla_probe
export MMGEN_XLA_CPU_PROBED=1
