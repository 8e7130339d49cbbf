"""Subword text tokenizer: a Hugging Face `tokenizers` tokenizer.json behind mmgen's
TextTokenizer interface (tokenizers/text.py).

The file may come from `bpe.train_bpe` or from an LLM checkpoint (e.g. Llama's). Either
way mmgen uses only its vocabulary, never its special tokens or post-processing: the
layout's own <bos>/<eos>/... sit after the text range.

Id: "bpe-{vocab_size}-{sha256 of the file's bytes, 12 hex}". A Llama import names the same
file "hf-{model_type}-{V}-{hash}" (convert/llama.py:text_tokenizer_id); `matches` accepts
that name too when its hash is this file's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

ID_PREFIX = "bpe"
HASH_HEX = 12
# Written next to tokenizer.json by some LLM checkpoints; convert/llama.py hashes it too.
SENTENCEPIECE_FILE = "tokenizer.model"


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


class SubwordTokenizer:
    def __init__(self, tokenizer: Tokenizer, content: bytes, path: Path | None = None):
        self._tokenizer = tokenizer
        self._content_hash = hashlib.sha256(content)
        self._content_sha256 = self._content_hash.hexdigest()
        self._import_digests: frozenset[str] | None = None
        self.path = path
        # mmgen packs its own rows: a padding or truncation setting stored in the file
        # would silently pad or cut captions
        tokenizer.no_padding()
        tokenizer.no_truncation()
        # captions are data: a caption that spells out "<|eot_id|>" must stay text, not
        # become the LLM's control token
        tokenizer.encode_special_tokens = True
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # max id + 1, not the entry count: a vocabulary may have holes
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.id = f"{ID_PREFIX}-{self.vocab_size}-{self._content_sha256[:HASH_HEX]}"

    @classmethod
    def from_file(cls, path: str | Path) -> SubwordTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text tokenizer {path}: no such file (data.text_tokenizer "
                                    "is 'bytes' or the path of a tokenizer.json)")
        content = path.read_bytes()
        try:
            tokenizer = Tokenizer.from_str(content.decode("utf-8"))
        except Exception as err:  # the library raises plain Exceptions with long messages
            raise ValueError(f"text tokenizer {path}: not a valid tokenizer.json "
                             f"({_first_line(err)})") from None
        made = cls(tokenizer, content, path)
        if made.vocab_size == 0:
            raise ValueError(f"text tokenizer {path}: empty vocabulary")
        return made

    def encode(self, text: str) -> np.ndarray:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, np.int32)

    def decode(self, ids) -> str:
        flat = np.asarray(ids).reshape(-1)
        kept = [int(i) for i in flat if 0 <= int(i) < self.vocab_size]
        # The library's decoder turns byte pieces (byte-level BPE, <0x..> byte fallback)
        # that do not complete a UTF-8 character into U+FFFD instead of raising, and
        # skip_special_tokens drops the file's own control tokens, as the byte decoder
        # drops mmgen's specials.
        return self._tokenizer.decode(kept, skip_special_tokens=True)

    def matches(self, tokenizer_id: str) -> bool:
        if tokenizer_id == self.id:
            return True
        prefix, _, digest = tokenizer_id.rpartition("-")
        return prefix.startswith("hf-") and digest in self._llm_import_digests()

    def _llm_import_digests(self) -> frozenset[str]:
        """The hashes convert/llama.py would give this file: of tokenizer.json alone, or
        of tokenizer.json followed by a tokenizer.model beside it (read once, on demand)."""
        if self._import_digests is None:
            found = {self._content_sha256[:HASH_HEX]}
            if self.path is not None:
                sibling = self.path.with_name(SENTENCEPIECE_FILE)
                if sibling.is_file():
                    both = self._content_hash.copy()
                    both.update(sibling.read_bytes())
                    found.add(both.hexdigest()[:HASH_HEX])
            self._import_digests = frozenset(found)
        return self._import_digests
