"""Real data, one global step at a time: sources -> decoded examples -> packed rows.

The unit of the stream is the global step. Step `b` owns examples
`[b * E, (b + 1) * E)` of one global order (the sources shuffled, repeated and mixed
by weight), where E = round(train.global_batch * data.examples_per_row). Process `p`
of `n` takes examples `b * E + p, b * E + p + n, ...`, decodes them, skips and counts
bad ones, tokenises, and first-fit packs its share into its rows of the batch.

Why steps rather than a running example stream:
- the iterator state is one integer (steps consumed), so a restore continues bitwise,
  and prefetched-but-unconsumed steps are never counted as read;
- global step b reads exactly the same examples whatever the process count, so a run
  may resume on a different number of hosts (only packing inside the step differs);
- a bad example leaves a gap in its own step and never shifts later steps.
What it costs: examples that do not fit the step's rows are dropped and counted
(`data/dropped_overflow`); `mmgen data inspect` suggests an examples_per_row that keeps
rows >= 95% full with few drops.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import Counter

import grain
import jax
import numpy as np

from mmgen.data import buckets, packing, transforms
from mmgen.data.records import BadExample
from mmgen.data.schema import NULL_CAPTION, Stream, pair_stream

# data.source name -> how to open it (path, cache_dir, log) -> a grain random-access source;
# a new format is one registration here, not a branch in the pipeline
SOURCES = {
    "wds": lambda path, cache_dir, log: _sources().TarShardSource(path, cache_dir=cache_dir,
                                                                  log=log),
    "arrayrecord": lambda path, cache_dir, log: _sources().ArrayRecordSource(path, log=log),
    "folder": lambda path, cache_dir, log: _sources().FolderSource(path, log=log),
    "text": lambda path, cache_dir, log: _sources().TextSource(path, log=log),
    "interleaved": lambda path, cache_dir, log: _sources().InterleavedSource(path, log=log),
}
MIN_SEEN_FOR_BAD_CHECK = 64  # examples seen before the bad fraction can stop a run
# ...unless every one of them was bad, and a dataset at data.max_bad_fraction would read
# that few all bad less often than this (7 at 10%): a short run on data that is all bad
# (a wrong path, a broken conversion) trained on padding alone, loss 0, without a word
ALL_BAD_ODDS = 1e-6
IMAGE_SEARCH_WINDOWS = 16  # next windows an image-tokenizer step without a good image reads
_READ = dict(num_threads=2, prefetch_buffer_size=4)


class DataError(RuntimeError):
    """The data cannot feed the run (e.g. too many bad examples); one line."""


def _sources():
    from mmgen.data import sources  # epath, array_record: only when real data is used

    return sources


def open_source(kind: str, path: str, *, cache_dir: str | None = None, log=print):
    if kind not in SOURCES:
        raise ValueError(f"unknown data source {kind!r}; known: {', '.join(SOURCES)}")
    return SOURCES[kind](path, cache_dir, log)


def image_shapes(data_cfg, downsample: int) -> list[tuple[int, int]]:
    """Pixel shapes (height, width) images are cropped to: the aspect-ratio buckets, or
    the one square."""
    shapes = buckets.parse(data_cfg.get("aspect_buckets", ""), data_cfg.image_size, downsample)
    return shapes or [(data_cfg.image_size, data_cfg.image_size)]


def row_length_problem(data_cfg, layout, downsample: int = 1) -> str | None:
    """Why a row cannot hold the longest image-caption pair, or None. Subword and byte
    tokenizers both spend at most one token per caption byte."""
    tokens = max([layout.tokens_per_image] + [
        (h // downsample) * (w // downsample) for h, w in image_shapes(data_cfg, downsample)
        if data_cfg.get("aspect_buckets")])
    longest = 6 + data_cfg.max_caption_bytes + tokens  # bos boi res eoi eos
    if data_cfg.seq_len >= longest:
        return None
    return (f"data.seq_len={data_cfg.seq_len} cannot hold an image ({tokens} "
            f"tokens) with a caption of data.max_caption_bytes={data_cfg.max_caption_bytes} "
            f"(need {longest})")


def parse_mixture(spec: str) -> list[tuple[str, str, float]]:
    """"wds:DIR/{0..3}.tar=0.7;text:docs/*.jsonl=0.3" -> [(kind, path, weight), ...]."""
    out = []
    for part in (p.strip() for p in spec.split(";") if p.strip()):
        kind, sep, rest = part.partition(":")
        path, eq, weight = rest.rpartition("=")
        if not sep or not eq or kind not in SOURCES:
            raise ValueError(f"data.mixture entry {part!r} is not KIND:PATH=WEIGHT with KIND "
                             f"in {', '.join(SOURCES)}")
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"data.mixture entry {part!r}: weight {weight!r} is not a "
                             "number") from None
        if not (math.isfinite(w) and w > 0):  # nan and inf pass `w <= 0`, then break grain
            raise ValueError(f"data.mixture entry {part!r}: weight must be a positive "
                             f"finite number, got {weight!r}")
        out.append((kind, path, w))
    if not out:
        raise ValueError("data.mixture is empty")
    return out


def source_specs(data_cfg) -> list[tuple[str, str, float]]:
    if data_cfg.source == "mix":
        return parse_mixture(data_cfg.mixture)
    return [(data_cfg.source, data_cfg.path, 1.0)]


class DataStats:
    """Thread-safe counters of what the pipeline read, skipped and packed.

    Bad examples are judged against what they are a share of, in two parts:
    - left out while indexing (`index_skipped`: the whole dataset's, the same on every
      process, found once): against everything indexed, once, by `check_index`;
    - found when read (this process's, since the run started or resumed): against the
      examples read, on every step, once 64 were read, or sooner when every one read was
      bad and a dataset at the limit would rarely read that (ALL_BAD_ODDS).
    Index-time skips weighed against the examples read so far stopped healthy runs at
    step 0 (and again after every resume, and on every process of a multi-process run).
    Read counts include steps that are prefetched but not yet consumed (a few steps
    ahead)."""

    def __init__(self, max_bad_fraction: float, index_skipped: Counter | None = None,
                 indexed: int = 0):
        self.lock = threading.Lock()
        self.max_bad_fraction = max_bad_fraction
        self.index_skipped: Counter = Counter(index_skipped or {})
        self.indexed = indexed  # entries indexed: usable examples plus index_skipped
        self.read_skipped: Counter = Counter()
        self.seen = 0
        self.pack = packing.PackStats()
        self.events: Counter = Counter()  # e.g. short_steps (reported as data/<name>)

    def check_index(self) -> None:
        # the whole dataset's counts, not a sample of it: no minimum
        self._check(sum(self.index_skipped.values()), self.indexed, self.index_skipped,
                    "indexed", minimum=1)

    def record(self, seen: int, skipped: Counter, pack: packing.PackStats | None) -> None:
        with self.lock:
            self.seen += seen
            self.read_skipped.update(skipped)
            if pack is not None:
                self.pack.add(pack)
            self._check(sum(self.read_skipped.values()), self.seen, self.read_skipped, "read")

    def _check(self, bad: int, total: int, reasons: Counter, what: str,
               minimum: int = MIN_SEEN_FOR_BAD_CHECK) -> None:
        f = self.max_bad_fraction
        all_bad = bad == total > 0 and f**total < ALL_BAD_ODDS
        if (total >= minimum and bad > f * total) or all_bad:
            top = ", ".join(f"{r} {c}" for r, c in reasons.most_common(4))
            raise DataError(
                f"{bad} of {total} examples {what} were bad ({bad / total:.1%} > "
                f"data.max_bad_fraction={self.max_bad_fraction}): {top}; "
                "`mmgen data inspect PATH` lists them")

    def metrics(self) -> dict[str, float]:
        """data/examples and data/bad: examples read and how many of them were bad (the
        progress line's bad=N/M); data/bad/<reason>: index-time and read-time skips."""
        with self.lock:
            out = {"data/examples": float(self.seen),
                   "data/bad": float(sum(self.read_skipped.values())),
                   "data/indexed": float(self.indexed),
                   "data/index_skipped": float(sum(self.index_skipped.values()))}
            reasons = self.index_skipped + self.read_skipped
            out.update({f"data/bad/{r}": float(c) for r, c in reasons.items()})
            if self.pack.capacity:
                out["data/packing_efficiency"] = self.pack.efficiency
                out["data/dropped_overflow"] = float(self.pack.dropped)
            out.update({f"data/{k}": float(v) for k, v in self.events.items()})
            return out

    def note(self, event: str) -> None:
        with self.lock:
            self.events[event] += 1


@dataclasses.dataclass
class Decoded:
    """One usable example before image tokens exist: text ids and images in order."""

    kind: str                     # "pair" | "text" | "doc"
    parts: list                   # ("text", ids) | ("image", uint8 HxWx3) | ("tokens", ids)
    captioning: bool = False      # pair only: image first, caption is the target


class StepBuilder:
    """Builds this process's rows of global step b (see the module docstring)."""

    def __init__(self, data_cfg, *, global_batch: int, layout, text_tokenizer, codec=None,
                 log=print):
        self.cfg, self.layout, self.text, self.codec = data_cfg, layout, text_tokenizer, codec
        self.sources, self.stats, self.order = _open_sources(data_cfg, log)
        self.examples_per_step = round(global_batch * data_cfg.examples_per_row)
        n = jax.process_count()
        if self.examples_per_step % n:
            raise DataError(f"train.global_batch x data.examples_per_row = "
                            f"{self.examples_per_step} examples per step do not divide over "
                            f"{n} processes")
        self.rows = global_batch // n
        self.process, self.num_processes = jax.process_index(), n
        downsample = codec.cfg.model.downsample if codec is not None else 1
        self.buckets = (image_shapes(data_cfg, downsample)
                        if data_cfg.get("aspect_buckets") else None)

    # -- per example -------------------------------------------------------------------

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, index, 11])

    def _image(self, record: dict, rng) -> tuple[str, np.ndarray]:
        tokens = record.get("image_tokens")
        if tokens is not None and self.buckets and record.get("image") is not None:
            tokens = None  # square crops (prepare's): crop the image to its bucket instead
        if tokens is not None:
            if self.buckets:
                raise DataError(
                    f"{record.get('origin', record['key'])}: data.aspect_buckets needs the "
                    "images, but this record holds only square image tokens (`mmgen data "
                    "prepare --drop-images`): train without data.aspect_buckets, or prepare "
                    "without --drop-images")
            want = self.layout.image_tokenizer_id
            if record.get("tokens_fingerprint") != want:
                from mmgen.tokenizers.layout import LayoutMismatchError

                raise LayoutMismatchError(
                    f"{record.get('origin', record['key'])}: precomputed image tokens are for "
                    f"{record.get('tokens_fingerprint')}, the model's tokenizer is {want}; "
                    "re-run `mmgen data prepare --tokenizer` with this tokenizer")
            return "tokens", np.asarray(tokens)
        if record.get("image") is None:
            raise BadExample("missing_image", record.get("key", ""))
        c = self.cfg
        pixels = transforms.decode_image(
            record["image"], size=c.image_size, crop=c.crop, rng=rng, buckets=self.buckets,
            max_pixels=c.max_pixels, min_size=c.min_image_size, max_aspect=c.max_aspect)
        return "image", pixels

    def decode(self, index: int, record: dict) -> Decoded:
        """Raises BadExample for anything unusable."""
        rng = self._rng(index)
        kind = record["kind"]
        if kind == "pair":
            image = self._image(record, rng)
            caption = transforms.clean_caption(record.get("caption") or "",
                                               max_bytes=self.cfg.max_caption_bytes)
            captioning = rng.random() < self.cfg.caption_task_fraction
            if not captioning and rng.random() < self.cfg.caption_dropout:
                caption = NULL_CAPTION  # the one null caption sampling guides against
            return Decoded("pair", [("text", self.text.encode(caption)), image], captioning)
        if kind == "text":
            text = transforms.clean_text(record.get("text") or "")
            return Decoded("text", [("text", self.text.encode(text))])
        parts = []
        for part in record.get("parts") or []:
            if "text" in part:
                parts.append(("text", self.text.encode(transforms.clean_text(part["text"]))))
            else:
                parts.append(self._image({"image": part.get("image"), "key": record["key"]},
                                         rng))
        if not parts:
            raise BadExample("bad_document", "no parts")
        return Decoded("doc", parts)

    # -- per step ----------------------------------------------------------------------

    def stream(self, ex: Decoded) -> dict[str, np.ndarray]:
        if ex.kind == "pair":
            (_, text_ids), (_, image_ids) = ex.parts
            return pair_stream(self.layout, text_ids, image_ids, ex.captioning)
        s = Stream(self.layout).special("<bos>")
        budget = self.cfg.seq_len - 2  # bos + eos
        for what, ids in ex.parts:
            if what == "text":
                ids = ids[:max(budget - len(s) + 1, 0)]
                if len(ids):
                    s.text(ids)
            elif len(s) - 1 + np.size(ids) + 3 <= budget:  # images are never cut
                s.image(ids, generate=True)
            if len(s) - 1 >= budget:
                break
        return s.special("<eos>").arrays()

    def host_indices(self, step: int) -> list[int]:
        lo = step * self.examples_per_step
        return list(range(lo + self.process, lo + self.examples_per_step, self.num_processes))

    def decoded_step(self, step: int) -> tuple[list[Decoded], Counter]:
        skipped, out = Counter(), []
        for index in self.host_indices(step):
            try:
                out.append(self.decode(index, self.order[index]))
            except BadExample as e:
                skipped[e.reason] += 1
        return out, skipped

    def encode_images(self, examples: list[Decoded]) -> None:
        """Replaces decoded pixels by image token ids, all of the step's images at once."""
        where = [(i, j) for i, ex in enumerate(examples) for j, (what, _) in enumerate(ex.parts)
                 if what == "image"]
        if not where:
            return
        if self.codec is None:
            raise DataError("raw images need an image tokenizer (tokenizer.checkpoint)")
        by_shape: dict[tuple, list] = {}  # aspect buckets: one encode call per shape
        for i, j in where:
            by_shape.setdefault(examples[i].parts[j][1].shape, []).append((i, j))
        for group in by_shape.values():
            ids = self.codec.encode(np.stack([examples[i].parts[j][1] for i, j in group]))
            for (i, j), grid in zip(group, ids, strict=True):
                examples[i].parts[j] = ("tokens", grid)  # [rows, cols]: Stream reads the grid

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        examples, skipped = self.decoded_step(int(step))
        self.encode_images(examples)
        streams = []
        for ex in examples:
            ex.parts = [("image" if w == "tokens" else w, ids) for w, ids in ex.parts]
            streams.append(self.stream(ex))
        batch, stats = packing.pack(streams, self.rows, self.cfg.seq_len, self.layout.pad)
        self.stats.record(len(self.host_indices(step)), skipped, stats)
        return batch


def _open_sources(data_cfg, log):
    """(sources, DataStats holding their index-time skips, the global order) of the
    configured source or mixture; an empty source, or one mostly left out while
    indexing, is an error."""
    specs = source_specs(data_cfg)
    try:
        sources = [open_source(kind, path, cache_dir=data_cfg.get("cache_dir"), log=log)
                   for kind, path, _ in specs]
    except ValueError as e:  # a malformed captions file or path spec: one line, no traceback
        raise DataError(str(e)) from None
    skipped = Counter()
    for src in sources:
        if len(src) == 0:
            raise DataError(f"data source {src!r} holds no usable examples")
        skipped.update(src.skipped)
    indexed = sum(len(src) for src in sources) + sum(skipped.values())
    stats = DataStats(data_cfg.max_bad_fraction, skipped, indexed)
    stats.check_index()
    return sources, stats, _global_order(sources, [w for *_, w in specs], data_cfg.seed)


def _global_order(sources, weights, seed: int) -> grain.MapDataset:
    """One infinite global order of raw records: each source shuffled (a new order every
    epoch) and repeated, then interleaved by weight."""
    parts = []
    for i, src in enumerate(sources):
        ds = grain.MapDataset.source(src)
        epochs = max(2**40 // len(ds), 1)  # "forever" as a count: lengths must be finite
        # shuffle, then repeat: every example once per epoch, a new order each epoch
        parts.append(ds.shuffle(seed=seed + 1000 * i).repeat(epochs))
    if len(parts) == 1:
        return parts[0]
    total = sum(weights)
    return grain.MapDataset.mix(parts, [w / total for w in weights])


def step_dataset(builder) -> grain.IterDataset:
    """Batches of global steps 0, 1, 2, ... for this process, built on threads ahead of
    use; the state is the number of steps consumed."""
    ds = grain.MapDataset.range(2**40).map(builder)
    return ds.to_iter_dataset(grain.ReadOptions(**_READ))


class ImageStepBuilder:
    """The image tokenizer's rows: images only, `global_batch` per step.

    Step b reads global examples [b * S, (b + 1) * S) with S = global_batch plus slack
    (data.image_slack, a fraction) so that bad images can be replaced by the next good
    ones of the same step; text examples are passed over (not bad). If a step has fewer
    good images than rows, good ones are repeated (counted as data/short_steps). If its
    window holds no good image at all, this process reads its share of the next windows
    instead (at most IMAGE_SEARCH_WINDOWS; counted as data/borrowed_steps)."""

    def __init__(self, data_cfg, *, global_batch: int, downsample: int = 1, log=print):
        self.cfg = data_cfg
        self.sources, self.stats, self.order = _open_sources(data_cfg, log)
        n = jax.process_count()
        self.rows = global_batch // n
        slack = int(np.ceil(global_batch * data_cfg.image_slack / n)) * n
        self.per_step = global_batch + slack
        self.process, self.num_processes = jax.process_index(), n
        self.buckets = (image_shapes(data_cfg, downsample)
                        if data_cfg.get("aspect_buckets") else None)
        self.passed_tokens = False  # passed over a record of image tokens alone

    def _window(self, lo: int) -> tuple[list[np.ndarray], int, Counter]:
        """(good images, images tried, skipped by reason) of this process's share of the
        window starting at global example `lo`, up to `rows` images."""
        skipped, images, seen = Counter(), [], 0
        for index in range(lo + self.process, lo + self.per_step, self.num_processes):
            if len(images) == self.rows:
                break
            try:
                record = self.order[index]
            except BadExample as e:  # unreadable (a non-UTF-8 caption, a cut-off shard)
                seen += 1
                skipped[e.reason] += 1
                continue
            image = record.get("image") if record["kind"] == "pair" else None
            if image is None and record["kind"] == "doc":
                image = next((p["image"] for p in record["parts"] if "image" in p), None)
            if image is None:
                self.passed_tokens |= record.get("image_tokens") is not None
                continue
            seen += 1
            c = self.cfg
            # a batch has one shape: the first good image picks the step's bucket
            shape = images[0].shape[:2] if images else None
            try:
                images.append(transforms.decode_image(
                    image, size=shape or c.image_size, crop=c.crop,
                    buckets=None if shape else self.buckets,
                    rng=np.random.default_rng([c.seed, index, 11]), max_pixels=c.max_pixels,
                    min_size=c.min_image_size, max_aspect=c.max_aspect))
            except BadExample as e:
                skipped[e.reason] += 1
        return images, seen, skipped

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        lo = int(step) * self.per_step
        images, seen, skipped = self._window(lo)
        self.stats.record(seen, skipped, None)
        # A window with no good image is bad luck at small per-process batches, not bad
        # data (the bad-fraction rule judges that): borrow the next windows' images. They
        # depend on the step alone, so a resume reads the same; they are counted when
        # their own step reads them, not here.
        for k in range(1, IMAGE_SEARCH_WINDOWS + 1):
            if images:
                break
            images, _, _ = self._window(lo + k * self.per_step)
            if images:
                self.stats.note("borrowed_steps")
        if not images:
            raise DataError(f"step {step}: no usable image among {self.per_step} examples "
                            f"and the next {IMAGE_SEARCH_WINDOWS * self.per_step}; " + (
                                "they hold image tokens alone (`mmgen data prepare "
                                "--drop-images`), and the image tokenizer trains on images"
                                if self.passed_tokens else "does data.path hold images?"))
        if len(images) < self.rows:
            self.stats.note("short_steps")
            images += [images[i % len(images)] for i in range(self.rows - len(images))]
        return {"images": np.stack(images)}
