"""Checkpoint evaluation: run suites, collect one flat report."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen.config import ConfigError
from mmgen.data import pipeline, synthetic, token_cache
from mmgen.eval.colour import colour_match_rate
from mmgen.load import ImageCodec, load_run
from mmgen.tokenizers.layout import check_same
from mmgen.train.losses import next_token_loss
from mmgen.train.metrics import summarise

HELDOUT_SEED = 1234  # held-out scenes are drawn with their own seed, never the training one


class ShuffledCaptions:
    """A token source whose scene descriptions are rotated by one: each image is paired
    with another scene's caption, to measure how much the caption informs the image."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.source[i])
        item["scene"] = self.source[(i + 1) % len(self.source)]["scene"]
        return item


def heldout_source(codec: ImageCodec, cfg, num: int, log=print):
    d = cfg.data
    path = token_cache.cache_path(d.cache_dir, codec.layout.fingerprint, HELDOUT_SEED,
                                  "heldout", num)
    token_cache.build(path, codec.encode, num=num, seed=HELDOUT_SEED, split="heldout",
                      scene_kwargs=pipeline.scene_kwargs(d), log=log)
    return token_cache.CachedScenes(path)


def sequence_losses(model, cfg, layout, source, batch_rows: int = 8) -> dict[str, float]:
    """Mean NLL per modality (nats per token) over every row built from `source`."""
    rows = pipeline.row_dataset(source, cfg.data, layout, shuffle=False, repeat=False)
    graphdef, params = nnx.split(model)
    sums = _loss_sums_fn(graphdef, cfg)
    total: dict[str, float] = {}
    for batch in rows.batch(batch_rows):  # last batch may be short: one extra compile
        for k, v in sums(params, batch).items():
            total[k] = total.get(k, 0.0) + float(v)
    return summarise(total)


_LOSS_SUMS: dict = {}  # jitted loss sums per (model structure, config): weights are args


def _loss_sums_fn(graphdef, cfg):
    key = (graphdef, json.dumps(cfg.to_dict(), sort_keys=True, default=str))
    if key not in _LOSS_SUMS:

        @jax.jit
        def sums(params, batch):
            m = nnx.merge(graphdef, params)
            _, metrics = next_token_loss(m, dict(batch, loss_norm=jnp.float32(1.0)), cfg)
            return {k: v for k, v in metrics.items() if k.startswith(("nll_sum/", "count/"))}

        _LOSS_SUMS[key] = sums
    return _LOSS_SUMS[key]


def colour_check(ctx, num: int, seed: int = 0):
    """Samples one image per single-object prompt of a SEEN composition and checks that
    the named colour dominates the object pixels. Returns (rate, images, prompts)."""
    from mmgen.eval.suites import _sample_images

    scenes = synthetic.single_object_prompts(num, seed, "train")
    rng = np.random.default_rng(seed)
    prompts = [synthetic.caption(s, rng) for s in scenes]
    images = _sample_images(ctx, prompts)
    return colour_match_rate(list(images), scenes), images, prompts, scenes


GENERATIVE = ("scenes", "text", "caption", "edit")  # suites that `--num` sizes


def default_num(cfg, suite: str, num: int | None = None) -> int:
    """Items a suite evaluates: `num` for the generative suites when given, else the
    config's eval.* sizes (loss/tokenizer: num_heldout_scenes, colour: num_colour_prompts)."""
    e = cfg.eval
    if num and suite in GENERATIVE:
        return num
    # .get: checkpoints written before a key existed still evaluate
    return {"loss": e.num_heldout_scenes, "tokenizer": e.num_heldout_scenes,
            "colour": e.num_colour_prompts}.get(suite, e.get("num_per_category", 500))


def evaluate(run_dir: str | Path, *, suites: Sequence[str] = ("all",), num: int | None = None,
             step: int | None = None, tokenizer_dir: str | None = None, log=print):
    """Runs `suites` on a joint-model checkpoint: (flat JSON-able report, examples by suite)."""
    from mmgen.eval.suites import SUITES, EvalContext

    start = time.time()
    names = list(SUITES) if "all" in suites else list(suites)
    unknown = set(names) - set(SUITES)
    if unknown:
        raise ConfigError(f"unknown eval suites {sorted(unknown)}; known: {list(SUITES)}")
    model, cfg, layout, step = load_run(run_dir, step)
    if cfg.kind != "joint":
        raise ConfigError(f"{run_dir} is a {cfg.kind!r} run; mmgen eval needs a joint model run")
    tok_dir = tokenizer_dir or cfg.tokenizer.checkpoint
    codec = ImageCodec(tok_dir)
    check_same(layout, codec.layout, f"tokenizer {tok_dir}")
    ctx = EvalContext(model=model, cfg=cfg, layout=layout, codec=codec, log=log)
    report: dict = {"checkpoint": str(run_dir), "step": step,
                    "layout_fingerprint": layout.fingerprint, "suites": names}
    examples = {}
    for name in names:
        n = default_num(cfg, name, num)
        t0 = time.time()
        log(f"eval suite {name} (num={n})")
        result = SUITES[name](ctx, n)
        report.update(result.metrics)
        report[f"num/{name}"] = n
        report[f"seconds/{name}"] = round(time.time() - t0, 1)
        examples[name] = result.examples
    report["eval_seconds"] = round(time.time() - start, 1)
    return report, examples
