"""The one jitted train step: gradients (with accumulation), update, EMA, metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from mmgen.parallel.sharding import logical_to_spec
from mmgen.train.losses import LOSSES
from mmgen.train.optimizer import schedule
from mmgen.train.state import StateSpec


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch",), mesh))


def make_train_step(spec: StateSpec, loss_name: str):
    """Returns step(state, batch) -> (state, metrics), jitted with donated state.

    With `train.grad_accum = k` the global batch is split into k micro-batches
    (row i goes to micro-batch i % k, so each keeps its share of every device) and
    gradients are summed; losses are normalised by the whole global batch.
    """
    cfg = spec.cfg
    loss_fn, norm_fn = LOSSES[loss_name]
    accum = cfg.train.grad_accum
    lr_schedule = schedule(cfg)

    def micro_loss(params, micro_batch):
        return loss_fn(spec.model(params), micro_batch, cfg)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: dict, batch: dict):
        norm = norm_fn(batch, cfg)
        if accum == 1:
            (loss, metrics), grads = grad_fn(state["params"], dict(batch, loss_norm=norm))
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
                batch,
            )

            def body(carry, mb):
                (loss, metrics), grads = grad_fn(state["params"], dict(mb, loss_norm=norm))
                return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

            first = dict(jax.tree.map(lambda x: x[0], micro), loss_norm=norm)
            (loss0, metrics0), grads0 = jax.eval_shape(grad_fn, state["params"], first)
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (loss0, metrics0, grads0))
            (loss, metrics, grads), _ = jax.lax.scan(body, zeros, micro)
        updates, opt = spec.tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"params": params, "opt": opt, "step": state["step"] + 1}
        if "ema" in state:
            d = cfg.optim.ema_decay
            new["ema"] = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], params)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                       lr=lr_schedule(state["step"]), loss_tokens=norm)
        return new, metrics

    return jax.jit(
        step,
        in_shardings=(spec.shardings, batch_sharding(spec.mesh)),
        out_shardings=(spec.shardings, None),
        donate_argnums=0,
    )

