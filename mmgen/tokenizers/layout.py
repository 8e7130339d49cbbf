"""Token-id layout: one vocabulary for every modality, and its fingerprint.

    [0, text_vocab)                text tokens: bytes (256, the byte-level tokenizer) or
                                   an imported LLM's subword vocabulary
    [text_vocab, +len(SPECIALS))   special tokens
    [image_offset, +image_codes)   image tokens (FSQ code indices)
    ...                            later modalities, each a contiguous block

The layout (plus whatever defines the image codes: FSQ levels, grid size) is
hashed into a fingerprint stored in every checkpoint; train, sample and eval
refuse to combine pieces whose fingerprints differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

SPECIALS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<res>")
TEXT_VOCAB = 256  # the byte-level tokenizer's text range, the default `text_vocab`
# Modality ids: a registry, so a new modality is a registration, not an if/else.
MODALITIES: dict[str, int] = {"pad": 0, "text": 1, "image": 2}


def register_modality(name: str) -> int:
    """Returns the id of `name`, adding it to the registry if new."""
    if name not in MODALITIES:
        MODALITIES[name] = max(MODALITIES.values()) + 1
    return MODALITIES[name]


class LayoutMismatchError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    image_codes: int          # number of distinct image tokens (product of FSQ levels)
    image_grid: tuple[int, int]  # tokens per image as (rows, cols)
    tokenizer_id: str = "bytes-v1"  # text tokenizer identity
    image_tokenizer_id: str = ""  # what the codes mean, e.g. "fsq[8, 5, 5, 5]-ds4-64px-<hash>"
    text_vocab: int = TEXT_VOCAB  # text ids [0, text_vocab); an imported LLM's vocab_size

    @property
    def special_offset(self) -> int:
        return self.text_vocab

    def special(self, name: str) -> int:
        return self.special_offset + SPECIALS.index(name)

    @property
    def pad(self) -> int:
        return self.special("<pad>")

    @property
    def bos(self) -> int:
        return self.special("<bos>")

    @property
    def eos(self) -> int:
        return self.special("<eos>")

    @property
    def boi(self) -> int:
        return self.special("<boi>")

    @property
    def eoi(self) -> int:
        return self.special("<eoi>")

    @property
    def res(self) -> int:
        return self.special("<res>")

    @property
    def image_offset(self) -> int:
        return self.special_offset + len(SPECIALS)

    @property
    def tokens_per_image(self) -> int:
        return self.image_grid[0] * self.image_grid[1]

    @property
    def vocab_size(self) -> int:
        return self.image_offset + self.image_codes

    def padded_vocab_size(self, multiple: int = 128) -> int:
        """Embedding rows: rounded up so the vocab dimension shards and tiles well."""
        return -(-self.vocab_size // multiple) * multiple

    def _fields(self) -> dict:
        """The JSON-able fields. `text_vocab` appears only when it is not the byte range,
        so layouts from before it existed keep their JSON and fingerprint."""
        d = dataclasses.asdict(self)
        d["image_grid"] = list(self.image_grid)
        if self.text_vocab == TEXT_VOCAB:
            del d["text_vocab"]
        d["specials"] = list(SPECIALS)
        return d

    def to_json(self) -> dict:
        return dict(self._fields(), fingerprint=self.fingerprint)

    @classmethod
    def from_json(cls, d: dict) -> TokenLayout:
        layout = cls(
            image_codes=int(d["image_codes"]),
            image_grid=tuple(d["image_grid"]),
            tokenizer_id=d["tokenizer_id"],
            image_tokenizer_id=d["image_tokenizer_id"],
            text_vocab=int(d.get("text_vocab", TEXT_VOCAB)),
        )
        if list(d.get("specials", SPECIALS)) != list(SPECIALS):
            raise LayoutMismatchError(f"special tokens differ: {d.get('specials')} vs {SPECIALS}")
        if "fingerprint" in d and d["fingerprint"] != layout.fingerprint:
            raise LayoutMismatchError("stored token-layout fingerprint does not match its fields")
        return layout

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self._fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def check_same(expected: TokenLayout, found: TokenLayout, what: str) -> None:
    """Raises one clear line when two pieces disagree on the token layout."""
    if expected.fingerprint != found.fingerprint:
        raise LayoutMismatchError(
            f"token layout of {what} ({found.fingerprint}: {found.image_tokenizer_id}, "
            f"{found.tokenizer_id}) does not match ({expected.fingerprint}: "
            f"{expected.image_tokenizer_id}, {expected.tokenizer_id})"
        )


def check_same_images(expected: TokenLayout, image_layout: TokenLayout, what: str) -> None:
    """Like check_same, for an image tokenizer's layout, which defines only the image part:
    the text part (bytes, a BPE, an imported LLM's vocabulary) is taken from `expected`."""
    image_part = dataclasses.replace(image_layout, tokenizer_id=expected.tokenizer_id,
                                     text_vocab=expected.text_vocab)
    check_same(expected, image_part, what)
