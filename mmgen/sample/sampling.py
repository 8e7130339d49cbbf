"""Token choice from logits: temperature, top-k, top-p (nucleus), classifier-free guidance.

Everything here is traced inside the jitted decode loop (sample/decode.py). The sampling
settings are Python numbers fixed per compiled program; only the logits, the key and
the guidance scale are traced.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

MASKED = -1e30  # finite, so a row whose every token is masked still has a defined argmax


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature <= 0 is greedy (argmax, the other
    fields are ignored); top_k <= 0 and top_p >= 1 switch those truncations off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def top_p_keep(logits_BV: jax.Array, top_p: float) -> jax.Array:
    """bool [B, V]: the smallest set of most likely tokens whose probability reaches
    `top_p` (the nucleus). The most likely token is always kept, so a tiny p is greedy.

    A token is kept when the mass of the tokens ranked strictly above it is still below
    p; ties at the boundary are broken by rank (argsort order), never all kept.
    p >= 1 keeps everything: the float32 cumulative sum can reach 1 before the last
    token, which would otherwise drop the far tail."""
    if top_p >= 1.0:
        return jnp.ones(logits_BV.shape, bool)
    order_BV = jnp.argsort(-logits_BV, axis=-1)
    probs_BV = jax.nn.softmax(jnp.take_along_axis(logits_BV, order_BV, axis=-1), axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_sorted_BV = (before_BV < top_p).at[:, 0].set(True)
    # back from rank order to vocabulary order
    rank_BV = jnp.argsort(order_BV, axis=-1)
    return jnp.take_along_axis(keep_sorted_BV, rank_BV, axis=-1)


def truncate(logits_BV: jax.Array, s: Sampling) -> jax.Array:
    """Temperature, then top-k, then top-p (the usual order): masked logits [B, V]."""
    logits_BV = logits_BV / s.temperature
    if 0 < s.top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, s.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, MASKED, logits_BV)
    if s.top_p < 1.0:
        logits_BV = jnp.where(top_p_keep(logits_BV, s.top_p), logits_BV, MASKED)
    return logits_BV


def sample_logits(key: jax.Array, logits_BV: jax.Array, s: Sampling) -> jax.Array:
    """One token id per row, int32 [B]."""
    if s.temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, truncate(logits_BV, s), axis=-1).astype(jnp.int32)


def token_logp(logits_BV: jax.Array, tok_B: jax.Array, s: Sampling) -> jax.Array:
    """log-probability [B] of `tok_B` under the distribution sample_logits draws from
    (greedy counts as temperature 1: its choice has no distribution to report)."""
    if s.temperature <= 0:
        s = dataclasses.replace(s, temperature=1.0)
    logp_BV = jax.nn.log_softmax(truncate(logits_BV, s), axis=-1)
    return jnp.take_along_axis(logp_BV, tok_B[:, None], axis=-1)[:, 0]


def guide(cond_BV: jax.Array, uncond_BV: jax.Array, scale: jax.Array) -> jax.Array:
    """Classifier-free guidance u + s (c - u): s = 1 is the conditional logits (up to one
    rounding of u + (c - u)), s = 0 the unconditional ones, s > 1 extrapolates."""
    return uncond_BV + scale * (cond_BV - uncond_BV)
