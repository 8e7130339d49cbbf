"""Tests for the built-in synthetic world (mmgen.data.synthetic)."""

import dataclasses

import numpy as np
import pytest

from mmgen.data import synthetic as S


def _key(objects):
    return sorted(dataclasses.astuple(o) for o in objects)


def _scenes(split, n=2000, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return [S.sample_scene(rng, split=split, **kw) for _ in range(n)]


def test_vocabulary_sizes_and_distinct_names():
    assert len(S.SHAPES) >= 6 and len(S.COLOURS) >= 8 and len(S.WORDS) >= 50
    assert all(w.islower() and 3 <= len(w) <= 6 for w in S.WORDS)
    caption_vocab = set(S.SHAPES) | set(S.WORD_COLOURS) | set(S.SIZES) | set(S.POSITIONS) | set(
        S.BACKGROUNDS) | set(S.TEXTURES)
    assert not caption_vocab & set(S.WORDS), "a word would confuse parse_caption"
    # Backgrounds are far from every object colour, so the colour check can separate them.
    for b in S.BACKGROUNDS.values():
        for c in S.WORD_COLOURS.values():
            assert np.linalg.norm(np.subtract(b, c)) > 120


def test_example_is_deterministic_and_index_dependent():
    a, b = S.example(5, seed=3), S.example(5, seed=3)
    S.example(6, seed=3)  # call order must not matter
    c = S.example(5, seed=3)
    assert a["image"].tobytes() == b["image"].tobytes() == c["image"].tobytes()
    assert a["caption"] == b["caption"] == c["caption"] and a["scene"] == c["scene"]
    others = [S.example(i, seed=3) for i in range(6, 12)]
    assert all(o["image"].tobytes() != a["image"].tobytes() for o in others)
    assert S.example(5, seed=4)["caption"] != a["caption"] or S.example(5, seed=4)[
        "image"].tobytes() != a["image"].tobytes()
    assert S.example(5, seed=3, split="heldout")["scene"] != a["scene"]


def test_render_shape_dtype_and_size_argument():
    scene = S.example(0, seed=0)["scene"]
    img = S.render(scene)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert S.render(scene, size=128).shape == (128, 128, 3)


def test_train_split_never_contains_held_out_pairs():
    for s in _scenes("train", p_word=0.5):
        assert not {(o.colour, o.shape) for o in s.objects} & S.HELD_OUT_COLOUR_SHAPE
        assert (s.word, s.word_colour) not in S.HELD_OUT_WORD_COLOUR


def test_heldout_split_always_contains_a_held_out_pair():
    scenes = _scenes("heldout")
    via_word = 0
    for s in scenes:
        obj = {(o.colour, o.shape) for o in s.objects} & S.HELD_OUT_COLOUR_SHAPE
        word = (s.word, s.word_colour) in S.HELD_OUT_WORD_COLOUR
        assert obj or word, s
        via_word += word
    assert 0 < via_word < len(scenes)  # both kinds of held-out composition occur


def test_captions_bounded_and_parse_back():
    rng = np.random.default_rng(1)
    templates_used = set()
    for s in _scenes("train", p_word=0.5, p_texture=0.5) + _scenes("heldout", n=300):
        text = S.caption(s, rng)
        assert len(text.encode("utf-8")) <= S.MAX_CAPTION_BYTES, text
        parsed = S.parse_caption(text)
        assert parsed is not None, text
        assert _key(parsed["objects"]) == _key(s.objects), text
        assert (parsed["word"], parsed["word_colour"]) == (s.word, s.word_colour), text
        assert parsed["background"] in (None, s.background)
        first = text.split()[0]
        templates_used.add("compact" if first.isdigit() or first in S.SIZES else
                           "scene" if text.startswith("a scene with") else
                           "written" if "written in" in text else
                           "word" if "the word" in text else "natural")
        for o in s.objects:
            assert o.colour in text and o.shape in text
    assert len(templates_used) == 5, templates_used


def test_long_scene_caption_is_truncated_to_bound():
    objs = tuple(S.SceneObject("triangle", c, "large", p) for c, p in zip(
        ["purple", "orange", "yellow", "green"], ["left", "right", "top", "center"], strict=True))
    scene = S.Scene(objs, "white", "plain", "pizza", "black")
    assert not S.fits(scene)
    assert len(S.caption(scene, np.random.default_rng(0)).encode()) <= S.MAX_CAPTION_BYTES


def test_counts_positions_and_no_overlap():
    """Each object's colour appears only inside its own slot box, with the right pixel count."""
    for s in _scenes("train", n=300, seed=2, p_word=0.0):
        img = S.render(s)
        for o in s.objects:
            mask = (img == S.COLOURS[o.colour]).all(-1)
            x0, y0, x1, y1 = S.object_box(o.position, o.size)
            inside = mask[y0:y1 + 1, x0:x1 + 1].sum()
            side = x1 - x0 + 1
            assert inside >= 0.3 * side * side, (o, inside)
            same = [p for p in s.objects if p.colour == o.colour]
            boxes = [S.object_box(p.position, p.size) for p in same]
            total = sum(mask[b[1]:b[3] + 1, b[0]:b[2] + 1].sum() for b in boxes)
            assert total == mask.sum(), "colour leaked outside its slot(s): overlap"
        groups = S.parse_caption(S.caption(s, np.random.default_rng(0)))["objects"]
        assert len(groups) == len(s.objects)


def test_word_is_rendered_away_from_objects():
    scenes = _scenes("train", n=200, seed=3, p_word=1.0)
    # A word is only dropped when the caption would not fit MAX_CAPTION_BYTES.
    assert sum(s.word is not None for s in scenes) > 0.5 * len(scenes)
    for s in scenes:
        if s.word is None:
            continue
        assert {"top", "bottom"} - {o.position for o in s.objects}
        without = S.render(dataclasses.replace(s, word=None, word_colour=None))
        diff = (S.render(s) != without).any(-1)
        assert diff.sum() > 20  # the word is visible
        for o in s.objects:  # ... and never drawn over an object
            x0, y0, x1, y1 = S.object_box(o.position, o.size)
            assert not diff[y0:y1 + 1, x0:x1 + 1].any()


def test_json_round_trip_and_validation():
    s = S.example(7, seed=0, p_word=1.0)["scene"]
    assert S.Scene.from_json(s.to_json()) == s
    with pytest.raises(ValueError):
        S.Scene((S.SceneObject("blob", "red", "small", "left"),), "white", "plain")
    with pytest.raises(ValueError):
        S.Scene((S.SceneObject("star", "red", "small", "left"),) * 2, "white", "plain")
    with pytest.raises(ValueError):
        S.sample_scene(np.random.default_rng(0), split="test")


def test_num_objects_and_single_object_prompts():
    assert all(len(s.objects) == 4 for s in _scenes("train", n=100, num_objects=4))
    prompts = S.single_object_prompts(50, seed=0)
    assert prompts == S.single_object_prompts(50, seed=0)
    assert all(len(p.objects) == 1 and p.word is None and p.texture == "plain" for p in prompts)
    assert not {(p.objects[0].colour, p.objects[0].shape) for p in prompts} & (
        S.HELD_OUT_COLOUR_SHAPE)
    assert len({p.objects[0].colour for p in prompts}) == len(S.COLOURS)
