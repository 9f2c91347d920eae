"""Logical axis names -> mesh axes -> `NamedSharding`s, for parameters, batches and activations.

Modules speak only logical names ("embed", "mlp", ...), stored on each `nnx.Param` as
`out_sharding` metadata. Rules (`LOGICAL_RULES` unless a caller passes its own) decide
which mesh axes each name is split over; a mesh axis that does not divide a dimension,
or that an earlier dimension already uses, is dropped, so every rule set gives a valid
sharding for every shape (at worst, replication).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | Sequence[str] | None
Rules = Sequence[tuple[str, MeshAxes]]

LOGICAL_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("position", None),
    ("patch_in", None),
    ("proj_out", None),
)


def _as_axis_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        return (mesh_axes,)
    return tuple(mesh_axes)


def rules_as_dict(rules: Rules | Iterable[Sequence[Any]]) -> dict[str, tuple[str, ...]]:
    """Normalises (name, axes) pairs, tuples or lists, to {name: (axes...)}."""
    table: dict[str, tuple[str, ...]] = {}
    for entry in rules:
        if len(entry) != 2 or not isinstance(entry[0], str):
            raise ValueError(f"sharding rule {entry!r} is not a (logical name, mesh axes) pair.")
        name, mesh_axes = entry
        if name in table:
            raise ValueError(f"logical axis {name!r} appears twice in the sharding rules.")
        table[name] = _as_axis_tuple(mesh_axes)
    return table


def logical_to_mesh_spec(
    logical_spec: Sequence[str | Sequence[str] | None] | PartitionSpec,
    rules: Rules,
    mesh: Mesh,
    shape: Sequence[int],
) -> PartitionSpec:
    """Maps one array's logical spec to a mesh `PartitionSpec` that is valid for `shape`.

    Per dimension, the rule's mesh axes are kept in order while their product still
    divides the dimension; axes missing from the mesh, of size 1, or already used by an
    earlier dimension are dropped. Unknown logical names are an error (a typo would
    otherwise silently replicate a large weight).
    """
    table = rules_as_dict(rules)
    logical_spec = tuple(logical_spec)
    if len(logical_spec) > len(shape):
        raise ValueError(f"logical spec {logical_spec} has more entries than the array has dimensions {tuple(shape)}.")
    used: set[str] = set()
    mesh_spec: list[str | tuple[str, ...] | None] = []
    for dim, names in zip(shape, logical_spec):
        kept: list[str] = []
        shards = 1
        for name in _as_axis_tuple(names):
            if name not in table:
                raise ValueError(f"logical axis {name!r} has no sharding rule; known names: {sorted(table)}.")
            for axis in table[name]:
                size = mesh.shape.get(axis, 1)
                if axis in used or size == 1 or dim % (shards * size):
                    continue
                kept.append(axis)
                used.add(axis)
                shards *= size
        mesh_spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while mesh_spec and mesh_spec[-1] is None:
        mesh_spec.pop()
    return PartitionSpec(*mesh_spec)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """A pytree of `NamedSharding`s matching `abstract_state` (an NNX State or any array pytree).

    Logical specs come from `nnx.get_partition_spec` (the `out_sharding` metadata of each
    Variable); leaves without one are replicated. Works on concrete arrays and on
    `jax.ShapeDtypeStruct`s from `nnx.eval_shape`, so nothing has to be materialised.
    """
    logical_specs = nnx.get_partition_spec(abstract_state)

    def to_sharding(logical_spec, leaf):
        if logical_spec is None or not hasattr(leaf, "shape"):
            return None
        return NamedSharding(mesh, logical_to_mesh_spec(logical_spec, rules, mesh, leaf.shape))

    return jax.tree.map(to_sharding, logical_specs, abstract_state, is_leaf=lambda x: x is None)


def batch_axes(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> tuple[str, ...]:
    """Mesh axes that the "batch" logical axis is split over on this mesh."""
    return tuple(axis for axis in rules_as_dict(rules).get("batch", ()) if axis in mesh.shape)


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> NamedSharding:
    """Sharding for [B, ...] inputs: the leading axis split over the batch mesh axes."""
    axes = batch_axes(mesh, rules)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def batch_shard_count(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> int:
    """How many pieces a batch is split into (the product of the batch mesh axes)."""
    return int(np.prod([mesh.shape[axis] for axis in batch_axes(mesh, rules)]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def replicate_host_array(host: np.ndarray, mesh: Mesh) -> jax.Array:
    """A replicated global array from host data that every process holds identically (no transfer
    between processes, unlike `device_put` of a numpy array onto a multi-process sharding)."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, replicated(mesh), lambda index: host[index])


def check_batch_layout(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> None:
    """Refuses meshes on which two processes would have to feed the same batch rows.

    Every process loads distinct rows (`host_batch_to_global`), so the devices of one
    process must hold a block of rows that no other process holds. A mesh axis that
    replicates the batch (`tensor`, or `fsdp` left out of the batch rule) and spans
    processes breaks that: its replicas would need the same rows from different hosts.
    """
    if jax.process_count() == 1:
        return
    rows = batch_shard_count(mesh, rules) * jax.process_count()
    owners: dict[tuple, set[int]] = {}
    for device, index in batch_sharding(mesh, rules).devices_indices_map((rows,)).items():
        owners.setdefault((index[0].start, index[0].stop), set()).add(device.process_index)
    shared = {block: procs for block, procs in owners.items() if len(procs) > 1}
    if shared:
        replicating = [a for a in mesh.axis_names if a not in batch_axes(mesh, rules) and mesh.shape[a] > 1]
        raise ValueError(
            f"mesh {dict(mesh.shape)} replicates the batch over {replicating} across processes "
            f"(processes {sorted(next(iter(shared.values())))} would need the same rows); keep "
            f"{' x '.join(replicating) or 'those axes'} within one host, i.e. at most "
            f"{jax.local_device_count()} devices (the devices of one process)")


def host_batch_to_global(local_batch: Mapping[str, Any] | Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """Turns each process's slice of the batch (a pytree of numpy arrays) into global `jax.Array`s.

    Every process passes its own rows; the global batch is their concatenation in
    process order, sharded over the batch mesh axes. On one process this is a plain
    device_put with the batch sharding.
    """
    sharding = batch_sharding(mesh, rules)
    shards = batch_shard_count(mesh, rules)
    processes = jax.process_count()

    def place(path, local):
        local = np.asarray(local)
        global_rows = local.shape[0] * processes if local.ndim else 0
        if local.ndim == 0 or global_rows % shards:
            where = jax.tree_util.keystr(path) or "batch"
            raise ValueError(
                f"{where}: {local.shape[0] if local.ndim else 'scalar'} rows per process x {processes} processes "
                f"cannot be split over {shards} batch shards; the global batch must be a multiple of {shards}."
            )
        return jax.make_array_from_process_local_data(sharding, local, (global_rows, *local.shape[1:]))

    return jax.tree_util.tree_map_with_path(place, local_batch)


# The mesh (and rules) that activations are pinned to while a step is traced; None outside.
_ACTIVATION_MESH: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "bioclip_jax_activation_mesh", default=None)


@contextlib.contextmanager
def pinned_activations(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Iterator[None]:
    """While tracing inside this context, `constrain` pins activations to `mesh`.

    Without the pins the SPMD partitioner may keep an activation sharded like the
    parameter it came from (the embedding dimension, under fsdp) and reshard it through
    a full replica; pinning [batch, ...] activations to the batch axes keeps each device's
    activations at its own rows.
    """
    token = _ACTIVATION_MESH.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def constrain(x: jax.Array, logical_spec: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names, inside `pinned_activations`; identity outside."""
    active = _ACTIVATION_MESH.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_mesh_spec(logical_spec, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
