"""Process start-up and mesh construction.

The mesh has axes (data, fsdp, expert, tensor); `tensor` is innermost so it stays on the
fastest links. Sizes come from the `mesh` config: per axis an ici size (within a host or
slice) and a dcn size (across hosts/slices); one ici axis and one dcn axis may be -1 to fill.
When every dcn size is 1 the mesh is flat over all devices of all processes.
"""

from __future__ import annotations

import glob
import os

import jax
import numpy as np
from jax.sharding import Mesh

from jaxlm.config import ConfigError, MeshConfig
from jaxlm.errors import UserError
from jaxlm.sharding import MESH_AXES

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


def resolve_axis_sizes(mesh_cfg: MeshConfig, n_devices: int, n_slices: int = 1) -> tuple[dict, dict]:
    """Returns ({axis: ici size}, {axis: dcn size}) with -1 filled; errors name the numbers.

    `n_slices` is the number of granules the dcn axes span: TPU slices, or processes
    (hosts) elsewhere. With every dcn size 1 the mesh is flat and `n_slices` is ignored.
    """
    dcn = {a: getattr(mesh_cfg, f"dcn_{a}") for a in MESH_AXES}
    if all(n == 1 for n in dcn.values()):
        n_slices = 1
    else:
        dcn = _fill(dcn, n_slices, "mesh.dcn_", f"{n_slices} hosts/slices")
    if n_devices % n_slices:
        raise ConfigError(f"{n_devices} devices do not split evenly over {n_slices} hosts/slices")
    per_slice = n_devices // n_slices
    where = f"{per_slice} devices" + (" per host/slice" if n_slices > 1 else "")
    ici = _fill({a: getattr(mesh_cfg, a) for a in MESH_AXES}, per_slice, "mesh.", where)
    return ici, dcn


def _fill(sizes: dict, total: int, prefix: str, where: str) -> dict:
    """Replaces the one -1 so that the sizes multiply to `total`, or raises a one-line ConfigError."""
    shown = " x ".join(f"{prefix}{a}={n}" for a, n in sizes.items())
    fill = [a for a, n in sizes.items() if n == -1]
    if len(fill) > 1:
        raise ConfigError(f"only one of {', '.join(prefix + a for a in fill)} may be -1 (fill)")
    known = int(np.prod([n for n in sizes.values() if n != -1]))
    if fill:
        if total % known:
            raise ConfigError(f"{shown} cannot fill {where}: {total} is not divisible by {known}; "
                              f"choose sizes whose product divides {total}")
        return {**sizes, fill[0]: total // known}
    if known != total:
        raise ConfigError(f"{shown} = {known}, but there are {where}; "
                          f"make the product {total} or set one of them to -1")
    return dict(sizes)


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
    """The (data, fsdp, expert, tensor) mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(device_grid(mesh_cfg, devices), MESH_AXES)


def device_grid(mesh_cfg: MeshConfig, devices: list) -> np.ndarray:
    """Devices arranged as the mesh; axis size = ici size x dcn size.

    Hybrid (dcn sizes set): each dcn granule (TPU slice, else process) holds a whole ici
    sub-mesh, so ici axes never cross the slow network. Flat: devices are ordered host by
    host, so the innermost axes (tensor, then expert, ...) stay inside a host when they fit.
    """
    from jax.experimental import mesh_utils

    ici, dcn = resolve_axis_sizes(mesh_cfg, len(devices), count_granules(devices))
    ici_shape, dcn_shape = [ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES]
    if int(np.prod(dcn_shape)) > 1:
        try:
            return mesh_utils.create_hybrid_device_mesh(
                ici_shape, dcn_shape, devices=devices, process_is_granule=devices[0].platform != "tpu")
        except (ValueError, NotImplementedError, AssertionError):
            return _hybrid_by_reshape(devices, ici_shape, dcn_shape)
    shape = [i * d for i, d in zip(ici_shape, dcn_shape)]
    try:
        return mesh_utils.create_device_mesh(shape, devices=_host_major(devices))  # TPU: follows the torus
    except (ValueError, NotImplementedError, AssertionError):
        return np.asarray(_host_major(devices)).reshape(shape)


def _hybrid_by_reshape(devices, ici_shape, dcn_shape) -> np.ndarray:
    """Hybrid grid without topology knowledge: granule-major order, interleaved axes."""
    n = len(ici_shape)
    grid = np.asarray(_host_major(devices)).reshape(*dcn_shape, *ici_shape)
    grid = grid.transpose([k for i in range(n) for k in (i, n + i)])  # (dcn_a, ici_a) per axis
    return grid.reshape([i * d for i, d in zip(ici_shape, dcn_shape)])


def _host_major(devices) -> list:
    if devices[0].platform == "tpu":
        return list(devices)
    return sorted(devices, key=lambda d: (d.process_index, d.id))


def count_granules(devices) -> int:
    """What dcn axes span: TPU slices (one when devices carry no slice_index), else processes."""
    if devices[0].platform == "tpu":
        return len({getattr(d, "slice_index", 0) for d in devices})
    return len({d.process_index for d in devices})


def data_parallel_size(mesh: Mesh, rules: dict) -> int:
    return int(np.prod([mesh.shape[a] for a in rules.get("batch", ())]))
