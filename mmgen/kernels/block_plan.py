"""Which (query block, key block) tiles a kernel must visit under the mask rule.

Every kernel skips tiles the mask makes empty, in the forward and both backward
passes, from per-block summaries of the ids (no [Q, K] mask is ever built):
a tile can hold a visible pair only if its blocks share a segment id range, and
either some key is not after some query (causal) or they share a bidirectional
span. On packed rows (segments and spans contiguous, ids increasing) this test
is exact; for arbitrary ids it over-approximates, never under: a visited tile
still applies the element-wise mask, a skipped tile is guaranteed empty.

Span ids restart in every example, so spans are compared as (segment, span) keys.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_BIG = jnp.iinfo(jnp.int32).max
_SPAN_STRIDE = 1 << 16  # span ids per example stay far below this


class BlockPlan(NamedTuple):
    """visit_BNM: tile (query block n, key block m) holds a visible pair (or may).
    kv_lo_BN/kv_hi_BN: visited key blocks of query block n lie in [lo, hi).
    q_lo_BM/q_hi_BM: visited query blocks of key block m lie in [lo, hi).
    Empty ranges are lo == hi == 0.
    kv_full_*/q_full_*: a run of tiles inside [lo, hi) in which every pair is visible
    (one segment, no padding, wholly below the diagonal or inside one span): kernels
    skip the element-wise mask there. An empty run is (lo, lo)."""

    visit_BNM: jax.Array
    kv_lo_BN: jax.Array
    kv_hi_BN: jax.Array
    q_lo_BM: jax.Array
    q_hi_BM: jax.Array
    kv_full_lo_BN: jax.Array
    kv_full_hi_BN: jax.Array
    q_full_lo_BM: jax.Array
    q_full_hi_BM: jax.Array


def _block_range(values_BL: jax.Array, valid_BL: jax.Array, block: int):
    """Per-block (min, max) of `values` over valid tokens; empty blocks give (BIG, -1)."""
    B, L = values_BL.shape
    v = values_BL.reshape(B, L // block, block)
    ok = valid_BL.reshape(B, L // block, block)
    lo = jnp.min(jnp.where(ok, v, _BIG), axis=-1)
    hi = jnp.max(jnp.where(ok, v, -1), axis=-1)
    return lo, hi


def _overlap(a_lo, a_hi, b_lo, b_hi):
    """[B, N] x [B, M] ranges -> [B, N, M] whether they intersect (empty never does)."""
    return (a_lo[:, :, None] <= b_hi[:, None, :]) & (b_lo[:, None, :] <= a_hi[:, :, None])


def _full_run(full_BNM: jax.Array, lo_BN: jax.Array):
    """The first run of consecutive full tiles: [start, end), or (lo, lo) without one."""
    M = full_BNM.shape[-1]
    idx = jnp.arange(M, dtype=jnp.int32)
    start = jnp.min(jnp.where(full_BNM, idx, M), axis=-1)
    after = (idx >= start[..., None]) & ~full_BNM
    end = jnp.min(jnp.where(after, idx, M), axis=-1)
    has = full_BNM.any(-1)
    return (jnp.where(has, start, lo_BN).astype(jnp.int32),
            jnp.where(has, end, lo_BN).astype(jnp.int32))


def _first_last(visit_BNM: jax.Array):
    """Visited range along the last axis: [lo, hi), or (0, 0) when nothing is visited."""
    M = visit_BNM.shape[-1]
    idx = jnp.arange(M, dtype=jnp.int32)
    any_ = visit_BNM.any(-1)
    lo = jnp.min(jnp.where(visit_BNM, idx, M), axis=-1)
    hi = jnp.max(jnp.where(visit_BNM, idx + 1, 0), axis=-1)
    return jnp.where(any_, lo, 0).astype(jnp.int32), jnp.where(any_, hi, 0).astype(jnp.int32)


def block_plan(
    q_segment_ids_BQ: jax.Array,
    kv_segment_ids_BK: jax.Array,
    q_span_ids_BQ: jax.Array,
    kv_span_ids_BK: jax.Array,
    q_index_BQ: jax.Array,
    kv_index_BK: jax.Array,
    *,
    block_q: int,
    block_k: int,
    causal: bool = True,
) -> BlockPlan:
    """The tiles to visit for lengths that are multiples of the block sizes."""
    Q, K = q_segment_ids_BQ.shape[1], kv_segment_ids_BK.shape[1]
    if Q % block_q or K % block_k:
        raise ValueError(f"lengths ({Q}, {K}) must be multiples of the blocks "
                         f"({block_q}, {block_k}); pad with segment id 0")
    q_real, kv_real = q_segment_ids_BQ > 0, kv_segment_ids_BK > 0
    q_seg_lo, q_seg_hi = _block_range(q_segment_ids_BQ, q_real, block_q)
    kv_seg_lo, kv_seg_hi = _block_range(kv_segment_ids_BK, kv_real, block_k)
    visit = _overlap(q_seg_lo, q_seg_hi, kv_seg_lo, kv_seg_hi)
    # full: both blocks wholly one and the same segment (a padded token breaks it)
    q_one = (q_seg_lo == q_seg_hi) & q_real.reshape(q_seg_lo.shape + (block_q,)).all(-1)
    kv_one = (kv_seg_lo == kv_seg_hi) & kv_real.reshape(kv_seg_lo.shape + (block_k,)).all(-1)
    full = q_one[:, :, None] & kv_one[:, None, :] & (q_seg_lo[:, :, None] == kv_seg_lo[:, None, :])
    if causal:
        q_idx_lo, q_idx_hi = _block_range(q_index_BQ, q_real, block_q)
        kv_idx_lo, kv_idx_hi = _block_range(kv_index_BK, kv_real, block_k)
        some_key_before = kv_idx_lo[:, None, :] <= q_idx_hi[:, :, None]
        before = kv_idx_hi[:, None, :] <= q_idx_lo[:, :, None]  # every key before every query
        q_key = q_segment_ids_BQ * _SPAN_STRIDE + q_span_ids_BQ
        kv_key = kv_segment_ids_BK * _SPAN_STRIDE + kv_span_ids_BK
        q_in_span, kv_in_span = q_real & (q_span_ids_BQ > 0), kv_real & (kv_span_ids_BK > 0)
        q_key_lo, q_key_hi = _block_range(q_key, q_in_span, block_q)
        kv_key_lo, kv_key_hi = _block_range(kv_key, kv_in_span, block_k)
        shared_span = _overlap(q_key_lo, q_key_hi, kv_key_lo, kv_key_hi)
        visit &= some_key_before | shared_span
        # or both blocks wholly inside one and the same bidirectional span
        q_one_span = (q_key_lo == q_key_hi) & q_in_span.reshape(q_key_lo.shape + (block_q,)).all(-1)
        kv_one_span = (kv_key_lo == kv_key_hi) & kv_in_span.reshape(
            kv_key_lo.shape + (block_k,)).all(-1)
        in_span = (q_one_span[:, :, None] & kv_one_span[:, None, :]
                   & (q_key_lo[:, :, None] == kv_key_lo[:, None, :]))
        full &= before | in_span
    kv_lo, kv_hi = _first_last(visit)
    q_lo, q_hi = _first_last(jnp.swapaxes(visit, 1, 2))
    return BlockPlan(visit, kv_lo, kv_hi, q_lo, q_hi, *_full_run(full, kv_lo),
                     *_full_run(jnp.swapaxes(full, 1, 2), q_lo))


def dense_block_occupancy(mask_BQK: jax.Array, block_q: int, block_k: int) -> jax.Array:
    """[B, N, M]: which tiles of a dense mask hold a visible pair (the plan's ground truth)."""
    B, Q, K = mask_BQK.shape
    return mask_BQK.reshape(B, Q // block_q, block_q, K // block_k, block_k).any((2, 4))
