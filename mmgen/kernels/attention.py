"""Attention entry point: one signature for every implementation.

`impl="xla"` is the reference (any backend, f32 softmax). Kernels added later
(cudnn, pallas_gpu, pallas_tpu) take exactly these arguments and follow the
mask rule in kernels/mask.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmgen.kernels.mask import attention_mask

IMPLS = ("xla",)


def attention(
    q_BQHD: jax.Array,
    k_BKGD: jax.Array,
    v_BKGD: jax.Array,
    *,
    q_segment_ids_BQ: jax.Array,
    kv_segment_ids_BK: jax.Array,
    q_span_ids_BQ: jax.Array,
    kv_span_ids_BK: jax.Array,
    q_index_BQ: jax.Array | None = None,
    kv_index_BK: jax.Array | None = None,
    causal: bool = True,
    impl: str = "xla",
) -> jax.Array:
    """Grouped-query attention under the multimodal mask; returns [B, Q, H, D].

    H query heads share G = H / (H // G) key/value heads. Rows with no visible key
    (padding) return zeros, never NaN.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; available: {IMPLS}")
    B, Q, H, D = q_BQHD.shape
    K, G = k_BKGD.shape[1], k_BKGD.shape[2]
    if H % G:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {G}")
    if q_index_BQ is None:
        q_index_BQ = jnp.broadcast_to(jnp.arange(Q) + (K - Q), (B, Q))
    if kv_index_BK is None:
        kv_index_BK = jnp.broadcast_to(jnp.arange(K), (B, K))
    mask_BQK = attention_mask(
        q_segment_ids_BQ, kv_segment_ids_BK, q_span_ids_BQ, kv_span_ids_BK,
        q_index_BQ, kv_index_BK, causal,
    )
    q_BQGRD = q_BQHD.reshape(B, Q, G, H // G, D)
    logits_BGRQK = jnp.einsum(
        "bqgrd,bkgd->bgrqk", q_BQGRD, k_BKGD, preferred_element_type=jnp.float32
    ) * (D**-0.5)
    mask_B11QK = mask_BQK[:, None, None]
    logits_BGRQK = jnp.where(mask_B11QK, logits_BGRQK, -1e30)
    probs_BGRQK = jax.nn.softmax(logits_BGRQK, axis=-1)
    probs_BGRQK = jnp.where(mask_B11QK, probs_BGRQK, 0.0)  # fully masked rows -> zeros
    out_BQGRD = jnp.einsum("bgrqk,bkgd->bqgrd", probs_BGRQK.astype(v_BKGD.dtype), v_BKGD)
    return out_BQGRD.reshape(B, Q, H, D)
