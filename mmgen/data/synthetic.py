"""Built-in synthetic world: procedural scenes of coloured shapes, rendered words and captions.

Every image is generated from a known scene description, so generated images can be checked
programmatically (colour, count, position, word) and held-out compositions measure
generalisation. Pure numpy + Pillow so data workers never import JAX.

Layout (canvas of `size` px): five slots, left/right/top/bottom/center, whose bounding boxes are
disjoint, so objects never overlap. A word is drawn centred on the bottom slot if it is free,
else on the top slot; `sample_scene` never occupies both when a word is present.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon")
# Saturated and >= ~80 apart in RGB, so nearest-colour classification of blurry samples works.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 30), "purple": (130, 50, 180), "orange": (245, 135, 25),
    "cyan": (30, 190, 210), "pink": (235, 80, 170),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
# Light, low saturation: >= 150 in RGB from every object colour even after texture darkening.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250), "gray": (215, 215, 215), "beige": (238, 228, 205),
    "mint": (218, 238, 222), "sky": (214, 228, 242), "rose": (244, 224, 228),
}
# Low contrast (<= 20/255) and low frequency (period 16 px at 64 px) so a VQ tokenizer can
# reconstruct them; they only ever darken the background.
TEXTURES: tuple[str, ...] = ("plain", "stripes", "checks", "gradient")
_TEXTURE_ADJ = {"plain": "plain", "stripes": "striped", "checks": "checked", "gradient": "shaded"}
WORD_COLOURS: dict[str, tuple[int, int, int]] = {**COLOURS, "black": (20, 20, 20)}
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "tree", "bird", "fish", "car", "house", "apple", "moon", "boat", "book",
    "cake", "milk", "frog", "lamp", "rain", "snow", "ship", "door", "bell", "coin", "hat", "key",
    "leaf", "lion", "bear", "wolf", "duck", "goat", "corn", "rice", "bread", "chair", "table",
    "clock", "river", "stone", "cloud", "wind", "fire", "sand", "road", "king", "queen", "horse",
    "mouse", "tiger", "zebra", "pizza", "ball", "kite", "drum", "hand",
)
# One held-out shape per colour (every colour and shape is still seen with other partners).
HELD_OUT_COLOUR_SHAPE: frozenset[tuple[str, str]] = frozenset({
    ("red", "star"), ("green", "triangle"), ("blue", "cross"), ("yellow", "circle"),
    ("purple", "square"), ("orange", "diamond"), ("cyan", "hexagon"), ("pink", "triangle"),
})
# Every 6th word with a rotating colour: 9 pairs, each word/colour seen otherwise.
HELD_OUT_WORD_COLOUR: frozenset[tuple[str, str]] = frozenset(
    (WORDS[i], tuple(WORD_COLOURS)[i // 6]) for i in range(0, len(WORDS), 6)
)
MAX_CAPTION_BYTES: int = 56
SPLITS: tuple[str, ...] = ("train", "heldout")

_COUNT_WORDS = ("", "a", "two", "three", "four")
_POS_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
               "bottom": "at the bottom", "center": "in the center"}
# Slot centres as fractions of the canvas; with the sizes below the boxes are ~2 px apart.
_SLOT_CENTRE = {"left": (0.19, 0.5), "right": (0.81, 0.5), "top": (0.5, 0.19),
                "bottom": (0.5, 0.81), "center": (0.5, 0.5)}
_SIZE_FRAC = {"small": 0.2, "large": 0.28}


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str
    texture: str
    word: str | None = None
    word_colour: str | None = None

    def __post_init__(self) -> None:
        # Validate eagerly: a bad name would otherwise surface as a KeyError deep in render.
        bad = [o for o in self.objects if o.shape not in SHAPES or o.colour not in COLOURS
               or o.size not in SIZES or o.position not in POSITIONS]
        positions = {o.position for o in self.objects}
        if bad or not self.objects or len(positions) != len(self.objects):
            raise ValueError(f"bad objects (unknown names or repeated positions): {self.objects}")
        if (self.background not in BACKGROUNDS or self.texture not in TEXTURES
                or (self.word is None) != (self.word_colour is None)
                or (self.word is not None and self.word_colour not in WORD_COLOURS)):
            raise ValueError(f"bad background/texture/word in {self}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"objects": [dataclasses.asdict(o) for o in self.objects]}

    @classmethod
    def from_json(cls, d: dict) -> Scene:
        return cls(**(d | {"objects": tuple(SceneObject(**o) for o in d["objects"])}))


def _groups(scene: Scene) -> list[tuple[SceneObject, list[str]]]:
    """Objects with equal shape+colour+size form one count group, in order of first appearance."""
    groups: dict[tuple[str, str, str], tuple[SceneObject, list[str]]] = {}
    for o in scene.objects:
        groups.setdefault((o.shape, o.colour, o.size), (o, []))[1].append(o.position)
    return list(groups.values())


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + ("es" if shape.endswith("s") else "s")


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _natural(o: SceneObject, pos: list[str]) -> str:
    where = _POS_PHRASE[pos[0]] if len(pos) == 1 else "at the " + _join(pos)
    return f"{_COUNT_WORDS[len(pos)]} {o.size} {o.colour} {_plural(o.shape, len(pos))} {where}"


def _compact(o: SceneObject, pos: list[str]) -> str:
    count = f"{len(pos)} " if len(pos) > 1 else ""
    return f"{count}{o.size} {o.colour} {_plural(o.shape, len(pos))} " + "&".join(pos)


def _templates(scene: Scene) -> list[str]:
    """All caption variants; the last (compact) one is the shortest by construction."""
    groups = _groups(scene)
    nat = _join([_natural(o, p) for o, p in groups])
    cmp = ", ".join(_compact(o, p) for o, p in groups)
    w, c = scene.word, scene.word_colour
    has = w is not None
    return [
        nat + (f', the word "{w}" in {c}' if has else ""),
        "a scene with " + nat + (f'; text "{w}" in {c}' if has else ""),
        nat + (f' and "{w}" written in {c}' if has else ""),
        cmp + (f'; "{w}" {c}' if has else ""),
    ]


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def fits(scene: Scene) -> bool:
    """True if the scene has a caption within MAX_CAPTION_BYTES (sample_scene guarantees it)."""
    return _nbytes(_templates(scene)[-1]) <= MAX_CAPTION_BYTES


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming every object's count, size, colour, shape and position, and the word.

    The rng picks a template; if it is too long we fall back to the compact one. The background
    is appended when room remains (half the time). Scenes not from `sample_scene` whose compact
    caption is too long are truncated (lossy) to keep the byte bound absolute.
    """
    texts = _templates(scene)
    text = texts[int(rng.integers(len(texts)))]
    if _nbytes(text) > MAX_CAPTION_BYTES:
        text = texts[-1]
    bg = f", on a {_TEXTURE_ADJ[scene.texture]} {scene.background} background"
    if rng.random() < 0.5 and _nbytes(text + bg) <= MAX_CAPTION_BYTES:
        text += bg
    return text.encode("utf-8")[:MAX_CAPTION_BYTES].decode("utf-8", errors="ignore")


_COUNT_OF = {w: i for i, w in enumerate(_COUNT_WORDS) if w} | {str(i): i for i in range(1, 5)}
_SHAPE_OF = {_plural(s, n): s for s in SHAPES for n in (1, 2)}
_TEXTURE_OF = {adj: t for t, adj in _TEXTURE_ADJ.items()}
_TOKEN = re.compile(r'"([^"]*)"|[a-z0-9]+')


def parse_caption(text: str) -> dict | None:
    """Inverse of `caption`: {"objects", "word", "word_colour", "background", "texture"}.

    Objects come back as a tuple of SceneObject (in caption order); background/texture are None
    when not mentioned. Returns None if the text is not a well-formed caption.
    """
    groups: list[list] = []
    pending: dict[str, object] = {}
    out: dict = {"word": None, "word_colour": None, "background": None, "texture": None}
    after_word = groups_open = False
    for m in _TOKEN.finditer(text.lower()):
        if m.group(1) is not None:  # the quoted word; its colour is the next colour token
            out["word"], after_word, groups_open = m.group(1), True, False
            continue
        t = m.group(0)
        if after_word and t in WORD_COLOURS:
            out["word_colour"], after_word = t, False
        elif t in _COUNT_OF:
            pending = {"count": _COUNT_OF[t]}
        elif t in SIZES:
            pending["size"] = t
        elif t in COLOURS:
            pending["colour"] = t
        elif t in _SHAPE_OF:
            if "size" not in pending or "colour" not in pending:
                return None
            groups.append([pending.get("count", 1), pending["size"], pending["colour"],
                           _SHAPE_OF[t], []])
            pending, groups_open = {}, True
        elif t in POSITIONS and groups and groups_open:
            groups[-1][4].append(t)
        elif t in BACKGROUNDS:
            out["background"] = t
        elif t in _TEXTURE_OF:
            out["texture"] = _TEXTURE_OF[t]
    objects = [SceneObject(shape, colour, size, p) for count, size, colour, shape, pos in groups
               for p in pos]
    positions = [o.position for o in objects]
    if (not groups or any(g[0] != len(g[4]) for g in groups)
            or len(set(positions)) != len(positions) or (out["word"] is None) != (
                out["word_colour"] is None)):
        return None
    return out | {"objects": tuple(objects)}


def _train_ok(shape: str, colour: str) -> bool:
    return (colour, shape) not in HELD_OUT_COLOUR_SHAPE


def sample_scene(rng: np.random.Generator, *, split: str = "train", max_objects: int = 4,
                 num_objects: int | None = None, p_word: float = 0.3,
                 p_texture: float = 0.3) -> Scene:
    """Sample a scene. "train" never contains a held-out pair; "heldout" always contains one
    (one object group's colour+shape, or the word+colour, the rest being train pairs).

    Scenes whose compact caption would exceed MAX_CAPTION_BYTES are resampled (so long names
    are a little rarer in busy scenes); an optional word is dropped first if that makes it fit.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n_max = num_objects if num_objects is not None else max_objects
    if not 1 <= n_max <= 4:
        raise ValueError(f"num_objects/max_objects must be in 1..4, got {n_max}")
    train_shapes = [(s, c) for s in SHAPES for c in COLOURS if _train_ok(s, c)]
    held_shapes = sorted((s, c) for c, s in HELD_OUT_COLOUR_SHAPE)
    train_words = [(w, c) for w in WORDS for c in WORD_COLOURS
                   if (w, c) not in HELD_OUT_WORD_COLOUR]
    held_words = sorted(HELD_OUT_WORD_COLOUR)
    for _ in range(1000):
        n = num_objects if num_objects is not None else int(rng.integers(1, max_objects + 1))
        held_word = split == "heldout" and p_word > 0 and rng.random() < p_word
        has_word = held_word or rng.random() < p_word
        free = list(POSITIONS)
        if has_word:  # keep top or bottom free for the word
            free.remove(("top", "bottom")[int(rng.integers(2))])
        positions = [free[i] for i in rng.permutation(len(free))[:n]]
        kinds: list[tuple[str, str, str]] = []
        for i in range(n):
            if i > 0 and rng.random() < 0.5:  # repeat an earlier object: a count group
                kinds.append(kinds[int(rng.integers(len(kinds)))])
                continue
            pool = held_shapes if (i == 0 and split == "heldout" and not held_word) else (
                train_shapes)
            shape, colour = pool[int(rng.integers(len(pool)))]
            kinds.append((shape, colour, SIZES[int(rng.integers(2))]))
        word = None
        if has_word:
            pool = held_words if held_word else train_words
            word = pool[int(rng.integers(len(pool)))]
        texture = "plain" if rng.random() >= p_texture else TEXTURES[int(rng.integers(1, 4))]
        scene = Scene(
            objects=tuple(SceneObject(*k, p) for k, p in zip(kinds, positions, strict=True)),
            background=tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))],
            texture=texture, word=word and word[0], word_colour=word and word[1])
        if not fits(scene) and has_word and not held_word:
            scene = dataclasses.replace(scene, word=None, word_colour=None)
        if fits(scene):
            return scene
    raise RuntimeError("could not sample a scene whose caption fits MAX_CAPTION_BYTES")


def object_box(position: str, size: str, canvas: int = 64) -> tuple[int, int, int, int]:
    """Inclusive pixel box (x0, y0, x1, y1) that an object of this size at this slot stays in."""
    fx, fy = _SLOT_CENTRE[position]
    half = _SIZE_FRAC[size] * canvas / 2
    x0, y0 = round(fx * canvas - half), round(fy * canvas - half)
    return x0, y0, x0 + round(2 * half) - 1, y0 + round(2 * half) - 1


def _shape_points(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy, h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "cross":  # plus sign with arms 0.7*h wide
        a = 0.35 * h
        return [(cx - a, y0), (cx + a, y0), (cx + a, cy - a), (x1, cy - a), (x1, cy + a),
                (cx + a, cy + a), (cx + a, y1), (cx - a, y1), (cx - a, cy + a), (x0, cy + a),
                (x0, cy - a), (cx - a, cy - a)]
    if shape == "star":  # 5 points, first one straight up
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, h, 0.45 * h)
        return list(zip(cx + r * np.cos(ang), cy + r * np.sin(ang), strict=True))
    if shape == "hexagon":
        ang = np.arange(6) * np.pi / 3
        return list(zip(cx + h * np.cos(ang), cy + h * np.sin(ang), strict=True))
    raise ValueError(shape)


@functools.lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)  # bundled font: no network, no system fonts


def _background(scene: Scene, size: int) -> np.ndarray:
    img = np.broadcast_to(np.array(BACKGROUNDS[scene.background], np.int16), (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    cell = max(8, size // 8)  # half-period: >= 8 px
    shade = {"plain": 0 * yy, "stripes": 12 * ((yy // cell) % 2),
             "checks": 12 * ((yy // cell + xx // cell) % 2),
             "gradient": (20 * yy) // max(size - 1, 1)}[scene.texture]
    return np.clip(img - shade[..., None], 0, 255).astype(np.uint8)


def render_background(scene: Scene, size: int = 64) -> np.ndarray:
    """uint8 [size, size, 3]: the scene's background and texture alone (an eval's floor)."""
    return _background(scene, size).copy()


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """Deterministic uint8 [size, size, 3] image. No anti-aliasing: flat colours, crisp edges."""
    im = Image.fromarray(_background(scene, size))
    draw = ImageDraw.Draw(im)
    draw.fontmode = "1"  # no anti-aliased text either
    for o in scene.objects:
        box = object_box(o.position, o.size, size)
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":  # inset so its area is comparable to the other shapes
            m = round(0.08 * (box[2] - box[0]))
            draw.rectangle((box[0] + m, box[1] + m, box[2] - m, box[3] - m), fill=fill)
        else:
            draw.polygon(_shape_points(o.shape, box), fill=fill)
    if scene.word is not None:
        taken = {o.position for o in scene.objects}
        slot = "bottom" if "bottom" not in taken else "top"
        xy = (size / 2, _SLOT_CENTRE[slot][1] * size)
        draw.text(xy, scene.word, fill=WORD_COLOURS[scene.word_colour],
                  font=_font(max(8, round(size * 12 / 64))), anchor="mm")
    return np.array(im, dtype=np.uint8)  # writable copy


def example(index: int, seed: int, split: str = "train", size: int = 64,
            **scene_kwargs) -> dict:
    """{"scene", "image", "caption"}, a pure function of (seed, index, split, size)."""
    rng = np.random.default_rng([seed, index, SPLITS.index(split)])
    scene = sample_scene(rng, split=split, **scene_kwargs)
    return {"scene": scene, "image": render(scene, size), "caption": caption(scene, rng)}


def single_object_prompts(n: int, seed: int, split: str = "train") -> list[Scene]:
    """n single-object scenes (plain texture, no word); train or held-out colour+shape pairs."""
    rng = np.random.default_rng([seed, 7919, SPLITS.index(split)])
    return [sample_scene(rng, split=split, num_objects=1, p_word=0.0, p_texture=0.0)
            for _ in range(n)]
