"""Eval suites: each turns a checkpoint into metrics and a few example images.

A suite is `fn(ctx, num) -> SuiteResult`, registered in SUITES; `mmgen eval --suite`
runs any subset. Adding a suite is writing one function here (see docs/eval.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
from PIL import Image

from mmgen.data import edits, synthetic
from mmgen.eval import scene_checker
from mmgen.eval.colour import colour_match_rate, dominant_object_colour
from mmgen.eval.heldout import (
    HELDOUT_SEED,
    ShuffledCaptions,
    heldout_source,
    sequence_losses,
    stream_losses,
)
from mmgen.eval.image_metrics import codebook_utilisation, psnr, ssim
from mmgen.sample.generate import generate_captions, generate_image_ids
from mmgen.tokenizers.text import BYTES, TextTokenizer

BATCH = 64           # prompts per generation batch (one compiled shape from 64 prompts on)


def batch_width(num: int) -> int:
    """Rows per generation batch for `num` prompts: BATCH, or for fewer prompts the next
    power of two (at least 8), so `--num 16` samples 16 rows, not 64 of which 48 are
    thrown away. Sampling keys are drawn per row (threefry counters by element), so a
    prompt gets the same tokens at any width, up to the float rounding of other shapes."""
    return min(BATCH, max(8, 1 << max(0, num - 1).bit_length()))


@dataclasses.dataclass
class EvalContext:
    model: object
    cfg: object
    layout: object
    codec: object      # load.ImageCodec
    log: Callable[[str], None] = print
    text_tokenizer: TextTokenizer = BYTES  # the run's (text.tokenizer_for_run)
    # renders generated ids: a diffusion decoder run (docs/decoder.md) or, when None, the
    # tokenizer's own decoder; tokenizer-quality metrics always use the tokenizer's
    decoder_dir: str | None = None
    decoder_steps: int | None = None
    # "heldout": compositions no training image contains (the default, what the targets
    # are scored on); "train": fresh scenes of seen compositions, for the generalisation gap
    split: str = "heldout"

    def render(self, ids: np.ndarray, seed: int = 0) -> np.ndarray:
        from mmgen.sample.render import render_images

        return render_images(ids, self.codec, self.decoder_steps, self.decoder_dir, seed)


@dataclasses.dataclass
class Example:
    """One evaluated item, for best/worst grids in the report."""

    category: str
    prompt: str
    image: np.ndarray
    ok: bool


@dataclasses.dataclass
class SuiteResult:
    metrics: dict[str, float]
    examples: list[Example] = dataclasses.field(default_factory=list)


SUITES: dict[str, Callable[[EvalContext, int], SuiteResult]] = {}


def register_suite(name: str):
    def wrap(fn):
        SUITES[name] = fn
        return fn

    return wrap


def _sample_images(ctx: EvalContext, prompts: list[str], prompt_images=None) -> np.ndarray:
    """Generates one image per prompt in fixed-shape batches; uint8 [N, H, W, 3]."""
    e = ctx.cfg.eval
    min_len = 3 + synthetic.MAX_CAPTION_BYTES + (0 if prompt_images is None
                                                  else ctx.layout.tokens_per_image + 3)
    out = []
    width = batch_width(len(prompts))
    for lo in range(0, len(prompts), width):
        chunk = prompts[lo:lo + width]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (width - n)  # same shape every batch
        images = None
        if prompt_images is not None:
            images = list(prompt_images[lo:lo + width])
            images += [images[-1]] * (width - n)
        ids = generate_image_ids(ctx.model, ctx.layout, chunk, seed=lo, temperature=e.temperature,
                                 top_k=e.top_k, cfg_scale=e.cfg_scale, prompt_images=images,
                                 min_prompt_len=min_len, text_tokenizer=ctx.text_tokenizer)
        out.append(ctx.render(ids[:n], seed=lo))
        ctx.log(f"  generated {min(lo + width, len(prompts))}/{len(prompts)}")
    return np.concatenate(out)


def _captions(scenes, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [synthetic.caption(s, rng) for s in scenes]


@register_suite("scenes")
def scenes_suite(ctx: EvalContext, num: int) -> SuiteResult:
    """GenEval-style categories on held-out compositions, scored by the scene checker."""
    metrics, examples = {}, []
    categories = [c for c in scene_checker.CATEGORIES if c != "text"]
    for cat in categories:
        metrics[f"scenes/{cat}"], exs = category_score(ctx, cat, num)
        examples += exs
    metrics["scenes/overall"] = float(np.mean([metrics[f"scenes/{c}"] for c in categories]))
    return SuiteResult(metrics, examples)


def category_score(ctx: EvalContext, category: str, num: int) -> tuple[float, list[Example]]:
    """The scene checker's pass rate on `num` held-out prompts of one category (for "text":
    the read word equals the prompted one)."""
    scenes = scene_checker.category_scenes(category, num, HELDOUT_SEED, ctx.split)
    prompts = _captions(scenes, HELDOUT_SEED)
    ctx.log(f"scenes/{category}: {num} prompts")
    images = _sample_images(ctx, prompts)
    oks = [scene_checker.check(im, s, category) for im, s in zip(images, scenes, strict=True)]
    return float(np.mean(oks)), [Example(category, p, im, ok)
                                 for p, im, ok in zip(prompts, images, oks, strict=True)]


@register_suite("text")
def text_suite(ctx: EvalContext, num: int) -> SuiteResult:
    """Rendered words: exact-word accuracy and character error rate."""
    scenes = scene_checker.category_scenes("text", num, HELDOUT_SEED, ctx.split)
    prompts = _captions(scenes, HELDOUT_SEED)
    ctx.log(f"text: {num} prompts")
    images = _sample_images(ctx, prompts)
    words = [scene_checker.read_word(im) for im in images]
    exact = [w == s.word for w, s in zip(words, scenes, strict=True)]
    cer = [scene_checker.char_error_rate(w, s.word) for w, s in zip(words, scenes, strict=True)]
    return SuiteResult({"text/exact_word": float(np.mean(exact)),
                        "text/char_error_rate": float(np.mean(cer))},
                       [Example("text", p, im, ok)
                        for p, im, ok in zip(prompts, images, exact, strict=True)])


def _objects(objs) -> list[tuple]:
    return sorted((o.colour, o.shape, o.size, o.position) for o in objs)


@register_suite("caption")
def caption_suite(ctx: EvalContext, num: int) -> SuiteResult:
    """Image -> caption on held-out scenes: does the caption parse back to the scene?"""
    rng = np.random.default_rng([HELDOUT_SEED, 5])
    scenes = [synthetic.sample_scene(rng, split=ctx.split, p_texture=0.0) for _ in range(num)]
    images = np.stack([synthetic.render(s, ctx.cfg.data.image_size) for s in scenes])
    ctx.log(f"caption: {num} images")
    ids = ctx.codec.encode(images)
    captions: list[str] = []
    for lo in range(0, num, BATCH):
        captions += generate_captions(ctx.model, ctx.layout, list(ids[lo:lo + BATCH]),
                                      max_bytes=synthetic.MAX_CAPTION_BYTES,
                                      text_tokenizer=ctx.text_tokenizer)
    parsed = [synthetic.parse_caption(c) for c in captions]
    exact, pairs_f1 = [], []
    for p, s in zip(parsed, scenes, strict=True):
        if p is None:
            exact.append(False)
            pairs_f1.append(0.0)
            continue
        exact.append(_objects(p["objects"]) == _objects(s.objects) and p["word"] == s.word)
        got = {(o.colour, o.shape) for o in p["objects"]}
        want = {(o.colour, o.shape) for o in s.objects}
        tp = len(got & want)
        pairs_f1.append(2 * tp / (len(got) + len(want)) if got or want else 1.0)
    return SuiteResult({"caption/parse_rate": float(np.mean([p is not None for p in parsed])),
                        "caption/exact_scene": float(np.mean(exact)),
                        "caption/colour_shape_f1": float(np.mean(pairs_f1))},
                       [Example("caption", c, im, ok)
                        for c, im, ok in zip(captions, images, exact, strict=True)])


def _found(dets, o) -> bool:
    return any((d.colour, d.shape, d.position) == (o.colour, o.shape, o.position) for d in dets)


def _edit_scores(im: np.ndarray, p: dict) -> tuple[bool, bool]:
    """(applied, preserved) of one edited image against its edit pair."""
    dets = scene_checker.detect_objects(im)
    tgt, src, changed = p["target"], p["source"], p["changed"]
    if p["kind"] == "change_word":
        applied = scene_checker.read_word(im) == tgt.word
    elif p["kind"] == "remove":
        gone = [o for o in src.objects if o not in tgt.objects]
        applied = not any(_found(dets, o) for o in gone)
    else:
        applied = _found(dets, changed)
    rest = [o for o in tgt.objects if o != changed]
    return applied, all(_found(dets, o) for o in rest)


@register_suite("edit")
def edit_suite(ctx: EvalContext, num: int) -> SuiteResult:
    """Image + instruction -> image on held-out edit pairs: edit applied, rest unchanged."""
    pairs = [edits.edit_pair(i, HELDOUT_SEED, ctx.split) for i in range(num)]
    size = ctx.cfg.data.image_size
    sources = ctx.codec.encode(np.stack([synthetic.render(p["source"], size) for p in pairs]))
    ctx.log(f"edit: {num} pairs")
    images = _sample_images(ctx, [p["instruction"] for p in pairs], list(sources))
    applied, kept = zip(*(_edit_scores(im, p) for im, p in zip(images, pairs, strict=True)),
                        strict=True)
    exact = [a and k for a, k in zip(applied, kept, strict=True)]
    # The same scores for the target's bare background: a removal is "applied" and a
    # one-object edit has nothing else to "preserve" without drawing anything, so these
    # are the floor a model must beat (about 0.2 and 0.3 on the held-out pairs).
    blank = [synthetic.render_background(p["target"], size) for p in pairs]
    floor = [_edit_scores(im, p) for im, p in zip(blank, pairs, strict=True)]
    metrics = {"edit/applied": float(np.mean(applied)), "edit/preserved": float(np.mean(kept)),
               "edit/exact": float(np.mean(exact)),
               "edit/applied_blank": float(np.mean([a for a, _ in floor])),
               "edit/preserved_blank": float(np.mean([k for _, k in floor]))}
    return SuiteResult(metrics, [Example("edit", p["instruction"], im, ok)
                                 for p, im, ok in zip(pairs, images, exact, strict=True)])


@register_suite("edit_loss")
def edit_loss_suite(ctx: EvalContext, num: int) -> SuiteResult:
    """Held-out edit pairs: NLL (nats per token) of the target image, its <eoi> and <eos>
    given the source image and the instruction: SFT's objective on held-out pairs. It moves
    before sampled edits do."""
    pairs = [edits.edit_pair(i, HELDOUT_SEED, ctx.split) for i in range(num)]
    size = ctx.cfg.data.image_size
    ids = {side: ctx.codec.encode(np.stack([synthetic.render(p[side], size) for p in pairs]))
           for side in ("source", "target")}
    ctx.log(f"edit_loss: {num} pairs")
    streams = [edits.edit_stream(s, p["instruction"], t, ctx.layout, ctx.text_tokenizer)
               for s, t, p in zip(ids["source"], ids["target"], pairs, strict=True)]
    losses = stream_losses(ctx.model, ctx.cfg, streams, ctx.layout.pad)
    return SuiteResult({"edit_loss/nll": losses["nll/all"],
                        "edit_loss/nll_image": losses["nll/image"]})


@register_suite("tokenizer")
def tokenizer_suite(ctx: EvalContext, num: int) -> SuiteResult:
    """Reconstruction quality of the image tokenizer on held-out renders."""
    size = ctx.cfg.data.image_size
    images = np.stack([synthetic.example(i, HELDOUT_SEED, ctx.split, size=size)["image"]
                       for i in range(num)])
    ids = ctx.codec.encode(images)
    recon = ctx.codec.decode(ids)
    use = codebook_utilisation(ids, ctx.layout.image_codes)
    metrics = {"tokenizer/psnr": psnr(images, recon), "tokenizer/ssim": ssim(images, recon),
               "tokenizer/codebook_used_fraction": use["used_fraction"],
               "tokenizer/codebook_perplexity": use["perplexity"]}
    # The checker on reconstructions of ground truth: the best score any generator that
    # goes through this tokenizer can reach, per category.
    for cat in scene_checker.CATEGORIES:
        scenes = scene_checker.category_scenes(cat, num, HELDOUT_SEED, ctx.split)
        truth = np.stack([synthetic.render(s, size) for s in scenes])
        rec = ctx.codec.decode(ctx.codec.encode(truth))
        metrics[f"tokenizer/checker_ceiling/{cat}"] = scene_checker.score(rec, scenes, cat)
    photos = real_photos(size)
    if photos is not None:  # optional extra: real photographs, far from the training data
        rec = ctx.codec.decode(ctx.codec.encode(photos))
        metrics["tokenizer/photo_psnr"] = psnr(photos, rec)
        metrics["tokenizer/photo_ssim"] = ssim(photos, rec)
    return SuiteResult(metrics,
                       [Example("tokenizer", "", np.concatenate([a, b], 1), True)
                        for a, b in zip(images[:8], recon[:8], strict=True)])


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel")


def real_photos(size: int) -> np.ndarray | None:
    """scikit-image's bundled photos (the `photos` extra), centre-cropped and resized to
    `size`; None when scikit-image is not installed. No download is ever attempted."""
    try:
        from skimage import data
    except ImportError:
        return None
    out = []
    for name in PHOTOS:
        img = Image.fromarray(getattr(data, name)()[..., :3])
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
        out.append(np.asarray(img.resize((size, size), Image.BICUBIC), np.uint8))
    return np.stack(out)


@register_suite("loss")
def loss_suite(ctx: EvalContext, num: int) -> SuiteResult:
    """Per-modality NLL on held-out scenes, with true and with shuffled captions."""
    source = heldout_source(ctx.codec, ctx.cfg, num, log=ctx.log, split=ctx.split)
    true = sequence_losses(ctx.model, ctx.cfg, ctx.layout, source,
                           text_tokenizer=ctx.text_tokenizer)
    shuffled = sequence_losses(ctx.model, ctx.cfg, ctx.layout, ShuffledCaptions(source),
                               text_tokenizer=ctx.text_tokenizer)
    m = {f"loss/nll/{k.split('/', 1)[1]}": v for k, v in true.items() if k.startswith("nll/")}
    m["loss/shuffled_captions/nll/image"] = shuffled["nll/image"]
    m["loss/caption_gain/image"] = shuffled["nll/image"] - true["nll/image"]
    # bits per dimension: nats per image -> bits per colour channel of each pixel
    size = ctx.cfg.data.image_size
    m["loss/image_bits_per_dim"] = (true["nll/image"] * ctx.layout.tokens_per_image
                                    / (size * size * 3) / math.log(2))
    return SuiteResult(m)


@register_suite("colour")
def colour_suite(ctx: EvalContext, num: int) -> SuiteResult:
    """Seen single-object compositions (issue 3's check): one sample per prompt; does the
    named colour dominate the object pixels?"""
    scenes = synthetic.single_object_prompts(num, 0, "train")
    prompts = _captions(scenes, 0)
    images = _sample_images(ctx, prompts)
    oks = [dominant_object_colour(im) == s.objects[0].colour
           for im, s in zip(images, scenes, strict=True)]
    return SuiteResult({"colour/match_rate": colour_match_rate(list(images), scenes)},
                       [Example("colour", p, im, ok)
                        for p, im, ok in zip(prompts, images, oks, strict=True)])
