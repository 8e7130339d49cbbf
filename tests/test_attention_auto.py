"""`auto`'s choice per platform, GPU architecture and dtype (kernels/attention.py)."""

import jax.numpy as jnp
import pytest

from mmgen.kernels.attention import resolve_impl


@pytest.mark.parametrize(("arch", "dtype", "want"), [
    ("9.0", jnp.bfloat16, "pallas_mgpu"),   # Hopper, wgmma operands: the Mosaic kernels
    ("9.0", jnp.float16, "pallas_mgpu"),
    ("9.0", jnp.float32, "pallas_gpu"),     # wgmma takes no f32: the Triton kernel
    ("8.0", jnp.bfloat16, "pallas_gpu"),    # Ampere: Triton
    ("10.0", jnp.bfloat16, "pallas_gpu"),   # Blackwell: not built for it yet
    (None, jnp.bfloat16, "pallas_gpu"),     # arch unknown: the kernel every NVIDIA GPU runs
])
def test_auto_on_gpu_takes_mosaic_only_for_half_precision_on_hopper(arch, dtype, want):
    assert resolve_impl("auto", "gpu", 128, dtype, arch) == want
    assert resolve_impl("auto", "cuda", 128, dtype, arch) == want


def test_auto_keeps_the_reference_for_unbuilt_head_dims_and_explicit_choices():
    assert resolve_impl("auto", "gpu", 96, jnp.bfloat16, "9.0") == "xla"
    assert resolve_impl("pallas_gpu", "gpu", 128, jnp.bfloat16, "9.0") == "pallas_gpu"
    assert resolve_impl("auto", "tpu", 128, jnp.bfloat16) == "pallas_tpu"
    assert resolve_impl("auto", "cpu", 128, jnp.bfloat16) == "xla"
