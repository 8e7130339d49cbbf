"""Aspect-ratio buckets: a few image shapes of about the same pixel (and token) count.

`data.aspect_buckets = "1:1,4:3,3:4,16:9,9:16"` gives, for `data.image_size` S and the
tokenizer's downsampling d, one shape per aspect W:H with about S*S pixels, both sides
multiples of d (so the convolutional tokenizer maps it to a (H/d) x (W/d) token grid).
Each image goes to the bucket nearest its own aspect (in log space) and is cropped to
that aspect, instead of every image being cropped to a square.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def parse(spec: str, image_size: int, downsample: int) -> list[tuple[int, int]]:
    """"W:H,..." -> pixel shapes [(height, width), ...]; "" -> [] (square images only)."""
    shapes = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        w_text, sep, h_text = part.partition(":")
        try:
            aspect = float(w_text) / float(h_text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"data.aspect_buckets entry {part!r} is not W:H") from None
        if not sep or not 0.2 <= aspect <= 5:
            raise ValueError(f"data.aspect_buckets entry {part!r} is not W:H with 1:5 <= W:H "
                             "<= 5:1")
        height = max(downsample, round(image_size / math.sqrt(aspect) / downsample) * downsample)
        width = max(downsample, round(image_size * math.sqrt(aspect) / downsample) * downsample)
        if (height, width) not in shapes:
            shapes.append((height, width))
    return shapes


def nearest(width: int, height: int, shapes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket (height, width) whose aspect is closest to width:height."""
    aspect = math.log(width / height)
    return min(shapes, key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))


def grids(shapes: Sequence[tuple[int, int]], downsample: int) -> list[tuple[int, int]]:
    return [(h // downsample, w // downsample) for h, w in shapes]
