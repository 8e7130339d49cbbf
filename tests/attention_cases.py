"""Random multimodal masks for kernel tests: packed rows, prompt-image spans, padding."""

from __future__ import annotations

import numpy as np


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
