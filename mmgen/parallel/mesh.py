"""Device mesh from the config: sizes for data / fsdp / sequence / tensor within a slice
(-1 = the rest) and, under `dcn`, how many slices each axis spans."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from mmgen.parallel.sharding import MESH_AXES


class MeshError(ValueError):
    pass


def split_dcn(sizes: dict) -> tuple[dict[str, int], dict[str, int]]:
    """(per-slice sizes, slices per axis) from a config's mesh group."""
    sizes = dict(sizes)
    dcn = {a: int(v) for a, v in dict(sizes.pop("dcn", None) or {}).items()}
    unknown = set(dcn) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"unknown mesh.dcn axes {sorted(unknown)}; known: {list(MESH_AXES)}")
    if any(v < 1 for v in dcn.values()):
        raise MeshError(f"mesh.dcn sizes must be >= 1, got {dcn}")
    return sizes, {a: dcn.get(a, 1) for a in MESH_AXES}


def resolve_axis_sizes(sizes: dict, num_devices: int) -> dict[str, int]:
    """Total size of each mesh axis (per-slice x slices). Fills one -1 with the remaining
    devices of a slice; errors in one line when sizes don't fit."""
    sizes, dcn = split_dcn(sizes)
    slices = math.prod(dcn.values())
    if num_devices % slices:
        raise MeshError(f"mesh.dcn {dcn} asks for {slices} slices, which does not divide "
                        f"{num_devices} devices")
    ici = _resolve_ici(sizes, num_devices // slices)
    return {a: ici[a] * dcn[a] for a in MESH_AXES}


def _resolve_ici(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
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


def make_mesh(sizes: dict, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    ici, dcn = split_dcn(sizes)
    if math.prod(dcn.values()) > 1:
        return _hybrid_mesh(ici, dcn, devices)
    sizes = resolve_axis_sizes(sizes, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if devices is jax.devices() or len(devices) == jax.device_count():
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))
    arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def _hybrid_mesh(ici: dict, dcn: dict[str, int], devices) -> Mesh:
    """Each axis spans ici[a] devices inside a slice times dcn[a] slices, so collectives
    over an axis with dcn == 1 never leave a slice. Slices are TPU slices where devices
    report as many as asked for (`slice_index`), else processes (GPU nodes, CPU processes
    in tests), else consecutive groups of devices (one process emulating slices)."""
    from jax.experimental import mesh_utils

    total = resolve_axis_sizes({**ici, "dcn": dcn}, len(devices))
    per_slice = [total[a] // dcn[a] for a in MESH_AXES]
    slices = [dcn[a] for a in MESH_AXES]
    n = math.prod(slices)
    if len({getattr(d, "slice_index", 0) for d in devices}) == n:
        arr = mesh_utils.create_hybrid_device_mesh(per_slice, slices, devices)
    elif len({d.process_index for d in devices}) == n:
        arr = mesh_utils.create_hybrid_device_mesh(per_slice, slices, devices,
                                                   process_is_granule=True)
    else:
        k = len(MESH_AXES)  # [slices..., per-slice...] -> interleave -> [total...]
        grouped = np.asarray(devices).reshape(slices + per_slice)
        order = [i for a in range(k) for i in (a, k + a)]
        arr = grouped.transpose(order).reshape([total[a] for a in MESH_AXES])
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
