"""Kernel-test helpers: random multimodal masks (packed rows, prompt-image spans,
padding) and a kernel's outputs and gradients next to the reference's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmgen.kernels.attention import attention


def packed_ids(rng: np.random.Generator, B: int, L: int, *, max_segments: int = 4,
               span_fraction: float = 0.3, pad_fraction: float = 0.1):
    """(segment_ids, span_ids, index) int32 [B, L] as the packer writes them: contiguous
    segments 1.., span ids restarting at 1 in every segment, padding (0) at the end."""
    seg = np.zeros((B, L), np.int32)
    span = np.zeros((B, L), np.int32)
    for b in range(B):
        used = L - int(rng.integers(0, int(L * pad_fraction) + 1))
        n = int(rng.integers(1, max_segments + 1))
        cuts = np.sort(rng.choice(np.arange(1, used), size=min(n - 1, used - 1), replace=False))
        bounds = [0, *cuts.tolist(), used]
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True), start=1):
            seg[b, lo:hi] = s
            # up to two bidirectional spans (prompt images), numbered in stream order
            starts = []
            for _ in range(int(rng.integers(0, 3))):
                width = int((hi - lo) * span_fraction * rng.uniform(0.3, 1.0))
                start = int(rng.integers(lo, hi - width + 1)) if width >= 2 else 0
                if width >= 2 and not span[b, start:start + width].any():
                    span[b, start:start + width] = -1
                    starts.append(start)
            for sid, start in enumerate(sorted(starts), start=1):
                end = start
                while end < hi and span[b, end] == -1:
                    end += 1
                span[b, start:end] = sid
    index = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy()
    return seg, span, index


def outputs_and_grads(kernel, q, k, v, do, ids_q, ids_k, causal, cap):
    """[out, lse, dq, dk, dv] as f32 numpy for a loss that uses both outputs (the lse
    cotangent is exercised too). kernel(q, k, v) -> (out, lse), or None for the xla
    reference under the same mask."""
    def reference(q, k, v):
        return attention(q, k, v, q_segment_ids_BQ=ids_q[0], kv_segment_ids_BK=ids_k[0],
                         q_span_ids_BQ=ids_q[1], kv_span_ids_BK=ids_k[1], q_index_BQ=ids_q[2],
                         kv_index_BK=ids_k[2], causal=causal, logit_cap=cap, return_lse=True)

    @jax.jit
    def go(q, k, v, do):
        (out, lse), vjp = jax.vjp(kernel or reference, q, k, v)
        dlse = jnp.where(jnp.isfinite(lse), 0.1 * jnp.cos(lse), 0.0)
        return out, lse, vjp((do, dlse))

    out, lse, grads = go(q, k, v, do)
    return [np.asarray(x, np.float32) for x in (out, lse, *grads)]
