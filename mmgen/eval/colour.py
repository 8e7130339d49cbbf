"""Programmatic colour check for generated images of the synthetic world.

Generated images are blurry and noisy, so every pixel is classified to its *nearest* reference
colour (object colours, backgrounds, word colours) rather than matched exactly; pixels far from
every reference (blended edges, artefacts) are ignored.
"""

from __future__ import annotations

import numpy as np

from mmgen.data.synthetic import BACKGROUNDS, COLOURS, WORD_COLOURS, Scene

# Object colours first so that index < len(COLOURS) means "object pixel".
_NAMES: tuple[str, ...] = tuple(COLOURS) + tuple(BACKGROUNDS) + tuple(
    c for c in WORD_COLOURS if c not in COLOURS)
_REF: np.ndarray = np.array(
    [{**COLOURS, **BACKGROUNDS, **WORD_COLOURS}[n] for n in _NAMES], dtype=np.float32)


def _to_float255(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] in 0..255 float; float inputs in [0, 1] (or [-1, 1]) are rescaled."""
    x = np.asarray(image)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"expected [H, W, 3] image, got shape {x.shape}")
    if np.issubdtype(x.dtype, np.floating) and x.max() <= 1.5:
        x = (x + 1.0) * 127.5 if x.min() < -0.01 else x * 255.0
    return x.astype(np.float32)


def classify_pixels(image: np.ndarray, max_dist: float = 100.0) -> np.ndarray:
    """[H, W] index into the reference colours (see `reference_names`), -1 if none is close."""
    x = _to_float255(image).reshape(-1, 1, 3)
    d = np.sqrt(((x - _REF[None]) ** 2).sum(-1))  # [HW, R]
    idx = d.argmin(-1)
    idx[d.min(-1) > max_dist] = -1
    return idx.reshape(image.shape[:2])


def reference_names() -> tuple[str, ...]:
    return _NAMES


def dominant_object_colour(image: np.ndarray, *, max_dist: float = 100.0,
                           min_fraction: float = 0.01) -> str | None:
    """Object colour with the most pixels, or None if < min_fraction of pixels are object-coloured.

    Background and word-only colours (black) never count as object colours.
    """
    idx = classify_pixels(image, max_dist)
    counts = np.bincount(idx[idx >= 0], minlength=len(_NAMES))[: len(COLOURS)]
    if counts.sum() < min_fraction * idx.size:
        return None
    return _NAMES[int(counts.argmax())]


def colour_match_rate(images: np.ndarray | list, scenes: list[Scene]) -> float:
    """Fraction of images whose dominant object colour is scenes[i].objects[0].colour."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images vs {len(scenes)} scenes")
    if not scenes:
        raise ValueError("no images to check")
    hits = sum(dominant_object_colour(im) == s.objects[0].colour for im, s in zip(
        images, scenes, strict=True))
    return hits / len(scenes)
