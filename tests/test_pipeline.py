"""grain pipeline: packed rows follow the schema, are deterministic and resume exactly."""

import zipfile

import numpy as np
import pytest
from ml_collections import ConfigDict

from mmgen.data import pipeline, token_cache
from mmgen.data.schema import FIELDS
from mmgen.tokenizers.layout import MODALITIES, TokenLayout

LAYOUT = TokenLayout(image_codes=64, image_grid=(4, 4), image_tokenizer_id="mean-colour")


def mean_colour_codes(images):
    """A real (if crude) image tokenizer: 4x4 grid of quantised mean brightness."""
    x = images.reshape(len(images), 4, 16, 4, 16, 3).mean(axis=(2, 4, 5))
    return np.clip(x / 4, 0, 63).astype(np.int32)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "c"
    token_cache.build(path, mean_colour_codes, num=40, seed=0, split="train", log=None)
    return token_cache.CachedScenes(path)


def data_cfg(**kw):
    d = ConfigDict(dict(seed=0, seq_len=2 * pipeline.max_example_length(LAYOUT),
                        examples_per_row=2, caption_task_fraction=0.5, caption_dropout=0.1,
                        image_size=64, max_objects=4,
                        p_word=0.3, p_texture=0.3))
    d.update(kw)
    return d


def test_rows_follow_schema(source):
    rows = pipeline.row_dataset(source, data_cfg(), LAYOUT)
    seen_captioning = seen_generation = False
    for i in range(12):
        r = rows[i]
        assert set(r) == set(FIELDS)
        seg = r["segment_ids"]
        assert set(np.unique(seg)) <= {0, 1, 2} and seg[0] == 1
        assert (np.diff(seg[seg > 0]) >= 0).all()  # segments contiguous, in order
        pad = seg == 0
        assert (r["tokens"][pad] == LAYOUT.pad).all() and (r["loss_weight"][pad] == 0).all()
        img = r["modality"] == MODALITIES["image"]
        ids = r["tokens"][img]
        assert ((ids >= LAYOUT.image_offset) | (ids == LAYOUT.res) | (ids == LAYOUT.eoi)).all()
        assert (r["loss_weight"][r["span_ids"] > 0] == 0).all()
        for s in (1, 2):  # positions restart per example
            assert (r["positions"][seg == s] == np.arange((seg == s).sum())).all()
        seen_captioning |= bool((r["span_ids"] > 0).any())
        seen_generation |= bool(((r["span_ids"] == 0) & img & (r["loss_weight"] > 0)).any())
    assert seen_captioning and seen_generation
    grid = r["rows"][r["tokens"] >= LAYOUT.image_offset]
    assert grid.min() == 1 and grid.max() == 4


def test_stream_is_deterministic_and_resumes_exactly(source):
    def stream(state=None, n=5):
        it = iter(pipeline.batches(pipeline.row_dataset(source, data_cfg(), LAYOUT), 3))
        if state is not None:
            it.set_state(state)
        return it, [next(it) for _ in range(n)]

    _, full = stream(n=6)
    it, first = stream(n=2)
    state = it.get_state()
    _, rest = stream(state, n=4)
    for a, b in zip(full, first + rest, strict=True):
        for k in FIELDS:
            np.testing.assert_array_equal(a[k], b[k])


def test_rows_too_short_fail_with_a_clear_message(source):
    with pytest.raises(ValueError, match="cannot hold"):
        pipeline.row_dataset(source, data_cfg(seq_len=100), LAYOUT)


def test_token_cache_rendered_by_worker_processes_equals_the_serial_one(tmp_path):
    """Large caches are rendered by spawned processes (token_cache.PARALLEL_MIN_SCENES):
    the same tokens and scenes, in the same order, as rendering in this process."""
    built = {w: token_cache.build(tmp_path / f"w{w}", mean_colour_codes, num=300, seed=3,
                                  split="train", batch=32, log=None, workers=w) for w in (0, 2)}
    ids = [np.load(built[w] / "tokens.npz")["image_ids"] for w in (0, 2)]
    assert ids[0].shape == (300, 16)
    np.testing.assert_array_equal(ids[0], ids[1])
    assert (built[0] / "scenes.jsonl").read_text() == (built[2] / "scenes.jsonl").read_text()
    assert len(set(map(bytes, ids[0]))) > 100  # distinct scenes, not one repeated chunk


def test_token_cache_is_keyed_by_scene_parameters(tmp_path):
    """Scenes drawn with another p_word are other scenes: they must not share a cache."""
    def path(**kw):
        return token_cache.cache_path(tmp_path, "fp", 0, "train", 40,
                                      pipeline.scene_kwargs(data_cfg(**kw)))

    assert path() == path()
    assert path(p_word=0.9) != path()
    assert path(max_objects=2) != path()
    words = {}
    for p_word in (0.0, 1.0):
        kw = {"p_word": p_word}
        built = token_cache.build(path(**kw), mean_colour_codes, num=16, seed=0,
                                  split="train", scene_kwargs=kw, log=None)
        words[p_word] = sum(s["word"] is not None for s in token_cache.CachedScenes(built).scenes)
    assert words[0.0] == 0 and words[1.0] >= 4, words  # busy scenes drop the word


def mean_colour_decode(ids):
    """Its inverse: each code back to a flat grey 16x16 patch."""
    grey = (np.asarray(ids) * 4 + 2).astype(np.uint8)
    return np.repeat(np.repeat(grey, 16, axis=1), 16, axis=2)[..., None].repeat(3, axis=-1)


def test_decoded_scenes_are_built_once_and_are_the_refiners_coarse_input(tmp_path):
    """The diffusion decoder's refiner input is decoded once per cache, in large batches
    (token_cache.build_decoded), not per training batch; a failed build leaves nothing
    that a later run would take for a finished one."""
    from mmgen.tasks import decoder_batches

    path = tmp_path / "c"
    token_cache.build(path, mean_colour_codes, num=40, seed=0, split="train", log=None)
    scenes = token_cache.CachedScenes(path)
    calls = []

    def decode(ids):
        calls.append(len(ids))
        if fail and len(calls) == 2:
            raise RuntimeError("killed")
        return mean_colour_decode(ids)

    fail = True
    with pytest.raises(RuntimeError):
        token_cache.build_decoded(scenes, decode, (4, 4), batch=16, log=None)
    assert not list(path.glob("decoded*")) and scenes.decoded is None
    fail, calls = False, []
    for _ in range(2):
        token_cache.build_decoded(scenes, decode, (4, 4), batch=16, log=None)
    assert calls == [16, 16, 8]  # once, in batches of 16
    np.testing.assert_array_equal(scenes.decoded,
                                  mean_colour_decode(scenes.image_ids.reshape(-1, 4, 4)))
    batch = next(iter(decoder_batches(scenes, data_cfg(), (4, 4), batch=8)))
    assert batch["coarse"].shape == (8, 64, 64, 3) and batch["coarse"].dtype == np.uint8
    np.testing.assert_array_equal(batch["coarse"], mean_colour_decode(batch["image_ids"]))
    plain = next(iter(decoder_batches(token_cache.CachedScenes(path), data_cfg(), (4, 4), 8)))
    assert "coarse" not in plain
    np.testing.assert_array_equal(plain["image_ids"], batch["image_ids"])


@pytest.mark.parametrize("damage", ["truncated", "short"])
def test_a_damaged_decoded_cache_is_rebuilt(tmp_path, damage):
    """A decoded.npy cut short (a truncated copy) used to end every decoder run reading it
    in a traceback (mmap length is greater than file size), one of another length in a
    traceback asking to delete it. Now it is said once and rebuilt."""
    path = token_cache.build(tmp_path / "c", mean_colour_codes, num=8, seed=0, split="train",
                             log=None)
    scenes = token_cache.CachedScenes(path)
    token_cache.build_decoded(scenes, mean_colour_decode, (4, 4), log=None)
    good = np.asarray(scenes.decoded).copy()
    out = path / "decoded.npy"
    if damage == "truncated":
        out.write_bytes(out.read_bytes()[:-100])
    else:
        np.save(out, good[:5])
    said, again = [], token_cache.CachedScenes(path)
    token_cache.build_decoded(again, mean_colour_decode, (4, 4), log=said.append)
    np.testing.assert_array_equal(again.decoded, good)
    assert len([s for s in said if "is damaged" in s and "rebuilding" in s]) == 1, said


def test_eos_is_a_target_only_after_a_caption():
    """The sampler ends an image at <eoi>; "<eoi> -> <eos>" in text->image rows would fight
    the captioning rows' "<eoi> -> caption" at the same position."""
    ids = np.arange(16)
    t2i = pipeline.example_stream(ids, "a red star", LAYOUT, captioning=False)
    cap = pipeline.example_stream(ids, "a red star", LAYOUT, captioning=True)
    for ex in (t2i, cap):
        assert ex["tokens"][-1] == LAYOUT.eos
    assert t2i["loss_weight"][-1] == 0.0 and t2i["tokens"][-2] == LAYOUT.eoi
    assert t2i["loss_weight"][-2] == 1.0  # <eoi> itself is still predicted
    assert cap["loss_weight"][-1] == 1.0  # a caption must learn to stop


@pytest.mark.parametrize("victim", ["tokens.npz", "scenes.jsonl"])
def test_a_damaged_token_cache_is_rebuilt(tmp_path, victim):
    """A cache marked done whose file was truncated used to fail every run reading it
    (BadZipFile, JSONDecodeError); it is now said once and rebuilt to the same contents."""
    path = tmp_path / "c"
    first = token_cache.open_or_build(path, mean_colour_codes, num=24, seed=0, split="train",
                                      log=None)
    ids, scenes = first.image_ids.copy(), list(first.scenes)
    data = (path / victim).read_bytes()
    (path / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises((ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile)):
        token_cache.CachedScenes(path)
    said = []
    again = token_cache.open_or_build(path, mean_colour_codes, num=24, seed=0, split="train",
                                      log=said.append)
    np.testing.assert_array_equal(again.image_ids, ids)
    assert again.scenes == scenes
    assert len([s for s in said if "is damaged" in s and "rebuilding" in s]) == 1, said
