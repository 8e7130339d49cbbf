"""The one jitted train step: gradients (with accumulation), update, EMA, metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mmgen.parallel.sharding import logical_to_spec
from mmgen.train.losses import LOSSES
from mmgen.train.optimizer import schedule
from mmgen.train.state import StateSpec


def batch_sharding(mesh) -> NamedSharding:
    """Batches of [rows, tokens] fields: rows over data x fsdp, tokens over sequence.
    Unsplit trailing dimensions are left out of the spec, so without sequence
    parallelism any field of rank >= 1 (e.g. tokenizer images, per-row values) fits."""
    spec = list(logical_to_spec(("batch", "length"), mesh))
    while spec and spec[-1] is None:
        spec.pop()
    return NamedSharding(mesh, PartitionSpec(*spec))


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
        new = {"params": params, "opt": opt}
        if "ema" in state:
            d = cfg.optim.ema_decay
            # e + (1-d)(p - e), not d*e + (1-d)*p: when p == e (a frozen parameter, e.g.
            # a LoRA base weight) the update is exactly 0 and the EMA stays bit-identical;
            # the other form rounds and drifts.
            new["ema"] = jax.tree.map(lambda e, p: e + (1 - d) * (p - e), state["ema"], params)
        grad_norm = optax.tree.norm(grads)
        new, health = _guard_nonfinite(state, new, loss, grad_norm, cfg.train.nonfinite)
        new["step"] = state["step"] + 1
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=lr_schedule(state["step"]),
                       loss_tokens=norm, nonfinite_steps=health["count"])
        return new, metrics

    return jax.jit(
        step,
        in_shardings=(spec.shardings, batch_sharding(spec.mesh)),
        out_shardings=(spec.shardings, None),
        donate_argnums=0,
    )


def _guard_nonfinite(old: dict, new: dict, loss, grad_norm, policy: str):
    """Drops a non-finite update: params, optimizer state and EMA stay those of the last
    finite step. `health` counts such steps and remembers the first; with the "stop"
    policy every later update is dropped too, so whatever the loop checkpoints before
    it notices (it checks at log steps and before saves) is the last good state."""
    health = old["health"]
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    apply = finite if policy == "skip" else finite & (health["first_step"] < 0)
    kept = jax.tree.map(lambda n, o: jnp.where(apply, n, o), new,
                        {k: old[k] for k in new})
    bad = ~finite
    health = {
        "count": health["count"] + bad.astype(jnp.int32),
        "first_step": jnp.where(bad & (health["first_step"] < 0), old["step"] + 1,
                                health["first_step"]),
    }
    return dict(kept, health=health), health


class NonFiniteError(FloatingPointError):
    pass


def check_health(state: dict, cfg) -> None:
    """Raises NonFiniteError (one line) when the non-finite policy says stop. Reads two
    scalars, so the loop calls it only at log steps and before checkpoint saves."""
    count = int(state["health"]["count"])
    if count == 0:
        return
    first = int(state["health"]["first_step"])
    if cfg.train.nonfinite == "stop":
        raise NonFiniteError(
            f"non-finite loss or gradient norm at step {first}; its update and all later "
            "ones were dropped and no checkpoint was written after it (train.nonfinite=stop)")
    if count > cfg.train.max_nonfinite:
        raise NonFiniteError(
            f"{count} non-finite steps (first at step {first}) exceed train.max_nonfinite="
            f"{cfg.train.max_nonfinite}; skipped updates were never applied")
