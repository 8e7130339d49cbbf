"""Low-rank adapters (LoRA) folded into the weights inside the step.

Decision: an adapter is not a layer. For every parameter whose path matches
`lora.targets`, the model the step differentiates uses W + (alpha / rank) * A @ B:
`fold` computes that sum from the train state's parameters before `nnx.merge`
(`StateSpec.model`), so the model code never sees an adapter. Because of that LoRA
works unchanged with scan_layers, remat, every attention kernel and every sharding,
and the train step, eval hooks, sampler and `load_run` all see one ordinary model.
The cost: backward materialises a full-size gradient for each targeted weight (then
contracts it into A's and B's), a transient the size of one copy of those weights.
Optimizer moments and checkpoints hold only A, B and the frozen base.

Shapes: A has the weight's input dims (those contracted with the activations) + (rank,),
B has (rank,) + its output dims, so A @ B (tensordot over rank) has the weight's shape.
Input dims are 2 for `w_o_HKD` (heads, head_dim) and 1 for every other weight (D for
w_q_DHK, F for w_down_FD, V for embed_VD whose rows are looked up, D for unembed_DV).
B starts at zero (the initial model is the base model exactly); A ~ normal with std
1/sqrt(fan_in). Their logical names come from the base weight (A: input names + None,
B: None + output names), so the one rules table shards them like their weight.

Adapters live in `model.lora`, nested like the base paths: the adapter of
`blocks/0/attn/w_q_DHK` is `lora/blocks/0/attn/w_q_DHK/{a,b}`. An export merges them
(`merge_for_export`): merged weights only, and a config with lora.rank = 0.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mmgen.config import ConfigError
from mmgen.models.paths import param_path

ADAPTERS = "lora"  # the model attribute (and first path part) holding every adapter
# weights whose activations contract more than their first dimension
INPUT_DIMS = {"w_o_HKD": 2}


def rank(cfg) -> int:
    """The adapter rank of a config; 0 when off or when the config predates LoRA."""
    lora = cfg.get("lora")
    return int(lora.rank) if lora is not None else 0


def scale(cfg) -> float:
    """alpha / rank (0.0 without adapters)."""
    r = rank(cfg)
    return float(cfg.lora.alpha) / r if r > 0 else 0.0


def is_adapter(path: str) -> bool:
    """True for 'lora/...' parameter paths (and 'lora.' tensor names)."""
    return path.startswith(ADAPTERS + "/") or path.startswith(ADAPTERS + ".")


def _input_dims(path: str) -> int:
    return INPUT_DIMS.get(path.rsplit("/", 1)[-1], 1)


def attach_adapters(model: nnx.Module, lora_cfg, rngs: nnx.Rngs, *,
                    check_rank: bool = True) -> nnx.Module:
    """Adds `model.lora` with an (a, b) pair for every 2-D or 3-D parameter whose path
    matches `lora_cfg.targets` (1-D parameters such as norm scales never match).
    `check_rank=False` skips the rank bound: a run saved before it was checked must load."""
    rx = re.compile(lora_cfg.targets)
    r = int(lora_cfg.rank)
    tree: dict = {}
    candidates = []
    for path, var in jax.tree_util.tree_flatten_with_path(
            nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        name = param_path(path)
        if var.ndim < 2:
            continue
        candidates.append(name)
        if not rx.search(name):
            continue
        n_in = _input_dims(name)
        shape, names = var.shape, tuple(var.get_metadata().get("out_sharding")
                                        or (None,) * var.ndim)
        fan_in, fan_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
        if check_rank and r > min(fan_in, fan_out):  # A @ B has no higher rank than W
            raise ConfigError(
                f"lora.rank={r} exceeds the rank of {name} {list(shape)} (at most "
                f"{min(fan_in, fan_out)}: {fan_in} inputs, {fan_out} outputs), so its adapter "
                "adds parameters and nothing else; lower lora.rank or narrow lora.targets")
        std = 1.0 / math.sqrt(fan_in)
        a = nnx.Param(std * jax.random.normal(rngs.params(), (*shape[:n_in], r), var.dtype),
                      out_sharding=(*names[:n_in], None))
        b = nnx.Param(jnp.zeros((r, *shape[n_in:]), var.dtype),
                      out_sharding=(None, *names[n_in:]))
        node = tree
        for part in name.split("/"):
            node = node.setdefault(part, {})
        node.update(a=a, b=b)
    if not tree:
        raise ConfigError(f"lora.targets={lora_cfg.targets!r} matches no 2-D or 3-D parameter; "
                         f"parameters are e.g. {', '.join(candidates[:4])}")
    model.lora = _to_nnx(tree)
    return model


def _to_nnx(tree):
    if isinstance(tree, dict):
        return nnx.Dict({k: _to_nnx(v) for k, v in tree.items()})
    return tree


def _pairs(adapters) -> dict[str, dict[str, jax.Array]]:
    """Base path -> {'a': A, 'b': B} from the 'lora' part of a params state."""
    out: dict[str, dict[str, jax.Array]] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        base, which = param_path(path).rsplit("/", 1)
        out.setdefault(base, {})[which] = x
    return out


def delta(a: jax.Array, b: jax.Array, s: float) -> jax.Array:
    """s * A @ B, contracted over the rank: the weight's shape."""
    return s * jnp.tensordot(a, b, axes=1)


def fold(params: nnx.State, s: float) -> nnx.State:
    """The params with every adapted weight replaced by W + s * A @ B; the adapters stay
    in the state (the forward never reads them). Identity without adapters. Pure jnp,
    so gradients of the folded weights flow to A and B."""
    if ADAPTERS not in params:
        return params
    pairs = _pairs(params[ADAPTERS])

    def one(path, w):
        name = param_path(path)
        ab = None if is_adapter(name) else pairs.get(name)
        return w if ab is None else w + delta(ab["a"], ab["b"], s).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(one, params)


def split(params: nnx.State) -> tuple[nnx.State, nnx.State | None]:
    """(base params, adapters or None)."""
    if ADAPTERS not in params:
        return params, None
    # raw_mapping: nested levels stay plain dicts, so the pytree structure (and with it
    # the shardings and jit signatures) is the one nnx.split gives
    raw = params.raw_mapping
    return (nnx.State({k: v for k, v in raw.items() if k != ADAPTERS}),
            nnx.State(raw[ADAPTERS]))


def join(base: nnx.State, adapters: nnx.State | None) -> nnx.State:
    """The inverse of `split`."""
    if adapters is None:
        return base
    return nnx.State({**base.raw_mapping, ADAPTERS: adapters.raw_mapping})


def merge_for_export(params: nnx.State, cfg) -> tuple[nnx.State, ml_collections.ConfigDict]:
    """(merged params without adapters, config with lora.rank = 0): what an export of a
    LoRA run holds, loadable as a plain model. Unchanged without adapters."""
    if ADAPTERS not in params:
        return params, cfg
    base, _ = split(fold(params, scale(cfg)))
    plain = ml_collections.ConfigDict(cfg.to_dict())
    plain.lora.rank = 0
    return base, plain
