"""The raw record every data source returns, why an example is skipped, and a binary format.

A record is a plain dict (cheap to build and to pass between grain threads):

    key                 str   the sample's id inside its source (tar: webdataset `__key__`;
                              folder: the image's relative path; jsonl: "path@byte_offset")
    source              str   the `.name` of the source that returned it
    origin              str   where the bytes came from, for error messages ("shard.tar:key")
    kind                str   "pair" (image + caption), "text", or "doc" (interleaved)
    image               bytes | None   encoded image file (pair)
    caption             str | None     raw caption, not yet cleaned (pair)
    text                str | None     raw text (text)
    parts               list | None    doc: [{"text": str} | {"image": bytes}, ...] in order
    meta                dict           JSON-able side information (the sample's .json, ...)
    image_tokens        np.ndarray | None   pre-computed integer image codes (pair)
    tokens_fingerprint  str | None     the token layout fingerprint the codes belong to

A pair has a caption and an image, image tokens, or both; tokens always come with their
fingerprint, so codes from another tokenizer are never mixed in silently.

Problems with one example raise `BadExample(reason, detail)`; pipelines skip the example
and count `reason`, one of `REASONS`.

`encode_record` / `decode_record` store a record without pickle (for ArrayRecord files):

    b"MMGR" | u16 version | u32 header length | UTF-8 JSON header | blobs

all integers little-endian. The header holds the strings, meta, the part layout, each
blob's byte length and the token dtype/shape; the blobs are the image bytes (the pair's
image, or the doc's images in order) followed by the raw little-endian token bytes.
"""

from __future__ import annotations

import json
import struct

import numpy as np

KINDS = ("pair", "text", "doc")

REASONS = (
    # image bytes (transforms.decode_image)
    "empty_file", "not_an_image", "corrupt_image", "truncated_image", "too_many_pixels",
    "too_small", "bad_aspect", "unsupported_mode",
    # captions and text
    "non_utf8_caption", "empty_caption", "missing_caption",
    "non_utf8_text", "empty_text", "missing_text",
    # containers: tar shards, folders, jsonl, ArrayRecord
    "missing_image", "unsafe_member_name", "unsupported_member", "duplicate_member",
    "truncated_shard", "corrupt_shard", "unreadable_file", "bad_json", "bad_document",
    "corrupt_record",
)

TOKEN_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64")

MAGIC = b"MMGR"
VERSION = 1
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length


class BadExample(Exception):
    """One example cannot be used; `reason` (from REASONS) is what pipelines count."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {', '.join(REASONS)}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        # Exceptions are rebuilt from .args when they cross process boundaries; ours has two.
        return (BadExample, (self.reason, self.detail))


def _check_parts(parts) -> None:
    if not isinstance(parts, list) or not parts:
        raise ValueError("a doc needs a non-empty list of parts")
    for part in parts:
        if not isinstance(part, dict) or len(part) != 1:
            raise ValueError(f"a doc part is {{'text': str}} or {{'image': bytes}}: {part!r:.80}")
        (name, value), = part.items()
        want = {"text": str, "image": bytes}.get(name)
        if want is None or not isinstance(value, want):
            raise ValueError(f"a doc part is {{'text': str}} or {{'image': bytes}}, got {name!r}")


def _check_tokens(tokens, fingerprint) -> None:
    if tokens is None:
        if fingerprint is not None:
            raise ValueError("tokens_fingerprint given without image_tokens")
        return
    if not isinstance(tokens, np.ndarray) or tokens.dtype.name not in TOKEN_DTYPES:
        raise ValueError(f"image_tokens must be an ndarray of {'/'.join(TOKEN_DTYPES)}")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ValueError("image_tokens need their tokens_fingerprint")


def check_record(record: dict) -> dict:
    """Raises ValueError if `record` does not have the documented shape; returns it."""
    for field in ("key", "source", "origin"):
        if not isinstance(record.get(field), str):
            raise ValueError(f"record field {field!r} must be a str")
    kind = record.get("kind")
    if kind not in KINDS:
        raise ValueError(f"record kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(record.get("meta"), dict):
        raise ValueError("record meta must be a dict")
    image, tokens = record.get("image"), record.get("image_tokens")
    if image is not None and not isinstance(image, bytes):
        raise ValueError("record image must be bytes or None")
    _check_tokens(tokens, record.get("tokens_fingerprint"))
    present = {f for f in ("image", "caption", "text", "parts", "image_tokens")
               if record.get(f) is not None}
    allowed = {"pair": {"image", "caption", "image_tokens"}, "text": {"text"},
               "doc": {"parts"}}[kind]
    if present - allowed:
        raise ValueError(f"a {kind} record cannot have {sorted(present - allowed)}")
    if kind == "pair":
        if not isinstance(record.get("caption"), str):
            raise ValueError("a pair needs a str caption")
        if image is None and tokens is None:
            raise ValueError("a pair needs image bytes or image_tokens")
    elif kind == "text" and not isinstance(record.get("text"), str):
        raise ValueError("a text record needs a str text")
    elif kind == "doc":
        _check_parts(record.get("parts"))
    return record


def make_record(key: str, kind: str, *, source: str = "", origin: str = "",
                image: bytes | None = None, caption: str | None = None,
                text: str | None = None, parts: list | None = None, meta: dict | None = None,
                image_tokens: np.ndarray | None = None,
                tokens_fingerprint: str | None = None) -> dict:
    """A checked record (see the module docstring)."""
    return check_record({
        "key": key, "source": source, "origin": origin, "kind": kind, "image": image,
        "caption": caption, "text": text, "parts": parts,
        "meta": {} if meta is None else meta, "image_tokens": image_tokens,
        "tokens_fingerprint": tokens_fingerprint,
    })


def encode_record(record: dict) -> bytes:
    """The record as bytes (format in the module docstring)."""
    check_record(record)
    blobs: list[bytes] = []
    parts = None
    if record["parts"] is not None:
        parts = []
        for part in record["parts"]:
            if "image" in part:
                blobs.append(part["image"])
                parts.append({"image": len(part["image"])})
            else:
                parts.append(part)
    if record["image"] is not None:
        blobs.append(record["image"])
    tokens = record["image_tokens"]
    token_header = None
    if tokens is not None:
        little = np.ascontiguousarray(tokens, tokens.dtype.newbyteorder("<"))
        blobs.append(little.tobytes())
        token_header = {"dtype": tokens.dtype.name, "shape": list(tokens.shape)}
    header = {
        "key": record["key"], "source": record["source"], "origin": record["origin"],
        "kind": record["kind"], "caption": record["caption"], "text": record["text"],
        "meta": record["meta"], "parts": parts,
        "image": None if record["image"] is None else len(record["image"]),
        "tokens": token_header, "fingerprint": record["tokens_fingerprint"],
    }
    try:  # ASCII escapes keep any str (even lone surrogates) encodable
        head = json.dumps(header, separators=(",", ":")).encode("ascii")
    except (TypeError, ValueError) as e:
        raise ValueError(f"record {record['key']!r} meta is not JSON-able: {e}") from None
    return b"".join([_PREFIX.pack(MAGIC, VERSION, len(head)), head, *blobs])


def _take(data: memoryview, at: int, size, what: str) -> tuple[bytes, int]:
    if not isinstance(size, int) or size < 0 or at + size > len(data):
        raise BadExample("corrupt_record", f"{what} runs past the end of the record")
    return bytes(data[at:at + size]), at + size


def _decode_tokens(data: memoryview, at: int, spec) -> tuple[np.ndarray, int]:
    try:
        dtype = np.dtype(spec["dtype"])
        shape = tuple(int(n) for n in spec["shape"])
    except (KeyError, TypeError, ValueError):
        raise BadExample("corrupt_record", "bad token dtype/shape") from None
    if dtype.name not in TOKEN_DTYPES or any(n < 0 for n in shape):
        raise BadExample("corrupt_record", f"bad token dtype/shape {spec!r:.80}")
    raw, at = _take(data, at, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, "tokens")
    little = np.frombuffer(raw, dtype.newbyteorder("<")).reshape(shape)
    return little.astype(dtype), at


def decode_record(data: bytes) -> dict:
    """The record stored by encode_record; BadExample("corrupt_record") if it is malformed."""
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise BadExample("corrupt_record", f"{len(view)} bytes is shorter than the prefix")
    magic, version, head_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise BadExample("corrupt_record", "bad magic, not an mmgen record")
    if version != VERSION:
        raise BadExample("corrupt_record", f"record format v{version}, this reader knows "
                                           f"v{VERSION}")
    head_raw, at = _take(view, _PREFIX.size, head_len, "header")
    try:
        head = json.loads(head_raw)
        parts = None
        if head["parts"] is not None:
            parts = []
            for part in head["parts"]:
                if "image" in part:
                    blob, at = _take(view, at, part["image"], "doc image")
                    part = {"image": blob}
                parts.append(part)
        image = None
        if head["image"] is not None:
            image, at = _take(view, at, head["image"], "image")
        tokens = None
        if head["tokens"] is not None:
            tokens, at = _decode_tokens(view, at, head["tokens"])
        if at != len(view):
            raise BadExample("corrupt_record", f"{len(view) - at} stray bytes after the blobs")
        return make_record(
            head["key"], head["kind"], source=head["source"], origin=head["origin"],
            image=image, caption=head["caption"], text=head["text"], parts=parts,
            meta=head["meta"], image_tokens=tokens, tokens_fingerprint=head["fingerprint"])
    except BadExample:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        # json errors are ValueErrors; a header of the wrong shape fails on access or check.
        raise BadExample("corrupt_record", f"bad header: {e}") from None
