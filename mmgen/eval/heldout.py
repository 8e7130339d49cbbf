"""Held-out sequences: token caches of held-out scenes and their per-modality losses."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen.data import pipeline
from mmgen.data.schema import pack_row
from mmgen.load import ImageCodec
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


def heldout_source(codec: ImageCodec, cfg, num: int, log=print, split: str = "heldout"):
    """Token source of `num` eval scenes (held-out compositions, or with split="train"
    fresh scenes of seen ones), drawn with the eval's own seed."""
    from mmgen.tasks import synthetic_tokens  # tasks imports eval lazily: no cycle

    return synthetic_tokens(codec, cfg.data, split=split, num=num, seed=HELDOUT_SEED,
                            log=log)


def sequence_losses(model, cfg, layout, source, batch_rows: int = 8,
                    text_tokenizer=None) -> dict[str, float]:
    """Mean NLL per modality (nats per token) over every row built from `source`."""
    kwargs = {} if text_tokenizer is None else {"text_tokenizer": text_tokenizer}
    rows = pipeline.row_dataset(source, cfg.data, layout, shuffle=False, repeat=False,
                                **kwargs)
    graphdef, params = nnx.split(model)
    sums = _loss_sums_fn(graphdef, cfg)
    total: dict[str, float] = {}
    for batch in rows.batch(batch_rows):  # last batch may be short: one extra compile
        for k, v in sums(params, batch).items():
            total[k] = total.get(k, 0.0) + float(v)
    return summarise(total)


def stream_losses(model, cfg, streams: list[dict], pad_id: int, batch_rows: int = 8
                  ) -> dict[str, float]:
    """Mean NLL per modality (`nll/<m>`) and over all weighted tokens (`nll/all`) of example
    streams (Stream arrays), one per row of the longest stream's length (empty rows fill
    the last batch)."""
    length = max(len(s["tokens"]) for s in streams)
    rows = [pack_row([s], length, pad_id) for s in streams]
    rows += [pack_row([], length, pad_id)] * (-len(rows) % batch_rows)
    graphdef, params = nnx.split(model)
    sums = _loss_sums_fn(graphdef, cfg)
    total: dict[str, float] = {}
    for lo in range(0, len(rows), batch_rows):
        batch = {k: np.stack([r[k] for r in rows[lo:lo + batch_rows]]) for k in rows[0]}
        for k, v in sums(params, batch).items():
            total[k] = total.get(k, 0.0) + float(v)
    total["nll_sum/all"] = sum(v for k, v in total.items() if k.startswith("nll_sum/"))
    total["count/all"] = sum(v for k, v in total.items() if k.startswith("count/"))
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
