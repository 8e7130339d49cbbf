"""Tests for the programmatic colour check (mmgen.eval.colour)."""

import numpy as np
from PIL import Image, ImageFilter

from mmgen.data import synthetic as S
from mmgen.eval import colour as C

SCENES = S.single_object_prompts(200, seed=0)
IMAGES = [S.render(s) for s in SCENES]


def test_ground_truth_renders_match():
    assert C.colour_match_rate(IMAGES, SCENES) >= 0.99


def test_shuffled_scenes_are_near_chance():
    perm = np.random.default_rng(0).permutation(len(SCENES))
    rate = C.colour_match_rate(IMAGES, [SCENES[i] for i in perm])
    assert rate <= 1 / len(S.COLOURS) + 0.1


def test_robust_to_noise_and_blur():
    rng = np.random.default_rng(0)
    degraded = []
    for img in IMAGES:
        blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(1.0)))
        noisy = blurred.astype(np.float32) / 255 + rng.normal(0, 10 / 255, img.shape)
        degraded.append(np.clip(noisy, 0, 1))  # float in [0, 1], like a decoder output
    assert C.colour_match_rate(degraded, SCENES) >= 0.97


def test_blank_and_textured_backgrounds_have_no_object_colour():
    for bg in S.BACKGROUNDS:
        for tex in S.TEXTURES:
            scene = S.Scene((S.SceneObject("star", "red", "small", "left"),), bg, tex)
            img = S.render(scene)
            assert C.dominant_object_colour(img) == "red"
            img[(img == S.COLOURS["red"]).all(-1)] = img[0, 0]  # erase the object
            assert C.dominant_object_colour(img) is None


def test_black_word_is_not_an_object_colour():
    scene = S.Scene((S.SceneObject("circle", "blue", "small", "center"),), "white", "plain",
                    "horse", "black")
    assert C.dominant_object_colour(S.render(scene)) == "blue"
