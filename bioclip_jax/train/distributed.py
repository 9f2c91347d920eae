"""Multi-process start-up: initialise `jax.distributed` when the environment says so.

A process learns that it is one of several in one of three ways:
- explicit variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
  (launch/local_multiprocess.sh sets them; any cluster manager can);
- SLURM: the SLURM_* variables that `srun` sets (jax finds coordinator, count and rank);
- Cloud TPU pod slices: TPU_WORKER_HOSTNAMES, or BIOCLIP_JAX_DISTRIBUTED=1
  (launch/tpu_pod.sh sets it) to let jax read the TPU metadata itself.
BIOCLIP_JAX_DISTRIBUTED=0 switches initialisation off whatever else is set.

CPU processes exchange data through gloo (TCP), the collectives jax ships with; a
JAX_CPU_COLLECTIVES_IMPLEMENTATION in the environment (e.g. mpi) is respected.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

SWITCH = "BIOCLIP_JAX_DISTRIBUTED"
EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _int_variable(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None


def launched_as_multiprocess(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    switch = env.get(SWITCH, "").strip().lower()
    if switch in ("0", "false", "no", "off"):
        return False
    if switch in ("1", "true", "yes", "on"):
        return True
    if _int_variable(env, "JAX_NUM_PROCESSES", 1) > 1:
        return True
    if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and _int_variable(env, "SLURM_NTASKS", 1) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def maybe_initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Initialises jax.distributed when launched as one of several processes; True if it did.

    Must run before anything touches a jax device. Explicit coordinator variables win;
    otherwise jax auto-detects SLURM, Open MPI, Kubernetes or a Cloud TPU slice.
    """
    env = os.environ if env is None else env
    if not launched_as_multiprocess(env):
        return False
    given = [name for name in EXPLICIT if name in env]
    if given and len(given) < len(EXPLICIT):
        missing = sorted(set(EXPLICIT) - set(given))
        raise ValueError(f"{', '.join(given)} set but {', '.join(missing)} missing: a multi-process "
                         f"launch needs all of {', '.join(EXPLICIT)}")
    num_processes = _int_variable(env, "JAX_NUM_PROCESSES", 1)
    process_id = _int_variable(env, "JAX_PROCESS_ID", 0)
    if given and not 0 <= process_id < num_processes:
        raise ValueError(f"JAX_PROCESS_ID={process_id} is outside [0, JAX_NUM_PROCESSES={num_processes})")
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in env:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if given:
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    return True


MESSAGE_BYTES = 1024  # an agreed verdict's message is cut to this many bytes


def agree_on_worst(code: int, message: str = "") -> tuple[int, str]:
    """The highest `code` over all processes, with the message of the first process that has it.

    One allgather: every process must call it at the same point, whatever its own outcome,
    so that a process which failed alone does not leave the others waiting in a collective.
    """
    if jax.process_count() == 1:
        return code, message
    import numpy as np  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    encoded = message.encode("utf-8")[:MESSAGE_BYTES].ljust(MESSAGE_BYTES, b"\0")
    row = np.concatenate([np.asarray([code], np.int32), np.frombuffer(encoded, np.uint8).astype(np.int32)])
    rows = np.asarray(multihost_utils.process_allgather(row)).reshape(jax.process_count(), -1)
    first = int(np.argmax(rows[:, 0]))  # argmax gives the lowest process with the highest code
    text = bytes(rows[first, 1:].astype(np.uint8)).rstrip(b"\0").decode("utf-8", errors="replace")
    return int(rows[first, 0]), text
