"""The single mask rule, shared by the reference attention and every kernel.

A query attends to a key iff both are real tokens of the same segment and either
the key is not after the query (causal), or both lie in the same bidirectional
span (span id > 0). Padding has segment id 0 and attends to nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(
    q_segment_ids_BQ: jax.Array,
    kv_segment_ids_BK: jax.Array,
    q_span_ids_BQ: jax.Array,
    kv_span_ids_BK: jax.Array,
    q_index_BQ: jax.Array,
    kv_index_BK: jax.Array,
    causal: bool = True,
) -> jax.Array:
    """Boolean [B, Q, K]: True where the query may attend to the key.

    `*_index` are the tokens' indices in the packed row (not their RoPE positions):
    causality is about order in the stream.
    """
    same_segment = (q_segment_ids_BQ[:, :, None] == kv_segment_ids_BK[:, None, :]) & (
        q_segment_ids_BQ[:, :, None] > 0
    )
    if not causal:
        return same_segment
    before = kv_index_BK[:, None, :] <= q_index_BQ[:, :, None]
    same_span = (q_span_ids_BQ[:, :, None] == kv_span_ids_BK[:, None, :]) & (
        q_span_ids_BQ[:, :, None] > 0
    )
    return same_segment & (before | same_span)


def self_attention_mask(segment_ids_BL: jax.Array, span_ids_BL: jax.Array, causal: bool = True):
    index_BL = jnp.broadcast_to(jnp.arange(segment_ids_BL.shape[1]), segment_ids_BL.shape)
    return attention_mask(
        segment_ids_BL, segment_ids_BL, span_ids_BL, span_ids_BL, index_BL, index_BL, causal
    )
