"""Image and caption transforms for web data: decode untrusted bytes or raise BadExample.

Pure functions without global state, so grain can run them on threads. Every rejection
is a `records.BadExample` whose reason pipelines count.
"""

from __future__ import annotations

import io
import math
import unicodedata
from collections.abc import Sequence

import numpy as np
from PIL import Image

from mmgen.data import buckets as buckets_lib
from mmgen.data.records import BadExample

# Formats web scrapes actually contain. Leaving out the rest (EPS, PSD, ...) keeps rarely
# exercised decoders, and EPS's Ghostscript subprocess, away from untrusted bytes. JPEG
# also opens multi-picture (MPO) files. AVIF only where this Pillow build decodes it.
Image.init()
IMAGE_FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
                      if f in Image.OPEN)

# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_EXIF_ORIENTATION = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_HIGH_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_WHITE = (255, 255, 255, 255)


def _pixel_limit(max_pixels: int) -> int:
    # Anything PIL itself warns about as a possible decompression bomb is rejected too.
    pil_limit = Image.MAX_IMAGE_PIXELS
    return min(max_pixels, pil_limit) if pil_limit else max_pixels


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Opens the image reading only its header, and applies the cheap size checks."""
    if not data:
        raise BadExample("empty_file", "0 bytes")
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise BadExample("too_many_pixels", str(e)) from None
    except Image.UnidentifiedImageError:
        raise BadExample("not_an_image", f"not a {'/'.join(IMAGE_FORMATS)} image") from None
    except Exception as e:  # decoders of untrusted bytes raise anything
        raise BadExample("corrupt_image", f"{type(e).__name__}: {e}") from None
    width, height = img.size
    if width * height > _pixel_limit(max_pixels):
        raise BadExample("too_many_pixels", f"{width}x{height} > {max_pixels} pixels")
    if width < 1 or height < 1:
        raise BadExample("corrupt_image", f"{width}x{height} image")
    return img


def _load(img: Image.Image) -> None:
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise BadExample("too_many_pixels", str(e)) from None
    except OSError as e:
        # PIL says "image file is truncated" unless ImageFile.LOAD_TRUNCATED_IMAGES is set,
        # which mmgen never does: a half-grey image would silently become training data.
        reason = "truncated_image" if "truncated" in str(e) else "corrupt_image"
        raise BadExample(reason, str(e)) from None
    except Exception as e:  # decoders of untrusted bytes raise anything
        raise BadExample("corrupt_image", f"{type(e).__name__}: {e}") from None


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # broken EXIF: the pixels are fine, keep them as stored
        return 1


def _grey_to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit int and float greyscale scaled (not clipped) to 0..255."""
    if mode.startswith("I;16") or (mode == "I" and pixels.min() >= 0 and pixels.max() <= 65535):
        # 16-bit PNG/TIFF (PIL may open them as "I"): full range is 0..65535.
        return ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    values = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(values.min()), float(values.max())
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    if hi <= lo:  # constant image: no range to stretch
        return np.zeros(values.shape, np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded mode as 8-bit RGB; transparency is composited over white."""
    if img.mode in _HIGH_BIT_GREY:
        return Image.fromarray(_grey_to_uint8(np.asarray(img), img.mode)).convert("RGB")
    if "transparency" in img.info or img.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGBX, ...


def _crop_box(width: int, height: int, crop: str, rng,
              aspect: float = 1.0) -> tuple[int, int, int, int]:
    """The largest centred or random box of width/height `aspect`, in source pixels."""
    box_w = min(width, max(1, round(height * aspect)))
    box_h = min(height, max(1, round(box_w / aspect)))
    if crop == "center":
        x0, y0 = (width - box_w) // 2, (height - box_h) // 2
    else:
        x0 = int(rng.integers(0, width - box_w + 1))
        y0 = int(rng.integers(0, height - box_h + 1))
    return x0, y0, x0 + box_w, y0 + box_h


def decode_image(data: bytes, *, size: int | tuple[int, int], crop: str = "center",
                 rng: np.random.Generator | None = None, max_pixels: int = 50_000_000,
                 min_size: int = 0, max_aspect: float = 0,
                 buckets: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """Encoded image bytes -> uint8 [height, width, 3], upright (EXIF), cropped to the
    target's aspect (centred, or random with `rng`) and resized to it.

    The target is `size` (an int: a square; or (height, width)), or with `buckets` (pixel
    shapes, data/buckets.py) the bucket nearest the upright image's aspect.

    Raises BadExample: empty_file, not_an_image, corrupt_image, truncated_image,
    too_many_pixels (width x height from the header, before decoding, above max_pixels or
    PIL's Image.MAX_IMAGE_PIXELS, whichever is lower), too_small (shorter side
    < min_size), bad_aspect (long/short side > max_aspect; 0 = off), unsupported_mode.
    """
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    if crop == "random" and rng is None:
        raise ValueError("crop='random' needs an rng")
    img = _open(data, max_pixels)
    width, height = img.size
    short, long = min(width, height), max(width, height)
    if short < min_size:
        raise BadExample("too_small", f"{width}x{height}, shorter side < {min_size}")
    if max_aspect and long / short > max_aspect:
        raise BadExample("bad_aspect", f"{width}x{height}, aspect > {max_aspect}")
    largest = max(max(b) for b in buckets) if buckets else (
        size if isinstance(size, int) else max(size))
    # JPEG can decode at 1/2, 1/4 or 1/8 scale directly: much faster for big photos. The
    # request keeps the shorter side at least the target's longest side, whatever the
    # orientation and bucket turn out to be.
    img.draft(None, (math.ceil(largest * width / short), math.ceil(largest * height / short)))
    _load(img)
    orientation = _orientation(img)
    try:
        rgb = _to_rgb(img)
    except (ValueError, OSError) as e:
        raise BadExample("unsupported_mode", f"mode {img.mode}: {e}") from None
    swaps = orientation in (5, 6, 7, 8)  # EXIF rotations by 90 degrees swap the axes
    upright_w, upright_h = (rgb.height, rgb.width) if swaps else rgb.size
    if buckets:
        out_h, out_w = buckets_lib.nearest(upright_w, upright_h, buckets)
    else:
        out_h, out_w = (size, size) if isinstance(size, int) else size
    # Crop and resize in one step (resize's box), in stored orientation, then turn
    # upright: never builds a huge intermediate for thin images.
    stored_w, stored_h = (out_h, out_w) if swaps else (out_w, out_h)
    box = _crop_box(*rgb.size, crop, rng, aspect=stored_w / stored_h)
    out = rgb.resize((stored_w, stored_h), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    if orientation in _UPRIGHT:
        out = out.transpose(_UPRIGHT[orientation])
    return np.asarray(out, np.uint8).copy()


def _cut_utf8(text: str, max_bytes: int) -> str:
    """At most max_bytes of UTF-8, cut on a character and, if one is near, a word boundary."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    cut = raw[:max_bytes].decode("utf-8", errors="ignore")  # drops a split last character
    if raw[len(cut.encode("utf-8")):][:1] != b" ":
        space = cut.rfind(" ")
        if space >= len(cut) // 2:  # a word boundary that keeps at least half the text
            cut = cut[:space]
    return cut.strip()


def _nfc_utf8(text: str | bytes, reason: str) -> str:
    """Text as NFC without byte-order marks; bytes must be UTF-8 and a str must encode
    as UTF-8 (no lone surrogates, e.g. from "\\ud800" in JSON), else BadExample(reason)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadExample(reason, str(e)) from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadExample(reason, str(e)) from None
    return unicodedata.normalize("NFC", text).replace("\ufeff", "")


def clean_caption(text: str | bytes, *, max_bytes: int) -> str:
    """A caption as NFC text on one line, whitespace collapsed, at most max_bytes UTF-8.

    Raises BadExample: non_utf8_caption (bytes that are not UTF-8, or lone surrogates in a
    str), empty_caption (nothing left).
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    text = _nfc_utf8(text, "non_utf8_caption")
    # Control characters (tabs, newlines, NUL, escape codes) become spaces; then every run
    # of Unicode whitespace (incl. no-break and line separators) becomes one space.
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text)
    text = _cut_utf8(" ".join(text.split()), max_bytes)
    if not text:
        raise BadExample("empty_caption", "nothing left after cleaning")
    return text


def clean_text(text: str | bytes) -> str:
    """A document's text as NFC, keeping its line structure: newlines and tabs stay,
    other control characters go, trailing and leading whitespace is stripped.

    Raises BadExample: non_utf8_text, empty_text.
    """
    text = _nfc_utf8(text, "non_utf8_text").replace("\r\n", "\n")
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    text = text.strip()
    if not text:
        raise BadExample("empty_text", "nothing left after cleaning")
    return text
