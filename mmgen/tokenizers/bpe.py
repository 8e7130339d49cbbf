"""Training a byte-level BPE text tokenizer on captions, written as a tokenizer.json.

Byte-level: pieces are built over the 256 byte symbols, so every string (emoji, CJK,
anything) encodes with no unknown token and decodes back exactly (after NFC
normalisation). No special tokens: mmgen's live in the token layout after the text range.
Training is deterministic: the same captions give the same file, hence the same id.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from mmgen.tokenizers.subword import SubwordTokenizer
from mmgen.tokenizers.text import TOKENIZER_FILE

BYTE_ALPHABET = 256
LOG_EVERY = 100_000      # captions between progress lines
SUMMARY_CAPTIONS = 10_000  # captions kept to measure compression (all of them are trained on)


def _empty_byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # one spelling per character, so "é" and "e\u0301" share pieces
    tokenizer.normalizer = normalizers.NFC()
    # no prefix space: decode(encode(s)) must give s back, leading characters included
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _write_atomically(path: Path, text: str) -> None:
    """A crash mid-write leaves the old file or none, never a truncated tokenizer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_bpe(texts: Iterable[str], *, vocab_size: int, out_path: str | Path,
              min_frequency: int = 2, log: Callable[[str], None] = print) -> Path:
    """Trains byte-level BPE with at most `vocab_size` ids on `texts`; writes `out_path`
    (a tokenizer.json) and returns it. Fewer ids result when the texts run out of pairs
    seen `min_frequency` times."""
    if vocab_size < BYTE_ALPHABET:
        raise ValueError(f"vocab_size={vocab_size} is below the {BYTE_ALPHABET} byte symbols "
                         "byte-level BPE starts from")
    out_path = Path(out_path)
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in texts:
            seen += 1
            if seen % LOG_EVERY == 0:
                log(f"bpe: read {seen} texts")
            yield text

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer = _empty_byte_level_bpe()
    log(f"bpe: training a vocabulary of up to {vocab_size} ids")
    tokenizer.train_from_iterator(counted(), trainer=trainer)
    _write_atomically(out_path, tokenizer.to_str(pretty=True))
    got = tokenizer.get_vocab_size(with_added_tokens=True)
    note = "" if got == vocab_size else f" (asked for {vocab_size}: no more frequent pairs)"
    log(f"bpe: {got} ids{note} from {seen} texts -> {out_path}")
    return out_path


def compression_summary(tokenizer: SubwordTokenizer, captions: list[str]) -> dict:
    """Mean tokens vs mean UTF-8 bytes per caption; ratio < 1 means shorter sequences
    than the byte tokenizer's."""
    tokens = np.array([len(tokenizer.encode(c)) for c in captions], np.float64)
    nbytes = np.array([len(c.encode("utf-8")) for c in captions], np.float64)
    mean_tokens = float(tokens.mean()) if len(captions) else 0.0
    mean_bytes = float(nbytes.mean()) if len(captions) else 0.0
    return {"mean_tokens_per_caption": mean_tokens, "mean_bytes_per_caption": mean_bytes,
            "tokens_per_byte": mean_tokens / mean_bytes if mean_bytes else 0.0,
            "max_tokens_per_caption": int(tokens.max()) if len(captions) else 0}


def train_bpe_from_captions(captions_iter: Iterable[str], out_dir: str | Path, vocab_size: int,
                            log: Callable[[str], None] = print) -> tuple[Path, dict]:
    """`mmgen data tokenizer`'s work: trains on every caption, writes OUT_DIR/tokenizer.json,
    and returns (its path, a summary for the log). Compression is measured on the first
    SUMMARY_CAPTIONS captions, so the captions are streamed, never all held in memory."""
    sample: list[str] = []
    count = 0

    def kept() -> Iterator[str]:
        nonlocal count
        for caption in captions_iter:
            count += 1
            if len(sample) < SUMMARY_CAPTIONS:
                sample.append(caption)
            yield caption

    path = train_bpe(kept(), vocab_size=vocab_size, out_path=Path(out_dir) / TOKENIZER_FILE,
                     log=log)
    tokenizer = SubwordTokenizer.from_file(path)
    summary = {"path": str(path), "tokenizer_id": tokenizer.id,
               "vocab_size": tokenizer.vocab_size, "num_captions": count,
               "summary_captions": len(sample), **compression_summary(tokenizer, sample)}
    log(f"bpe: {summary['mean_tokens_per_caption']:.2f} tokens vs "
        f"{summary['mean_bytes_per_caption']:.2f} bytes per caption "
        f"(ratio {summary['tokens_per_byte']:.3f})")
    return path, summary
