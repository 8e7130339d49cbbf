"""Diffusion decoder: a conditional rectified-flow model that renders pixels from image tokens.

    x_t = (1 - t) * noise + t * image,   t in [0, 1],   target velocity v = image - noise

    x_t_BHWC (+ coarse_BHWC) -> conv in -> [ResBlock, stride-2 conv] per 2x down
      -> + token embeddings (at the token grid h x w) -> ResBlocks
      -> [pixel shuffle up, + skip, ResBlock] per 2x up -> conv out = v_BHWC
    every ResBlock is FiLM-modulated by an embedding of t

The condition is the token ids' learned embeddings, added at the token grid. With
`refine=True` the tokenizer's own decoded image ("coarse") is concatenated to x_t at
full resolution: the network then only has to learn the residual detail the
autoencoder blurs away (edges, word strokes), which trains in minutes on a CPU.

With `predict="x"` the network outputs the clean image (coarse + a residual when
refining) and the velocity is derived, v = (x_hat - x_t) / (1 - t), 1 - t clipped at
MIN_ONE_MINUS_T; the loss is still the velocity MSE. A small net that outputs v directly
must also copy the noise through (v = image - noise), and the part it misses stays in
the sample as grain; x-prediction never has to, and its last Euler step lands on x_hat.
Sampling integrates dx/dt = v with Euler steps from Gaussian noise at t=0 to t=1.

Every parameter carries logical axis names (models/layers.py `param`); none of them is
mapped to a mesh axis by parallel/sharding.py, so this small model is replicated.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mmgen.models.layers import RMSNorm, param

KERNEL_AXES = ("kernel_h", "kernel_w", "conv_in", "conv_out")
PREDICTIONS = ("x", "v")
# x-prediction's velocity divides by 1 - t; clipping bounds the loss weight near t = 1
MIN_ONE_MINUS_T = 0.05


class Conv(nnx.Module):
    """SAME-padded 2D conv (NHWC) whose kernel and bias carry logical axis names."""

    def __init__(self, cin: int, cout: int, k: int, *, rngs: nnx.Rngs, stride: int = 1,
                 scale: float = 1.0):
        self.kernel = param(rngs, (k, k, cin, cout), KERNEL_AXES, fan_in=k * k * cin,
                            scale=scale)
        self.bias = nnx.Param(jnp.zeros((cout,)), out_sharding=("conv_out",))
        self.stride = stride

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x_BHWC, self.kernel[...], (self.stride, self.stride), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...]


def time_features(t_B: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal features of t in [0, 1] (scaled by 1000 like DDPM timesteps): [B, dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / half)
    angles_BF = 1000.0 * t_B[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(angles_BF), jnp.cos(angles_BF)], axis=-1)


class ResBlock(nnx.Module):
    """x + conv(silu(film(norm(conv(silu(norm(x))))))); FiLM from the time embedding.

    The second conv starts near zero so every block starts as the identity."""

    def __init__(self, c: int, time_dim: int, *, rngs: nnx.Rngs):
        self.norm1, self.norm2 = RMSNorm(c), RMSNorm(c)
        self.conv1 = Conv(c, c, 3, rngs=rngs)
        self.conv2 = Conv(c, c, 3, rngs=rngs, scale=0.1)
        self.film_TC = param(rngs, (time_dim, 2 * c), ("time_embed", "conv_out"), fan_in=time_dim,
                             scale=0.1)

    def __call__(self, x_BHWC: jax.Array, temb_BT: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x_BHWC)))
        scale_BC, shift_BC = jnp.split(temb_BT @ self.film_TC[...], 2, axis=-1)
        h = self.norm2(h) * (1 + scale_BC[:, None, None]) + shift_BC[:, None, None]
        return x_BHWC + self.conv2(jax.nn.silu(h))


def _pixel_shuffle(x_BHWC: jax.Array, r: int) -> jax.Array:
    b, h, w, c = x_BHWC.shape
    x = x_BHWC.reshape(b, h, w, r, r, c // (r * r))
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * r, w * r, c // (r * r))


class FlowDecoder(nnx.Module):
    """Velocity model v(x_t, t | token ids[, coarse image]) of a rectified flow.

    widths[i] is the width at resolution image / 2**i; len(widths) - 1 must equal
    log2(downsample), so the last level sits at the token grid."""

    def __init__(self, *, num_codes: int, downsample: int, widths: tuple[int, ...],
                 blocks_per_level: int, mid_blocks: int, time_dim: int, refine: bool,
                 rngs: nnx.Rngs, predict: str = "x"):
        n_down = int(downsample).bit_length() - 1
        if 2**n_down != downsample or len(widths) != n_down + 1:
            raise ValueError(f"need len(widths) = log2(downsample) + 1, got widths={widths}, "
                             f"downsample={downsample}")
        if predict not in PREDICTIONS:
            raise ValueError(f"predict must be one of {PREDICTIONS}, got {predict!r}")
        self.refine, self.time_dim, self.predict = refine, time_dim, predict
        w = widths
        t_axes = ("time_embed", "time_mlp")
        self.time_in_TT = param(rngs, (time_dim, time_dim), t_axes, fan_in=time_dim)
        self.time_out_TT = param(rngs, (time_dim, time_dim), t_axes[::-1], fan_in=time_dim)
        self.embed_KC = param(rngs, (num_codes, w[-1]), ("image_codes", "conv_out"), fan_in=1,
                              scale=0.02)
        self.conv_in = Conv(6 if refine else 3, w[0], 3, rngs=rngs)
        self.down_blocks = nnx.List([ResBlock(w[i], time_dim, rngs=rngs)
                                     for i in range(n_down) for _ in range(blocks_per_level)])
        self.downs = nnx.List([Conv(w[i], w[i + 1], 4, stride=2, rngs=rngs)
                               for i in range(n_down)])
        self.mid = nnx.List([ResBlock(w[-1], time_dim, rngs=rngs) for _ in range(mid_blocks)])
        self.ups = nnx.List([Conv(w[i + 1], 4 * w[i], 3, rngs=rngs)
                             for i in reversed(range(n_down))])
        self.up_blocks = nnx.List([ResBlock(w[i], time_dim, rngs=rngs)
                                   for i in reversed(range(n_down))
                                   for _ in range(blocks_per_level)])
        self.norm_out = RMSNorm(w[0])
        self.conv_out = Conv(w[0], 3, 3, rngs=rngs, scale=0.1)
        self.blocks_per_level = blocks_per_level

    def _time_embedding(self, t_B: jax.Array) -> jax.Array:
        h = jax.nn.silu(time_features(t_B, self.time_dim) @ self.time_in_TT[...])
        return h @ self.time_out_TT[...]

    def __call__(self, x_BHWC: jax.Array, t_B: jax.Array, ids_Bhw: jax.Array,
                 coarse_BHWC: jax.Array | None = None) -> jax.Array:
        """Velocity v_BHWC at (x_t, t); images and coarse in [-1, 1]."""
        out_BHWC = self._net(x_BHWC, t_B, ids_Bhw, coarse_BHWC)
        if self.predict == "v":
            return out_BHWC
        x_hat = out_BHWC + coarse_BHWC if self.refine else out_BHWC
        one_minus_t = jnp.maximum(1.0 - t_B, MIN_ONE_MINUS_T)[:, None, None, None]
        return (x_hat - x_BHWC) / one_minus_t

    def _net(self, x_BHWC, t_B, ids_Bhw, coarse_BHWC):
        temb_BT = self._time_embedding(t_B)
        if self.refine:
            x_BHWC = jnp.concatenate([x_BHWC, coarse_BHWC], axis=-1)
        h = self.conv_in(x_BHWC)
        k = self.blocks_per_level
        skips = []
        for i, down in enumerate(self.downs):
            for block in self.down_blocks[i * k:(i + 1) * k]:
                h = block(h, temb_BT)
            skips.append(h)
            h = down(jax.nn.silu(h))
        h = h + self.embed_KC[...][ids_Bhw]  # the condition, at the token grid
        for block in self.mid:
            h = block(h, temb_BT)
        for i, up in enumerate(self.ups):
            h = _pixel_shuffle(up(jax.nn.silu(h)), 2) + skips.pop()
            for block in self.up_blocks[i * k:(i + 1) * k]:
                h = block(h, temb_BT)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


def flow_matching_loss(model: FlowDecoder, images_BHWC: jax.Array, ids_Bhw: jax.Array,
                       noise_BHWC: jax.Array, t_B: jax.Array,
                       coarse_BHWC: jax.Array | None) -> jax.Array:
    """Per-image mean squared error of the predicted velocity: [B]. Images in [-1, 1]."""
    t = t_B[:, None, None, None]
    x_t = (1.0 - t) * noise_BHWC + t * images_BHWC
    v_BHWC = model(x_t, t_B, ids_Bhw, coarse_BHWC)
    return jnp.mean(jnp.square(v_BHWC - (images_BHWC - noise_BHWC)), axis=(1, 2, 3))


def noise_and_time(seeds_B: jax.Array, shape_HWC: tuple[int, int, int]):
    """(noise_BHWC, t_B) from one integer seed per image: the training randomness is a
    function of the data stream alone, so a resumed run repeats it bit for bit."""

    def one(seed):
        k_noise, k_t = jax.random.split(jax.random.key(seed))
        return jax.random.normal(k_noise, shape_HWC), jax.random.uniform(k_t, ())

    return jax.vmap(one)(seeds_B)


def euler_sample(model: FlowDecoder, ids_Bhw: jax.Array, noise_BHWC: jax.Array, steps: int,
                 coarse_BHWC: jax.Array | None = None) -> jax.Array:
    """Integrates the flow from noise (t=0) to an image (t=1) in `steps` Euler steps;
    returns images in ~[-1, 1]. Deterministic given the noise."""
    dt = 1.0 / steps
    batch = noise_BHWC.shape[0]

    def body(i, x_BHWC):
        t_B = jnp.full((batch,), i * dt, jnp.float32)
        return x_BHWC + dt * model(x_BHWC, t_B, ids_Bhw, coarse_BHWC)

    return jax.lax.fori_loop(0, steps, body, noise_BHWC)


def batch_loss(model: FlowDecoder, batch: dict) -> jax.Array:
    """Per-image velocity MSE [B] of a training batch:
    "images" uint8 [B,H,W,3], "image_ids" [B,h,w], "noise_seed" [B], and with a refining
    model "coarse" uint8 [B,H,W,3] (the tokenizer's decoding of the ids)."""
    images_BHWC = batch["images"].astype(jnp.float32) / 127.5 - 1.0
    noise_BHWC, t_B = noise_and_time(batch["noise_seed"], images_BHWC.shape[1:])
    coarse = batch["coarse"].astype(jnp.float32) / 127.5 - 1.0 if model.refine else None
    per_image_B = flow_matching_loss(model, images_BHWC, batch["image_ids"], noise_BHWC, t_B,
                                     coarse)
    return per_image_B
