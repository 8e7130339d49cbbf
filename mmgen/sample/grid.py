"""Image grids for sample sheets and TensorBoard."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N,H,W,3] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, 3] sheet."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    sheet = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        sheet[y:y + h, x:x + w] = img
    return sheet


def file_in_the_way(path: str | Path) -> Path | None:
    """The first of `path` and its parents that exists as something other than a
    directory: where writing under `path` (or creating it as a directory) would fail."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)


def unwritable(directory: str | Path) -> str | None:
    """Why files cannot be written in `directory`, or None. Commands ask before their work,
    so a read-only --out fails in a second, not at the end of a long eval or sampling run.
    Creates nothing: the nearest existing folder of `directory` is probed with a temporary
    file (the command makes the folders when it writes)."""
    directory = Path(directory)
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        return f"cannot write in {existing}: {e.strerror or e}"
    return None


def save_png(image: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(image, np.uint8))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
    return path
