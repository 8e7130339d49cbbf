"""Train state: created abstractly, given shardings by logical names, then initialised
by one jitted function, so no parameter ever exists unsharded on one device."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mmgen.models import lora
from mmgen.parallel.sharding import state_shardings
from mmgen.train.optimizer import make_optimizer

BuildModel = Callable[[nnx.Rngs], nnx.Module]


def split_params(model: nnx.Module):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("models must keep all their state in nnx.Param")
    return graphdef, params


class StateSpec:
    """Everything needed to create, shard, restore and step a train state."""

    def __init__(self, cfg, build_model: BuildModel, mesh: jax.sharding.Mesh):
        self.cfg, self.build_model, self.mesh = cfg, build_model, mesh
        self.lora_scale = lora.scale(cfg)
        abstract_model = nnx.eval_shape(lambda: build_model(nnx.Rngs(0)))
        self.graphdef, abstract_params = split_params(abstract_model)
        self.tx: optax.GradientTransformation = make_optimizer(cfg, abstract_params)
        self.abstract = jax.eval_shape(self._init, jax.random.key(0))
        self.shardings = state_shardings(self.abstract, mesh)

    def _init(self, key: jax.Array) -> dict:
        _, params = split_params(self.build_model(nnx.Rngs(key)))
        state = {"params": params, "opt": self.tx.init(params), "step": jnp.zeros((), jnp.int32),
                 # non-finite steps seen (updates dropped) and the first one (-1 = none)
                 "health": {"count": jnp.zeros((), jnp.int32),
                            "first_step": jnp.full((), -1, jnp.int32)}}
        if self.cfg.optim.ema_decay > 0:
            state["ema"] = jax.tree.map(jnp.copy, params)
        return state

    def init(self, seed: int) -> dict:
        with jax.set_mesh(self.mesh):
            return jax.jit(self._init, out_shardings=self.shardings)(jax.random.key(seed))

    def abstract_with_shardings(self):
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract, self.shardings,
        )

    def model(self, params) -> nnx.Module:
        """The model these params define: LoRA adapters (if any) folded into their
        weights, so every caller (step, hooks, sampler, load_run) sees a plain model."""
        return nnx.merge(self.graphdef, lora.fold(params, self.lora_scale))
