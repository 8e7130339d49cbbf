"""`mmgen sample`: text -> image, image -> caption, image + instruction -> image.

Prompts run in fixed-size batches (the last one padded by repetition, every prompt
left-padded to the longest), so one compiled program serves the whole run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mmgen.sample.generate import generate_captions, generate_image_ids
from mmgen.sample.grid import make_grid, save_png
from mmgen.sample.inputs import Item, Progress, SampleError, load_image, render

DEFAULT_TEMPERATURE = {"image": 0.8, "edit": 0.8, "caption": 0.0}  # captions: greedy


def _batches(n: int, batch: int):
    for lo in range(0, n, batch):
        yield lo, min(lo + batch, n)


def _padded(xs: list, batch: int) -> list:
    """Repeats the last entry up to `batch`: the same shapes, hence the same program."""
    return xs + [xs[-1]] * (batch - len(xs))


class Sampler:
    """A loaded run plus the run-wide sampling settings of one command."""

    def __init__(self, args, model, cfg, layout, codec, text_tokenizer, log: Callable):
        self.args, self.model, self.cfg, self.layout = args, model, cfg, layout
        self.codec, self.text_tokenizer, self.log = codec, text_tokenizer, log

    def temperature(self, mode: str) -> float:
        t = self.args.temperature
        return DEFAULT_TEMPERATURE[mode] if t is None else t

    def images(self, items: list[Item]) -> np.ndarray:
        size = self.codec.cfg.data.image_size
        note = lambda m: print(m, file=sys.stderr)  # noqa: E731
        return np.stack([load_image(it.image, size, note) for it in items])

    def image_ids(self, prompts: list[str], mode: str, grid=None, sources=None) -> np.ndarray:
        """Image ids [len(prompts), h, w]; `sources` (edit) are prompt-image ids."""
        a, batch = self.args, max(1, min(self.args.batch, len(prompts)))
        min_len = max(len(self.text_tokenizer.encode(p)) for p in prompts) + 3
        if sources is not None:
            min_len += sources[0].size + 3
        h, w = grid or self.layout.image_grid
        warning = row_length_warning(min_len + h * w + 1, self.cfg.data.seq_len)
        if warning:
            print(warning, file=sys.stderr)
        progress, out = Progress(len(prompts), "images"), []
        for b, (lo, hi) in enumerate(_batches(len(prompts), batch)):
            imgs = None if sources is None else _padded(list(sources[lo:hi]), batch)
            ids = generate_image_ids(
                self.model, self.layout, _padded(prompts[lo:hi], batch), seed=a.seed + b,
                temperature=self.temperature(mode), top_k=a.top_k, top_p=a.top_p,
                cfg_scale=a.cfg, prompt_images=imgs, min_prompt_len=min_len,
                text_tokenizer=self.text_tokenizer, grid=grid)
            out.append(ids[: hi - lo])
            progress.update(hi)
        return np.concatenate(out)

    def captions(self, ids: np.ndarray) -> list[str]:
        a, batch = self.args, max(1, min(self.args.batch, len(ids)))
        max_tokens = self.cfg.data.max_caption_bytes if a.max_tokens is None else a.max_tokens
        progress, out = Progress(len(ids), "captions"), []
        for b, (lo, hi) in enumerate(_batches(len(ids), batch)):
            out += generate_captions(
                self.model, self.layout, _padded(list(ids[lo:hi]), batch), max_bytes=max_tokens,
                seed=a.seed + b, temperature=self.temperature("caption"), top_k=a.top_k,
                top_p=a.top_p, stop_ids=a.stop_ids, text_tokenizer=self.text_tokenizer,
            )[: hi - lo]
            progress.update(hi)
        return out

    def write_grid(self, ids: np.ndarray, cols: int, first_column=None) -> Path:
        """Renders ids; with `first_column` ([rows, H, W, 3]) each row starts with it."""
        a = self.args
        images = render(ids, self.codec, a.decoder, a.decoder_steps, a.seed)
        if first_column is not None:
            rows = images.reshape(len(first_column), -1, *images.shape[1:])
            images = np.concatenate([first_column[:, None], rows], 1).reshape(-1, *images.shape[1:])
            cols += 1
        sheet = make_grid(images, cols=cols)
        out = save_png(sheet, self.args.out, scale=self.args.scale)
        self.log(f"wrote {out} ({sheet.shape[1] * self.args.scale}x"
                 f"{sheet.shape[0] * self.args.scale} px)")
        return out


def row_length_warning(row_tokens: int, seq_len: int) -> str | None:
    """A one-line warning when a generation row (prompt, prompt image, the image, `<eoi>`)
    is longer than the rows the run was trained on. Not an error: RoPE runs at any
    length, but the model never saw those positions (with packed rows it may have seen
    only far shorter examples, so this only catches the sure cases)."""
    if row_tokens <= seq_len:
        return None
    return (f"mmgen sample: warning: a row of prompt + image is {row_tokens} tokens, longer "
            f"than the {seq_len}-token rows the model was trained on (data.seq_len): it has "
            f"never seen those positions, expect poor output")


def _cols(num: int, n_prompts: int) -> int:
    """One row per prompt; a single prompt's samples in a near-square grid."""
    return num if n_prompts > 1 else min(num, int(np.ceil(np.sqrt(num))))


def run_image(s: Sampler, items: list[Item], grid) -> int:
    num = 16 if s.args.num is None else s.args.num
    prompts = [it.prompt for it in items for _ in range(num)]
    h, w = grid or s.layout.image_grid
    s.log(f"sampling {len(prompts)} image(s) of {h}x{w} tokens")
    s.write_grid(s.image_ids(prompts, "image", grid=grid), _cols(num, len(items)))
    return 0


def run_edit(s: Sampler, items: list[Item]) -> int:
    num = 1 if s.args.num is None else s.args.num
    pixels = s.images(items)
    sources = s.codec.encode(pixels)
    prompts = [it.prompt for it in items for _ in range(num)]
    s.log(f"editing {len(items)} image(s), {num} sample(s) each")
    ids = s.image_ids(prompts, "edit", sources=np.repeat(sources, num, axis=0))
    s.write_grid(ids, num, first_column=pixels)
    return 0


def run_caption(s: Sampler, items: list[Item]) -> int:
    ids = s.codec.encode(s.images(items))
    captions = s.captions(ids)
    for c in captions:
        print(one_line(c), flush=True)
    out = Path(s.args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"image": str(it.image), "caption": c} for it, c in zip(items, captions, strict=True)]
    out.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def one_line(text: str) -> str:
    """`text` with control characters (newlines, tabs, ...) escaped: one caption per
    stdout line whatever a model emits; OUT.json keeps the exact text."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)


def parse_stop_ids(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        ids = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        ids = (-1,)
    if any(i < 0 for i in ids):
        raise SampleError(f"--stop-ids takes comma-separated token ids (>= 0), got {text!r}")
    return ids


def check_runs(args) -> str:
    """The image tokenizer's directory, once the metadata of every run given (checkpoint,
    tokenizer, decoder) says it is of the right kind: before any weights load."""
    from mmgen.load import check_run_kinds

    return check_run_kinds(args.checkpoint, args.step, args.tokenizer, args.decoder, "sample")


def load_sampler(args, log: Callable) -> Sampler:
    """The run, its image tokenizer (checked against the run's layout) and text tokenizer;
    a --decoder is loaded and checked against the tokenizer here, before any sampling."""
    from mmgen.load import ImageCodec, load_run, tokenizer_step
    from mmgen.sample.render import load_decoder
    from mmgen.tokenizers.layout import check_same_images
    from mmgen.tokenizers.text import tokenizer_for_run

    tok_dir = check_runs(args)
    model, cfg, layout, step = load_run(args.checkpoint, args.step)
    beyond = [i for i in args.stop_ids if i >= layout.vocab_size]
    if beyond:  # such an id is never sampled: the caption would run to --max-tokens
        raise SampleError(f"--stop-ids {beyond} are not ids of this model (its vocabulary "
                          f"has {layout.vocab_size})")
    codec = ImageCodec(tok_dir, tokenizer_step(cfg, args.tokenizer))
    check_same_images(layout, codec.layout, f"tokenizer {tok_dir}")
    if args.decoder:
        load_decoder(args.decoder).check_codec(codec)
    print(f"mmgen sample: {args.checkpoint} step {step}", file=sys.stderr)
    return Sampler(args, model, cfg, layout, codec, tokenizer_for_run(cfg, layout), log)


def check_aspect(text: str) -> None:
    """--aspect is one W:H (checked before the checkpoint loads; whether the run was trained
    on it is aspect_grid's question)."""
    from mmgen.data import buckets

    try:
        shapes = buckets.parse(text, 64, 1)  # any size: only the syntax is checked
    except ValueError:
        shapes = []
    if len(shapes) != 1 or "," in text:
        raise SampleError(f"--aspect takes one W:H between 1:5 and 5:1 (e.g. 4:3), got {text!r}")


def aspect_grid(args, cfg, codec) -> tuple[int, int]:
    """The token grid of --aspect W:H, which must be one of the run's trained buckets."""
    from mmgen.config import ConfigError
    from mmgen.data import buckets

    ds = codec.cfg.model.downsample
    trained = buckets.parse(cfg.data.get("aspect_buckets", ""), cfg.data.image_size, ds)
    (shape,) = buckets.parse(args.aspect, cfg.data.image_size, ds)
    if shape not in trained:
        names = cfg.data.get("aspect_buckets") or "none (square images only)"
        raise ConfigError(f"--aspect {args.aspect} is not one of the aspect buckets the "
                          f"model was trained on: {names}")
    return shape[0] // ds, shape[1] // ds
