"""AdamW with warmup + cosine, clipping, and regex rules for decay and freezing."""

from __future__ import annotations

import re

import jax
import optax


def param_path(path) -> str:
    """'blocks/0/attn/w_q_DHK' from a jax key path (the trailing '.value' dropped)."""
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
        if name == "value":
            continue
        parts.append(str(name))
    return "/".join(parts)


def regex_mask(params, pattern: str):
    """True for every parameter whose path matches `pattern` (empty pattern: none)."""
    rx = re.compile(pattern) if pattern else None
    return jax.tree_util.tree_map_with_path(
        lambda p, _: bool(rx and rx.search(param_path(p))), params
    )


def schedule(cfg) -> optax.Schedule:
    o = cfg.optim
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=max(o.warmup_steps, 1),
        decay_steps=max(cfg.train.steps, o.warmup_steps + 1), end_value=o.lr * o.min_lr_ratio,
    )


def make_optimizer(cfg, params) -> optax.GradientTransformation:
    """Weight decay applies to paths NOT matching `optim.no_decay`; parameters matching
    `optim.freeze` get zero updates (and no optimizer moments)."""
    o = cfg.optim
    decay_mask = jax.tree.map(lambda m: not m, regex_mask(params, o.no_decay))
    tx = optax.chain(
        optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                    mask=decay_mask),
    )
    if o.freeze:
        frozen = regex_mask(params, o.freeze)
        labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx
