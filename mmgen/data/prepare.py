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

from mmgen.data import paths, transforms
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
    if ":" not in spec:  # a local path, not KIND:PATH with an unknown KIND or a URL
        paths.expand(spec)  # FileNotFoundError when it does not exist, not "cannot tell"
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


def _said(skipped: Counter) -> str:
    """Skip counts as one line: "bad_json 2, missing_text 1", most common first."""
    return ", ".join(f"{r} {c}" for r, c in skipped.most_common())


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


def _refuse_used_out(out: Path) -> None:
    """A second prepare into the same folder would put both sets' shards under the summary's
    read_with glob (OUT/*.array_record), so training would read both: refuse, before any
    data is read, and delete nothing."""
    from mmgen.sample.grid import file_in_the_way

    blocking = file_in_the_way(out)
    if blocking is not None:
        raise ValueError(f"--out {out}: {blocking} is a file, not a directory")
    shards = sorted(out.glob("*.array_record")) if out.is_dir() else []
    held = [f"{len(shards)} shard(s) such as {shards[0].name}"] if shards else []
    if (out / SUMMARY).exists():
        held.append(f"{SUMMARY} from an earlier prepare")
    if held:
        raise ValueError(f"--out {out} already holds {' and '.join(held)}; pick an empty or "
                         "new --out")


def prepare(src: str, out: str | Path, *, num_shards: int, tokenizer: str | None = None,
            image_size: int = 64, max_caption_bytes: int = 256, max_pixels: int = 50_000_000,
            keep_images: bool = True, limit: int | None = None, log=print) -> dict:
    """Writes OUT/data-XXXXX-of-NNNNN.array_record (contiguous runs of the source's order)
    and OUT/summary.json; returns the summary."""
    from mmgen.data.arrayrecord import write_array_record

    if num_shards < 1:  # ValueError: `mmgen data prepare` prints it as one line
        raise ValueError(f"--num-shards must be at least 1, got {num_shards}")
    if not keep_images and not tokenizer:  # without tokens a record would hold nothing
        raise ValueError("--drop-images needs --tokenizer RUN: it stores image tokens "
                         "instead of the images")
    out = Path(out)
    _refuse_used_out(out)
    kind, path = parse_src(src)
    source = open_source(kind, path, log=log)
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
            held = record.get("tokens_fingerprint")
            if codec is not None and pixels is None and held not in (
                    None, codec.layout.image_tokenizer_id):  # their summary would lie
                raise ValueError(
                    f"{record.get('origin') or record['key']}: holds image tokens of {held} "
                    f"and no image to encode with --tokenizer {tokenizer} "
                    f"({codec.layout.image_tokenizer_id}); prepare from the original images")
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


def _suggest_examples_per_row(caption_bytes: list[int], seq_len: int,
                              tokens_per_image: int) -> tuple[dict, str]:
    """(summary keys, log line) for `inspect --seq-len --tokens-per-image`."""
    # + 6 specials per example, as steps.row_length_problem counts them
    lengths = np.asarray(caption_bytes) + tokens_per_image + 6
    # offering 97% of a row's tokens fills rows to ~96% and drops ~1% of examples
    # (first-fit, lengths like uniform 50..350 at seq_len 4096; tests/test_data_pipeline)
    per_row = 0.97 * seq_len / lengths.mean()
    said = f"with seq_len {seq_len} and {tokens_per_image} tokens per image: "
    if per_row < 1:  # a row would not hold one example: no examples_per_row helps
        need = int(np.ceil(lengths.mean() / 0.97))
        return {"min_seq_len": need}, (
            f"{said}seq_len is smaller than one example ({lengths.mean():.0f} tokens on "
            f"average); use a data.seq_len of at least {need}")
    return {"suggested_examples_per_row": round(float(per_row), 2)}, (
        f"{said}data.examples_per_row={per_row:.2f} fills rows to about 96% "
        "(byte-level captions; subword captions are shorter)")


def inspect(src: str, *, limit: int = 1000, sheet: str | Path = "contact_sheet.png",
            image_size: int = 96, max_pixels: int = 50_000_000, seq_len: int | None = None,
            tokens_per_image: int | None = None, log=print) -> dict:
    """Counts, skip reasons and caption statistics of (the first `limit` records of) a
    source, plus a contact sheet of its first 64 usable images."""
    from mmgen.sample.grid import make_grid, save_png
    from mmgen.sample.inputs import check_out

    # now, not after every record is read; not probed: a text-only source writes no sheet
    check_out(str(sheet), "image", flag="--sheet", probe=False)
    kind, path = parse_src(src)
    source = open_source(kind, path, log=log)
    skipped: Counter = Counter()
    kinds: Counter = Counter()
    caption_bytes, images, captions = [], [], []
    token_sets: Counter = Counter()  # prepared records: whose image tokens they hold
    for record, pixels in _validated(source, size=image_size, max_caption_bytes=2**31 - 1,
                                     max_pixels=max_pixels, skipped=skipped, limit=limit):
        kinds[record["kind"]] += 1
        if record.get("tokens_fingerprint"):
            token_sets[record["tokens_fingerprint"]] += 1
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
           + _said(source.skipped)
           if source.skipped else ""))
    log(f"checked {checked:,}: {out['usable']:,} usable "
        + " ".join(f"{k}={v}" for k, v in sorted(kinds.items()))
        + (", skipped " + _said(skipped) if skipped else ", none skipped"))
    if caption_bytes:
        q = np.percentile(caption_bytes, [50, 90, 99])
        out["caption_bytes"] = {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
                                "max": int(max(caption_bytes))}
        log(f"caption bytes: p50 {q[0]:.0f}, p90 {q[1]:.0f}, p99 {q[2]:.0f}, "
            f"max {max(caption_bytes)}")
        if seq_len and tokens_per_image:
            keys, line = _suggest_examples_per_row(caption_bytes, seq_len, tokens_per_image)
            out.update(keys)
            log(line)
    if token_sets:  # training refuses them under another image tokenizer
        out["image_tokens"] = dict(token_sets)
        log("image tokens (mmgen data prepare --tokenizer): " + ", ".join(
            f"{n:,} records of {fp}" for fp, n in token_sets.most_common()))
    for c in captions[:5]:
        log(f"  caption: {c!r}")
    if not images:
        log(f"no contact sheet: no image-caption pair with an image among the {checked:,} "
            "records checked"
            + (" (records of image tokens alone: prepared with --drop-images)"
               if token_sets else ""))
    if images:
        grid = make_grid(np.stack(images), cols=8)
        out["contact_sheet"] = str(save_png(grid, sheet))
        (Path(sheet).with_suffix(".txt")).write_text("\n".join(captions) + "\n")
        log(f"wrote {sheet} ({len(images)} images, captions in "
            f"{Path(sheet).with_suffix('.txt')})")
    return out


def _record_texts(record: dict) -> list[str]:
    """A record's caption or texts, cleaned as training cleans them; BadExample when it has
    none, so the record is counted like `inspect` and `prepare` count theirs."""
    if record["kind"] == "pair":
        return [transforms.clean_caption(record.get("caption") or "", max_bytes=2**31 - 1)]
    if record["kind"] == "text":
        return [transforms.clean_text(record.get("text") or "")]
    # a document is skipped whole when one text part is bad, as in training
    pieces = [transforms.clean_text(p["text"]) for p in record["parts"] if "text" in p]
    if not pieces:  # images only: nothing to learn a text vocabulary from
        raise BadExample("missing_text", "a document of images only")
    return pieces


def texts(src: str, *, limit: int | None = None, skipped: Counter | None = None,
          log=print) -> Iterator[str]:
    """Every caption and text of a source (cleaned), for training a text tokenizer;
    records without usable text are counted by reason in `skipped` (from the source's
    index-time skips on, like `prepare`'s summary)."""
    skipped = Counter() if skipped is None else skipped
    kind, path = parse_src(src)
    source = open_source(kind, path, log=log)
    skipped.update(source.skipped)
    n = len(source) if limit is None else min(limit, len(source))
    for i in range(n):
        try:
            pieces = _record_texts(source[i])
        except BadExample as e:
            skipped[e.reason] += 1
            continue
        yield from pieces


def text_tokenizer(src: str, out: str | Path, *, vocab_size: int, limit: int | None = None,
                   log=print) -> dict:
    """Trains a byte-level BPE on a source's captions and texts (OUT/tokenizer.json), says
    what was skipped, and returns the BPE summary; refuses a source without any text
    before writing a tokenizer of the 256 bytes alone."""
    from itertools import chain

    from mmgen.tokenizers.bpe import train_bpe_from_captions

    skipped: Counter = Counter()
    stream = texts(src, limit=limit, skipped=skipped, log=log)
    first = next(stream, None)  # None: no record read (up to --limit) held any text
    if first is None:
        raise ValueError(f"no text in {src}: " + (f"skipped {sum(skipped.values()):,} "
                         f"records: {_said(skipped)}" if skipped else "it holds no records"))
    path, summary = train_bpe_from_captions(chain([first], stream), out, vocab_size, log=log)
    log(f"texts: {summary['num_captions']:,} from {src}, "
        + (f"skipped {sum(skipped.values()):,} records: {_said(skipped)}" if skipped
           else "none skipped"))
    log(f"wrote {path} ({summary['vocab_size']} ids, {summary['num_captions']:,} "
        f"texts); train with --config.data.text_tokenizer={path}")
    return {**summary, "skipped": dict(sorted(skipped.items()))}
