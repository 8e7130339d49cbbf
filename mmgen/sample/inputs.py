"""What `mmgen sample` reads and shows: prompts, input images, mode, progress, rendering.

Every user mistake here is a SampleError with one line of text; the CLI prints it and
exits 2. Checks that need no model (files exist, prompts non-empty) run before the
checkpoint is loaded, so a typo fails in a second, not after a restore.
"""

from __future__ import annotations

import codecs
import dataclasses
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

MODES = ("image", "caption", "edit")
# larger inputs are refused before decoding, as in training (data.max_pixels' default)
MAX_PIXELS = 50_000_000


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
        return [Item(prompt.strip() if prompt is not None else None, default)]
    path = Path(prompts_file)
    if not path.is_file():
        raise SampleError(f"prompts file {path} " + ("is a directory, not a file"
                                                      if path.is_dir() else "does not exist"))
    if path.suffix == ".json":  # read line by line, a JSON list would be one prompt
        raise SampleError(f"prompts file {path}: .json is not a prompts format; write one "
                          'prompt per line (.txt) or .jsonl lines {"prompt": ..., "image": ...}')
    numbered = [(n, ln) for n, ln in enumerate(_utf8_lines(path), 1) if ln.strip()]
    if not numbered:
        raise SampleError(f"prompts file {path} has no prompts")
    if path.suffix != ".jsonl":
        return [Item(ln.strip(), default) for _, ln in numbered]
    return [_jsonl_item(path, n, ln, default) for n, ln in numbered]


def _utf8_lines(path: Path) -> list[str]:
    # a byte-order mark (Windows editors) is not part of the first prompt
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise SampleError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                          "save the prompts file as UTF-8") from None


def _jsonl_item(path: Path, n: int, line: str, default: Path | None) -> Item:
    """Line `n` of a .jsonl prompts file; null or a missing key means absent."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise SampleError(f"{path}:{n}: not JSON ({e.msg})") from None
    if not isinstance(row, dict) or not ({"prompt", "image"} & row.keys()):
        raise SampleError(f'{path}:{n}: expected {{"prompt": ..., "image": ...}}')
    unknown = sorted(row.keys() - {"prompt", "image"})
    if unknown:  # {"img": ...} would otherwise sample without its image
        raise SampleError(f'{path}:{n}: unknown keys {unknown}; a line has "prompt" and/or '
                          '"image"')
    for key in ("prompt", "image"):
        if not isinstance(row.get(key, ""), str | None):
            raise SampleError(f'{path}:{n}: "{key}" must be a string, got {row[key]!r}')
    img, prompt = row.get("image"), row.get("prompt")
    return Item(prompt.strip() if prompt else prompt, Path(img) if img else default)


def check_out(out: str, mode: str, flag: str = "--out", probe: bool = True) -> None:
    """Refuses, before the checkpoint loads, an --out the mode could not write: image and
    edit save an image file whose format PIL takes from the suffix; caption writes OUT
    with its suffix replaced by .json (so OUT may name a directory: DIR.json goes beside it).
    `flag` names the option in the message (`mmgen data inspect --sheet` checks its PNG);
    `probe`: also try writing in its folder (not for a file that may never be written)."""
    from mmgen.sample.grid import file_in_the_way, unwritable

    path = Path(out)
    if path.name in ("", ".."):
        raise SampleError(f"{flag} {out} names no file")
    target = path.with_suffix(".json") if mode == "caption" else path
    blocking = file_in_the_way(target.parent)
    if blocking is not None:
        raise SampleError(f"{flag} {out}: {blocking} is a file, not a directory")
    if target.is_dir():
        raise SampleError(f"{flag} {out}: {target} is a directory; give a file name"
                          + ("" if mode == "caption" else f" such as {target / 'grid.png'}"))
    if mode != "caption":
        _check_image_suffix(out, path.suffix, flag)
    why = unwritable(target.parent) if probe else None
    if why is not None:
        raise SampleError(f"{flag} {out}: {why}")


def _check_image_suffix(out: str, suffix: str, flag: str) -> None:
    """PIL picks the format from the suffix; a dry run into memory shows it can write RGB."""
    Image.init()
    fmt = Image.registered_extensions().get(suffix.lower())
    try:
        if fmt is None:
            raise ValueError
        Image.new("RGB", (2, 2)).save(io.BytesIO(), format=fmt)
    except (ValueError, OSError, KeyError):
        what = f"PIL cannot write {suffix} images" if suffix else "no suffix to name the format"
        raise SampleError(f"{flag} {out}: {what}; use e.g. .png or .jpg") from None


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
    if mode == "caption" and has_prompt:
        raise SampleError("--mode caption takes no prompt (it captions the image); drop the "
                          "prompt, or use --mode edit to edit the image by it")
    for it in items:
        if it.image is not None and not it.image.is_file():
            where = "" if it.image.is_absolute() else (
                f" (relative paths are read from the working directory, {Path.cwd()})")
            raise SampleError(f"image file {it.image} " + ("is a directory, not a file"
                                                           if it.image.is_dir()
                                                           else f"does not exist{where}"))
    return mode


def check_images(items: list[Item]) -> None:
    """Reads every input image once before the checkpoint loads, so an unreadable,
    non-square or unsupported one fails in a second (load_image reads it again later)."""
    for path in dict.fromkeys(it.image for it in items if it.image is not None):
        _read_square_rgb(path)


def load_image(path: Path, size: int, note=None) -> np.ndarray:
    """uint8 [size, size, 3]. A square image of another size is resized (with a note);
    a non-square one is refused: cropping would silently drop part of the picture."""
    img = _read_square_rgb(path)
    if img.width != size:
        if note:
            note(f"note: resizing {path} from {img.width}x{img.height} to {size}x{size}")
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img, np.uint8)


def _read_square_rgb(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        if img.width * img.height > MAX_PIXELS:  # before decoding: a bomb fills memory
            raise SampleError(f"image {path} is {img.width}x{img.height}, more than "
                              f"{MAX_PIXELS:,} pixels; downscale it first")
        img.load()  # decode now: a truncated file fails here, not in a conversion
        # as training reads images: a phone photo's EXIF rotation is applied
        img = ImageOps.exif_transpose(img)
    except (OSError, Image.DecompressionBombError) as e:
        raise SampleError(f"cannot read image {path}: {e}") from None
    img = _to_rgb(img, path)
    if img.width != img.height:
        raise SampleError(f"image {path} is {img.width}x{img.height}; the model takes square "
                          "images (crop it to a square first)")
    return img


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """8-bit RGB. 16-bit grayscale is scaled (65535 -> 255): PIL's own conversion clips
    it, turning nearly every pixel white. 32-bit integer and float pixels have no
    defined white level, so they are refused. Transparency is composited onto white."""
    if img.mode.startswith("I;16"):
        pixels = np.asarray(img).astype(np.float64) * (255 / 65535)
        img = Image.fromarray(np.round(pixels).astype(np.uint8), "L")
    elif img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "32-bit float"
        raise SampleError(f"image {path} has {kind} pixels (PIL mode {img.mode}), which have "
                          "no defined white level; save it as 8- or 16-bit RGB or grayscale")
    if "A" in img.mode or "a" in img.mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    try:
        return img.convert("RGB")
    except ValueError as e:  # a mode PIL has no conversion for
        raise SampleError(f"cannot convert image {path} (PIL mode {img.mode}) to RGB: "
                          f"{e}") from None


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
