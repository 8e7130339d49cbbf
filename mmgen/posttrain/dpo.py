"""Direct preference optimisation (Rafailov et al. 2023) on the pretraining loop.

loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) per pair, where pi and ref are
the summed log-probabilities of the chosen (c) and rejected (r) responses under the
policy and the frozen reference. Rows hold one pair each (posttrain/preference_data.py);
the reference's log-probabilities arrive in the batch (posttrain/reference.py).
"""

from __future__ import annotations

from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen.config import ConfigError, require
from mmgen.posttrain import preference_data as pref
from mmgen.posttrain.logprobs import resolve_code_range, target_logps
from mmgen.posttrain.reference import ReferenceScorer
from mmgen.tasks import JointTask, per_host_batch
from mmgen.train.hooks import Context, Hook
from mmgen.train.losses import register_loss

HELDOUT_PAIR_SEED = 4321  # held-out pairs: held-out compositions and a seed of their own
SOURCES = ("synthetic", "jsonl")
KEYS = ("beta", "source", "path", "heldout_path", "num_pairs", "num_heldout_pairs")


def check_dpo_config(cfg) -> None:
    """One-line ConfigErrors for the `dpo` group, before the tokenizer or any data loads."""
    d = cfg.get("dpo")
    require(d is not None, "posttrain.objective='dpo' needs a `dpo` config group "
            "(see configs/dpo.py)")
    missing = [k for k in KEYS if k not in d]
    require(not missing, f"the dpo config group lacks {missing} (see configs/dpo.py)")
    require(d.beta > 0, f"dpo.beta must be positive, got {d.beta}")
    require(d.source in SOURCES, f"dpo.source must be one of {SOURCES}, got {d.source!r}")
    files = [k for k in ("path", "heldout_path") if d[k]]
    if d.source == "jsonl":
        require(bool(d.path), "dpo.source='jsonl' needs dpo.path (lines of prompt, chosen, "
                "rejected)")
        for key in files:  # the held-out file is read only after the training data
            require(Path(d[key]).is_file(), f"dpo.{key} {d[key]} is not a file")
    else:
        if files:  # the synthetic source reads no file: it would be ignored without a word
            raise ConfigError(f"dpo.{files[0]} is set but dpo.source={d.source!r} makes its "
                              "own pairs: set dpo.source=jsonl to read the file")
        require(d.num_pairs >= per_host_batch(cfg),
                f"dpo.num_pairs={d.num_pairs} is smaller than the per-host batch")
    require(d.num_heldout_pairs >= 0,
            f"dpo.num_heldout_pairs must be >= 0 (0 = none), got {d.num_heldout_pairs}")


def pair_sums(logp_BT: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Summed response log-probabilities [B] of segment 1 (chosen) and 2 (rejected)."""
    w_BT = batch["loss_weight"][:, 1:]
    seg_BT = batch["segment_ids"][:, 1:]
    return (jnp.sum(jnp.where(seg_BT == 1, w_BT * logp_BT, 0.0), axis=1),
            jnp.sum(jnp.where(seg_BT == 2, w_BT * logp_BT, 0.0), axis=1))


def count_pairs(batch: dict, cfg) -> jax.Array:
    """Pairs in the global batch (rows that hold a rejected segment), at least 1."""
    return jnp.maximum(jnp.sum(jnp.any(batch["segment_ids"] == 2, axis=1)), 1).astype(
        jnp.float32)


@register_loss("dpo", norm=count_pairs)
def dpo_loss(model, batch: dict, cfg) -> tuple[jax.Array, dict]:
    pi_c, pi_r = pair_sums(target_logps(model, batch, cfg), batch)
    ref_c, ref_r = pair_sums(batch["ref_logp"][:, 1:], batch)
    valid = jnp.any(batch["segment_ids"] == 2, axis=1)
    z = cfg.dpo.beta * ((pi_c - ref_c) - (pi_r - ref_r))
    norm = batch["loss_norm"]
    loss = jnp.sum(jnp.where(valid, -jax.nn.log_sigmoid(z), 0.0)) / norm
    mean = lambda x: jnp.sum(jnp.where(valid, x, 0.0)) / norm  # noqa: E731
    return loss, {"dpo/accuracy": mean((z > 0).astype(jnp.float32)),
                  "dpo/reward_margin": mean(z / cfg.dpo.beta),
                  "dpo/logp_margin": mean(pi_c - pi_r)}


def _margin_fn(graphdef, cfg):
    @jax.jit
    def margins(params, batch):
        m = nnx.merge(graphdef, params)
        pi_c, pi_r = pair_sums(target_logps(m, batch, cfg), batch)
        return pi_c - pi_r

    return margins


def logp_margins(model, rows: grain.MapDataset, cfg, batch_rows: int = 16) -> np.ndarray:
    """log p(chosen) - log p(rejected) of every pair row, summed over response tokens."""
    graphdef, params = nnx.split(model)
    fn = _margin_fn(graphdef, cfg)
    out = []
    for batch in rows.batch(batch_rows):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        out.append(np.asarray(fn(params, batch)))
    return np.concatenate(out)


def heldout_rows(codec, cfg, layout, text_tokenizer=None, log=print
                 ) -> grain.MapDataset | None:
    """Held-out pairs: of held-out compositions (one fixed caption each) for the synthetic
    source, of dpo.heldout_path for jsonl (None without one, or with 0 synthetic pairs)."""
    if cfg.dpo.get("source", "synthetic") == "jsonl":
        if not cfg.dpo.heldout_path:
            return None
        return grain.MapDataset.source(pref.jsonl_pair_rows(
            cfg.dpo.heldout_path, cfg, layout, codec, text_tokenizer, log=log,
            key="dpo.heldout_path"))
    if cfg.dpo.num_heldout_pairs == 0:
        return None
    source = pref.build_pairs(codec, cfg.data, num=cfg.dpo.num_heldout_pairs,
                              seed=HELDOUT_PAIR_SEED, split="heldout", log=log)
    return pref.pair_rows(source, cfg.data, layout, seed=HELDOUT_PAIR_SEED, shuffle=False,
                          repeat=False)


class MarginHook(Hook):
    """Logs the held-out log-likelihood margin of chosen over rejected images."""

    def __init__(self, every: int, rows: grain.MapDataset):
        self.every, self.rows = every, rows

    def begin(self, ctx: Context) -> None:
        if self.every > 0 and ctx.step == 0:  # the "before" of a fresh run
            self(ctx)

    def __call__(self, ctx: Context) -> None:
        m = logp_margins(ctx.model(), self.rows, ctx.cfg)
        metrics = {"dpo/heldout_logp_margin": float(m.mean()),
                   "dpo/heldout_accuracy": float((m > 0).mean())}
        ctx.writer.scalars(ctx.step, metrics)
        print(f"step {ctx.step}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
              flush=True)


class WithReference:
    """Adds `ref_logp` to every host batch of an inner grain iterator; its checkpointed
    state is the inner iterator's (the reference is fixed, so its scores are recomputed)."""

    def __init__(self, inner, scorer: ReferenceScorer):
        self.inner, self.scorer = inner, scorer

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.inner)
        return dict(batch, ref_logp=self.scorer(batch))

    def get_state(self) -> dict:
        return self.inner.get_state()

    def set_state(self, state: dict) -> None:
        self.inner.set_state(state)


class DPOTask(JointTask):
    name = "dpo"
    loss = "dpo"

    def __init__(self, cfg, log=print, workdir=None):
        check_dpo_config(cfg)
        super().__init__(cfg, log=log, workdir=workdir)
        resolve_code_range(cfg, self.layout)
        self.tokens_per_batch = cfg.train.global_batch * cfg.data.seq_len

    def row_length_problem(self) -> str | None:
        if self.cfg.dpo.source == "jsonl":
            return None  # longer pairs are skipped and counted as too_long
        need = pref.pair_length(self.layout)
        if self.cfg.data.seq_len >= need:
            return None
        return f"data.seq_len={self.cfg.data.seq_len} cannot hold a preference pair ({need})"

    def data(self):
        d = self.cfg.data
        if self.cfg.dpo.source == "jsonl":
            rows = grain.MapDataset.source(pref.jsonl_pair_rows(
                self.cfg.dpo.path, self.cfg, self.layout, self.codec, self.text_tokenizer,
                log=self.log)).shuffle(seed=d.seed)
            rows = rows.repeat(2**40 // len(rows))
        else:
            source = pref.build_pairs(self.codec, d, num=self.cfg.dpo.num_pairs, seed=d.seed,
                                      split="train", log=self.log)
            rows = pref.pair_rows(source, d, self.layout, seed=d.seed)
        rows = rows[jax.process_index()::jax.process_count()]
        batches = rows.batch(per_host_batch(self.cfg), drop_remainder=True)
        inner = iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                                                prefetch_buffer_size=4)))
        return WithReference(inner, ReferenceScorer(self.cfg, self.layout, log=self.log))

    def hooks(self) -> list[Hook]:
        rows = heldout_rows(self.codec, self.cfg, self.layout, self.text_tokenizer, self.log)
        margins = [] if rows is None else [MarginHook(self.cfg.train.eval_every, rows)]
        return [*super().hooks(), *margins]
