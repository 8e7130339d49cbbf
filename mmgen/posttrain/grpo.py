"""GRPO (Shao et al. 2024) with programmatic rewards, on the pretraining loop.

Per image token of a sampled image, with advantage A (the sample's reward normalised
within its prompt's group), the policy's log-probability logp, the sampler's
log-probability logp_old and the reference's logp_ref:

    loss = -min(r A, clip(r, 1 - eps, 1 + eps) A) + kl_coef * (exp(d) - d - 1),
    r = exp(logp - logp_old),  d = logp_ref - logp

averaged over the image tokens of the global batch. The KL term is the non-negative
"k3" estimator of KL(policy || reference). One update per rollout, so r is 1 up to the
difference between the KV-cache decode and the full forward pass (`rl/logp_gap`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmgen.config import require
from mmgen.eval.scene_checker import CATEGORIES
from mmgen.eval.suites import EvalContext, category_score
from mmgen.posttrain.logprobs import resolve_code_range, target_logps
from mmgen.posttrain.reference import ReferenceScorer
from mmgen.posttrain.rollout import RolloutHook, Rollouts
from mmgen.tasks import JointTask
from mmgen.train.hooks import Context, Hook
from mmgen.train.losses import count_loss_tokens, register_loss, target_weights


@register_loss("grpo", norm=count_loss_tokens)
def grpo_loss(model, batch: dict, cfg) -> tuple[jax.Array, dict]:
    r = cfg.rl
    logp_BT = target_logps(model, batch, cfg, r.temperature)
    w_BT = target_weights(batch, dict(cfg.loss.modality_weights))
    adv_BT = batch["advantage"][:, 1:]
    old_BT = batch["sample_logp"][:, 1:]
    ratio_BT = jnp.exp(logp_BT - old_BT)
    pg_BT = -jnp.minimum(ratio_BT * adv_BT,
                         jnp.clip(ratio_BT, 1 - r.clip_eps, 1 + r.clip_eps) * adv_BT)
    d_BT = batch["ref_logp"][:, 1:] - logp_BT
    kl_BT = jnp.exp(d_BT) - d_BT - 1
    norm = batch["loss_norm"]
    mean = lambda x_BT: jnp.sum(w_BT * x_BT) / norm  # noqa: E731
    loss = mean(pg_BT + r.kl_coef * kl_BT)
    return loss, {"rl/kl": mean(kl_BT), "rl/pg": mean(pg_BT),
                  "rl/logp_gap": mean(jnp.abs(jax.lax.stop_gradient(logp_BT) - old_BT))}


class HeldoutScoreHook(Hook):
    """The scene checker's pass rate on held-out prompts of the RL categories, sampled
    the way the policy samples during RL (rl.temperature, no guidance, no truncation);
    `mmgen eval` measures the eval settings (docs/post-training.md reports both)."""

    def __init__(self, every: int, task: GRPOTask):
        self.every, self.task = every, task

    def begin(self, ctx: Context) -> None:
        if self.every > 0 and ctx.step == 0:  # the "before" of a fresh run
            self(ctx)

    def __call__(self, ctx: Context) -> None:
        cfg = ctx.cfg.copy_and_resolve_references()
        cfg.eval.update(dict(temperature=cfg.rl.temperature, cfg_scale=1.0, top_k=0))
        ectx = EvalContext(model=ctx.model(), cfg=cfg, layout=ctx.layout, codec=self.task.codec,
                           log=lambda _: None, text_tokenizer=self.task.text_tokenizer)
        metrics = {}
        for cat in self.task.categories:  # "text": the read word equals the prompt's
            metrics[f"rl/heldout/{cat}"], _ = category_score(ectx, cat, cfg.rl.num_heldout)
        metrics["rl/heldout_score"] = float(np.mean(list(metrics.values())))
        ctx.writer.scalars(ctx.step, metrics)
        print(f"step {ctx.step}: " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()),
              flush=True)


KEYS = ("categories", "prompts_per_step", "group_size", "reward", "temperature", "kl_coef",
        "clip_eps", "seed", "num_heldout")


def check_rl_config(cfg) -> list[str]:
    """One-line ConfigErrors for the `rl` group, before the tokenizer or any model loads;
    the prompt categories."""
    r = cfg.get("rl")
    require(r is not None, "posttrain.objective='grpo' needs an `rl` config group "
            "(see configs/rl_scenes.py)")
    missing = [k for k in KEYS if k not in r]
    require(not missing, f"the rl config group lacks {missing} (see configs/rl_scenes.py)")
    categories = [c.strip() for c in r.categories.split(",") if c.strip()]
    require(categories and set(categories) <= set(CATEGORIES),
            f"rl.categories={r.categories!r}: choose from {list(CATEGORIES)}")
    require(r.group_size >= 2, f"rl.group_size must be >= 2, got {r.group_size}")
    require(r.prompts_per_step * r.group_size == cfg.train.global_batch,
            f"rl.prompts_per_step x rl.group_size = {r.prompts_per_step * r.group_size} "
            f"must equal train.global_batch={cfg.train.global_batch} (one row per sample)")
    from mmgen.posttrain.rewards import KINDS

    require(r.reward in KINDS, f"rl.reward must be one of {KINDS}, got {r.reward!r}")
    require(r.temperature > 0, f"rl.temperature must be positive, got {r.temperature}")
    # a negative coefficient rewards moving away from the reference; a clip range <= 0
    # inverts PPO's clip bounds
    require(r.kl_coef >= 0, f"rl.kl_coef must be >= 0, got {r.kl_coef}")
    require(r.clip_eps > 0, f"rl.clip_eps must be positive, got {r.clip_eps}")
    require(r.num_heldout >= 0, f"rl.num_heldout must be >= 0 (0 = none), got {r.num_heldout}")
    require(jax.process_count() == 1, "GRPO rollouts run in a single process")
    return categories


class GRPOTask(JointTask):
    name = "grpo"
    loss = "grpo"

    def __init__(self, cfg, log=print, workdir=None):
        self.categories = check_rl_config(cfg)
        super().__init__(cfg, log=log, workdir=workdir)
        resolve_code_range(cfg, self.layout)

    def row_length_problem(self) -> str | None:
        from mmgen.data.pipeline import max_example_length

        need = max_example_length(self.layout)
        if self.cfg.data.seq_len >= need:
            return None
        return f"data.seq_len={self.cfg.data.seq_len} cannot hold a sampled example ({need})"

    def data(self):
        scorer = ReferenceScorer(self.cfg, self.layout, temperature=self.cfg.rl.temperature,
                                 log=self.log)
        self.rollouts = Rollouts(self.cfg, self.categories, self.layout, self.codec, scorer,
                                 self.text_tokenizer, log=self.log)
        self.data_stats = self.rollouts.metrics
        return self.rollouts

    def hooks(self) -> list[Hook]:
        heldout = [HeldoutScoreHook(self.cfg.train.eval_every, self)
                   ] if self.cfg.rl.num_heldout > 0 else []
        return [RolloutHook(self.rollouts), *super().hooks(), *heldout]
