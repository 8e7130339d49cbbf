"""Preference pairs from the synthetic world: a caption, the image of its scene (chosen)
and the image of a scene that contradicts it in one attribute (rejected).

The rejected scene differs from the chosen one by exactly one of: an object's colour, an
object's shape, an object's slot, or the rendered word, so the only way to prefer the
chosen image is to follow the caption. Pair images are encoded once and cached on disk
(npz of ids + JSON lines of scenes, no pickle), like data/token_cache.py.

A row packs one pair as two segments: segment 1 = chosen, segment 2 = rejected, both
`<bos> caption <boi> <res> ids <eoi> <eos>`; only image tokens carry weight, so a row's
log-likelihood sums cover the response alone. Keeping a pair in one row keeps it
together under every batch split, micro-batching and sharding.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import grain
import numpy as np

from mmgen.data import synthetic as syn
from mmgen.data.pipeline import example_stream, scene_kwargs
from mmgen.data.schema import check_no_loss_in_spans, pack_row
from mmgen.tokenizers.layout import MODALITIES, TokenLayout

PERTURBATIONS = ("colour", "shape", "position", "word")


def perturb(scene: syn.Scene, rng: np.random.Generator, split: str) -> tuple[syn.Scene, str]:
    """(a scene that contradicts `scene`'s caption in one attribute, which attribute)."""
    kinds = [k for k in PERTURBATIONS if k != "word" or scene.word is not None]
    for _ in range(100):
        kind = kinds[int(rng.integers(len(kinds)))]
        objs = list(scene.objects)
        i = int(rng.integers(len(objs)))
        o = objs[i]
        if kind == "word":
            words = [w for w in syn.WORDS if w != scene.word]
            return dataclasses.replace(scene, word=words[int(rng.integers(len(words)))]), kind
        if kind == "colour":
            options = [dataclasses.replace(o, colour=c) for c in syn.COLOURS if c != o.colour]
        elif kind == "shape":
            options = [dataclasses.replace(o, shape=s) for s in syn.SHAPES if s != o.shape]
        else:
            used = {x.position for x in objs}
            if scene.word is not None:  # the word holds the bottom slot, or the top one
                used |= {"bottom"} if "bottom" not in used else {"top"}
            options = [dataclasses.replace(o, position=p) for p in syn.POSITIONS
                       if p not in used]
        if split == "train":  # the training stream never shows a held-out composition
            options = [x for x in options
                       if (x.colour, x.shape) not in syn.HELD_OUT_COLOUR_SHAPE]
        # an object identical to another one would not contradict the caption
        options = [x for x in options if x not in objs]
        if options:
            objs[i] = options[int(rng.integers(len(options)))]
            return dataclasses.replace(scene, objects=tuple(objs)), kind
    raise RuntimeError(f"could not perturb {scene}")


def pair(index: int, seed: int, split: str, data_cfg) -> dict:
    """{"chosen": Scene, "rejected": Scene, "kind"}: a pure function of its arguments."""
    rng = np.random.default_rng([seed, index, syn.SPLITS.index(split), 47])
    kwargs = scene_kwargs(data_cfg)
    kwargs.pop("size")
    chosen = syn.sample_scene(rng, split=split, **kwargs)
    rejected, kind = perturb(chosen, rng, split)
    return {"chosen": chosen, "rejected": rejected, "kind": kind}


class PairCache:
    """Encoded preference pairs: index -> {"chosen_ids", "rejected_ids", "chosen" (scene
    JSON), "kind"}; a grain random-access source."""

    def __init__(self, path: Path):
        with np.load(path / "pairs.npz", allow_pickle=False) as z:
            self.chosen_ids, self.rejected_ids = z["chosen_ids"], z["rejected_ids"]
        self.meta = [json.loads(line) for line in (path / "pairs.jsonl").read_text().splitlines()]
        if not len(self.meta) == len(self.chosen_ids) == len(self.rejected_ids):
            raise ValueError(f"pair cache {path} is inconsistent; delete it to rebuild")

    def __len__(self) -> int:
        return len(self.meta)

    def __getitem__(self, i: int) -> dict:
        return {"chosen_ids": self.chosen_ids[i], "rejected_ids": self.rejected_ids[i],
                **self.meta[i]}


def build_pairs(codec, data_cfg, *, num: int, seed: int, split: str, log=print) -> PairCache:
    """Renders and encodes `num` pairs once per (tokenizer, seed, split, num)."""
    path = Path(data_cfg.cache_dir) / (
        f"pairs-{split}-s{seed}-n{num}-{codec.layout.fingerprint}")
    if not (path / "done").exists():
        path.mkdir(parents=True, exist_ok=True)
        start, size = time.time(), data_cfg.image_size
        pairs = [pair(i, seed, split, data_cfg) for i in range(num)]
        ids = {}
        for side in ("chosen", "rejected"):
            images = np.stack([syn.render(p[side], size) for p in pairs])
            ids[side] = codec.encode(images).reshape(num, -1).astype(np.int32)
            log(f"preference pairs {split}: {num} {side} images encoded "
                f"({time.time() - start:.0f}s)")
        np.savez(path / "pairs.tmp.npz", chosen_ids=ids["chosen"], rejected_ids=ids["rejected"])
        (path / "pairs.tmp.npz").rename(path / "pairs.npz")
        (path / "pairs.jsonl").write_text("".join(
            json.dumps({"chosen": p["chosen"].to_json(), "kind": p["kind"]}) + "\n"
            for p in pairs))
        (path / "done").write_text("ok\n")
    return PairCache(path)


def response_only(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keeps loss weight on image tokens only: the caption is the shared prompt."""
    example = dict(example)
    example["loss_weight"] = example["loss_weight"] * (
        example["modality"] == MODALITIES["image"])
    return example


def pair_row(item: dict, caption: str, layout: TokenLayout, seq_len: int) -> dict:
    """One row: segment 1 = chosen, segment 2 = rejected (module docstring)."""
    chosen, rejected = (response_only(example_stream(item[f"{side}_ids"], caption, layout,
                                                     captioning=False))
                        for side in ("chosen", "rejected"))
    return pack_pair(chosen, rejected, layout, seq_len)


def pack_pair(chosen: dict, rejected: dict, layout: TokenLayout, seq_len: int) -> dict:
    """Two examples (Stream arrays, weight on their responses) as one row's segments 1, 2."""
    row = pack_row([chosen, rejected], seq_len, layout.pad)
    check_no_loss_in_spans(row)
    return row


def jsonl_pair_rows(path: str, cfg, layout: TokenLayout, codec, text_tokenizer,
                    log=print, key: str = "dpo.path") -> list[dict]:
    """Rows of a jsonl file of {"prompt", "chosen", "rejected"} (each a string or a list of
    text/image parts, as SFT's jsonl; posttrain/sft_jsonl.py): bad lines are skipped and
    counted, a pair longer than data.seq_len is too_long. `key`: the config key naming
    the file, for errors."""
    from mmgen.posttrain.sft_jsonl import load_jsonl

    d = cfg.data
    pairs, _ = load_jsonl(path, layout=layout, text_tokenizer=text_tokenizer,
                          encode=codec.encode, image_size=d.image_size, max_len=d.seq_len,
                          max_bad_fraction=d.max_bad_fraction, max_pixels=d.max_pixels,
                          responses=("chosen", "rejected"), what="dpo", key=key, log=log)
    return [pack_pair(c, r, layout, d.seq_len) for c, r in pairs]


def pair_length(layout: TokenLayout) -> int:
    """Tokens of one pair row: two text->image examples of the longest caption."""
    return 2 * (1 + syn.MAX_CAPTION_BYTES + 3 + layout.tokens_per_image + 1)


def pair_rows(source: PairCache, data_cfg, layout: TokenLayout, *, seed: int,
              shuffle: bool = True, repeat: bool = True) -> grain.MapDataset:
    """Rows of pairs; each epoch draws a fresh caption template per pair."""
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(2**40 // len(ds))

    def to_row(index: int, item: dict) -> dict:
        rng = np.random.default_rng([seed, index, 53])
        caption = syn.caption(syn.Scene.from_json(item["chosen"]), rng)
        return pair_row(item, caption, layout, data_cfg.seq_len)

    return ds.map_with_index(to_row)
