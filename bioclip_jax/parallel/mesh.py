"""The device mesh: one place that turns (data, fsdp, tensor) sizes into a `Mesh`.

Every sharded object in the project (parameters, optimiser state, batches, the loss)
names these three axes, so the same code runs on 1 CPU, 8 simulated devices, a GPU
node or a TPU pod; only the sizes change.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, device_count: int) -> tuple[int, int, int]:
    """Replaces the single -1 ("the rest") and checks that the sizes use every device once."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name!r} has size {size!r}; use a positive integer or -1 for 'the rest'.")
    rest_axes = [name for name, size in sizes.items() if size == -1]
    if len(rest_axes) > 1:
        raise ValueError(f"mesh axes {rest_axes} are all -1; at most one axis may take 'the rest' of the devices.")
    fixed = int(np.prod([size for size in sizes.values() if size != -1]))
    if rest_axes:
        if device_count % fixed:
            raise ValueError(
                f"cannot give axis {rest_axes[0]!r} the rest of {device_count} devices: the other axes "
                f"multiply to {fixed}, which does not divide {device_count}."
            )
        sizes[rest_axes[0]] = device_count // fixed
    elif fixed != device_count:
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {fixed} devices, "
            f"but {device_count} are available; the product must match (or use -1 for one axis)."
        )
    return int(sizes["data"]), int(sizes["fsdp"]), int(sizes["tensor"])


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
    """Builds a ("data", "fsdp", "tensor") mesh over all devices of all processes.

    `jax.make_mesh` picks a device order that follows the physical topology (rings on
    TPU, NVLink islands on GPU). Axes are `Auto`: `jit` with explicit in/out shardings
    decides the intermediate layouts, and `shard_map` handles the hand-written parts.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh was given an empty device list.")
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
