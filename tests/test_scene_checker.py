"""Validation of the programmatic scene checker (it is itself an evaluation instrument).

Chance level: for a uniformly random pairing that moves every image (a random derangement),
each off-diagonal (image i, scene j) pair is equally likely, so the expected score is exactly
the mean of the off-diagonal entries of the full check matrix M[i, j] = check(image_i, scene_j).
We compute M from one analysis per image, so chance costs no extra detection.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mmgen.data import synthetic as syn
from mmgen.eval import scene_checker as sc

N = 200


def _degrade(image: np.ndarray, seed: int) -> np.ndarray:
    """Mild blur (PIL GaussianBlur radius 1) plus Gaussian noise of sigma 8/255."""
    x = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1)), np.float32)
    x += np.random.default_rng(seed).normal(0.0, 8.0, x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


@functools.cache
def _data(category: str) -> tuple[list[syn.Scene], list[sc.Analysis], list[sc.Analysis]]:
    scenes = sc.category_scenes(category, N, seed=0)
    images = [syn.render(s) for s in scenes]
    clean = [sc.analyse(im) for im in images]
    noisy = [sc.analyse(_degrade(im, i)) for i, im in enumerate(images)]
    return scenes, clean, noisy


def _score(analyses: list[sc.Analysis], scenes: list[syn.Scene], category: str) -> float:
    return float(np.mean([sc.check_analysis(a, s, category)
                          for a, s in zip(analyses, scenes, strict=True)]))


@pytest.mark.parametrize("category", sc.CATEGORIES)
def test_category_scenes_are_valid_and_held_out(category: str) -> None:
    scenes = _data(category)[0]
    assert scenes == sc.category_scenes(category, N, seed=0)  # deterministic
    assert len(set(scenes)) > 1
    for s in scenes:
        assert syn.fits(s) and s.texture == "plain"
        pairs = {(o.colour, o.shape) for o in s.objects}
        if category == "text":
            assert (s.word, s.word_colour) in syn.HELD_OUT_WORD_COLOUR
            assert not pairs & syn.HELD_OUT_COLOUR_SHAPE
        else:
            assert s.word is None and pairs & syn.HELD_OUT_COLOUR_SHAPE
        if category == "counting":
            assert 2 <= len(s.objects) <= 4 and len({(o.shape, o.colour, o.size)
                                                     for o in s.objects}) == 1
        if category in ("two_objects", "colour_attribution", "position"):
            a, b = s.objects
            assert a.shape != b.shape and a.colour != b.colour


@pytest.mark.parametrize("category", sc.CATEGORIES)
def test_ground_truth_renders_pass(category: str) -> None:
    scenes, clean, _ = _data(category)
    assert _score(clean, scenes, category) >= 0.99


@pytest.mark.parametrize("category", sc.CATEGORIES)
def test_shuffled_pairs_score_near_chance(category: str) -> None:
    scenes, clean, _ = _data(category)
    m = np.array([[sc.check_analysis(a, s, category) for s in scenes] for a in clean], float)
    chance = (m.sum() - np.trace(m)) / (N * (N - 1))
    perm = np.roll(np.arange(N), 7)  # a fixed permutation without fixed points
    assert (perm != np.arange(N)).all()
    shuffled = float(m[np.arange(N), perm].mean())
    assert shuffled <= chance + 0.1
    assert chance < 0.5  # the checker discriminates at all


@pytest.mark.parametrize("category", sc.CATEGORIES)
def test_robust_to_blur_and_noise(category: str) -> None:
    # Measured at seed 0: 1.0 everywhere except colours 0.99, colour_attribution 0.995 (a blurred
    # small cyan hexagon read as a circle, a small red star as a diamond); text 1.0.
    scenes, _, noisy = _data(category)
    assert _score(noisy, scenes, category) >= 0.95


def test_detect_objects_matches_training_scenes() -> None:
    hits = 0
    for i in range(300):
        rng = np.random.default_rng([11, i])
        # Half with a word, textures on half: the hard cases for text rejection and backgrounds.
        s = syn.sample_scene(rng, p_word=0.5, p_texture=0.5)
        dets = sc.detect_objects(syn.render(s))
        hits += sorted((d.colour, d.shape, d.position) for d in dets) == sorted(
            (o.colour, o.shape, o.position) for o in s.objects)
    assert hits >= 297


def test_read_word_and_no_text() -> None:
    for s in sc.category_scenes("text", 30, seed=1, split="train"):
        assert sc.read_word(syn.render(s)) == s.word
    for s in sc.category_scenes("two_objects", 30, seed=1):
        assert sc.read_word(syn.render(s)) is None


def test_coloured_text_is_not_an_object() -> None:
    # Words in an object colour must not show up as detections, also when blurred.
    obj = syn.SceneObject("circle", "blue", "small", "left")
    for colour in syn.WORD_COLOURS:
        for word in ("queen", "cat", "mouse"):
            s = syn.Scene((obj,), "gray", "plain", word, colour)
            for im in (syn.render(s), _degrade(syn.render(s), 0)):
                assert [(d.shape, d.position) for d in sc.detect_objects(im)] == [
                    ("circle", "left")]


def test_scale_independent() -> None:
    s = syn.Scene((syn.SceneObject("star", "red", "small", "left"),
                   syn.SceneObject("hexagon", "cyan", "large", "center")), "beige", "checks",
                  "bread", "green")
    for size in (48, 96, 128):
        a = sc.analyse(syn.render(s, size))
        assert [(d.colour, d.shape, d.position) for d in a.detections] == [
            ("red", "star", "left"), ("cyan", "hexagon", "center")]
        assert a.word == "bread"


def test_check_semantics_and_errors() -> None:
    s = syn.Scene((syn.SceneObject("square", "green", "large", "left"),
                   syn.SceneObject("square", "green", "large", "right")), "white", "plain")
    image = syn.render(s)
    assert sc.check(image, s, "counting")
    three = syn.Scene(s.objects + (syn.SceneObject("square", "green", "large", "top"),),
                      "white", "plain")
    assert not sc.check(image, three, "counting")
    moved = syn.Scene((syn.SceneObject("square", "green", "large", "top"),), "white", "plain")
    assert sc.check(image, moved, "single_object") and not sc.check(image, moved, "position")
    recoloured = syn.Scene((syn.SceneObject("square", "red", "large", "left"),), "white",
                           "plain")
    assert not sc.check(image, recoloured, "colours")
    assert sc.score([image, image], [s, three], "counting") == 0.5
    assert sc.char_error_rate("bead", "bread") == 0.2 and sc.char_error_rate(None, "cat") == 1.0
    with pytest.raises(ValueError):
        sc.check(image, s, "nonsense")
    with pytest.raises(ValueError):
        sc.score([image], [s, s], "counting")
