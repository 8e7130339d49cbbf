"""mmgen: one autoregressive transformer over interleaved text and image tokens."""

from mmgen.xla_cpu import apply_defaults as _apply_xla_cpu_defaults

_apply_xla_cpu_defaults()  # before jax starts a backend (mmgen/xla_cpu.py)
