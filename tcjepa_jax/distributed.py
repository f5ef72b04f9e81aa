"""Joining the processes of a multi-host run, before anything touches a device.

    python -m tcjepa_jax.train ...                         # one host: nothing to join
    # Cloud TPU pods and SLURM jobs: found from the environment (one process per host / task)
    # anything else: name the coordinator explicitly, the same on every host
    python -m tcjepa_jax.train --coordinator_address=10.0.0.1:1234 --num_processes=4 --process_id=$I

JAX's own environment variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)
work too. After this, jax.devices() lists the devices of every host and the mesh spans them all;
each host reads its own part of the data (data/pipeline.py), process 0 writes the logs and
TensorBoard, and every host joins the Orbax checkpoints.
"""

import os

import jax
from absl import logging

# Environment variables that mean "this process is one of several": JAX's cluster detection
# (jax._src.clusters) then finds the coordinator, the process count and this process's id.
_CLUSTER_MARKERS = (
    "JAX_COORDINATOR_ADDRESS",
    "TPU_WORKER_HOSTNAMES",      # Cloud TPU VMs of a multi-host slice
    "MEGASCALE_COORDINATOR_ADDRESS",  # multi-slice TPU jobs
    "SLURM_JOB_ID",
)


def cluster_detected(environ=os.environ) -> bool:
    if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) <= 1:
        return False  # a single-task SLURM job is one process
    if "TPU_WORKER_HOSTNAMES" in environ and "," not in environ["TPU_WORKER_HOSTNAMES"]:
        return False  # a single-host TPU VM
    return any(name in environ for name in _CLUSTER_MARKERS) or _cloud_tpu_vm(environ)


def _cloud_tpu_vm(environ) -> bool:
    """A Cloud TPU VM created with gcloud lists its slice's hosts in the TPU metadata, not in
    the environment: ask JAX's own detector (which reads that metadata). Initialising on a
    single-host VM is harmless (one process)."""
    if environ is not os.environ or "TPU_SKIP_MDS_QUERY" in environ:
        return False
    try:
        from jax._src.clusters import cloud_tpu_cluster  # private: guarded, may move
        return bool(cloud_tpu_cluster.GceTpuCluster.is_env_present())
    except Exception:  # noqa: BLE001 - no detector or no metadata server: not a TPU VM
        return False


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               cpu_collectives: str = "gloo") -> bool:
    """Calls jax.distributed.initialize when this is a multi-process run; returns whether it did.

    Explicit arguments win; otherwise the environment decides (see the module docstring).
    `cpu_collectives` lets CPU-only processes (tests, laptops) run cross-process collectives.
    """
    if not coordinator_address and "JAX_NUM_PROCESSES" in os.environ:
        # JAX reads JAX_COORDINATOR_ADDRESS itself but not these two: pass them on.
        coordinator_address = os.environ.get("JAX_COORDINATOR_ADDRESS", "")
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
        process_id = int(os.environ.get("JAX_PROCESS_ID", "-1"))
    explicit = bool(coordinator_address)
    if explicit and (num_processes < 1 or not 0 <= process_id < num_processes):
        raise ValueError(f"--coordinator_address={coordinator_address} needs --num_processes >= 1 "
                         f"and 0 <= --process_id < num_processes (got {num_processes}, "
                         f"{process_id}).")
    if not explicit and not cluster_detected():
        return False
    if cpu_collectives:  # affects only the CPU backend; harmless on TPU and GPU hosts
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()
    logging.info("Process %d of %d; %d local and %d global devices.", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
