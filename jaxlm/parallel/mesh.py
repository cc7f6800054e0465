"""Mesh construction (and the agreement of processes on one answer).

The mesh has axes (data, fsdp, expert, tensor); `tensor` is innermost so it stays on the
fastest links. Sizes come from the `mesh` config: per axis an ici size (within a host or
slice) and a dcn size (across hosts/slices); one ici axis and one dcn axis may be -1 to fill.
When every dcn size is 1 the mesh is flat over all devices of all processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.sharding import Mesh

from jaxlm.errors import ConfigError
from jaxlm.parallel.sharding import MESH_AXES

if TYPE_CHECKING:  # the config is above this package: only its type is named here
    from jaxlm.config import MeshConfig

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


def all_processes_agree(ok: bool) -> bool:
    """True if `ok` on every process: all processes must take the same step (or none)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))
