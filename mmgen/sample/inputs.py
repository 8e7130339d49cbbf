"""What `mmgen sample` reads and shows: prompts, input images, mode, progress, rendering.

Every user mistake here is a SampleError with one line of text; the CLI prints it and
exits 2. Checks that need no model (files exist, prompts non-empty) run before the
checkpoint is loaded, so a typo fails in a second, not after a restore.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

MODES = ("image", "caption", "edit")


class SampleError(ValueError):
    """A bad input to `mmgen sample`, said in one line."""


@dataclasses.dataclass(frozen=True)
class Item:
    prompt: str | None   # the text prompt or edit instruction; None when captioning
    image: Path | None   # the input image (caption, edit)


def read_items(prompt: str | None, prompts_file: str | None, image: str | None) -> list[Item]:
    """--prompt / --prompts-file (+ --image, the default image of every line)."""
    default = Path(image) if image else None
    if prompts_file is None:
        return [Item(prompt, default)]
    path = Path(prompts_file)
    if not path.is_file():
        raise SampleError(f"prompts file {path} does not exist")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise SampleError(f"prompts file {path} has no prompts")
    if path.suffix != ".jsonl":
        return [Item(ln.strip(), default) for ln in lines]
    items = []
    for n, ln in enumerate(lines, 1):
        try:
            row = json.loads(ln)
        except json.JSONDecodeError as e:
            raise SampleError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not ({"prompt", "image"} & row.keys()):
            raise SampleError(f'{path}:{n}: expected {{"prompt": ..., "image": ...}}')
        img = row.get("image")
        items.append(Item(row.get("prompt"), Path(img) if img else default))
    return items


def resolve_mode(mode: str | None, items: list[Item]) -> str:
    """The explicit --mode, else: image + prompt -> edit, image only -> caption, else image."""
    has_image = any(it.image is not None for it in items)
    has_prompt = any(it.prompt for it in items)
    mode = mode or ("image" if not has_image else "edit" if has_prompt else "caption")
    if mode in ("caption", "edit") and not all(it.image is not None for it in items):
        raise SampleError(f"--mode {mode} needs an input image (--image, or \"image\" in "
                          "every line of a .jsonl prompts file)")
    if mode in ("image", "edit") and not all(it.prompt for it in items):
        raise SampleError(f"--mode {mode} needs a prompt (--prompt or --prompts-file)")
    if mode == "image" and has_image:
        raise SampleError("--image is an input of --mode caption or edit, not of --mode image")
    for it in items:
        if it.image is not None and not it.image.is_file():
            raise SampleError(f"image file {it.image} does not exist")
    return mode


def load_image(path: Path, size: int, note=None) -> np.ndarray:
    """uint8 [size, size, 3]. A square image of another size is resized (with a note);
    a non-square one is refused: cropping would silently drop part of the picture."""
    try:
        img = Image.open(path).convert("RGB")
    except OSError as e:
        raise SampleError(f"cannot read image {path}: {e}") from None
    if img.width != img.height:
        raise SampleError(f"image {path} is {img.width}x{img.height}; the model takes square "
                          f"{size}x{size} images (crop it to a square first)")
    if img.width != size:
        if note:
            note(f"note: resizing {path} from {img.width}x{img.height} to {size}x{size}")
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img, np.uint8)


def render(ids: np.ndarray, codec, decoder_dir: str | None, decoder_steps: int | None,
           seed: int = 0) -> np.ndarray:
    """Image ids [N, h, w] -> uint8 images: the diffusion decoder of `decoder_dir` (a
    decoder run, docs/decoder.md) in `decoder_steps` steps, else the tokenizer's decoder."""
    from mmgen.sample.render import render_images

    return render_images(ids, codec, decoder_steps, decoder_dir=decoder_dir, seed=seed)


class Progress:
    """One status line on stderr, rewritten in place on a terminal."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.t0 = total, what, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, done: int) -> None:
        dt = time.perf_counter() - self.t0
        width = 24
        bar = "#" * (width * done // max(self.total, 1))
        line = f"sample: [{bar:<{width}}] {done}/{self.total} {self.what} ({dt:.1f} s)"
        end = "\n" if not self.tty or done >= self.total else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)
