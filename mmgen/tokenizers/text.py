"""Byte-level text tokenizer: UTF-8 bytes are token ids 0..255."""

from __future__ import annotations

import numpy as np

TOKENIZER_ID = "bytes-v1"


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(ids) -> str:
    """Decodes text ids, dropping anything outside the byte range (specials, image ids)."""
    data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")
