"""Text tokenizers: bytes and subword (BPE tokenizer.json) behind one interface."""

import hashlib
import json
import unicodedata

import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict
from tokenizers import Tokenizer, decoders, models, normalizers, processors

from mmgen.data import synthetic
from mmgen.models.transformer import Transformer, TransformerConfig
from mmgen.sample.generate import generate_captions, image_prompt_rows
from mmgen.tokenizers import text
from mmgen.tokenizers.bpe import compression_summary, train_bpe, train_bpe_from_captions
from mmgen.tokenizers.layout import LayoutMismatchError, TokenLayout
from mmgen.tokenizers.text import (
    BYTES,
    check_matches,
    load_text_tokenizer,
    tokenizer_for_run,
    with_text_tokenizer,
)

LAYOUT = TokenLayout(image_codes=16, image_grid=(2, 3), image_tokenizer_id="test")
VOCAB = 400
UNSEEN = ["a cat 🐱 on a mat", "猫と犬", "naïve café — ✓", "e\u0301 (combining accent)",
          "  leading and trailing spaces  ", "tab\tnew\nline", "", "<s> </s> <|endoftext|>",
          "\x00\x7f control", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👩‍👩‍👧"]


def _captions(n: int, seed: int, split: str) -> list[str]:
    rng = np.random.default_rng(seed)
    return [synthetic.caption(synthetic.sample_scene(rng, split=split), rng) for _ in range(n)]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(path, summary) of a BPE vocabulary trained on 400 synthetic training captions."""
    lines = []
    out = tmp_path_factory.mktemp("bpe")
    path, summary = train_bpe_from_captions(iter(_captions(400, 0, "train")), out, VOCAB,
                                            log=lines.append)
    assert lines and any("tokens vs" in line for line in lines)  # progress went to `log`
    return path, summary


def test_byte_tokenizer_round_trip_and_identity():
    tok = load_text_tokenizer("bytes")
    assert tok is BYTES and tok.id == "bytes-v1" == text.TOKENIZER_ID and tok.vocab_size == 256
    for s in ["two red circles", "", "ünïcødé ✓ 猫 🐱"]:
        ids = tok.encode(s)
        assert ids.dtype == np.int32 and ((ids >= 0) & (ids < 256)).all()
        assert tok.decode(ids) == s
        # the module-level functions are the same byte tokenizer, bit for bit
        np.testing.assert_array_equal(text.encode(s), ids)
        assert text.decode(ids) == s
    assert tok.decode([104, 300, -1, 105, 999]) == "hi"
    assert with_text_tokenizer(LAYOUT, tok).fingerprint == LAYOUT.fingerprint


def test_bpe_round_trips_unseen_text_without_unknowns(trained):
    tok = load_text_tokenizer(trained[0])
    assert tok.vocab_size == VOCAB and tok.id.startswith(f"bpe-{VOCAB}-")
    for s in _captions(200, 1234, "heldout") + UNSEEN:
        ids = tok.encode(s)
        assert ids.dtype == np.int32 and ((ids >= 0) & (ids < tok.vocab_size)).all()
        # byte-level: every string encodes; NFC is the one change the normaliser makes
        assert tok.decode(ids) == unicodedata.normalize("NFC", s)
    # out-of-range ids (mmgen specials, image codes) are skipped, as the byte decoder does
    ids = tok.encode("red circle")
    assert tok.decode([VOCAB, *ids, VOCAB + 5, -1]) == "red circle"
    # a sampled sequence may stop inside a character: replacement character, no exception
    cat = tok.encode("🐱").tolist()
    assert len(cat) > 1 and tok.decode(cat[:-1]) == "\ufffd"


def test_bpe_has_no_special_tokens(trained):
    stored = json.loads(trained[0].read_text())
    assert stored["added_tokens"] == [] and stored["post_processor"] is None
    assert stored["model"]["unk_token"] is None
    raw = Tokenizer.from_file(str(trained[0]))
    assert raw.get_vocab_size(with_added_tokens=True) == raw.get_vocab_size() == VOCAB


def test_bpe_compresses_captions(trained):
    _, summary = trained
    assert summary["num_captions"] == 400 and summary["vocab_size"] == VOCAB
    heldout = compression_summary(load_text_tokenizer(trained[0]),
                                  _captions(500, 1234, "heldout"))
    print(f"tokens/bytes: train {summary['tokens_per_byte']:.3f}, "
          f"held-out {heldout['tokens_per_byte']:.3f}")
    assert summary["tokens_per_byte"] < 0.4 and heldout["tokens_per_byte"] < 0.4
    # a byte-level piece is at least one byte: captions never get longer than in bytes
    assert heldout["max_tokens_per_caption"] <= synthetic.MAX_CAPTION_BYTES


def test_bpe_training_is_deterministic(trained, tmp_path):
    captions = _captions(400, 0, "train")
    again = train_bpe(iter(captions), vocab_size=VOCAB, out_path=tmp_path / "again.json",
                      log=lambda _: None)
    assert _sha(again) == _sha(trained[0])
    assert load_text_tokenizer(again).id == load_text_tokenizer(trained[0]).id


def test_loaded_tokenizer_gives_the_library_ids(trained):
    path = trained[0]
    raw = Tokenizer.from_file(str(path))
    from_file, from_dir = load_text_tokenizer(path), load_text_tokenizer(path.parent)
    assert from_file.id == from_dir.id == f"bpe-{VOCAB}-{_sha(path)[:12]}"
    for s in _captions(20, 7, "heldout"):
        want = raw.encode(s, add_special_tokens=False).ids
        assert from_file.encode(s).tolist() == from_dir.encode(s).tolist() == want


def test_bad_tokenizer_files_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_text_tokenizer(tmp_path / "missing.json")
    assert "\n" not in str(e.value) and "missing.json" in str(e.value)
    for name, content in [("broken.json", "{not json"), ("other.json", '{"a": 1}'),
                          ("binary.json", b"\xff\xfe")]:
        f = tmp_path / name
        f.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(ValueError) as e:
            load_text_tokenizer(f)
        assert "\n" not in str(e.value) and name in str(e.value)
    with pytest.raises(ValueError, match="below the 256 byte symbols"):
        train_bpe(["abc"], vocab_size=100, out_path=tmp_path / "t.json", log=lambda _: None)


def test_run_tokenizer_must_be_the_layouts(trained):
    path = trained[0]
    tok = load_text_tokenizer(path)
    bpe_layout = with_text_tokenizer(LAYOUT, tok)
    assert bpe_layout.text_vocab == VOCAB and bpe_layout.bos == VOCAB + 1
    assert bpe_layout.fingerprint != LAYOUT.fingerprint
    run = ConfigDict({"data": {"text_tokenizer": str(path)}})
    assert tokenizer_for_run(run, bpe_layout).id == tok.id
    # a config without the key is a byte-level run
    assert tokenizer_for_run(ConfigDict({"data": {}}), LAYOUT) is BYTES
    with pytest.raises(LayoutMismatchError) as e:
        tokenizer_for_run(run, LAYOUT)
    assert "\n" not in str(e.value) and tok.id in str(e.value)
    with pytest.raises(LayoutMismatchError):
        tokenizer_for_run(ConfigDict({"data": {"text_tokenizer": "bytes"}}), bpe_layout)
    with pytest.raises(LayoutMismatchError, match="text range holds"):
        check_matches(tok, TokenLayout(16, (2, 3), tokenizer_id=tok.id, text_vocab=300))
    # a Llama import names the same file hf-{model_type}-{V}-{sha256 of it, 12 hex}
    imported = TokenLayout(16, (2, 3), tokenizer_id=f"hf-llama-{VOCAB}-{_sha(path)[:12]}",
                           text_vocab=VOCAB)
    assert tokenizer_for_run(run, imported) is not None
    with pytest.raises(LayoutMismatchError):
        check_matches(tok, TokenLayout(16, (2, 3), tokenizer_id=f"hf-llama-{VOCAB}-0123456789ab",
                                       text_vocab=VOCAB))


def test_prompts_are_encoded_with_the_layouts_tokenizer(trained):
    tok = load_text_tokenizer(trained[0])
    layout = with_text_tokenizer(LAYOUT, tok)
    rows = image_prompt_rows(["a red circle"], layout, text_tokenizer=tok)
    tokens = rows["tokens"][0].tolist()
    assert tokens[0] == layout.bos and tokens[-2:] == [layout.boi, layout.res]
    assert tokens[1:-2] == tok.encode("a red circle").tolist()
    with pytest.raises(LayoutMismatchError):
        image_prompt_rows(["a red circle"], layout)  # the byte default is not this layout's
    with pytest.raises(LayoutMismatchError):
        image_prompt_rows(["a red circle"], LAYOUT, text_tokenizer=tok)


def test_generated_captions_are_decoded_with_the_layouts_tokenizer(trained):
    tok = load_text_tokenizer(trained[0])
    layout = with_text_tokenizer(LAYOUT, tok)
    cfg = TransformerConfig(vocab_size=layout.padded_vocab_size(), d_model=32, num_layers=1,
                            num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    images = [np.arange(6) % 16, (np.arange(6) * 5) % 16]
    captions = generate_captions(model, layout, images, max_bytes=8, temperature=1.0,
                                 text_tokenizer=tok)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    # sampling is confined to the text range, and a caption re-encodes to text ids
    for c in captions:
        assert (tok.encode(c) < tok.vocab_size).all()


def _llm_style_tokenizer_json() -> str:
    """A tiny Llama-2-style tokenizer.json: sentencepiece pieces with <0xNN> byte fallback,
    its own <unk>/<s>/</s>, a post-processor adding <s> and a stored truncation."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁", "a", "c", "t", "▁c", "at", "▁cat"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "c"), ("a", "t"), ("▁c", "at")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.enable_truncation(max_length=2)
    return tok.to_str()


def test_llm_tokenizer_json_is_used_without_its_specials(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(_llm_style_tokenizer_json())
    tok = load_text_tokenizer(tmp_path)
    assert tok.vocab_size == 3 + 256 + 7
    for s in ["cat cat cat", "a cat 猫 🐱", "<s> is text here </s>"]:
        ids = tok.encode(s)  # no <s> prepended, no truncation to 2, literal "<s>" stays text
        assert not set(ids.tolist()) & {0, 1, 2} and len(ids) > 2
        assert tok.decode(ids) == s
    cat = tok.encode("猫").tolist()  # "▁" then three <0x..> byte pieces
    assert tok.decode([1, *cat, 2]) == "猫"  # the file's own specials are dropped
    partial = tok.decode(cat[:-1])  # an unfinished UTF-8 character: no exception
    assert "\ufffd" in partial and "猫" not in partial
