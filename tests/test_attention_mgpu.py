"""The Mosaic GPU (Hopper) kernels, kernels/pallas_mgpu.py and pallas_mgpu_bwd.py, on CPU.

In Pallas' Mosaic GPU interpret mode (simulated warpgroups, shared memory, TMA and
barriers, with race detection) it is checked against the f32 reference, forward and
backward, by tests/mgpu_interpret_cases.py (tolerances there), run in a subprocess.

The simulator takes three equivalent routes where it lacks an operation (module
docstring); the GPU route is lowered for CUDA here and run by scripts/gpu_attention.sh.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from mmgen.kernels import pallas_mgpu
from mmgen.kernels.attention import attention, resolve_impl


def test_mgpu_kernel_in_interpret_mode(repo):
    """tests/mgpu_interpret_cases.py (its docstring says why in a subprocess): five
    mask/shape cases forward and backward against the reference, and block skipping in
    all three kernels."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-o", "faulthandler_timeout=300", "tests/mgpu_interpret_cases.py"],
                         cwd=repo, env=env, timeout=840, capture_output=True, text=True)
    assert res.returncode == 0 and "6 passed" in res.stdout, (res.stdout + res.stderr)[-4000:]


def test_cuda_lowering_of_the_gpu_route():
    """The GPU route (transposed-ref and register-operand wgmma, register layouts) lowers
    to Mosaic GPU for CUDA on this CPU machine, forward and backward (the Mosaic dK/dV
    and dQ kernels; Triton's at D=256), at head dims 64/128/256, with GQA groups of 3 and
    a soft cap."""
    for B, L, H, G, D, cap in [(1, 300, 6, 2, 64, None), (1, 256, 2, 1, 128, 30.0),
                               (1, 128, 2, 2, 256, None)]:
        ids = (jnp.ones((B, L), jnp.int32), jnp.zeros((B, L), jnp.int32),
               jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)))
        x = jax.ShapeDtypeStruct((B, L, H, D), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((B, L, G, D), jnp.bfloat16)

        def loss(q, k, v, ids=ids, cap=cap):
            out, _ = pallas_mgpu.flash_attention(q, k, v, ids, ids, logit_cap=cap)
            return out.astype(jnp.float32).sum()

        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, kv, kv).lower(
            lowering_platforms=("cuda",)).as_text()
        bwd = ("mmgen_flash_dkdv_mgpu", "mmgen_flash_dq_mgpu") if D <= 128 else (
            "mmgen_flash_dkdv", "mmgen_flash_dq")  # D=256: the Triton backward
        for name in ("mmgen_flash_fwd_mgpu", *bwd):
            assert name in text, (D, name)
        assert (D <= 128) == ("mmgen_flash_dkdv_mgpu" in text)


def test_mgpu_rejects_what_wgmma_cannot_take():
    x = jnp.zeros((1, 128, 1, 64), jnp.float32)
    ids = (jnp.ones((1, 128), jnp.int32),) * 3
    with pytest.raises(ValueError, match="bf16/f16"):
        pallas_mgpu.flash_attention(x, x, x, ids, ids, interpret=True)
    with pytest.raises(ValueError, match="head dims"):
        y = jnp.zeros((1, 128, 1, 32), jnp.bfloat16)
        pallas_mgpu.flash_attention(y, y, y, ids, ids, interpret=True)


def test_mgpu_is_an_explicit_impl_for_gpus_only():
    assert resolve_impl("pallas_mgpu", "gpu") == "pallas_mgpu"
    assert resolve_impl("auto", "gpu") == "pallas_gpu"  # no arch or dtype: any NVIDIA GPU
    x = jnp.zeros((1, 128, 1, 64), jnp.bfloat16)
    ids = jnp.ones((1, 128), jnp.int32)
    with pytest.raises(ValueError, match="Hopper"):
        attention(x, x, x, q_segment_ids_BQ=ids, kv_segment_ids_BK=ids, q_span_ids_BQ=ids,
                  kv_span_ids_BK=ids, impl="pallas_mgpu")
