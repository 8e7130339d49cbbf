"""grain random-access sources of real data: tar shards, ArrayRecord, folders, jsonl.

Every source has `__len__`, `__getitem__` (a record dict, see records.py), `.name` and
`.skipped`, a Counter of the examples left out while indexing, by reason. Problems found
only when an example is read raise `records.BadExample`; wrap a source in `SkipBad` to turn
those into None (grain's "filtered out") and count them instead.

Indexes are built at construction by reading headers or scanning for line breaks, never by
extracting anything to disk. Reads open the file per call (or use readers that are safe to
share), so grain may call `__getitem__` from many threads. All paths go through
`etils.epath`, so local and gs:// (with gcsfs) files work; specs are `paths.expand` specs.

Safety: names inside containers (tar members, folder captions, document image paths) must
be relative and must not climb out with "..": others are never read and are counted as
"unsafe_member_name".
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import operator
import os
import re
import tarfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from etils import epath

from mmgen.data import arrayrecord, paths
from mmgen.data.records import BadExample, decode_record, make_record

# img2dataset / webdataset member extensions, matched on everything after the first dot of
# the member's basename, lower-cased (webdataset's rule; "a.b.jpg" has extension "b.jpg").
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
META_EXT = "json"
TAR_INDEX_VERSION = 1

_BLOCK = tarfile.BLOCKSIZE
# Members of one sample sit next to each other; read them in one request if the gaps
# (tar headers, padding, other members) are at most this many bytes.
_MAX_READ_GAP = 64 * 1024
_SCAN_CHUNK = 8 * 1024 * 1024
_DRIVE = re.compile(r"^[A-Za-z]:")
_BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark: Excel's "CSV UTF-8" and Notepad write it
# ASCII whitespace: a line of only these (a lone "\r" of a CRLF blank line too) is blank
_BLANK_BYTES = np.zeros(256, bool)
_BLANK_BYTES[list(b" \t\n\r\x0b\x0c")] = True

Log = Callable[[str], None]


def is_safe_name(name: str) -> bool:
    """True for a relative path that stays inside its folder (no "..", no absolute path,
    no drive letter or URL scheme, no NUL)."""
    norm = name.replace("\\", "/")
    if not norm or norm.startswith("/") or _DRIVE.match(norm) or "://" in norm:
        return False
    return "\x00" not in norm and ".." not in norm.split("/")


def _read_spans(path: epath.Path, spans: list[tuple[int, int]], *, short_reason: str,
                origin: str) -> list[bytes]:
    """Byte ranges of one file, with one open and, when they are close, one read."""
    lo = min(offset for offset, _ in spans)
    hi = max(offset + size for offset, size in spans)
    try:
        with path.open("rb") as f:
            if hi - lo <= sum(size for _, size in spans) + _MAX_READ_GAP:
                f.seek(lo)
                blob = f.read(hi - lo)
                out = [blob[offset - lo:offset - lo + size] for offset, size in spans]
            else:
                out = []
                for offset, size in spans:
                    f.seek(offset)
                    out.append(f.read(size))
    except OSError as e:
        raise BadExample("unreadable_file", f"{origin}: {e}") from None
    if any(len(b) != size for b, (_, size) in zip(out, spans, strict=True)):
        raise BadExample(short_reason, f"{origin}: file is shorter than when it was indexed")
    return out


def _read_file(path: epath.Path, origin: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadExample("missing_image", f"{origin}: no such file") from None
    except OSError as e:
        raise BadExample("unreadable_file", f"{origin}: {e}") from None


def _utf8(raw: bytes, reason: str, origin: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadExample(reason, f"{origin}: {e}") from None


def _json_object(raw: bytes | str, origin: str) -> dict:
    try:
        obj = json.loads(raw)
    except ValueError as e:  # includes UnicodeDecodeError
        raise BadExample("bad_json", f"{origin}: {e}") from None
    except RecursionError:  # nested deeper than the parser's stack: garbage, not a record
        raise BadExample("bad_json", f"{origin}: nested too deeply") from None
    if not isinstance(obj, dict):
        raise BadExample("bad_json", f"{origin}: expected a JSON object")
    return obj


def _index(index) -> int:
    return operator.index(index)


def _check_range(i: int, n: int, name: str) -> None:
    if not 0 <= i < n:
        raise IndexError(f"index {i} out of range for {name} with {n} examples")


def _summary(name: str, count: int, skipped: Counter) -> str:
    left_out = ", ".join(f"{reason}={n}" for reason, n in sorted(skipped.items()))
    return f"{name}: {count} examples" + (f", skipped {left_out}" if left_out else "")


# ---------------------------------------------------------------------------------------
# tar shards


def _member_key(name: str) -> tuple[str, str] | None:
    """(key, extension) by webdataset's rule, or None for names without an extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _slot(ext: str) -> int | None:
    """Which (offset, size) pair of a sample's spans row a member fills."""
    if ext in IMAGE_EXTS:
        return 0
    return {CAPTION_EXT: 1, META_EXT: 2}.get(ext)


class _ShardIndex:
    """The complete samples of one shard and what was left out."""

    def __init__(self):
        self.samples: dict[str, list[int]] = {}  # key -> [img off, size, txt.., json..]
        self.skipped: Counter = Counter()
        self.last_key: str | None = None

    def add(self, info: tarfile.TarInfo) -> None:
        if not is_safe_name(info.name):
            self.skipped["unsafe_member_name"] += 1
            return
        if info.isdir():
            return
        if not info.isfile() or info.issparse():  # links, devices: no data of their own
            self.skipped["unsupported_member"] += 1
            return
        parsed = _member_key(info.name)
        if parsed is None:
            return
        key, ext = parsed
        self.last_key = key
        spans = self.samples.setdefault(key, [-1] * 6)
        slot = _slot(ext)
        if slot is None:
            return
        if spans[2 * slot] >= 0:
            self.skipped["duplicate_member"] += 1
            return
        spans[2 * slot:2 * slot + 2] = [info.offset_data, info.size]

    def broken_off(self, reason: str) -> None:
        # The sample being read when the shard ended may be missing members: drop it.
        if self.last_key is not None:
            self.samples.pop(self.last_key, None)
        self.skipped[reason] += 1

    def complete(self) -> tuple[list[str], list[list[int]]]:
        keys, rows = [], []
        for key, spans in self.samples.items():
            if spans[0] < 0:
                self.skipped["missing_image"] += 1
            elif spans[2] < 0:
                self.skipped["missing_caption"] += 1
            else:
                keys.append(key)
                rows.append(spans)
        return keys, rows


def _walk_tar(f, size: int, shard: _ShardIndex) -> None:
    """Reads member headers only (tarfile seeks over the data) and notes how it ended."""
    tf = tarfile.open(fileobj=f, mode="r:")  # "r:": plain tar, never decompress or extract
    while True:
        try:
            info = tf.next()
        except tarfile.ReadError:
            break  # a bad header mid-archive: classified below from where it stopped
        tf.members.clear()  # tarfile keeps every header; we only stream through them
        if info is None:
            break
        if info.offset_data + info.size > size:
            parsed = _member_key(info.name)
            if parsed:
                shard.last_key = parsed[0]
            shard.broken_off("truncated_shard")
            return
        shard.add(info)
    f.seek(tf.offset)
    block = f.read(_BLOCK)
    if len(block) < _BLOCK:  # cut at or inside a header: no end-of-archive marker
        shard.broken_off("truncated_shard")
    elif block.count(0) != _BLOCK:  # a header tarfile could not parse
        shard.broken_off("corrupt_shard")


def _scan_shard(path: epath.Path, size: int) -> _ShardIndex:
    shard = _ShardIndex()
    if size == 0:
        shard.skipped["empty_file"] += 1
        return shard
    try:
        with path.open("rb") as f:
            _walk_tar(f, size, shard)
    except tarfile.ReadError:  # the very first header is bad: not a plain tar file
        shard.skipped["corrupt_shard"] += 1
    except OSError:
        shard.skipped["unreadable_file"] += 1
    return shard


def _stat(path: epath.Path) -> tuple[int, int]:
    """(size, modification time) for the index cache key; nanoseconds where the file system
    has them (local files), since a shard rewritten within a second must not match."""
    if "://" not in str(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    st = path.stat()
    return int(st.length), int(st.mtime)


class TarShardSource:
    """Image-caption pairs from webdataset / img2dataset tar shards.

    A sample is the members sharing a key: one image (`KEY.jpg|jpeg|png|webp`), a caption
    (`KEY.txt`, UTF-8) and optionally `KEY.json` (becomes `meta`). The key is the member
    name up to the first dot of its basename, as in webdataset, so folders may contain dots
    ("v1.2/000.jpg" has key "v1.2/000"). Other extensions are ignored.

    At construction every shard's headers are read (threads: `index_threads`) and each
    sample's byte spans recorded; `__getitem__` seeks and reads just those bytes. Left out
    and counted in `.skipped`: samples without image ("missing_image") or caption
    ("missing_caption"), unsafe member names, links and other non-files
    ("unsupported_member"), repeated members ("duplicate_member"), unreadable, empty or
    non-tar shards, and per shard that breaks off ("truncated_shard") or holds an unparsable
    header ("corrupt_shard") one count; samples complete before the break are kept.

    `cache_dir`: if set, the index is saved there as .npz, keyed by the shards' paths,
    sizes and modification times, and reused when they match.
    """

    def __init__(self, spec: str, *, name: str | None = None, cache_dir: str | None = None,
                 index_threads: int = 8, log: Log = print, log_every: int = 100):
        self.name = name or f"tar:{spec}"
        self.paths = paths.expand(spec)
        self._files = [epath.Path(p) for p in self.paths]
        self.skipped: Counter = Counter()
        self._log, self._log_every = log, log_every
        with ThreadPoolExecutor(max(1, min(index_threads, len(self._files)))) as pool:
            stats = list(pool.map(self._stat_or_none, self._files))
            cache = self._cache_path(cache_dir, stats)
            if not (cache and self._load_cache(cache)):
                self._build(pool, stats)
                if cache:
                    self._save_cache(cache)
        if self.skipped or len(self.paths) >= log_every:
            log(_summary(self.name, len(self), self.skipped))

    @staticmethod
    def _stat_or_none(path: epath.Path) -> tuple[int, int] | None:
        try:
            return _stat(path)
        except OSError:
            return None

    def _build(self, pool: ThreadPoolExecutor, stats: list) -> None:
        start, total = time.monotonic(), 0
        shard_ids, rows, keys = [], [], []

        def scan(i: int) -> _ShardIndex:
            if stats[i] is None:
                shard = _ShardIndex()
                shard.skipped["unreadable_file"] += 1
                return shard
            return _scan_shard(self._files[i], stats[i][0])

        for i, shard in enumerate(pool.map(scan, range(len(self._files)))):
            shard_keys, shard_rows = shard.complete()
            self.skipped.update(shard.skipped)
            shard_ids.append(np.full(len(shard_keys), i, np.int32))
            rows.extend(shard_rows)
            keys.extend(shard_keys)
            total += len(shard_keys)
            if (i + 1) % self._log_every == 0:
                self._log(f"{self.name}: indexed {i + 1}/{len(self._files)} shards, {total} "
                          f"samples, {time.monotonic() - start:.0f}s")
        self._shard_of = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32)
        self._spans = np.asarray(rows, np.int64).reshape(-1, 6)
        self._set_keys(keys)

    def _set_keys(self, keys: list[str]) -> None:
        # One UTF-8 blob plus end offsets: a few bytes per key instead of a str object each.
        encoded = [k.encode("utf-8", "surrogateescape") for k in keys]
        self._key_blob = b"".join(encoded)
        self._key_ends = np.cumsum([len(k) for k in encoded], dtype=np.int64)

    def _key(self, i: int) -> str:
        start = int(self._key_ends[i - 1]) if i else 0
        return self._key_blob[start:int(self._key_ends[i])].decode("utf-8", "surrogateescape")

    # -- index cache (.npz, loaded with allow_pickle=False)

    def _cache_path(self, cache_dir: str | None, stats: list) -> epath.Path | None:
        if not cache_dir or any(s is None for s in stats):
            return None
        fingerprint = json.dumps([TAR_INDEX_VERSION, self.paths, stats])
        digest = hashlib.sha256(fingerprint.encode("utf-8", "surrogateescape")).hexdigest()
        return epath.Path(cache_dir) / f"tar-index-{digest[:24]}.npz"

    def _load_cache(self, cache: epath.Path) -> bool:
        try:
            with cache.open("rb") as f, np.load(f, allow_pickle=False) as z:
                self._shard_of = z["shard_of"]
                self._spans = z["spans"]
                self._key_blob = z["key_blob"].tobytes()
                self._key_ends = z["key_ends"]
                self.skipped = Counter(json.loads(z["skipped"].tobytes()))
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            # a cache cut short or damaged (disk full, a killed writer) is rebuilt
            self._log(f"{self.name}: ignoring unreadable index cache {cache}: {e!r}")
            return False
        return True

    def _save_cache(self, cache: epath.Path) -> None:
        """The index is in memory already: a cache that cannot be written (a read-only or
        full data.cache_dir, a file in its place) is said and the run goes on without."""
        tmp = cache.parent / f"{cache.name}.tmp-{threading.get_native_id()}"
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as f:
                np.savez(f, shard_of=self._shard_of, spans=self._spans,
                         key_blob=np.frombuffer(self._key_blob, np.uint8),
                         key_ends=self._key_ends,
                         skipped=np.frombuffer(json.dumps(dict(self.skipped)).encode(),
                                               np.uint8))
            tmp.replace(cache)
        except OSError as e:
            self._log(f"{self.name}: cannot write the index cache {cache} (data.cache_dir): "
                      f"{e}; going on without it")
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass

    # -- reading

    def __len__(self) -> int:
        return len(self._shard_of)

    def __getitem__(self, index) -> dict:
        i = _index(index)
        _check_range(i, len(self), self.name)
        shard = int(self._shard_of[i])
        img_off, img_size, txt_off, txt_size, js_off, js_size = self._spans[i].tolist()
        key = self._key(i)
        origin = f"{self.paths[shard]}:{key}"
        spans = [(img_off, img_size), (txt_off, txt_size)]
        if js_off >= 0:
            spans.append((js_off, js_size))
        blobs = _read_spans(self._files[shard], spans, short_reason="truncated_shard",
                            origin=origin)
        caption = _utf8(blobs[1], "non_utf8_caption", origin)
        meta = _json_object(blobs[2], origin) if len(blobs) > 2 else {}
        return make_record(key, "pair", source=self.name, origin=origin, image=blobs[0],
                           caption=caption, meta=meta)

    def __repr__(self) -> str:
        return (f"TarShardSource({self.name!r}, shards={len(self.paths)}, samples={len(self)}, "
                f"skipped={dict(self.skipped)})")


# ---------------------------------------------------------------------------------------
# ArrayRecord


class ArrayRecordSource:
    """Records of ArrayRecord files written by `arrayrecord.write_array_record`.

    Files that cannot be opened are counted as "unreadable_file" and left out. A record
    that does not decode raises BadExample("corrupt_record"). A record's `source` becomes
    this source's name; its other fields are as written (`origin` says where it came from).
    """

    def __init__(self, spec: str, *, name: str | None = None, log: Log = print):
        self.name = name or f"arrayrecord:{spec}"
        self.skipped: Counter = Counter()
        self.paths, counts = [], []
        for path in paths.expand(spec):
            try:
                n = arrayrecord.count_records(path)
            except Exception as e:  # the reader raises RuntimeError/ValueError on bad files
                self.skipped["unreadable_file"] += 1
                log(f"{self.name}: skipping unreadable {path}: {e}")
                continue
            self.paths.append(path)
            counts.append(n)
        self._ends = np.cumsum(counts, dtype=np.int64)
        self._readers: list = [None] * len(self.paths)
        self._lock = threading.Lock()
        if self.skipped:
            log(_summary(self.name, len(self), self.skipped))

    def _reader(self, f: int):
        if self._readers[f] is None:
            with self._lock:  # readers are shared by all threads; open each once
                if self._readers[f] is None:
                    self._readers[f] = arrayrecord.open_reader(self.paths[f])
        return self._readers[f]

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index) -> dict:
        i = _index(index)
        _check_range(i, len(self), self.name)
        f = int(np.searchsorted(self._ends, i, side="right"))
        position = i - (int(self._ends[f - 1]) if f else 0)
        origin = f"{self.paths[f]}[{position}]"
        try:
            raw = self._reader(f).read([position])[0]
        except Exception as e:  # checksum and chunk errors of a damaged file
            raise BadExample("corrupt_record", f"{origin}: {e}") from None
        try:
            record = decode_record(raw)
        except BadExample as e:
            raise BadExample(e.reason, f"{origin}: {e.detail}") from None
        record["source"] = self.name
        return record

    def __repr__(self) -> str:
        return (f"ArrayRecordSource({self.name!r}, files={len(self.paths)}, "
                f"records={len(self)}, skipped={dict(self.skipped)})")


# ---------------------------------------------------------------------------------------
# a folder of images with a captions file


_FILE_KEYS, _CAPTION_KEYS = ("file", "image"), ("caption", "text")


def _first_present(row: dict, names: tuple[str, ...]):
    return next((row[n] for n in names if row.get(n) is not None), None)


def _csv_lines(reader, path: epath.Path):
    """A strict csv reader's rows. An unbalanced quote would swallow the rows after it
    into one caption (or overflow csv's field size limit); strict mode stops at the text
    after the quote that closes it, or at the end of the file, and that becomes one line
    naming where the row began. Quoted captions may still hold line breaks."""
    while True:
        first = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ValueError(f"{path}:{first}: {e} in the row starting here (an unbalanced "
                             "quote? a field that starts with one must end with one)") from None
        yield row


class FolderSource:
    """Images in a folder, captioned by `captions.jsonl` or else `captions.csv` in it.

    jsonl lines are `{"file": "rel/path.jpg", "caption": "..."}` ("image" and "text" are
    accepted as aliases); csv has a header row with `file` (or `image`) and `caption` (or
    `text`) columns. Other fields become `meta`. Left out at construction and counted:
    unparsable lines ("bad_json"), captions with invalid UTF-8 ("non_utf8_caption"), rows
    without a file ("missing_image") or caption ("missing_caption"), and paths that are
    absolute or climb out of the folder ("unsafe_member_name"). A listed file that is gone
    raises BadExample("missing_image") when read. The key is the relative path. A leading
    UTF-8 BOM is ignored; a csv that does not parse (an unbalanced quote) raises a
    ValueError naming its line.
    """

    def __init__(self, root: str, *, name: str | None = None, log: Log = print):
        self.root = epath.Path(root)
        self.name = name or f"folder:{root}"
        self.skipped: Counter = Counter()
        self._files: list[str] = []
        self._captions: list[str] = []
        self._metas: list[dict | None] = []
        jsonl, table = self.root / "captions.jsonl", self.root / "captions.csv"
        if jsonl.exists():
            self._read_jsonl(jsonl)
        elif table.exists():
            self._read_csv(table)
        else:
            raise FileNotFoundError(f"no captions.jsonl or captions.csv in {root}")
        if self.skipped:
            log(_summary(self.name, len(self), self.skipped))

    def _add(self, file, caption, meta: dict) -> None:
        if not isinstance(file, str) or not file:
            self.skipped["missing_image"] += 1
        elif not is_safe_name(file):
            self.skipped["unsafe_member_name"] += 1
        elif caption is None:
            self.skipped["missing_caption"] += 1
        elif not isinstance(caption, str):
            self.skipped["bad_json"] += 1
        elif any("\udc80" <= ch <= "\udcff" for ch in caption):  # undecodable csv bytes
            self.skipped["non_utf8_caption"] += 1
        else:
            self._files.append(file)
            self._captions.append(caption)
            self._metas.append(meta or None)

    def _read_jsonl(self, path: epath.Path) -> None:
        with path.open("rb") as f:
            for n, raw in enumerate(f):
                if n == 0:
                    raw = raw.removeprefix(_BOM)
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self.skipped["non_utf8_caption"] += 1
                    continue
                try:
                    row = _json_object(line, str(path))
                except BadExample:
                    self.skipped["bad_json"] += 1
                    continue
                meta = {k: v for k, v in row.items() if k not in _FILE_KEYS + _CAPTION_KEYS}
                self._add(_first_present(row, _FILE_KEYS), _first_present(row, _CAPTION_KEYS),
                          meta)

    def _read_csv(self, path: epath.Path) -> None:
        with path.open("rb") as raw:
            # surrogateescape keeps undecodable bytes visible, so one bad row is skipped
            # instead of failing the whole file; utf-8-sig drops a leading BOM (Excel).
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape",
                                    newline="")
            reader = csv.reader(text, strict=True)
            rows = (row for row in _csv_lines(reader, path) if row)  # blank lines: []
            columns = next(rows, [])
            if not (set(columns) & set(_FILE_KEYS) and set(columns) & set(_CAPTION_KEYS)):
                raise ValueError(f"{path}: the header needs a 'file' and a 'caption' column, "
                                 f"got {columns}")
            for values in rows:
                row = dict(zip(columns, values, strict=False))
                meta = {k: v for k, v in row.items() if k not in _FILE_KEYS + _CAPTION_KEYS}
                self._add(_first_present(row, _FILE_KEYS), _first_present(row, _CAPTION_KEYS),
                          meta)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index) -> dict:
        i = _index(index)
        _check_range(i, len(self), self.name)
        rel = self._files[i]
        path = self.root / rel
        image = _read_file(path, str(path))
        return make_record(rel, "pair", source=self.name, origin=str(path), image=image,
                           caption=self._captions[i], meta=dict(self._metas[i] or {}))

    def __repr__(self) -> str:
        return (f"FolderSource({self.name!r}, images={len(self)}, "
                f"skipped={dict(self.skipped)})")


# ---------------------------------------------------------------------------------------
# jsonl: text and interleaved documents


def _line_spans(path: epath.Path) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets and lengths (without the newline) of a file's non-blank lines.

    Blank means whitespace only, so the "\r" left of a CRLF blank line is blank too; a
    UTF-8 BOM at the start of the file is not part of the first line."""
    newlines, has_text, open_line = [], [], False
    with path.open("rb") as f:
        bom = pos = len(_BOM) if f.read(len(_BOM)) == _BOM else 0
        f.seek(pos)
        while chunk := f.read(_SCAN_CHUNK):
            data = np.frombuffer(chunk, np.uint8)
            text = ~_BLANK_BYTES[data]
            breaks = np.flatnonzero(data == 10)
            # per piece between line breaks (each starting at a break, itself blank):
            # does it hold a non-blank byte
            pieces = np.logical_or.reduceat(text, np.concatenate([[0], breaks]))
            open_line |= bool(pieces[0])
            if len(breaks):
                has_text.append(np.concatenate([[open_line], pieces[1:-1]]))
                open_line = bool(pieces[-1])
            newlines.append(breaks + pos)
            pos += len(chunk)
    has_text.append(np.array([open_line]))
    breaks = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    starts = np.concatenate([[bom], breaks + 1]).astype(np.int64)
    ends = np.concatenate([breaks, [pos]]).astype(np.int64)
    keep = np.concatenate(has_text)
    return starts[keep], (ends - starts)[keep]


class _LineIndex:
    """Where every non-blank line of some jsonl files starts; reads one line per call."""

    def __init__(self, files: list[str], skipped: Counter, log: Log, name: str):
        self.paths, starts, lengths = [], [], []
        for p in files:
            try:
                s, n = _line_spans(epath.Path(p))
            except OSError as e:
                skipped["unreadable_file"] += 1
                log(f"{name}: skipping unreadable {p}: {e}")
                continue
            self.paths.append(p)
            starts.append(s)
            lengths.append(n)
        self.files = [epath.Path(p) for p in self.paths]
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self.ends = np.cumsum([len(s) for s in starts], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def read(self, i: int) -> tuple[int, str, bytes]:
        """(file number, origin "path@offset", the line's bytes)."""
        f = int(np.searchsorted(self.ends, i, side="right"))
        offset, size = int(self.starts[i]), int(self.lengths[i])
        origin = f"{self.paths[f]}@{offset}"
        line, = _read_spans(self.files[f], [(offset, size)], short_reason="unreadable_file",
                            origin=origin)
        return f, origin, line

    def json_row(self, index, name: str) -> tuple[int, str, dict]:
        """(file number, origin, the line as a JSON object) for a source's `index`."""
        i = _index(index)
        _check_range(i, len(self), name)
        f, origin, line = self.read(i)
        return f, origin, _json_object(_utf8(line, "non_utf8_text", origin), origin)


class TextSource:
    """Text records from jsonl files of `{"text": "..."}`; other fields become `meta`.

    Construction finds the line starts (blank or whitespace-only lines are not examples,
    a leading UTF-8 BOM is not part of the first); a line is parsed when read: invalid
    UTF-8 raises BadExample("non_utf8_text"), invalid JSON "bad_json", no text
    "missing_text". The key is "path@byte_offset".
    """

    def __init__(self, spec: str, *, name: str | None = None, log: Log = print):
        self.name = name or f"text:{spec}"
        self.skipped: Counter = Counter()
        self._lines = _LineIndex(paths.expand(spec), self.skipped, log, self.name)

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index) -> dict:
        _, origin, row = self._lines.json_row(index, self.name)
        text = row.pop("text", None)
        if text is None:
            raise BadExample("missing_text", f"{origin}: no 'text' field")
        if not isinstance(text, str):
            raise BadExample("bad_json", f"{origin}: 'text' is not a string")
        return make_record(origin, "text", source=self.name, origin=origin, text=text,
                           meta=row)

    def __repr__(self) -> str:
        return (f"TextSource({self.name!r}, files={len(self._lines.paths)}, lines={len(self)}, "
                f"skipped={dict(self.skipped)})")


class InterleavedSource:
    """Interleaved documents from jsonl lines `{"content": [{"text": ...}, {"image": path},
    ...]}`; other fields become `meta`.

    Image paths are relative to the jsonl file's folder and must stay inside it (else
    BadExample("unsafe_member_name")); the image bytes are read with the document. A line
    that is not such a document raises "bad_document" (or "bad_json", "non_utf8_text"); a
    listed image that is gone, "missing_image". The key is "path@byte_offset".
    """

    def __init__(self, spec: str, *, name: str | None = None, log: Log = print):
        self.name = name or f"interleaved:{spec}"
        self.skipped: Counter = Counter()
        self._lines = _LineIndex(paths.expand(spec), self.skipped, log, self.name)
        self._folders = [f.parent for f in self._lines.files]

    def __len__(self) -> int:
        return len(self._lines)

    def _part(self, part, folder: epath.Path, origin: str) -> dict:
        if not isinstance(part, dict) or len(part) != 1:
            raise BadExample("bad_document", f"{origin}: a part is {{'text'}} or {{'image'}}")
        (kind, value), = part.items()
        if kind not in ("text", "image") or not isinstance(value, str):
            raise BadExample("bad_document", f"{origin}: bad part {kind!r}")
        if kind == "text":
            return {"text": value}
        if not is_safe_name(value):
            raise BadExample("unsafe_member_name", f"{origin}: image path {value!r:.200}")
        path = folder / value
        return {"image": _read_file(path, f"{origin}: {path}")}

    def __getitem__(self, index) -> dict:
        f, origin, row = self._lines.json_row(index, self.name)
        content = row.pop("content", None)
        if not isinstance(content, list) or not content:
            raise BadExample("bad_document", f"{origin}: 'content' is not a non-empty list")
        parts = [self._part(part, self._folders[f], origin) for part in content]
        return make_record(origin, "doc", source=self.name, origin=origin, parts=parts,
                           meta=row)

    def __repr__(self) -> str:
        return (f"InterleavedSource({self.name!r}, files={len(self._lines.paths)}, "
                f"docs={len(self)}, skipped={dict(self.skipped)})")
