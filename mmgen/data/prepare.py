"""`mmgen data prepare | inspect | tokenizer`: convert, look at, and learn from a dataset.

prepare  reads any source, drops what is unusable (counted by reason), and writes
         ArrayRecord shards of validated records, optionally with image tokens computed
         by an image tokenizer (then training reads tokens and never decodes pixels);
inspect  counts a source, decodes a sample of it, prints skip reasons, caption lengths and
         sample captions, and writes a contact sheet;
tokenizer trains a byte-level BPE on a source's captions and texts.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mmgen.data import transforms
from mmgen.data.records import BadExample
from mmgen.data.steps import SOURCES, open_source

SUMMARY = "summary.json"


def parse_src(spec: str) -> tuple[str, str]:
    """"KIND:PATH", or a PATH whose kind is guessed: *.tar -> wds, *.array_record ->
    arrayrecord, a folder -> its *.array_record or *.tar files, else an image folder,
    *.jsonl -> text or interleaved (from its first line)."""
    kind, sep, path = spec.partition(":")
    if sep and kind in SOURCES:
        return kind, path
    first = spec.split(",")[0]
    if ".tar" in first:
        return "wds", spec
    if ".array_record" in first:
        return "arrayrecord", spec
    if Path(first).is_dir():  # a folder of shards, or of images with captions
        root = Path(first)
        if any(root.glob("*.array_record")):
            return "arrayrecord", str(root / "*.array_record")
        if any(root.glob("*.tar")):
            return "wds", str(root / "*.tar")
        return "folder", spec
    if first.endswith(".jsonl") and Path(first).is_file():
        with open(first, "rb") as f:
            line = f.readline()
        try:
            return ("interleaved" if "content" in json.loads(line) else "text"), spec
        except (ValueError, TypeError):
            return "text", spec
    raise ValueError(f"cannot tell the kind of {spec!r}; write KIND:PATH with KIND in "
                     f"{', '.join(SOURCES)}")


class Progress:
    """One status line every few seconds (a progress bar for logs, not only terminals)."""

    def __init__(self, what: str, total: int, log=print, every_s: float = 5.0):
        self.what, self.total, self.log, self.every = what, total, log, every_s
        self.t0 = self.last = time.time()

    def update(self, done: int, extra: str = "", force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        pct = 100.0 * done / self.total if self.total else 100.0
        self.log(f"{self.what}: {done:,}/{self.total:,} ({pct:.0f}%) {extra} "
                 f"{rate:,.0f}/s eta {eta / 60:.1f} min")


def _validated(source, *, size: int, max_caption_bytes: int, max_pixels: int,
               skipped: Counter, limit: int | None) -> Iterator[tuple[dict, np.ndarray | None]]:
    """(record with a cleaned caption/text, decoded image or None) for every usable record;
    bad ones are counted in `skipped` and left out."""
    n = len(source) if limit is None else min(limit, len(source))
    for i in range(n):
        try:
            record = dict(source[i])
            pixels = None
            if record["kind"] == "pair":
                record["caption"] = transforms.clean_caption(record.get("caption") or "",
                                                             max_bytes=max_caption_bytes)
                if record.get("image") is not None:
                    pixels = transforms.decode_image(record["image"], size=size,
                                                     max_pixels=max_pixels)
                elif record.get("image_tokens") is None:
                    raise BadExample("missing_image", record.get("key", ""))
            elif record["kind"] == "text":
                record["text"] = transforms.clean_text(record.get("text") or "")
            else:
                for part in record["parts"]:
                    if "image" in part:
                        transforms.decode_image(part["image"], size=size, max_pixels=max_pixels)
            yield record, pixels
        except BadExample as e:
            skipped[e.reason] += 1


def prepare(src: str, out: str | Path, *, num_shards: int, tokenizer: str | None = None,
            image_size: int = 64, max_caption_bytes: int = 256, max_pixels: int = 50_000_000,
            keep_images: bool = True, limit: int | None = None, log=print) -> dict:
    """Writes OUT/data-XXXXX-of-NNNNN.array_record (contiguous runs of the source's order)
    and OUT/summary.json; returns the summary."""
    from mmgen.data.arrayrecord import write_array_record

    if num_shards < 1:  # ValueError: `mmgen data prepare` prints it as one line
        raise ValueError(f"--num-shards must be at least 1, got {num_shards}")
    kind, path = parse_src(src)
    source = open_source(kind, path, log=log)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    codec = None
    if tokenizer:
        from mmgen.load import ImageCodec

        codec = ImageCodec(tokenizer)
        image_size = codec.cfg.data.image_size
    skipped: Counter = Counter(source.skipped)
    index_skipped = sum(skipped.values())  # found while indexing, not in `total`
    total = len(source) if limit is None else min(limit, len(source))
    progress = Progress("prepare", total, log)
    records = _validated(source, size=image_size, max_caption_bytes=max_caption_bytes,
                         max_pixels=max_pixels, skipped=skipped, limit=limit)
    done = 0

    def tokenised() -> Iterator[dict]:
        nonlocal done
        chunk: list[tuple[dict, np.ndarray | None]] = []

        def flush():
            with_pixels = [i for i, (_, p) in enumerate(chunk) if p is not None]
            if codec is not None and with_pixels:
                ids = codec.encode(np.stack([chunk[i][1] for i in with_pixels]))
                for i, row in zip(with_pixels, ids, strict=True):
                    chunk[i][0]["image_tokens"] = row.astype(np.int16 if codec.layout
                                                             .image_codes < 2**15 else np.int32)
                    chunk[i][0]["tokens_fingerprint"] = codec.layout.image_tokenizer_id
                    if not keep_images:
                        chunk[i][0]["image"] = None
            yield from (r for r, _ in chunk)
            chunk.clear()

        for record, pixels in records:
            chunk.append((record, pixels))
            if len(chunk) == 64:
                yield from flush()
            done += 1
            progress.update(done + sum(skipped.values()) - index_skipped,
                            f"skipped {sum(skipped.values()):,}")
        yield from flush()

    stream = tokenised()
    written = 0
    per_shard = -(-total // num_shards)
    files = []
    for shard in range(num_shards):
        name = f"data-{shard:05d}-of-{num_shards:05d}.array_record"

        def take(n=per_shard):
            for _ in range(n):
                try:
                    yield next(stream)
                except StopIteration:
                    return

        written += write_array_record(out / name, take())
        files.append(name)
    progress.update(done + sum(skipped.values()) - index_skipped,
                    f"skipped {sum(skipped.values()):,}", force=True)
    summary = {
        "source": src, "kind": kind, "written": written,
        "skipped": dict(sorted(skipped.items())), "shards": files,
        "image_size": image_size,
        "image_tokenizer": codec.layout.image_tokenizer_id if codec else None,
        "read_with": f"--config.data.source=arrayrecord --config.data.path='{out}/*.array_record'",
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    log(f"wrote {written:,} records in {num_shards} shards to {out}; skipped "
        f"{sum(skipped.values()):,}" + "".join(f"\n  {r}: {c}" for r, c in sorted(skipped.items())))
    return summary


def inspect(src: str, *, limit: int = 1000, sheet: str | Path = "contact_sheet.png",
            image_size: int = 96, max_pixels: int = 50_000_000, seq_len: int = 0,
            tokens_per_image: int = 0, log=print) -> dict:
    """Counts, skip reasons and caption statistics of (the first `limit` records of) a
    source, plus a contact sheet of its first 64 usable images."""
    from mmgen.sample.grid import make_grid, save_png

    kind, path = parse_src(src)
    source = open_source(kind, path, log=log)
    skipped: Counter = Counter()
    kinds: Counter = Counter()
    caption_bytes, images, captions = [], [], []
    for record, pixels in _validated(source, size=image_size, max_caption_bytes=2**31 - 1,
                                     max_pixels=max_pixels, skipped=skipped, limit=limit):
        kinds[record["kind"]] += 1
        if record["kind"] == "pair":
            caption_bytes.append(len(record["caption"].encode()))
            if pixels is not None and len(images) < 64:
                images.append(pixels)
                captions.append(record["caption"])
    checked = min(limit, len(source))
    out = {"source": src, "kind": kind, "records": len(source),
           "index_skipped": dict(source.skipped), "checked": checked,
           "usable": sum(kinds.values()), "kinds": dict(kinds),
           "skipped": dict(sorted(skipped.items()))}
    log(f"{src} ({kind}): {len(source):,} records indexed"
        + (f", {sum(source.skipped.values()):,} skipped while indexing: "
           + ", ".join(f"{r} {c}" for r, c in source.skipped.most_common())
           if source.skipped else ""))
    log(f"checked {checked:,}: {out['usable']:,} usable "
        + " ".join(f"{k}={v}" for k, v in sorted(kinds.items()))
        + (", skipped " + ", ".join(f"{r} {c}" for r, c in skipped.most_common())
           if skipped else ", none skipped"))
    if caption_bytes:
        q = np.percentile(caption_bytes, [50, 90, 99])
        out["caption_bytes"] = {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
                                "max": int(max(caption_bytes))}
        log(f"caption bytes: p50 {q[0]:.0f}, p90 {q[1]:.0f}, p99 {q[2]:.0f}, "
            f"max {max(caption_bytes)}")
        if seq_len and tokens_per_image:
            lengths = np.asarray(caption_bytes) + tokens_per_image + 6
            # offering 97% of a row's tokens fills rows to ~96% and drops ~1% of examples
            # (first-fit, lengths like uniform 50..350 at seq_len 4096; tests/test_data_pipeline)
            per_row = 0.97 * seq_len / lengths.mean()
            out["suggested_examples_per_row"] = round(float(per_row), 2)
            log(f"with seq_len {seq_len} and {tokens_per_image} tokens per image: "
                f"data.examples_per_row={per_row:.2f} fills rows to about 96% "
                "(byte-level captions; subword captions are shorter)")
    for c in captions[:5]:
        log(f"  caption: {c!r}")
    if images:
        grid = make_grid(np.stack(images), cols=8)
        out["contact_sheet"] = str(save_png(grid, sheet))
        (Path(sheet).with_suffix(".txt")).write_text("\n".join(captions) + "\n")
        log(f"wrote {sheet} ({len(images)} images, captions in "
            f"{Path(sheet).with_suffix('.txt')})")
    return out


def texts(src: str, *, limit: int | None = None, log=print) -> Iterator[str]:
    """Every caption and text of a source (cleaned), for training a text tokenizer."""
    kind, path = parse_src(src)
    source = open_source(kind, path, log=log)
    n = len(source) if limit is None else min(limit, len(source))
    for i in range(n):
        try:
            record = source[i]
            pieces = ([record.get("caption")] if record["kind"] == "pair"
                      else [record.get("text")] if record["kind"] == "text"
                      else [p["text"] for p in record["parts"] if "text" in p])
            for piece in pieces:
                yield transforms.clean_text(piece or "")
        except BadExample:
            continue
