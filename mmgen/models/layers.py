"""Building blocks: parameters with logical axis names, RMSNorm, RoPE (1D + 2D), SwiGLU."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Parameters are created with explicit logical names and placed by the rules table in
# parallel/sharding.py; eager sharding at creation would need a mesh inside eval_shape.
nnx.use_eager_sharding(False)


def param(rngs: nnx.Rngs, shape: Sequence[int], names: Sequence[str | None], *, fan_in: int,
          dtype=jnp.float32, scale: float = 1.0) -> nnx.Param:
    """A truncated-normal weight with std scale/sqrt(fan_in), tagged with logical names."""
    std = scale / fan_in**0.5
    init = jax.nn.initializers.truncated_normal(std)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), dtype), out_sharding=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return (x32 * jax.lax.rsqrt(var + self.eps) * self.scale[...]).astype(x.dtype)


def rope_angles(positions_BL: jax.Array, rows_BL: jax.Array, cols_BL: jax.Array,
                head_dim: int, theta: float) -> jax.Array:
    """Rotation angles [B, L, head_dim/2] for multimodal RoPE.

    Half of the rotary pairs follow the 1D stream position (every token); a quarter
    follow the image row and a quarter the image column. Text has row = col = 0, so
    those pairs do not rotate and text sees plain 1D RoPE, while image tokens also
    get their relative 2D offsets directly.
    """
    pairs = head_dim // 2
    n_t = pairs // 2
    n_h = (pairs - n_t) // 2
    n_w = pairs - n_t - n_h

    def freqs(n):
        return 1.0 / (theta ** (jnp.arange(n, dtype=jnp.float32) / max(n, 1)))

    a_t = positions_BL[..., None].astype(jnp.float32) * freqs(n_t)
    a_h = rows_BL[..., None].astype(jnp.float32) * freqs(n_h)
    a_w = cols_BL[..., None].astype(jnp.float32) * freqs(n_w)
    return jnp.concatenate([a_t, a_h, a_w], axis=-1)


def apply_rope(x_BLHD: jax.Array, angles_BLP: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x_BLHD.astype(jnp.float32), 2, axis=-1)
    cos = jnp.cos(angles_BLP)[:, :, None, :]
    sin = jnp.sin(angles_BLP)[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLHD.dtype)


class SwiGLU(nnx.Module):
    def __init__(self, d_model: int, mlp_dim: int, *, rngs: nnx.Rngs, num_layers: int):
        self.w_gate_DF = param(rngs, (d_model, mlp_dim), ("embed", "mlp"), fan_in=d_model)
        self.w_up_DF = param(rngs, (d_model, mlp_dim), ("embed", "mlp"), fan_in=d_model)
        # residual-branch outputs scaled down with depth for a stable start
        self.w_down_FD = param(rngs, (mlp_dim, d_model), ("mlp", "embed"), fan_in=mlp_dim,
                               scale=(2 * num_layers) ** -0.5)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        dt = x_BLD.dtype
        gate_BLF = jnp.einsum("bld,df->blf", x_BLD, self.w_gate_DF[...].astype(dt))
        up_BLF = jnp.einsum("bld,df->blf", x_BLD, self.w_up_DF[...].astype(dt))
        h_BLF = jax.nn.silu(gate_BLF) * up_BLF
        return jnp.einsum("blf,fd->bld", h_BLF, self.w_down_FD[...].astype(dt))
