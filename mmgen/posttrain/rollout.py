"""GRPO's data source: on-policy rollouts sampled from the live train state.

Each `next()` draws `rl.prompts_per_step` prompts of training compositions (never a
held-out one), samples `rl.group_size` images per prompt with the KV-cache sampler from
the current parameters (no guidance, temperature `rl.temperature`, no truncation, so the
sampling distribution is exactly the one the loss differentiates), scores them with the
programmatic rewards, normalises advantages within each group and returns one training
row per sample: `<bos> caption <boi> <res> ids <eoi> <eos>` with loss weight on the image
ids only, plus per-token `advantage`, `sample_logp` (from the sampler) and `ref_logp`
(from the frozen reference).

It is an ordinary data iterator to the loop: its state (rollouts done) is saved in every
checkpoint, and prompts and sampling seeds are functions of the rollout index, so a
resumed run samples what the uninterrupted one would have. The loop hands it the live
state through `RolloutHook.begin` before the first step.
"""

from __future__ import annotations

import time

import numpy as np

from mmgen.data import synthetic as syn
from mmgen.data.pipeline import example_stream
from mmgen.data.schema import pack_row
from mmgen.eval.scene_checker import category_scenes
from mmgen.posttrain.rewards import group_advantages, rewards
from mmgen.sample.generate import sample_images
from mmgen.tokenizers.layout import MODALITIES
from mmgen.train.hooks import Context, Hook


def prompt_scenes(categories: list[str], n: int, seed: int, index: int
                  ) -> list[tuple[str, syn.Scene, str]]:
    """(category, scene, caption) of rollout `index`: training compositions only."""
    out = []
    for j in range(n):
        k = index * n + j
        cat = categories[k % len(categories)]
        scene = category_scenes(cat, 1, seed * 1_000_003 + k, split="train")[0]
        out.append((cat, scene, syn.caption(scene, np.random.default_rng([seed, k, 61]))))
    return out


class Rollouts:
    def __init__(self, cfg, categories: list[str], layout, codec, scorer, text_tokenizer,
                 log=print):
        self.cfg, self.layout, self.codec, self.scorer = cfg, layout, codec, scorer
        self.text_tokenizer, self.log = text_tokenizer, log
        self.categories = categories
        self.index = 0
        self.ctx: Context | None = None
        self._stats: dict[str, float] = {}

    def bind(self, ctx: Context) -> None:
        self.ctx = ctx

    def __iter__(self):
        return self

    def get_state(self) -> dict:
        return {"rollouts": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["rollouts"])

    def metrics(self) -> dict[str, float]:
        return dict(self._stats)

    def __next__(self) -> dict[str, np.ndarray]:
        if self.ctx is None:
            raise RuntimeError("rollouts need the live train state: RolloutHook.begin binds it")
        r, t0 = self.cfg.rl, time.time()
        prompts = prompt_scenes(self.categories, r.prompts_per_step, r.seed, self.index)
        G = r.group_size
        captions = [c for _, _, c in prompts for _ in range(G)]
        # the policy that samples is the one the step differentiates: params, not EMA
        policy = self.ctx.spec.model(self.ctx.state["params"])
        ids_NHW, logps_NT = sample_images(
            policy, self.layout, captions, seed=r.seed * 7919 + self.index,
            temperature=r.temperature, cfg_scale=1.0,
            min_prompt_len=3 + syn.MAX_CAPTION_BYTES, text_tokenizer=self.text_tokenizer)
        images = self.codec.decode(ids_NHW)
        scenes = [s for _, s, _ in prompts for _ in range(G)]
        cats = [c for c, _, _ in prompts for _ in range(G)]
        reward_N, passed_N = rewards(images, scenes, cats, r.reward)
        adv_N = group_advantages(reward_N.reshape(-1, G)).reshape(-1)
        batch = rollout_rows(ids_NHW, logps_NT, captions, adv_N, self.layout,
                             self.cfg.data.seq_len, self.text_tokenizer)
        batch["ref_logp"] = self.scorer(batch)
        self.index += 1
        groups = reward_N.reshape(-1, G)
        self._stats = {"rl/reward": float(reward_N.mean()),
                       "rl/pass_rate": float(passed_N.mean()),
                       "rl/reward_best_of_group": float(groups.max(axis=1).mean()),
                       "rl/groups_without_signal": float((groups.std(axis=1) == 0).mean()),
                       "rl/rollout_s": time.time() - t0}
        return batch


def rollout_rows(ids_NHW: np.ndarray, logps_NT: np.ndarray, captions: list[str],
                 adv_N: np.ndarray, layout, seq_len: int, text_tokenizer
                 ) -> dict[str, np.ndarray]:
    """Training rows [N, seq_len] of sampled images: loss weight 1 on the image ids only,
    with per-token `advantage` and `sample_logp` (module docstring)."""
    lo, hi = layout.image_offset, layout.image_offset + layout.image_codes
    rows = []
    for ids_HW, logp_T, caption, adv in zip(ids_NHW, logps_NT, captions, adv_N, strict=True):
        ex = example_stream(ids_HW, caption, layout, captioning=False,
                            text_tokenizer=text_tokenizer)
        codes = ((ex["modality"] == MODALITIES["image"]) & (ex["tokens"] >= lo)
                 & (ex["tokens"] < hi))
        ex["loss_weight"] = codes.astype(np.float32)
        ex["advantage"] = np.full(codes.shape, adv, np.float32)
        ex["sample_logp"] = np.zeros(codes.shape, np.float32)
        ex["sample_logp"][codes] = logp_T  # raster order, as sampled
        rows.append(ex)
    return _pack(rows, seq_len, layout.pad)


def _pack(examples: list[dict], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One example per row; the extra per-token fields padded with zeros."""
    extra = ("advantage", "sample_logp")
    out = []
    for ex in examples:
        row = pack_row([ex], seq_len, pad_id)
        n = len(ex["tokens"])
        for k in extra:
            row[k] = np.zeros((seq_len,), np.float32)
            row[k][:n] = ex[k]
        out.append(row)
    return {k: np.stack([row[k] for row in out]) for k in out[0]}


class RolloutHook(Hook):
    """Gives the rollout source the live train context before the first step."""

    def __init__(self, rollouts: Rollouts):
        self.rollouts = rollouts

    def begin(self, ctx: Context) -> None:
        self.rollouts.bind(ctx)
