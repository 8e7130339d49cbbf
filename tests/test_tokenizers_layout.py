import pytest

from mmgen.tokenizers import text
from mmgen.tokenizers.layout import (
    SPECIALS,
    LayoutMismatchError,
    TokenLayout,
    check_same,
    register_modality,
)


def test_byte_tokenizer_round_trip():
    for s in ["two red circles", "", "ünïcødé ✓", 'the word "cat" in green']:
        ids = text.encode(s)
        assert ids.dtype.kind == "i" and (ids < 256).all()
        assert text.decode(ids) == s


def test_decode_drops_non_text_ids():
    assert text.decode([104, 300, 105, 999]) == "hi"


def test_layout_blocks_do_not_overlap():
    lay = TokenLayout(image_codes=1000, image_grid=(16, 16), image_tokenizer_id="x")
    specials = [lay.special(s) for s in SPECIALS]
    assert min(specials) == 256 and len(set(specials)) == len(SPECIALS)
    assert lay.image_offset == max(specials) + 1
    assert lay.vocab_size == lay.image_offset + 1000
    assert lay.padded_vocab_size() % 128 == 0 and lay.padded_vocab_size() >= lay.vocab_size
    assert lay.tokens_per_image == 256


def test_fingerprint_round_trip_and_mismatch_error():
    a = TokenLayout(image_codes=1000, image_grid=(16, 16), image_tokenizer_id="fsq-a")
    b = TokenLayout(image_codes=1000, image_grid=(16, 16), image_tokenizer_id="fsq-b")
    assert TokenLayout.from_json(a.to_json()) == a
    check_same(a, TokenLayout.from_json(a.to_json()), "same")
    assert a.fingerprint != b.fingerprint
    with pytest.raises(LayoutMismatchError, match="does not match"):
        check_same(a, b, "tokenizer")
    tampered = dict(a.to_json(), image_codes=999)
    with pytest.raises(LayoutMismatchError, match="fingerprint"):
        TokenLayout.from_json(tampered)


def test_modality_registry_is_open():
    first = register_modality("audio")
    assert register_modality("audio") == first and first > 2
