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


def reward(image: np.ndarray, scene: Scene, category: str) -> float:
    analysis = scene_checker.analyse(image)
    if category == "text":
        return max(0.0, 1.0 - scene_checker.char_error_rate(analysis.word, scene.word))
    return float(scene_checker.check_analysis(analysis, scene, category))


def rewards(images: Sequence[np.ndarray], scenes: Sequence[Scene],
            categories: Sequence[str]) -> np.ndarray:
    """float32 [N] rewards (module docstring)."""
    return np.asarray([reward(im, s, c) for im, s, c in zip(images, scenes, categories,
                                                          strict=True)], np.float32)


def group_advantages(rewards_PG: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """GRPO advantages: each reward minus its group's mean, over the group's std. A group
    whose samples all score the same carries no signal and gets zeros."""
    mean_P1 = rewards_PG.mean(axis=1, keepdims=True)
    std_P1 = rewards_PG.std(axis=1, keepdims=True)
    return np.where(std_P1 > eps, (rewards_PG - mean_P1) / np.maximum(std_P1, eps), 0.0)
