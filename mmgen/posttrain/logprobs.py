"""Per-token log-probabilities as the sampler defines them, for DPO and GRPO.

The sampler draws an image token only from the image codes (sample/decode.allowed_ids)
and a text token from the text vocabulary, so a token's probability is normalised over
that set, not over the whole embedding table: then the log-probability a loss sees is
the one the sampled token was drawn with (temperature included).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def resolve_code_range(cfg, layout) -> None:
    """Fills the derived `posttrain.image_offset/image_codes` keys from the token layout
    (losses see only the config); saved with every checkpoint like model.vocab_size."""
    cfg.posttrain.image_offset = layout.image_offset
    cfg.posttrain.image_codes = layout.image_codes


def code_range(cfg) -> tuple[int, int]:
    """[lo, hi) of the image-code ids, filled into `posttrain` from the layout by the task."""
    p = cfg.posttrain
    return int(p.image_offset), int(p.image_offset + p.image_codes)


def target_logps(model, batch: dict, cfg, temperature: float = 1.0) -> jax.Array:
    """log p(token t+1 | tokens <= t) [B, L-1], float32.

    Targets that are image codes are normalised over the image codes; every other target
    (text, specials) over the real vocabulary. Logits are divided by `temperature`."""
    logits_BLV = model(batch)[:, :-1] / temperature
    targets_BL = batch["tokens"][:, 1:]
    vocab_V = jnp.arange(logits_BLV.shape[-1])
    lo, hi = code_range(cfg)
    is_code_V = (vocab_V >= lo) & (vocab_V < hi)
    lse_all_BL = jax.nn.logsumexp(
        jnp.where(vocab_V < cfg.model.vocab_size, logits_BLV, -jnp.inf), axis=-1)
    lse_code_BL = jax.nn.logsumexp(jnp.where(is_code_V, logits_BLV, -jnp.inf), axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    target_is_code_BL = (targets_BL >= lo) & (targets_BL < hi)
    return target_logit_BL - jnp.where(target_is_code_BL, lse_code_BL, lse_all_BL)


def shift_to_targets(x_BL: jax.Array) -> jax.Array:
    """A per-token field (value of token t) aligned with target_logps (position t-1)."""
    return x_BL[:, 1:]
