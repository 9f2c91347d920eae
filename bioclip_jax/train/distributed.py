"""Multi-process start-up: initialise `jax.distributed` when the environment says so."""

from __future__ import annotations

import os

import jax


def launched_as_multiprocess() -> bool:
    env = os.environ
    if int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        return True
    return "TPU_WORKER_HOSTNAMES" in env and "," in env.get("TPU_WORKER_HOSTNAMES", "")


def maybe_initialize_distributed() -> None:
    """Explicit coordinator variables win; SLURM and TPU pods are auto-detected by jax."""
    if not launched_as_multiprocess():
        return
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
