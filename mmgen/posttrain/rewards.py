"""Programmatic rewards for RL: the eval scene checker and a text-rendering reward.

A reward is a float in [0, 1] per (image, scene, category). Object categories score the
scene checker's GenEval-style check (the same one `mmgen eval --suite scenes` reports);
"text" scores 1 - character error rate of the word read off the image, so a nearly
right word earns partial credit (its exact-word check is the eval's metric).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmgen.data.synthetic import Scene
from mmgen.eval import scene_checker

KINDS = ("check", "partial")


def attribute_credit(analysis: scene_checker.Analysis, scene: Scene) -> float:
    """Mean over the scene's objects of three indicators: some detection has its colour,
    its shape, and its shape in its colour."""
    found = [(d.shape, d.colour) for d in analysis.detections]
    per_object = [np.mean([any(c == o.colour for _, c in found),
                           any(s == o.shape for s, _ in found),
                           (o.shape, o.colour) in found]) for o in scene.objects]
    return float(np.mean(per_object))


def score(image: np.ndarray, scene: Scene, category: str, kind: str = "check"
          ) -> tuple[float, bool]:
    """(reward, whether the category's check passes), from one analysis of the image.

    kind "check": the reward is the check; "partial": half the check plus half
    attribute_credit, which still ranks the samples of a group when none passes (a
    sparse reward leaves most groups of a weak model without any signal)."""
    analysis = scene_checker.analyse(image)
    passed = scene_checker.check_analysis(analysis, scene, category)
    if category == "text":
        return max(0.0, 1.0 - scene_checker.char_error_rate(analysis.word, scene.word)), passed
    if kind == "check":
        return float(passed), passed
    return 0.5 * float(passed) + 0.5 * attribute_credit(analysis, scene), passed


def rewards(images: Sequence[np.ndarray], scenes: Sequence[Scene],
            categories: Sequence[str], kind: str = "check") -> tuple[np.ndarray, np.ndarray]:
    """(float32 [N] rewards, bool [N] checks passed): each image analysed once."""
    scored = [score(im, s, c, kind) for im, s, c in zip(images, scenes, categories,
                                                      strict=True)]
    return (np.asarray([r for r, _ in scored], np.float32),
            np.asarray([p for _, p in scored], bool))


def group_advantages(rewards_PG: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """GRPO advantages: each reward minus its group's mean, over the group's std. A group
    whose samples all score the same carries no signal and gets zeros."""
    mean_P1 = rewards_PG.mean(axis=1, keepdims=True)
    std_P1 = rewards_PG.std(axis=1, keepdims=True)
    return np.where(std_P1 > eps, (rewards_PG - mean_P1) / np.maximum(std_P1, eps), 0.0)
