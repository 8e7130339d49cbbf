"""The frozen reference model of DPO and GRPO, scored beside the data.

Its per-token log-probabilities are computed on each host batch before the batch enters
the train step and travel in it as the field `ref_logp`, so the one train step never
holds a second model and the losses stay plain functions of (model, batch, cfg).
The cost is one extra forward pass per batch on the local devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmgen.load import expect_kind, load_run
from mmgen.posttrain.logprobs import target_logps
from mmgen.tokenizers.layout import check_same


def reference_source(cfg) -> tuple[str, int | None]:
    """(path, step) of the reference: posttrain.reference, else the run it starts from,
    at posttrain.reference_step (pinned at the run's first start: tasks.pin_source_steps)."""
    post = cfg.posttrain
    step = post.get("reference_step", -1)
    if step < 0 and not post.reference:
        step = cfg.init.get("step", -1)
    return post.reference or cfg.init.checkpoint, None if step < 0 else step


def per_token(logps_BT: np.ndarray) -> np.ndarray:
    """Target-aligned [B, L-1] -> per-token [B, L] (token t's value at t; token 0 gets 0)."""
    return np.concatenate([np.zeros_like(logps_BT[:, :1]), logps_BT], axis=1)


class ReferenceScorer:
    """rows (numpy [B, L] schema fields) -> `ref_logp` [B, L] float32 per token, under the
    reference's EMA weights when it has them (what init.checkpoint starts the policy from),
    at `temperature` (GRPO's sampling temperature; 1 for DPO)."""

    def __init__(self, cfg, layout, *, temperature: float = 1.0, log=print):
        path, step = reference_source(cfg)
        # from the metadata first: a tokenizer run here used to fail mid-step
        expect_kind(path, "joint", "the DPO/GRPO reference must be a joint model run", step)
        model, _, ref_layout, step = load_run(path, step, use_ema=True)
        if ref_layout is not None:
            check_same(layout, ref_layout, f"the reference model {path}")
        log(f"reference model: {path} (step {step})")
        graphdef, self.params = nnx.split(model)

        @jax.jit
        def score(params, batch):
            return target_logps(nnx.merge(graphdef, params), batch, cfg, temperature)

        self._score = score

    def __call__(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        batch = {k: jnp.asarray(v) for k, v in rows.items()
                 if k in ("tokens", "segment_ids", "positions", "rows", "cols", "span_ids")}
        return per_token(np.asarray(self._score(self.params, batch), np.float32))
