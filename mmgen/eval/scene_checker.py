"""GenEval-style programmatic checker for the synthetic world: no models, no downloads.

Generated images are blurry, bleed colour and carry stray blobs, so detection is built from
robust pieces: nearest-palette pixel classification, a morphological "core" (erosion) that
separates objects from thin text strokes and from bridges between neighbours, connected
components by label propagation (pure numpy), nearest-template shape classification on
bbox-normalised masks, and nearest-slot positions. Words are read by normalised correlation
against the known bitmap font over the closed vocabulary `synthetic.WORDS`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mmgen.data import synthetic as syn
from mmgen.data.synthetic import Scene, SceneObject

CATEGORIES: tuple[str, ...] = ("single_object", "two_objects", "counting", "colours", "position",
                               "colour_attribution", "text")
_OBJ = tuple(syn.COLOURS)
# Textures only darken backgrounds by <= 20, so shaded copies make them classify as background.
_BG = np.array([np.array(c) - s for c in syn.BACKGROUNDS.values() for s in (0, 10, 20)],
               np.float32)
_REF = np.concatenate([np.array([syn.COLOURS[c] for c in _OBJ], np.float32), _BG,
                       np.array([syn.WORD_COLOURS["black"]], np.float32)])
_GRID = 32  # canonical resolution for shape templates
_TEMPLATE_BLURS = (0.0, 1.0, 1.5)  # Gaussian radii at 64 px
_NEIGH8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


@dataclasses.dataclass
class Detection:
    colour: str
    shape: str
    position: str
    area: int
    bbox: tuple[int, int, int, int]  # inclusive (x0, y0, x1, y1)
    centroid: tuple[float, float]  # (x, y)


@dataclasses.dataclass
class Analysis:
    """Everything `check` needs from an image, so many scenes can be checked against one image."""
    detections: list[Detection]
    word: str | None


def _shift(a: np.ndarray, dy: int, dx: int, fill: int | bool = 0) -> np.ndarray:
    """out[y, x] = a[y + dy, x + dx], `fill` outside the image."""
    out = np.full_like(a, fill)
    h, w = a.shape
    out[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
        a[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    return out


def _morph(mask: np.ndarray, r: int, erode: bool) -> np.ndarray:
    """Binary erosion / dilation by a (2r+1)^2 square."""
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out = out & _shift(mask, dy, dx, False) if erode else out | _shift(mask, dy, dx, False)
    return out


def _propagate(labels: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Grow positive labels into `allowed` pixels (8-connected) until stable; the max label wins
    where two fronts meet, so a thin bridge is split between the two objects it joins."""
    labels = labels.copy()
    while True:
        grown = labels.copy()
        for dy, dx in _NEIGH8:
            grown = np.maximum(grown, _shift(labels, dy, dx))
        grown = np.where(allowed, grown, 0)
        if np.array_equal(grown, labels):
            return labels
        labels = grown


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels (1..k, 0 = off) by max-label propagation."""
    ids = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    labels = _propagate(ids, mask)
    uniq, dense = np.unique(labels, return_inverse=True)
    return dense.reshape(mask.shape) + (uniq[0] != 0)  # keep 0 for "off" when all are on


def _normalise(mask: np.ndarray) -> np.ndarray:
    """Crop to bbox and resample to _GRID x _GRID, so templates compare independent of size."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.uint8) * 255
    return np.asarray(Image.fromarray(crop).resize((_GRID, _GRID), Image.BILINEAR),
                      np.float32) / 255.0


def _alpha_mask(x: np.ndarray, region: np.ndarray, colour: np.ndarray,
                bg: np.ndarray) -> np.ndarray:
    """Pixels of `region` at least half-way from `bg` to `colour` (projection on bg->colour).

    Under linear blur the 0.5 iso-line stays at the true edge whatever the colour pair, whereas a
    nearest-palette mask shrinks light objects (yellow on white) and grows dark ones.
    """
    v = colour - bg
    alpha = ((x - bg) @ v) / float(v @ v)
    return region & (alpha >= 0.5)


@functools.lru_cache(maxsize=8)
def _templates(canvas: int) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Shape names, normalised masks and bbox aspects of GT renders: both sizes, every slot
    (different sub-pixel phases) and a few blur levels, since generated images are blurry and
    blur eats star tips and hexagon corners in a consistent way."""
    names, masks, aspects = [], [], []
    red, white = (np.array(syn.COLOURS["red"], np.float32),
                  np.array(syn.BACKGROUNDS["white"], np.float32))
    for shape in syn.SHAPES:
        for size in syn.SIZES:
            for slot in syn.POSITIONS:
                scene = Scene((SceneObject(shape, "red", size, slot),), "white", "plain")
                img = Image.fromarray(syn.render(scene, canvas))
                for blur in _TEMPLATE_BLURS:
                    im = img.filter(ImageFilter.GaussianBlur(blur * canvas / 64)) if blur else img
                    x = np.asarray(im, np.float32)
                    m = _alpha_mask(x, np.ones(x.shape[:2], bool), red, white)
                    ys, xs = np.nonzero(m)
                    names.append(shape)
                    masks.append(_normalise(m))
                    aspects.append((np.ptp(xs) + 1) / (np.ptp(ys) + 1))
    return tuple(names), np.stack(masks), np.array(aspects)


def _classify_shape(mask: np.ndarray, canvas: int) -> str:
    names, masks, aspects = _templates(canvas)
    m = _normalise(mask)
    iou = np.minimum(m, masks).sum((1, 2)) / np.maximum(m, masks).sum((1, 2))
    ys, xs = np.nonzero(mask)
    aspect = (np.ptp(xs) + 1) / (np.ptp(ys) + 1)
    # Normalising to the bbox discards aspect; hexagons (0.87) vs circles (1.0) need it back.
    score = iou - 0.5 * np.abs(np.log(aspect / aspects))
    return names[int(score.argmax())]


def _nearest_slot(x: float, y: float, canvas: int) -> str:
    d = {p: (x / canvas - fx) ** 2 + (y / canvas - fy) ** 2
         for p, (fx, fy) in syn._SLOT_CENTRE.items()}
    return min(d, key=d.get)


def _pixel_classes(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest reference index [H, W] and distance to the nearest background [H, W]."""
    x = np.asarray(image, np.float32)[..., :3]
    d = np.sqrt(((x[:, :, None, :] - _REF) ** 2).sum(-1))
    nb = len(_OBJ)
    return d.argmin(-1), d[..., nb:nb + len(_BG)].min(-1)


def _detect(image: np.ndarray) -> tuple[list[Detection], np.ndarray]:
    """Detections and the [H, W] mask of pixels belonging to them."""
    x = np.asarray(image, np.float32)[..., :3]
    canvas = min(x.shape[:2])
    scale = canvas / 64
    idx, _ = _pixel_classes(x)
    fg = idx < len(_OBJ)  # any object colour: bled edges of one object stay in one component
    is_bg = (idx >= len(_OBJ)) & (idx < len(_OBJ) + len(_BG))
    # Text strokes are <= 2 px at 64 px; a (2r+1)^2 erosion removes them, while every shape
    # (thinnest: the small cross's ~4 px arms) keeps a core.
    r = max(1, round(scale))
    core = _components(_morph(fg, r, True))
    core_sizes = np.bincount(core.ravel())
    core[np.isin(core, np.nonzero(core_sizes < max(2, 3 * scale ** 2))[0])] = 0
    labels = _propagate(core, fg)
    dets: list[tuple[Detection, np.ndarray]] = []
    for lab in np.unique(labels[labels > 0]):
        comp = labels == lab
        # Vote on the core: blurred edges take blended colours (red on white reads as pink).
        colour = _OBJ[int(np.bincount(idx[core == lab], minlength=len(_OBJ)).argmax())]
        ref = np.array(syn.COLOURS[colour], np.float32)
        # Real objects have a saturated interior; blurred text strokes (and gray halos of
        # black text, which can read as purple) are only blends and never get close to it.
        if (np.sqrt(((x[comp] - ref) ** 2).sum(-1)) < 45).sum() < 4 * scale ** 2:
            continue
        # Local background: median of background pixels around the object (textures vary it).
        near = _morph(comp, 2 * r + 1, False)
        bg = np.median(x[near & is_bg], 0) if (near & is_bg).any() else _BG[0]
        region = _morph(comp, r + 1, False) & ((labels == 0) | comp)
        m = _alpha_mask(x, region, ref, bg) | comp & (idx == _OBJ.index(colour))
        ys, xs = np.nonzero(m)
        bw, bh = np.ptp(xs) + 1, np.ptp(ys) + 1
        # Drop noise, and blurred words that merged into one wide blob (all shapes are ~square).
        if len(ys) < 20 * scale ** 2 or bw > 1.8 * bh or bh > 1.8 * bw:
            continue
        cx, cy = float(xs.mean()), float(ys.mean())
        dets.append((Detection(colour, _classify_shape(m, canvas), _nearest_slot(cx, cy, canvas),
                               int(len(ys)), (int(xs.min()), int(ys.min()), int(xs.max()),
                                              int(ys.max())), (cx, cy)), m))
    # One object per slot in this world: extra fragments in a slot are artefacts, keep the largest.
    best: dict[str, tuple[Detection, np.ndarray]] = {}
    for d, m in dets:
        if d.position not in best or d.area > best[d.position][0].area:
            best[d.position] = (d, m)
    owned = np.zeros(fg.shape, bool)
    for _, m in best.values():
        owned |= m
    keep = sorted((d for d, _ in best.values()), key=lambda d: syn.POSITIONS.index(d.position))
    return keep, owned


def detect_objects(image: np.ndarray) -> list[Detection]:
    """Objects in a uint8 [H, W, 3] image, at most one per slot, ordered by slot."""
    return _detect(image)[0]


def _font_px(canvas: int) -> int:
    return max(8, round(canvas * 12 / 64))  # as synthetic.render


@functools.lru_cache(maxsize=8)
def _word_templates(canvas: int) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Binary masks [N, H, W] of every word rendered exactly as synthetic.render places it."""
    masks, keys = [], []
    for slot in ("top", "bottom"):
        for word in syn.WORDS:
            im = Image.new("1", (canvas, canvas), 0)
            draw = ImageDraw.Draw(im)
            draw.fontmode = "1"
            draw.text((canvas / 2, syn._SLOT_CENTRE[slot][1] * canvas), word, fill=1,
                      font=syn._font(_font_px(canvas)), anchor="mm")
            masks.append(np.array(im, np.float32))
            keys.append((word, slot))
    return np.stack(masks), keys


def _ink(image: np.ndarray, owned: np.ndarray) -> np.ndarray:
    """Soft text-likeness in [0, 1]: distance from every background, with detected objects (and a
    1 px halo of their blurred edges) removed."""
    _, dbg = _pixel_classes(image)
    ink = np.clip((dbg - 30.0) / 60.0, 0.0, 1.0)
    ink[_morph(owned, 1, False)] = 0.0
    return ink


def _read(image: np.ndarray, owned: np.ndarray) -> str | None:
    canvas = min(image.shape[:2])
    ink = _ink(image, owned)
    tmpl, keys = _word_templates(canvas)
    if ink[tmpl.max(0) > 0].sum() < 4 * canvas / 64:
        return None  # nothing text-like where words are drawn
    best, best_score = None, -np.inf
    s = max(1, round(canvas / 32))  # generated text may be shifted by a pixel or two
    for dy in range(-s, s + 1):
        for dx in range(-s, s + 1):
            x = _shift(ink, dy, dx)
            # Normalised correlation (cosine) between the ink and each word mask.
            num = (tmpl * x).sum((1, 2))
            den = np.sqrt((tmpl ** 2).sum((1, 2)) * ((x * (tmpl.max(0) > 0)) ** 2).sum()) + 1e-6
            sc = num / den
            i = int(sc.argmax())
            if sc[i] > best_score:
                best, best_score = keys[i][0], float(sc[i])
    return best


def read_word(image: np.ndarray) -> str | None:
    """The best-matching word of synthetic.WORDS (any word colour), None if no text pixels."""
    return _read(image, _detect(image)[1])


def char_error_rate(pred: str | None, truth: str) -> float:
    """Levenshtein distance / len(truth); a missing prediction counts as deleting everything."""
    p = pred or ""
    row = list(range(len(p) + 1))
    for i, ct in enumerate(truth, 1):
        prev, row[0] = row[0], i
        for j, cp in enumerate(p, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ct != cp))
    return row[len(p)] / max(1, len(truth))


def analyse(image: np.ndarray) -> Analysis:
    dets, owned = _detect(image)
    return Analysis(dets, _read(image, owned))


def check_analysis(a: Analysis, scene: Scene, category: str) -> bool:
    """GenEval semantics on an analysed image (see module `check`)."""
    found = {(d.shape, d.colour, d.position) for d in a.detections}
    shapes = [d.shape for d in a.detections]
    objs = scene.objects
    if category in ("single_object", "two_objects"):
        return all(o.shape in shapes for o in objs)
    if category == "counting":
        return shapes.count(objs[0].shape) == len(objs)
    if category in ("colours", "colour_attribution"):
        return all(any(s == o.shape and c == o.colour for s, c, _ in found) for o in objs)
    if category == "position":  # absolute: each object's shape at its named slot
        return all(any(s == o.shape and p == o.position for s, _, p in found) for o in objs)
    if category == "text":
        return a.word == scene.word
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def check(image: np.ndarray, scene: Scene, category: str) -> bool:
    """single_object / two_objects: every scene shape detected; counting: exactly the scene's
    number of objects of its shape; colours / colour_attribution: each (shape, colour) pair of
    the scene detected on one object; position: each scene shape detected at its named slot
    (absolute slots, stricter than GenEval's relative check); text: read word == scene.word."""
    return check_analysis(analyse(image), scene, category)


def score(images: Sequence[np.ndarray], scenes: Sequence[Scene], category: str) -> float:
    if len(images) != len(scenes) or not scenes:
        raise ValueError(f"need equal, non-zero numbers of images and scenes: "
                         f"{len(images)} vs {len(scenes)}")
    return float(np.mean([check(im, s, category) for im, s in zip(images, scenes, strict=True)]))


def category_scenes(category: str, n: int, seed: int, split: str = "heldout") -> list[Scene]:
    """n deterministic prompt scenes; with split="heldout" every scene contains a held-out pair
    (colour+shape for objects, word+colour for "text"). Plain backgrounds; a word only in "text".
    """
    if category not in CATEGORIES or split not in syn.SPLITS:
        raise ValueError(f"bad category/split {category!r}/{split!r}")
    rng = np.random.default_rng([seed, CATEGORIES.index(category), syn.SPLITS.index(split)])
    held = split == "heldout"
    held_pairs = sorted((s, c) for c, s in syn.HELD_OUT_COLOUR_SHAPE)
    train_pairs = [(s, c) for s in syn.SHAPES for c in syn.COLOURS
                   if (c, s) not in syn.HELD_OUT_COLOUR_SHAPE]
    words = sorted(syn.HELD_OUT_WORD_COLOUR) if held else [
        (w, c) for w in syn.WORDS for c in syn.WORD_COLOURS if (w, c) not in
        syn.HELD_OUT_WORD_COLOUR]

    def pick(pool: list) -> tuple:
        return pool[int(rng.integers(len(pool)))]

    out: list[Scene] = []
    while len(out) < n:
        first = pick(held_pairs if held and category != "text" else train_pairs)
        if category in ("two_objects", "colour_attribution", "position"):
            second = pick([p for p in train_pairs if p[0] != first[0] and p[1] != first[1]])
            kinds = [first, second]
        elif category == "counting":
            kinds = [first] * int(rng.integers(2, 5))
        else:
            kinds = [first]
        pos = rng.permutation(len(syn.POSITIONS))[:len(kinds)]
        size = pick(syn.SIZES)
        objs = tuple(SceneObject(s, c, size if category == "counting" else pick(syn.SIZES),
                                 syn.POSITIONS[p]) for (s, c), p in zip(kinds, pos, strict=True))
        word = pick(words) if category == "text" else (None, None)
        if category == "text" and {"top", "bottom"} <= {o.position for o in objs}:
            continue  # no room for the word (cannot happen with one object; kept for safety)
        scene = Scene(objs, pick(list(syn.BACKGROUNDS)), "plain", *word)
        if syn.fits(scene):
            out.append(scene)
    return out
