"""Building blocks: parameters with logical axis names, projections, RMSNorm, RoPE
(1D + 2D), SwiGLU."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mmgen.parallel.sharding import on_one_device

# Parameters are created with explicit logical names and placed by the rules table in
# parallel/sharding.py; eager sharding at creation would need a mesh inside eval_shape.
nnx.use_eager_sharding(False)


def param(rngs: nnx.Rngs, shape: Sequence[int], names: Sequence[str | None], *, fan_in: int,
          dtype=jnp.float32, scale: float = 1.0) -> nnx.Param:
    """A truncated-normal weight with std scale/sqrt(fan_in), tagged with logical names."""
    std = scale / fan_in**0.5
    init = jax.nn.initializers.truncated_normal(std)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names))


def project(x: jax.Array, w: jax.Array, n_in: int = 1, **dot_kwargs) -> jax.Array:
    """x [..., *in] contracted with w [*in, *out] -> [..., *out] (n_in = len(in)).

    On one device this is one 2-D matmul [tokens, in] @ [in, out]: XLA:CPU computes the
    weight gradient of a product whose tokens are split over (batch, length) through
    transposed copies, and the tiny config's MLP ran 2.2x slower forward+backward so.
    Under a mesh the einsum keeps batch and length apart for the partitioner (merging
    them made the 64-chip pod_7b compile exhaust 23 GB of host memory).
    """
    if not on_one_device():
        return project_einsum(x, w, n_in, **dot_kwargs)
    lead, ins, outs = x.shape[:-n_in], w.shape[:n_in], w.shape[n_in:]
    y = jnp.matmul(x.reshape(-1, math.prod(ins)), w.reshape(math.prod(ins), -1), **dot_kwargs)
    return y.reshape(*lead, *outs)


def project_einsum(x: jax.Array, w: jax.Array, n_in: int = 1, **dot_kwargs) -> jax.Array:
    """`project` as one einsum, every dim kept (the form used under a mesh)."""
    letters = "abcdefghijklmnop"
    xi = letters[:x.ndim]
    wi = xi[x.ndim - n_in:] + letters[x.ndim:x.ndim + w.ndim - n_in]
    return jnp.einsum(f"{xi},{wi}->{xi[:x.ndim - n_in] + wi[n_in:]}", x, w, **dot_kwargs)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), dtype), out_sharding=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return (x32 * jax.lax.rsqrt(var + self.eps) * self.scale[...]).astype(x.dtype)


ROPE_KINDS = ("mm", "mrope")


def rope_sections(head_dim: int) -> tuple[int, int, int]:
    """Rotary pairs following (position, row, col): half, then a quarter each."""
    pairs = head_dim // 2
    n_t = pairs // 2
    n_h = (pairs - n_t) // 2
    return n_t, n_h, pairs - n_t - n_h


def rope_angles(positions_BL: jax.Array, rows_BL: jax.Array, cols_BL: jax.Array,
                head_dim: int, theta: float, kind: str = "mm") -> jax.Array:
    """Rotation angles [B, L, head_dim/2] for multimodal RoPE.

    Half of the rotary pairs follow the 1D stream position (every token); a quarter
    follow the image row and a quarter the image column (`rope_sections`).

    kind "mm": each section has its own frequency ladder theta**(-j/n) and the row/col
    pairs rotate by row/col alone. Text has row = col = 0, so those pairs do not rotate.

    kind "mrope" (Qwen2-VL style, for models imported from a 1D-RoPE LLM): every pair j
    keeps the LLM's frequency theta**(-2j/head_dim); the first section rotates by the
    position, the second by position + row, the third by position + col. Text has
    row = col = 0, so every pair follows the position and text gets exactly the LLM's
    RoPE; image tokens add their 2D offsets on top of it.
    """
    n_t, n_h, n_w = rope_sections(head_dim)
    if kind == "mrope":
        # integer sums first: for text the float angles equal the LLM's exactly
        pos_BLP = jnp.concatenate([
            jnp.broadcast_to(positions_BL[..., None], (*positions_BL.shape, n_t)),
            jnp.broadcast_to((positions_BL + rows_BL)[..., None], (*positions_BL.shape, n_h)),
            jnp.broadcast_to((positions_BL + cols_BL)[..., None], (*positions_BL.shape, n_w)),
        ], axis=-1).astype(jnp.float32)
        inv_freq_P = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
        return pos_BLP * inv_freq_P
    if kind != "mm":
        raise ValueError(f"unknown rope kind {kind!r}; known: {ROPE_KINDS}")

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
        gate_BLF = project(x_BLD, self.w_gate_DF[...].astype(dt))
        up_BLF = project(x_BLD, self.w_up_DF[...].astype(dt))
        h_BLF = jax.nn.silu(gate_BLF) * up_BLF
        return project(h_BLF, self.w_down_FD[...].astype(dt))
