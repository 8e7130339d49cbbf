"""Finite Scalar Quantisation (Mentzer et al., 2023, "FSQ: VQ-VAE made simple").

Each of the `C = len(levels)` latent channels is squashed into a bounded range,
rounded to one of `levels[c]` integers, and rescaled to [-1, 1]. The implicit
codebook is the product grid, so there is nothing to learn and nothing to
collapse; a code's index is its mixed-radix number.

Shapes: `N` is any number of leading dims, `C` the number of FSQ channels.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Widens the tanh range by a hair so the outermost levels are reached by
# finite inputs (tanh itself never reaches +-1).
_EPS = 1e-3


def _round_ste(x: jax.Array) -> jax.Array:
    """Round in the forward pass, identity in the backward pass."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


class FSQ:
    """Finite scalar quantiser over the grid `levels[0] x ... x levels[C-1]`."""

    def __init__(self, levels: Sequence[int]):
        levels = [int(v) for v in levels]
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels must be >= 2 each, got {levels}")
        self.levels = tuple(levels)
        self.dim = len(levels)
        self.num_codes = int(np.prod(levels))
        lv = np.asarray(levels, np.float64)
        # Integer codes live in [-(L//2), ..., L - 1 - L//2]: symmetric for odd L,
        # one extra negative level for even L.
        self._half_width = np.floor(lv / 2)
        half_l = (lv - 1) * (1 + _EPS) / 2
        # Even L: shift the tanh so its range (-half_l - offset, half_l - offset)
        # covers L integers (e.g. L=8: (-4.0, 3.0)) instead of only L-1.
        offset = np.where(lv % 2 == 0, 0.5, 0.0)
        # numpy, not jnp: the model may be built under jit/eval_shape, and jnp constants
        # created there would be tracers captured as static attributes.
        self._half_l = np.asarray(half_l, np.float32)
        self._offset = np.asarray(offset, np.float32)
        self._shift = np.asarray(np.arctanh(offset / half_l), np.float32)
        basis = np.concatenate([[1], np.cumprod(levels[:-1])]).astype(np.int32)
        self._basis = basis
        self._levels = np.asarray(levels, np.int32)
        self._hw = np.asarray(self._half_width, np.float32)

    def bound(self, z_NC: jax.Array) -> jax.Array:
        """Squash to a range whose rounding reaches exactly `levels[c]` integers."""
        z_NC = z_NC.astype(jnp.float32)
        return jnp.tanh(z_NC + self._shift) * self._half_l - self._offset

    def quantize(self, z_NC: jax.Array) -> jax.Array:
        """Bound, round (straight-through) and normalise to [-1, 1]."""
        return self.quantize_bounded(self.bound(z_NC))

    def quantize_bounded(self, b_NC: jax.Array) -> jax.Array:
        """Round already bounded latents (straight-through) and normalise to [-1, 1]."""
        return _round_ste(b_NC) / self._hw

    @staticmethod
    def rounding_gap(b_NC: jax.Array) -> jax.Array:
        """Mean squared distance of bounded latents to their level (0 at level centres,
        0.25 on a rounding boundary); gradients only move the latents."""
        return jnp.mean(jnp.square(b_NC - jax.lax.stop_gradient(jnp.round(b_NC))))

    def codes_to_indices(self, zhat_NC: jax.Array) -> jax.Array:
        """Normalised codes -> int32 mixed-radix indices in [0, num_codes)."""
        digits_NC = jnp.round(zhat_NC * self._hw + self._hw).astype(jnp.int32)
        return jnp.sum(digits_NC * self._basis, axis=-1).astype(jnp.int32)

    def indices_to_codes(self, idx_N: jax.Array) -> jax.Array:
        """int32 indices -> normalised codes, the inverse of `codes_to_indices`."""
        idx_N1 = jnp.asarray(idx_N, jnp.int32)[..., None]
        digits_NC = (idx_N1 // self._basis) % self._levels
        return (digits_NC.astype(jnp.float32) - self._hw) / self._hw
