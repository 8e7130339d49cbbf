"""Image tokenizer: a small autoencoder whose bottleneck is FSQ-quantised.

    images_BHWC in [-1, 1]
      -> encoder="conv":  stride-2 convs (log2(downsample) of them) -> 3x3 residual blocks
         encoder="patch": space-to-depth patches -> 1x1 conv -> 1x1 residual blocks
      -> 1x1 conv to FSQ dim -> FSQ (straight-through)          = zhat_BhwC
      -> 1x1 conv -> residual blocks -> (3x3 conv + pixel shuffle) per 2x
      -> 3x3 conv to RGB                                         = recon_BHWC

Most compute sits at the token resolution h x w; the full-resolution layers
are thin. Upsampling is sub-pixel (conv then depth-to-space), which has no
checkerboard artefacts and is cheap on CPU. The patch encoder's code for a token is a
function of that token's own pixels only: equal patches get equal ids wherever they sit,
which the autoregressive model finds far easier to predict than codes that also carry
their neighbourhood (docs/results.md). Every parameter carries logical
axis names; the tokenizer is small, so the sharding rules replicate it.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen.tokenizers.fsq import FSQ

KERNEL_AXES = ("kernel_h", "kernel_w", "conv_in", "conv_out")
BIAS_AXES = ("conv_out",)
NORM_AXES = ("norm",)


def _conv(
    cin: int, cout: int, k: int, stride: int, rngs: nnx.Rngs, dtype, scale: float = 1.0
) -> nnx.Conv:
    init = nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
    return nnx.Conv(
        cin,
        cout,
        (k, k),
        strides=(stride, stride),
        padding="SAME",
        dtype=dtype,
        kernel_init=nnx.with_partitioning(init, KERNEL_AXES),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), BIAS_AXES),
        rngs=rngs,
    )


def _norm(c: int, rngs: nnx.Rngs, dtype) -> nnx.RMSNorm:
    # Per-pixel RMS norm over channels: no batch statistics, cheap, stable.
    return nnx.RMSNorm(
        c,
        dtype=dtype,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), NORM_AXES),
        rngs=rngs,
    )


class ResBlock(nnx.Module):
    """x + conv(act(norm(conv(act(norm(x)))))), last conv zero-ish initialised."""

    def __init__(self, c: int, rngs: nnx.Rngs, dtype, k: int = 3):
        self.norm1 = _norm(c, rngs, dtype)
        self.conv1 = _conv(c, c, k, 1, rngs, dtype)
        self.norm2 = _norm(c, rngs, dtype)
        self.conv2 = _conv(c, c, k, 1, rngs, dtype, scale=0.1)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        h_BHWC = self.conv1(jax.nn.silu(self.norm1(x_BHWC)))
        h_BHWC = self.conv2(jax.nn.silu(self.norm2(h_BHWC)))
        return x_BHWC + h_BHWC


def _pixel_shuffle(x_BHWC: jax.Array, r: int) -> jax.Array:
    b, h, w, c = x_BHWC.shape
    x = x_BHWC.reshape(b, h, w, r, r, c // (r * r))
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * r, w * r, c // (r * r))


def _space_to_depth(x_BHWC: jax.Array, r: int) -> jax.Array:
    b, h, w, c = x_BHWC.shape
    x = x_BHWC.reshape(b, h // r, r, w // r, r, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // r, w // r, r * r * c)


class ImageAutoencoder(nnx.Module):
    """Conv or patch encoder -> FSQ -> conv decoder; `downsample` must be a power of 2."""

    def __init__(
        self,
        *,
        levels: Sequence[int],
        channels: int,
        downsample: int,
        num_res_blocks: int,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        encoder: str = "conv",
    ):
        n_down = int(downsample).bit_length() - 1
        if downsample < 1 or 2**n_down != downsample:
            raise ValueError(f"downsample must be a power of 2, got {downsample}")
        if encoder not in ("conv", "patch"):
            raise ValueError(f"encoder must be 'conv' or 'patch', got {encoder!r}")
        self.fsq = FSQ(levels)
        self.downsample = downsample
        self.patch_encoder = encoder == "patch"
        self.dtype = dtype
        # Thin layers at high resolution, `channels` at token resolution.
        widths = [max(channels >> (n_down - i), 16) for i in range(n_down + 1)]
        widths[-1] = channels
        # Logical names are always attached; they are applied eagerly only when a
        # mesh is set (otherwise the trainer applies them via jit out_shardings).
        eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
        with nnx.use_eager_sharding(eager):
            if self.patch_encoder:  # 1x1 convs on space-to-depth patches
                self.enc_in = _conv(3 * downsample**2, channels, 1, 1, rngs, dtype)
                self.downs = nnx.List([])
            else:
                self.enc_in = _conv(3, widths[0], 3, 1, rngs, dtype) if n_down == 0 else None
                self.downs = nnx.List(
                    [
                        _conv(3 if i == 0 else widths[i], widths[i + 1], 4, 2, rngs, dtype)
                        for i in range(n_down)
                    ]
                )
            k_enc = 1 if self.patch_encoder else 3
            self.enc_blocks = nnx.List(
                [ResBlock(channels, rngs, dtype, k_enc) for _ in range(num_res_blocks)]
            )
            self.enc_norm = _norm(channels, rngs, dtype)
            self.to_code = _conv(channels, self.fsq.dim, 1, 1, rngs, dtype)
            self.from_code = _conv(self.fsq.dim, channels, 3, 1, rngs, dtype)
            self.dec_blocks = nnx.List(
                [ResBlock(channels, rngs, dtype) for _ in range(num_res_blocks)]
            )
            self.ups = nnx.List(
                [
                    _conv(widths[i + 1], 4 * widths[i], 3, 1, rngs, dtype)
                    for i in reversed(range(n_down))
                ]
            )
            self.dec_norm = _norm(widths[0], rngs, dtype)
            self.to_rgb = _conv(widths[0], 3, 3, 1, rngs, dtype)

    def encode(self, images_BHWC: jax.Array) -> jax.Array:
        """Images in [-1, 1] -> quantised codes zhat_BhwC (straight-through)."""
        return self.fsq.quantize_bounded(self.latents(images_BHWC))

    def latents(self, images_BHWC: jax.Array) -> jax.Array:
        """Images in [-1, 1] -> bounded latents before rounding, float32 [B, h, w, C]."""
        x = images_BHWC.astype(self.dtype)
        if self.patch_encoder:
            x = _space_to_depth(x, self.downsample)
        if self.enc_in is not None:
            x = self.enc_in(x)
        for i, down in enumerate(self.downs):
            x = down(x if i == 0 else jax.nn.silu(x))
        for block in self.enc_blocks:
            x = block(x)
        z_BhwC = self.to_code(jax.nn.silu(self.enc_norm(x)))
        return self.fsq.bound(z_BhwC.astype(jnp.float32))

    def encode_ids(self, images_BHWC: jax.Array) -> jax.Array:
        """Images in [-1, 1] -> int32 code ids [B, H/ds, W/ds]."""
        return self.fsq.codes_to_indices(self.encode(images_BHWC))

    def decode(self, zhat_BhwC: jax.Array) -> jax.Array:
        """Quantised codes -> images in ~[-1, 1] (float32)."""
        x = self.from_code(zhat_BhwC.astype(self.dtype))
        for block in self.dec_blocks:
            x = block(x)
        for up in self.ups:
            x = _pixel_shuffle(up(jax.nn.silu(x)), 2)
        x = self.to_rgb(jax.nn.silu(self.dec_norm(x)))
        return x.astype(jnp.float32)

    def decode_ids(self, ids_Bhw: jax.Array) -> jax.Array:
        return self.decode(self.fsq.indices_to_codes(ids_Bhw))

    def __call__(self, images_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        zhat_BhwC = self.encode(images_BHWC)
        return self.decode(zhat_BhwC), self.fsq.codes_to_indices(zhat_BhwC)


def images_to_unit(images_BHWC: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_BHWC.astype(jnp.float32) / 127.5 - 1.0


def unit_to_images(x_BHWC) -> np.ndarray:
    """Model output in ~[-1, 1] -> uint8 [0, 255] on the host (rounded, clipped)."""
    return np.clip(np.round((np.asarray(x_BHWC) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def autoencoder_loss(model: ImageAutoencoder, batch: dict,
                     code_snap: float = 0.0) -> tuple[jax.Array, dict]:
    """Reconstruction loss on batch["images"] (uint8 [B, H, W, 3]).

    L1 + MSE: L1 keeps gradients alive on small errors (sharp edges, thin
    strokes of rendered words) while MSE matches the PSNR we report.
    `code_snap` weighs the latents' squared distance to their FSQ level: latents that
    sit near a rounding boundary give one flat colour several ids depending on far-away
    context, noise the joint model must then learn; snapped latents give it one id.
    """
    x_BHWC = images_to_unit(batch["images"])
    b_BhwC = model.latents(x_BHWC)
    recon_BHWC = model.decode(model.fsq.quantize_bounded(b_BhwC))
    err = recon_BHWC - x_BHWC
    mse = jnp.mean(jnp.square(err))
    l1 = jnp.mean(jnp.abs(err))
    gap = model.fsq.rounding_gap(b_BhwC)
    loss = l1 + mse + code_snap * gap
    # PSNR on the [0, 1] scale: an error of e in [-1, 1] is e/2 there.
    mse01 = jnp.mean(jnp.square(jnp.clip(recon_BHWC, -1, 1) - x_BHWC)) / 4
    psnr = -10.0 * jnp.log10(jnp.maximum(mse01, 1e-10))
    return loss, {"loss": loss, "mse": mse, "l1": l1, "psnr": psnr, "rounding_gap": gap}
