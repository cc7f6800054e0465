"""Process start-up: `jax.distributed` on a cluster (SLURM, a TPU pod, explicit env), or one process.

Set before anything touches JAX's devices (`jaxlm train` calls `initialize()` first thing).
"""

from __future__ import annotations

import glob
import os

import jax

from jaxlm.errors import UserError

# JAXLM_DISTRIBUTED=auto forces jax's own cluster detection, =off keeps a single process
# even inside SLURM or on a TPU VM (e.g. a debugging shell inside an allocation).
ENV_MODE = "JAXLM_DISTRIBUTED"


def initialize() -> str:
    """Starts jax.distributed when the environment asks for several processes.

    Must run before anything touches a JAX device. Returns how it started ("single",
    "explicit", "slurm", "tpu", "ompi", "auto", "already"), for logs and tests.
    """
    env = os.environ
    mode = env.get(ENV_MODE, "").strip().lower()
    if jax.distributed.is_initialized():
        return "already"
    if mode == "off":
        return "single"
    if env.get("JAXLM_COORDINATOR"):
        return _initialize_explicit(env)
    kind = "auto" if mode == "auto" else _detect_cluster(env)
    if kind == "single":
        return kind
    local_ids = _local_device_ids(env) or (_slurm_local_device_ids(env) if kind == "slurm" else None)
    # jax reads the coordinator, process count and id from SLURM / TPU metadata / Open MPI itself
    jax.distributed.initialize(local_device_ids=local_ids)
    return kind


def _detect_cluster(env) -> str:
    # The batch script of an sbatch job also sees SLURM_NTASKS>1 but is not one of the
    # tasks; srun sets SLURM_STEP_NUM_TASKS for the tasks it starts.
    if int(env.get("SLURM_STEP_NUM_TASKS") or 1) > 1 and "SLURM_PROCID" in env:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env:
        return "ompi"
    if _on_tpu_vm(env):
        return "tpu"  # also fine on a single-host TPU VM: jax then finds one process
    return "single"


def _slurm_local_device_ids(env) -> list[int] | None:
    """GPUs this SLURM task drives; jax's own default is GPU number SLURM_LOCALID, one per task."""
    visible = [v for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    if int(env["SLURM_STEP_NUM_TASKS"]) <= nodes:  # one task per node drives all of its GPUs
        return list(range(len(visible) or int(env.get("SLURM_GPUS_ON_NODE") or 0))) or None
    if len(visible) == 1:  # srun bound one GPU to this task (--gpus-per-task=1): it is device 0
        return [0]
    return None


def _local_device_ids(env) -> list[int] | None:
    ids = env.get("JAXLM_LOCAL_DEVICE_IDS", "").strip()
    try:
        return [int(i) for i in ids.split(",")] if ids else None
    except ValueError:
        raise UserError(f"JAXLM_LOCAL_DEVICE_IDS={ids!r} must be a comma-separated list of device numbers")


def _on_tpu_vm(env) -> bool:
    """A Cloud TPU VM (chips on PCI, as jax checks) or a GKE TPU pod (worker list in env)."""
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # private helper moved: fall back to the device files TPU VMs expose
        return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _initialize_explicit(env) -> str:
    """JAXLM_COORDINATOR=host:port, JAXLM_NUM_PROCESSES, JAXLM_PROCESS_ID (launch/multihost_cpu.sh)."""
    try:
        n = int(env["JAXLM_NUM_PROCESSES"])
        pid = int(env["JAXLM_PROCESS_ID"])
    except (KeyError, ValueError):
        raise UserError("JAXLM_COORDINATOR is set, so JAXLM_NUM_PROCESSES and JAXLM_PROCESS_ID must be "
                        f"integers; got {env.get('JAXLM_NUM_PROCESSES')!r} and {env.get('JAXLM_PROCESS_ID')!r}")
    if not 0 <= pid < n:
        raise UserError(f"JAXLM_PROCESS_ID={pid} must be in [0, JAXLM_NUM_PROCESSES={n})")
    # Cross-process collectives of CPU devices; only the CPU client reads it, so GPU runs
    # started this way are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        env["JAXLM_COORDINATOR"], n, pid, local_device_ids=_local_device_ids(env),
        initialization_timeout=int(env.get("JAXLM_INIT_TIMEOUT", 300)),
        heartbeat_timeout_seconds=int(env.get("JAXLM_HEARTBEAT_TIMEOUT", 100)))
    return "explicit"


# ------------------------------------------------------------------------------- mesh
