"""AdamW with warmup + cosine, clipping, and regex rules for decay and freezing."""

from __future__ import annotations

import re

import jax
import optax

from mmgen.config import ConfigError
from mmgen.models.lora import is_adapter
from mmgen.models.paths import param_path


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


def parse_decay_rules(text: str) -> list[tuple[re.Pattern, float]]:
    """[(regex, rate)] from "REGEX=RATE;REGEX=RATE" (big_vision style); "" = no rules.
    Raises ValueError (one line) on a malformed rule, a bad regex or a negative rate."""
    rules = []
    for item in (x.strip() for x in text.split(";")):
        if not item:
            continue
        pattern, eq, rate_text = item.rpartition("=")  # rpartition: a regex may hold '='
        if not eq or not pattern:
            raise ValueError(f"optim.decay_rules: {item!r} is not REGEX=RATE")
        try:
            rate = float(rate_text)
        except ValueError:
            raise ValueError(f"optim.decay_rules: rate {rate_text!r} in {item!r} is not a "
                             "number") from None
        if not rate >= 0:
            raise ValueError(f"optim.decay_rules: rate in {item!r} must be >= 0")
        try:
            rules.append((re.compile(pattern), rate))
        except re.error as e:
            raise ValueError(f"optim.decay_rules: bad regex {pattern!r}: {e}") from None
    return rules


def decay_rates(cfg, params):
    """Each parameter's decoupled weight-decay rate: the first matching
    `optim.decay_rules` rule, else `optim.weight_decay` unless `optim.no_decay` matches."""
    o = cfg.optim
    rules = parse_decay_rules(o.get("decay_rules", ""))
    no_decay = re.compile(o.no_decay) if o.no_decay else None

    def rate(path, _):
        name = param_path(path)
        for rx, r in rules:
            if rx.search(name):
                return r
        return 0.0 if no_decay and no_decay.search(name) else float(o.weight_decay)

    return jax.tree_util.tree_map_with_path(rate, params)


def adamw(cfg, params) -> optax.GradientTransformation:
    """AdamW with a decay rate per parameter: scale_by_adam, then one masked
    add_decayed_weights per distinct rate, then -lr. Without decay_rules this is
    optax.adamw's chain with the same mask (same numbers, same state tree, so old
    checkpoints restore)."""
    o = cfg.optim
    if parse_decay_rules(o.get("decay_rules", "")):
        rates = decay_rates(cfg, params)
        masks = {r: jax.tree.map(lambda x, r=r: x == r, rates)
                 for r in sorted({r for r in jax.tree.leaves(rates) if r > 0})}
    else:  # exactly optax.adamw's one masked decay
        masks = {float(o.weight_decay): jax.tree.map(lambda m: not m,
                                                     regex_mask(params, o.no_decay))}
    decays = [optax.add_decayed_weights(r, mask=m) for r, m in masks.items()]
    return optax.chain(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps), *decays,
                       optax.scale_by_learning_rate(schedule(cfg)))


def check_freeze_matches(cfg, params) -> None:
    """Before training: an `optim.freeze` that matches no parameter is a typo that would
    train everything. (Not when a run is only loaded: a stored config may keep a rule for
    parameters an export has since merged away, e.g. LoRA adapters.)"""
    pattern = cfg.optim.get("freeze", "")
    if pattern and not any(jax.tree.leaves(regex_mask(params, pattern))):
        paths = jax.tree.leaves(
            jax.tree_util.tree_map_with_path(lambda p, _: param_path(p), params))
        raise ConfigError(f"optim.freeze={pattern!r} matches no parameter; parameters are "
                          f"e.g. {', '.join(paths[:4])}")


def make_optimizer(cfg, params) -> optax.GradientTransformation:
    """AdamW (`adamw`: decay per `optim.decay_rules` / `optim.no_decay`); parameters
    matching `optim.freeze` get zero updates (and no optimizer moments). A LoRA model
    (models/lora.py) trains only its adapters: every other parameter is frozen too."""
    o = cfg.optim
    tx = optax.chain(
        optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
        adamw(cfg, params),
    )
    frozen = regex_mask(params, o.freeze)
    paths = jax.tree_util.tree_map_with_path(lambda p, _: param_path(p), params)
    lora = any(is_adapter(p) for p in jax.tree.leaves(paths))
    if lora:
        frozen = jax.tree.map(lambda f, p: f or not is_adapter(p), frozen, paths)
    if o.freeze or lora:
        labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx
