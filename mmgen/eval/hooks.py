"""Train-loop hooks that evaluate or draw: they only read the state the loop hands them."""

from __future__ import annotations

import jax
import numpy as np

from mmgen.data import synthetic
from mmgen.eval.evaluate import default_num
from mmgen.eval.suites import SUITES, EvalContext
from mmgen.sample.generate import generate_image_ids
from mmgen.sample.grid import make_grid, save_png
from mmgen.tokenizers.image_autoencoder import images_to_unit, unit_to_images
from mmgen.tokenizers.text import TextTokenizer, tokenizer_for_run
from mmgen.train.hooks import Context, Hook

GRID_PROMPTS = 8


class _RunTextTokenizer:
    """Loads the run's text tokenizer on first use, then keeps it: a large tokenizer.json
    is parsed and hashed once per run, not at every hook call."""

    _text_tokenizer: TextTokenizer | None = None

    def text_tokenizer(self, ctx: Context) -> TextTokenizer:
        if self._text_tokenizer is None:
            self._text_tokenizer = tokenizer_for_run(ctx.cfg, ctx.layout)
        return self._text_tokenizer


class EvalHook(_RunTextTokenizer, Hook):
    """Runs the suites in `eval.hook_suites` on the current weights; `eval/...` scalars."""

    def __init__(self, every: int, codec):
        self.every, self.codec = every, codec

    def __call__(self, ctx: Context) -> None:
        ectx = EvalContext(model=ctx.model(), cfg=ctx.cfg, layout=ctx.layout, codec=self.codec,
                           log=lambda *_: None, text_tokenizer=self.text_tokenizer(ctx))
        metrics = {}
        for name in [s.strip() for s in ctx.cfg.eval.hook_suites.split(",") if s.strip()]:
            metrics.update(SUITES[name](ectx, default_num(ctx.cfg, name)).metrics)
        ctx.writer.scalars(ctx.step, {f"eval/{k}": v for k, v in metrics.items()})


def _save_grid(ctx: Context, grid: np.ndarray, tag: str) -> None:
    """Every process generates (the model is sharded across them); only process 0 writes
    the PNG (the writer already logs from process 0 only)."""
    if jax.process_index() == 0:
        save_png(grid, ctx.workdir / "samples" / f"step_{ctx.step:07d}.png", scale=2)
    ctx.writer.image(ctx.step, tag, grid)


class SampleGridHook(_RunTextTokenizer, Hook):
    """Generates images for a fixed set of prompts; PNG in workdir/samples + TensorBoard."""

    def __init__(self, every: int, codec):
        self.every, self.codec = every, codec

    def __call__(self, ctx: Context) -> None:
        rng = np.random.default_rng(0)
        scenes = [synthetic.sample_scene(rng, num_objects=1 + i % 2) for i in range(GRID_PROMPTS)]
        prompts = [synthetic.caption(s, rng) for s in scenes]
        e = ctx.cfg.eval
        ids = generate_image_ids(ctx.model(), ctx.layout, prompts, seed=ctx.step,
                                 temperature=e.temperature, top_k=e.top_k, cfg_scale=e.cfg_scale,
                                 text_tokenizer=self.text_tokenizer(ctx))
        truth = np.stack([synthetic.render(s) for s in scenes])
        grid = make_grid(np.concatenate([truth, self.codec.decode(ids)]), cols=GRID_PROMPTS)
        _save_grid(ctx, grid, "samples")


class ReconstructionGridHook(Hook):
    """Tokenizer runs: ground truth (top) over reconstructions (bottom)."""

    def __init__(self, every: int):
        self.every = every

    def __call__(self, ctx: Context) -> None:
        size = ctx.cfg.data.image_size
        images = np.stack([synthetic.example(i, 1234, "heldout", size=size)["image"]
                           for i in range(8)])
        recon = unit_to_images(ctx.model()(images_to_unit(images))[0])
        grid = make_grid(np.concatenate([images, recon]), cols=8)
        _save_grid(ctx, grid, "reconstructions")
