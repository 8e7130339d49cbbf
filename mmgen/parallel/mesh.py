"""Device mesh from the config: sizes for data / fsdp / tensor (-1 = the rest)."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from mmgen.parallel.sharding import MESH_AXES


class MeshError(ValueError):
    pass


def resolve_axis_sizes(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fills one -1 with the remaining devices; errors in one line when sizes don't fit."""
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"unknown mesh axes {sorted(unknown)}; known: {list(MESH_AXES)}")
    sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshError(f"at most one mesh axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise MeshError(f"mesh axis sizes must be positive or -1, got {sizes}")
    if free:
        if num_devices % fixed:
            raise MeshError(f"mesh {sizes} does not divide {num_devices} devices")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(
            f"mesh {sizes} has {math.prod(sizes.values())} devices but {num_devices} are present"
        )
    return sizes


def make_mesh(sizes: dict[str, int], devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = resolve_axis_sizes(sizes, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if devices is jax.devices() or len(devices) == jax.device_count():
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))
    arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))
