"""Multi-process start-up: one JAX process per host, all joined before any device is touched."""
from __future__ import annotations

import os

import jax
from absl import flags, logging

flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for runs spanning processes")
flags.DEFINE_integer("num_processes", None, "number of processes in the run")
flags.DEFINE_integer("process_id", None, "this process's index, 0..num_processes-1")

_CLUSTER_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _on_multihost_cluster() -> str | None:
    """The environment setting that says this process is one of several (`VAR=value`), or None."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        return f"TPU_WORKER_HOSTNAMES={hosts}"
    for var in _CLUSTER_ENV_VARS[1:]:
        value = os.environ.get(var)
        if value and (not value.isdigit() or int(value) > 1):
            return f"{var}={value}"
    return None


def initialize_from_flags() -> None:
    """Explicit flags win; otherwise JAX auto-detects TPU pods and Slurm/MPI; else one process."""
    f = flags.FLAGS
    if f.coordinator_address or f.num_processes is not None or f.process_id is not None:   # any one: all three
        if f.coordinator_address is None or f.num_processes is None or f.process_id is None:
            raise ValueError("--coordinator_address, --num_processes and --process_id must be given together")
        host, _, port = f.coordinator_address.rpartition(":")
        if not host or not port.isdigit():   # JAX took the port with rsplit(':')[1]: an IndexError without one
            raise ValueError(f"--coordinator_address={f.coordinator_address!r} must be host:port (process 0's)")
        jax.distributed.initialize(coordinator_address=f.coordinator_address,
                                   num_processes=f.num_processes, process_id=f.process_id)
    elif cluster := _on_multihost_cluster():
        try:
            jax.distributed.initialize()
        except ValueError as e:   # e.g. salloc's SLURM_NTASKS without srun's per-task variables, Open MPI 5
            raise ValueError(f"{cluster} says this is one of several processes, but JAX could not detect the "
                             f"cluster's coordinator and this process's index ({e}): start each process with the "
                             "cluster's launcher (srun, mpirun, the TPU pod's workers), or pass "
                             "--coordinator_address, --num_processes and --process_id") from None
    else:
        return
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
