"""Checkpoint evaluation: held-out losses per modality, tokenizer quality, colour check."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen.data import pipeline, synthetic, token_cache
from mmgen.eval.colour import colour_match_rate
from mmgen.eval.image_metrics import codebook_utilisation, psnr
from mmgen.load import ImageCodec, load_run
from mmgen.sample.generate import generate_image_ids
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


_LOSS_SUMS: dict = {}  # jitted loss sums per (model structure, config): weights are args


def tokenizer_quality(codec: ImageCodec, num: int, seed: int = HELDOUT_SEED) -> dict:
    size = codec.cfg.data.image_size
    images = np.stack([synthetic.example(i, seed, "heldout", size=size)["image"]
                       for i in range(num)])
    ids = np.concatenate([codec.encode(images[i:i + 64]) for i in range(0, num, 64)])
    recon = np.concatenate([codec.decode(ids[i:i + 64]) for i in range(0, num, 64)])
    use = codebook_utilisation(ids, codec.layout.image_codes)
    return {"psnr": psnr(images, recon), "codebook_used_fraction": use["used_fraction"],
            "codebook_perplexity": use["perplexity"]}


def colour_check(model, layout, codec: ImageCodec, num: int, *, temperature: float,
                 top_k: int, cfg_scale: float, seed: int = 0):
    """Samples one image per single-object prompt of a seen composition and checks that
    the named colour dominates the object pixels. Returns (rate, images, prompts)."""
    scenes = synthetic.single_object_prompts(num, seed, "train")
    rng = np.random.default_rng(seed)
    prompts = [synthetic.caption(s, rng) for s in scenes]
    ids = generate_image_ids(model, layout, prompts, seed=seed, temperature=temperature,
                             top_k=top_k, cfg_scale=cfg_scale)
    images = codec.decode(ids)
    return colour_match_rate(list(images), scenes), images, prompts


def evaluate(run_dir: str | Path, *, step: int | None = None, tokenizer_dir: str | None = None,
             log=print) -> dict:
    """Every metric of the skeleton's eval, as a flat JSON-able dict."""
    start = time.time()
    model, cfg, layout, step = load_run(run_dir, step)
    if cfg.kind != "joint":
        raise ValueError(f"{run_dir} is a {cfg.kind!r} run; mmgen eval needs a joint model run")
    codec = ImageCodec(tokenizer_dir or cfg.tokenizer.checkpoint)
    check_same(layout, codec.layout, f"tokenizer {tokenizer_dir or cfg.tokenizer.checkpoint}")
    e = cfg.eval
    report: dict = {"checkpoint": str(run_dir), "step": step,
                    "layout_fingerprint": layout.fingerprint}
    log(f"eval: held-out losses on {e.num_heldout_scenes} scenes")
    source = heldout_source(codec, cfg, e.num_heldout_scenes, log=log)
    for k, v in sequence_losses(model, cfg, layout, source).items():
        report[f"heldout/{k}"] = v
    shuffled = sequence_losses(model, cfg, layout, ShuffledCaptions(source))
    report["heldout_shuffled_captions/nll/image"] = shuffled["nll/image"]
    log("eval: tokenizer reconstruction")
    for k, v in tokenizer_quality(codec, e.num_heldout_scenes).items():
        report[f"tokenizer/{k}"] = v
    log(f"eval: colour check on {e.num_colour_prompts} sampled images")
    rate, _, _ = colour_check(model, layout, codec, e.num_colour_prompts,
                              temperature=e.temperature, top_k=e.top_k,
                              cfg_scale=e.cfg_scale)
    report["colour/match_rate"] = rate
    report["colour/num_prompts"] = e.num_colour_prompts
    report["eval_seconds"] = time.time() - start
    return report


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return path



