"""Device mesh and logical-axis sharding rules shared by training, evaluation and checkpoints."""

from bioclip_jax.parallel.mesh import MESH_AXES, make_mesh
from bioclip_jax.parallel.sharding import (
    LOGICAL_RULES,
    batch_axes,
    batch_sharding,
    host_batch_to_global,
    logical_to_mesh_spec,
    state_shardings,
)

__all__ = [
    "LOGICAL_RULES",
    "MESH_AXES",
    "batch_axes",
    "batch_sharding",
    "host_batch_to_global",
    "logical_to_mesh_spec",
    "make_mesh",
    "state_shardings",
]
