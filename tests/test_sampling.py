"""Sampling controls (top-p, guidance, stop tokens, seeds), the structure constraint,
edit prompts, and `mmgen sample` (docs/sampling.md). Decode-vs-forward equivalence of
the cache itself is tests/test_model_decode.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmgen.cli import main as mmgen
from mmgen.data.schema import NULL_CAPTION, Stream, check_no_loss_in_spans
from mmgen.models.transformer import Transformer, TransformerConfig
from mmgen.sample.command import one_line
from mmgen.sample.decode import DecodeSpec
from mmgen.sample.generate import (
    caption_prompt_rows,
    decode_rows,
    edit_image_ids,
    generate_captions,
    image_prompt_rows,
    prompt_streams,
)
from mmgen.sample.sampling import Sampling, sample_logits, top_p_keep
from mmgen.tokenizers.layout import TokenLayout

LAYOUT = TokenLayout(image_codes=16, image_grid=(2, 3), image_tokenizer_id="test")
GRID = LAYOUT.image_grid
GREEDY, HOT = Sampling(0.0), Sampling(1.5)
TOL = 1e-4  # float32 logits of order 1-10: cache vs full forward, u + 1 * (c - u) vs c


@pytest.fixture(scope="module")
def model():
    cfg = TransformerConfig(vocab_size=LAYOUT.padded_vocab_size(), d_model=32, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, max_image_grid=4)
    return Transformer(cfg, rngs=nnx.Rngs(1))


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, LAYOUT.image_codes, GRID) for _ in range(n)]


# --- top-p ------------------------------------------------------------------------------

def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = np.array([0.1, 0.5, 0.05, 0.2, 0.15])  # ranked: 0.5 0.2 0.15 0.1 0.05
    logits = jnp.log(jnp.asarray([probs]))
    for p, want in [(0.3, {1}), (0.69, {1, 3}), (0.71, {1, 3, 4}), (0.84, {1, 3, 4}),
                    (0.86, {0, 1, 3, 4}), (1.0, {0, 1, 2, 3, 4})]:
        got = set(np.nonzero(np.asarray(top_p_keep(logits, p))[0])[0].tolist())
        assert got == want, (p, got)


def test_top_p_small_is_greedy_and_one_is_plain_temperature():
    logits = jax.random.normal(jax.random.key(0), (64, 50)) * 3
    greedy = np.asarray(jnp.argmax(logits, -1))
    for seed in range(5):
        key = jax.random.key(seed)
        tiny = sample_logits(key, logits, Sampling(1.0, 0, 1e-6))
        np.testing.assert_array_equal(np.asarray(tiny), greedy)
        plain = jax.random.categorical(key, logits / 0.7, axis=-1)
        full = sample_logits(key, logits, Sampling(0.7, 0, 1.0))
        np.testing.assert_array_equal(np.asarray(full), np.asarray(plain))
    assert np.asarray(top_p_keep(logits, 1.0)).all()  # the mask itself keeps everything


def test_top_p_small_decodes_greedily(model):
    rows = image_prompt_rows(["a red circle", "x"], LAYOUT)
    greedy = decode_rows(model, LAYOUT, rows, DecodeSpec.image(GRID, GREEDY, False))
    tiny = decode_rows(model, LAYOUT, rows, DecodeSpec.image(GRID, Sampling(1.0, 0, 1e-6), False),
                       seed=5)
    np.testing.assert_array_equal(tiny["tokens"], greedy["tokens"])


# --- guidance ---------------------------------------------------------------------------

def test_guidance_scale_one_is_the_conditional_logits(model):
    prompts = ["a red circle", "two"]
    cond = image_prompt_rows(prompts, LAYOUT)
    both = image_prompt_rows(prompts + [NULL_CAPTION] * 2, LAYOUT)
    want = np.asarray(model({k: jnp.asarray(v) for k, v in cond.items()}))[:, -1]
    spec = DecodeSpec.image(GRID, GREEDY, guided=True)
    got = decode_rows(model, LAYOUT, both, spec, cfg_scale=1.0)
    np.testing.assert_allclose(got["first_logits"], want, atol=TOL, rtol=TOL)
    plain = decode_rows(model, LAYOUT, cond, DecodeSpec.image(GRID, GREEDY, False))
    np.testing.assert_array_equal(got["tokens"], plain["tokens"])
    null = np.asarray(model({k: jnp.asarray(v) for k, v in both.items()}))[2:, -1]
    zero = decode_rows(model, LAYOUT, both, spec, cfg_scale=0.0)
    np.testing.assert_allclose(zero["first_logits"], null, atol=TOL, rtol=TOL)


# --- stop tokens --------------------------------------------------------------------------

def test_rows_stop_at_first_stop_token_then_pad_and_loop_ends_early(model):
    rows = caption_prompt_rows(_images(3), LAYOUT)
    n = 12
    free = decode_rows(model, LAYOUT, rows, DecodeSpec.text(n, GREEDY, (LAYOUT.eos,)))
    assert free["steps"] == n or (free["tokens"] == LAYOUT.eos).any(1).all()
    stops = {LAYOUT.eos, *free["tokens"][:, 2].tolist()}  # every row stops by step 2
    got = decode_rows(model, LAYOUT, rows, DecodeSpec.text(n, GREEDY, stops))
    ends = [int(np.nonzero(np.isin(r, list(stops)))[0][0]) for r in free["tokens"]]
    for row, free_row, end in zip(got["tokens"], free["tokens"], ends, strict=True):
        np.testing.assert_array_equal(row[: end + 1], free_row[: end + 1])  # up to the stop
        assert (row[end + 1:] == LAYOUT.pad).all()
    assert got["steps"] == max(ends) + 1 < n


def test_captions_end_at_user_stop_ids(model):
    images = _images(2, seed=3)
    full = generate_captions(model, LAYOUT, images, max_bytes=10)
    first = [c.encode()[0] for c in full if c]
    cut = generate_captions(model, LAYOUT, images, max_bytes=10, stop_ids=first)
    assert all(c == "" or c.encode()[0] not in first for c in cut)
    assert any(c == "" for c in cut)


# --- structure, seeds -------------------------------------------------------------------

def _tilted(model, boost=30.0):
    """The model, with specials made overwhelmingly likely: the constraint must hold anyway."""
    graphdef, state = nnx.split(model)
    tilted = nnx.merge(graphdef, state)
    special = jnp.arange(LAYOUT.special_offset, LAYOUT.image_offset)
    tilted.unembed_DV[...] = tilted.unembed_DV[...].at[:, special].add(boost)
    return tilted


def test_image_span_is_exactly_n_image_ids_then_eoi_over_many_seeds(model):
    tilted = _tilted(model)
    rows = image_prompt_rows(["a", "bb", "a red circle"], LAYOUT)
    spec = DecodeSpec.image(GRID, HOT, guided=False)
    n_img = GRID[0] * GRID[1]
    for seed in range(25):
        tok = decode_rows(tilted, LAYOUT, rows, spec, seed=seed)["tokens"]
        ids = tok[:, :n_img] - LAYOUT.image_offset
        assert tok.shape[1] == n_img + 1 and (tok[:, -1] == LAYOUT.eoi).all()
        assert ((ids >= 0) & (ids < LAYOUT.image_codes)).all()


def test_same_seed_same_output_different_seeds_differ(model):
    images = _images(4, seed=1)
    kw = dict(max_bytes=8, temperature=1.0, top_p=0.95)
    a = generate_captions(model, LAYOUT, images, seed=1, **kw)
    assert a == generate_captions(model, LAYOUT, images, seed=1, **kw)
    assert a != generate_captions(model, LAYOUT, images, seed=2, **kw)
    ekw = dict(temperature=1.0, top_p=0.9, cfg_scale=3.0)
    e1 = edit_image_ids(model, LAYOUT, images[:2], ["make it red", "x"], seed=7, **ekw)
    np.testing.assert_array_equal(
        e1, edit_image_ids(model, LAYOUT, images[:2], ["make it red", "x"], seed=7, **ekw))
    assert not np.array_equal(
        e1, edit_image_ids(model, LAYOUT, images[:2], ["make it red", "x"], seed=8, **ekw))


def test_a_prompts_image_does_not_depend_on_its_batch(model):
    """The eval suites pad fewer than 64 prompts to the next power of two, not to 64
    (suites.batch_width): that is only the same eval if a prompt's sampled tokens do not
    depend on how many rows are beside it (per-row keys; guidance on)."""
    from mmgen.eval.suites import BATCH, batch_width
    from mmgen.sample.generate import generate_image_ids

    assert [batch_width(n) for n in (1, 8, 9, 16, 17, 33, 64, 65, 500)] == [
        8, 8, 16, 16, 32, 64, 64, BATCH, BATCH]
    prompts = [f"a red circle {i}" for i in range(16)]
    # every prompt padded to one length, as the suites do (min_prompt_len)
    kw = dict(seed=3, temperature=1.0, cfg_scale=3.0, min_prompt_len=24)
    narrow = generate_image_ids(model, LAYOUT, prompts[:8], **kw)
    wide = generate_image_ids(model, LAYOUT, prompts, **kw)
    np.testing.assert_array_equal(narrow, wide[:8])
    assert not np.array_equal(wide[:8], wide[8:])  # rows differ: not one row repeated


# --- editing ----------------------------------------------------------------------------

def test_edit_prompt_is_the_training_prefix_with_a_lossless_bidirectional_span():
    src, tgt = _images(2, seed=2)
    (prompt,) = prompt_streams(["make it red"], LAYOUT, [src])
    train = Stream(LAYOUT).special("<bos>").image(src, generate=False).text(
        np.frombuffer(b"make it red", np.uint8)).image(tgt, generate=True).arrays()
    P = len(prompt["tokens"])
    for k in prompt:
        np.testing.assert_array_equal(prompt[k], train[k][:P])
    in_span = prompt["span_ids"] > 0
    image_ids = (prompt["tokens"] >= LAYOUT.image_offset)
    np.testing.assert_array_equal(in_span, image_ids)
    assert in_span.sum() == src.size and (prompt["loss_weight"][in_span] == 0).all()
    check_no_loss_in_spans(prompt)


def test_cached_edit_decode_matches_full_forward(model):
    """Teacher forcing: a full forward pass over prompt + generated tokens picks the same
    greedy tokens the cached loop did, and its last-prompt logits match (TOL)."""
    images = _images(2, seed=4)
    rows = image_prompt_rows(["make it red", "x"], LAYOUT, images)
    out = decode_rows(model, LAYOUT, rows, DecodeSpec.image(GRID, GREEDY, False))
    n_img = GRID[0] * GRID[1]
    N = len(images)
    r, c = np.divmod(np.arange(n_img), GRID[1])
    gen = {"tokens": out["tokens"][:, :n_img],
           "positions": rows["positions"][:, -1:] + 1 + np.arange(n_img),
           "rows": np.tile(r + 1, (N, 1)), "cols": np.tile(c + 1, (N, 1)),
           "segment_ids": np.ones((N, n_img)), "span_ids": np.zeros((N, n_img))}
    full = {k: jnp.asarray(np.concatenate([rows[k], gen[k]], 1), jnp.int32) for k in gen}
    logits = np.asarray(model(full))
    P = rows["tokens"].shape[1]
    np.testing.assert_allclose(out["first_logits"], logits[:, P - 1], atol=TOL, rtol=TOL)
    lo = LAYOUT.image_offset
    forced = logits[:, P - 1:P - 1 + n_img, lo:lo + LAYOUT.image_codes].argmax(-1) + lo
    np.testing.assert_array_equal(forced, out["tokens"][:, :n_img])


# --- CLI --------------------------------------------------------------------------------

def test_cli_input_errors_are_one_line_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    cases = [(["--image", str(tmp_path / "missing.png"), "--mode", "caption"], "does not exist"),
             (["--prompts-file", str(empty)], "has no prompts"),
             (["--image", str(tmp_path / "missing.png"), "--prompt", "x", "--mode", "image"],
              "not of --mode image")]
    for argv, msg in cases:
        rc = mmgen(["sample", "--checkpoint", str(tmp_path / "no_run"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and msg in err[0], err


def test_rows_longer_than_training_rows_get_a_one_line_warning():
    from mmgen.sample.command import row_length_warning

    assert row_length_warning(320, 320) is None
    warning = row_length_warning(640, 320)
    assert "640 tokens" in warning and "data.seq_len" in warning and "\n" not in warning


@pytest.mark.slow
def test_cli_caption_and_edit_on_trained_run(runs, tmp_path, capsys):
    from PIL import Image

    from mmgen.data import synthetic

    png = tmp_path / "in.png"
    Image.fromarray(synthetic.example(0, 7, "heldout", size=64)["image"]).save(png)
    run = ["sample", "--checkpoint", str(runs["joint"])]
    assert mmgen([*run, "--image", str(png), "--mode", "caption", "--out",
                  str(tmp_path / "caps")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    rows = json.loads((tmp_path / "caps.json").read_text())
    assert [one_line(r["caption"]) for r in rows] == printed[-1:]
    assert rows[0]["image"] == str(png)
    assert mmgen([*run, "--image", str(png), "--prompt", "make the circle red", "--num", "2",
                  "--out", str(tmp_path / "edit.png")]) == 0
    assert Image.open(tmp_path / "edit.png").size == (3 * 64 + 4 * 2, 64 + 2 * 2)
    capsys.readouterr()
    assert mmgen([*run, "--image", str(tmp_path / "nope.png"), "--mode", "caption"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
