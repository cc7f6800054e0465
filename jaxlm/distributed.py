"""Process start-up and mesh construction.

The mesh has axes (data, fsdp, expert, tensor); `tensor` is innermost so it stays on the
fastest links. Sizes come from the `mesh` config: per axis an ici size (within a host or
slice) and a dcn size (across hosts/slices); one ici axis may be -1 to fill the rest.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from jaxlm.config import ConfigError, MeshConfig
from jaxlm.sharding import MESH_AXES


def initialize() -> None:
    """Starts jax.distributed when the environment asks for several processes; else nothing."""


def resolve_axis_sizes(mesh_cfg: MeshConfig, n_devices: int, n_slices: int = 1) -> tuple[dict, dict]:
    """Returns ({axis: ici size}, {axis: dcn size}) with -1 filled; errors name the numbers."""
    dcn = {a: getattr(mesh_cfg, f"dcn_{a}") for a in MESH_AXES}
    dcn_product = int(np.prod(list(dcn.values())))
    if dcn_product == 1:  # no dcn axes set: one flat mesh over every device of every host
        n_slices = 1
    elif dcn_product != n_slices:
        raise ConfigError(
            f"mesh dcn sizes {dcn} multiply to {dcn_product}, but there are {n_slices} hosts/slices; "
            f"set mesh.dcn_* so that they multiply to {n_slices}")
    per_slice = n_devices // n_slices
    ici = {a: getattr(mesh_cfg, a) for a in MESH_AXES}
    fill = [a for a, n in ici.items() if n == -1]
    if len(fill) > 1:
        raise ConfigError(f"only one mesh axis may be -1 (fill), got {', '.join('mesh.' + a for a in fill)}")
    known = int(np.prod([n for n in ici.values() if n != -1]))
    if fill:
        if per_slice % known:
            raise ConfigError(
                f"mesh sizes {ici} cannot fill {per_slice} devices per slice: {per_slice} is not divisible by {known}")
        ici[fill[0]] = per_slice // known
    if int(np.prod(list(ici.values()))) != per_slice:
        raise ConfigError(
            f"mesh sizes {ici} multiply to {int(np.prod(list(ici.values())))}, but {per_slice} devices are present "
            f"per slice; make the product {per_slice} or set one axis to -1")
    return ici, dcn


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    ici, dcn = resolve_axis_sizes(mesh_cfg, len(devices), _count_slices(devices))
    if int(np.prod(list(dcn.values()))) > 1:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh(
            [ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES], devices=devices,
            process_is_granule=not hasattr(devices[0], "slice_index"))
    else:
        shape = [ici[a] for a in MESH_AXES]
        try:
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh(shape, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def _count_slices(devices) -> int:
    """TPU slices when present, else processes: the granule that dcn axes span."""
    if hasattr(devices[0], "slice_index"):
        return len({d.slice_index for d in devices})
    return len({d.process_index for d in devices})


def data_parallel_size(mesh: Mesh, rules: dict) -> int:
    return int(np.prod([mesh.shape[a] for a in rules.get("batch", ())]))
