"""Logical axis names -> mesh axes: the one rules table, and the helpers that apply it.

Parameters name their dimensions once where they are created (e.g. ("embed", "mlp"));
activations use the same names through `constrain`. Changing how a run is
parallelised is a change to the mesh in the config, never to the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated). Names absent here
# are replicated. Embedding tables shard their rows over tensor (vocab-parallel
# head) and their width over fsdp, like every other weight.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    # sequence parallelism: activations split along the sequence; attention gathers the
    # keys/values of the whole row ("kv_length" stays unsplit), see Attention
    ("length", "sequence"),
    ("kv_length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    # the image tokenizer's convolutions are small: replicated
    ("kernel_h", None),
    ("kernel_w", None),
    ("conv_in", None),
    ("conv_out", None),
)
_RULES = dict(RULES)


def logical_to_spec(names: Sequence[str | None] | None, mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Maps logical names to a PartitionSpec; mesh axes of size 1 are dropped, and a
    mesh axis is used at most once per array (first dimension wins)."""
    if not names:
        return PartitionSpec()
    used: set[str] = set()
    out = []
    for name in names:
        axes = _RULES.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1 and a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def state_shardings(abstract_state, mesh: jax.sharding.Mesh):
    """NamedShardings for an nnx.State (or any pytree of nnx Variables) from logical names."""

    def one(x):
        if isinstance(x, nnx.Variable) and not hasattr(x.get_value(), "shape"):
            return x  # e.g. optax's MaskedNode: the moment slot of a frozen parameter
        names = x.get_metadata().get("out_sharding") if isinstance(x, nnx.Variable) else None
        spec = logical_to_spec(names, mesh)
        if isinstance(x, nnx.Variable):
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def on_one_device() -> bool:
    """True outside a mesh and under a one-device mesh (no partitioner at work)."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh is None or mesh.empty or mesh.size == 1


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names under the current abstract mesh (no-op without)."""
    if on_one_device():
        return x
    return jax.lax.with_sharding_constraint(
        x, logical_to_spec(names, jax.sharding.get_abstract_mesh()))
