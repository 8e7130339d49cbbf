"""grain pipelines: synthetic images for the tokenizer, packed token rows for the
joint model. Every random choice is seeded by (seed, example index), so the stream
is a pure function of the step and the iterator state is a small JSON dict."""

from __future__ import annotations

import grain
import jax
import numpy as np

from mmgen.data import synthetic
from mmgen.data.schema import NULL_CAPTION, check_no_loss_in_spans, pack_row, pair_stream
from mmgen.tokenizers import text as text_tok
from mmgen.tokenizers.layout import TokenLayout

_READ = dict(num_threads=2, prefetch_buffer_size=4)


def scene_kwargs(data_cfg) -> dict:
    """Keyword arguments of synthetic.example taken from the data config."""
    return dict(size=data_cfg.image_size, max_objects=data_cfg.max_objects,
                p_word=data_cfg.p_word, p_texture=data_cfg.p_texture)


def _host_slice(ds: grain.MapDataset) -> grain.MapDataset:
    # Each process reads a disjoint, interleaved subset of the global stream.
    return ds[jax.process_index()::jax.process_count()]


def image_dataset(data_cfg, per_host_batch: int, *, split: str = "train") -> grain.IterDataset:
    """Batches of {"images": uint8 [B,H,W,3]} of freshly rendered synthetic scenes."""
    kwargs = scene_kwargs(data_cfg)
    ds = grain.MapDataset.range(2**62).map(
        lambda i: {"images": synthetic.example(int(i), data_cfg.seed, split, **kwargs)["image"]}
    )
    ds = _host_slice(ds).batch(per_host_batch, drop_remainder=True)
    return ds.to_iter_dataset(grain.ReadOptions(**_READ))


def example_stream(image_ids: np.ndarray, caption: str, layout: TokenLayout,
                   captioning: bool, text_tokenizer=text_tok.BYTES) -> dict[str, np.ndarray]:
    """One training example: text->image, or (captioning) prompt image->text
    (schema.pair_stream)."""
    return pair_stream(layout, text_tokenizer.encode(caption), image_ids, captioning)


def max_example_length(layout: TokenLayout) -> int:
    return 1 + synthetic.MAX_CAPTION_BYTES + 3 + layout.tokens_per_image + 1


def row_length_problem(data_cfg, layout: TokenLayout) -> str | None:
    """Why rows of data.seq_len cannot hold data.examples_per_row examples, or None."""
    longest = max_example_length(layout)
    need = data_cfg.examples_per_row * longest
    if data_cfg.seq_len >= need:
        return None
    return (f"data.seq_len={data_cfg.seq_len} cannot hold data.examples_per_row="
            f"{data_cfg.examples_per_row} examples of up to {longest} tokens (need {need})")


def row_dataset(source, data_cfg, layout: TokenLayout, *, shuffle: bool = True,
                repeat: bool = True, text_tokenizer=text_tok.BYTES) -> grain.MapDataset:
    """Packed rows (dicts of [L] arrays) from a source of {"image_ids", "scene"}.

    Captions are byte-level for training (the synthetic source); eval passes the run's
    own text tokenizer so held-out losses work for any text vocabulary."""
    length, k = data_cfg.seq_len, int(data_cfg.examples_per_row)
    problem = row_length_problem(data_cfg, layout)
    if problem:
        raise ValueError(problem)
    seed = data_cfg.seed
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:  # "forever" as a finite count: grain's lengths must fit in an index
        ds = ds.repeat(2**40 // len(ds))

    def to_example(index: int, item: dict) -> dict:
        rng = np.random.default_rng([seed, index, 7])
        scene = synthetic.Scene.from_json(item["scene"])
        captioning = rng.random() < data_cfg.caption_task_fraction
        text = synthetic.caption(scene, rng)
        if not captioning and rng.random() < data_cfg.caption_dropout:
            text = NULL_CAPTION  # teaches the unconditional image model used for guidance
        return example_stream(item["image_ids"], text, layout, captioning, text_tokenizer)

    def to_row(examples: list[dict]) -> dict:
        row = pack_row(examples, length, layout.pad)
        check_no_loss_in_spans(row)
        return row

    ds = ds.map_with_index(to_example).batch(k, batch_fn=list).map(to_row)
    return ds


def batches(rows: grain.MapDataset, per_host_batch: int) -> grain.IterDataset:
    """Host-local batches of rows, prefetched on threads."""
    ds = _host_slice(rows).batch(per_host_batch, drop_remainder=True)
    return ds.to_iter_dataset(grain.ReadOptions(**_READ))


def to_global(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """Assembles the global batch from each process's slice."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}

