"""Mesh sizes from the config: -1 fills, ici x dcn, one-line errors, host-local inner axes."""

from dataclasses import dataclass

import jax
import numpy as np
import pytest

from jaxlm.config import ConfigError, MeshConfig, load_config
from jaxlm.parallel.launch import _detect_cluster
from jaxlm.parallel.mesh import device_grid, make_mesh, resolve_axis_sizes


def sizes(**kw):
    return resolve_axis_sizes(MeshConfig(**{k: v for k, v in kw.items() if k not in ("n", "slices")}),
                              kw.get("n", 8), kw.get("slices", 1))


def test_minus_one_fills_the_remaining_devices():
    ici, dcn = sizes(data=-1, tensor=2)
    assert ici == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 2}
    assert dcn == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    assert sizes(data=1, fsdp=-1, n=16)[0]["fsdp"] == 16


def test_dcn_sizes_split_devices_per_host_and_may_fill_too():
    ici, dcn = sizes(data=-1, dcn_data=2, n=8, slices=2)
    assert ici["data"] == 4 and dcn["data"] == 2
    ici, dcn = sizes(data=1, fsdp=-1, dcn_data=-1, n=32, slices=4)
    assert ici["fsdp"] == 8 and dcn["data"] == 4


def test_without_dcn_sizes_the_mesh_is_flat_over_every_host():
    ici, _ = sizes(data=-1, n=8, slices=2)  # two processes, no dcn sizes: one flat data axis
    assert ici["data"] == 8


@pytest.mark.parametrize("kw,words", [
    (dict(data=3), ["mesh.data=3", "= 3", "8 devices", "-1"]),
    (dict(data=-1, tensor=3), ["not divisible by 3", "8 devices"]),
    (dict(data=-1, fsdp=-1), ["only one of mesh.data, mesh.fsdp"]),
    (dict(data=-1, dcn_data=4, slices=2), ["mesh.dcn_data=4", "2 hosts/slices"]),
    (dict(data=-1, dcn_data=-1, dcn_fsdp=-1, slices=2), ["only one of mesh.dcn_data, mesh.dcn_fsdp"]),
    (dict(data=8, dcn_data=2, slices=2), ["mesh.data=8", "4 devices per host/slice"]),
    (dict(data=-1, dcn_data=3, n=8, slices=3), ["8 devices do not split evenly over 3"]),
])
def test_mismatched_sizes_raise_one_line_errors_naming_the_numbers(kw, words):
    with pytest.raises(ConfigError) as e:
        sizes(**kw)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_flat_mesh_uses_all_eight_devices_with_tensor_innermost():
    cfg = load_config(None, ["mesh.data=-1", "mesh.fsdp=2", "mesh.tensor=2"])
    mesh = make_mesh(cfg.mesh)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    # neighbours along `tensor` are consecutive devices (the fastest links)
    assert abs(mesh.devices[0, 0, 0, 0].id - mesh.devices[0, 0, 0, 1].id) == 1


@dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


@pytest.mark.parametrize("via_jax", [True, False], ids=["mesh_utils", "fallback"])
def test_hybrid_mesh_keeps_ici_axes_inside_a_process(via_jax, monkeypatch):
    if not via_jax:  # the fallback used when jax's helper rejects the devices
        from jax.experimental import mesh_utils

        monkeypatch.setattr(mesh_utils, "create_hybrid_device_mesh", lambda *a, **k: (_ for _ in ()).throw(ValueError))
    # 2 processes x 4 devices, listed interleaved to prove the order is not assumed
    devices = [FakeDevice(i, i % 2) for i in range(8)]
    grid = device_grid(MeshConfig(data=1, fsdp=2, tensor=2, dcn_data=2), devices)
    assert grid.shape == (2, 2, 1, 2)
    for sub in grid:  # each index of the dcn axis `data` is one process's whole ici sub-mesh
        assert len({d.process_index for d in sub.flat}) == 1
    assert [d.process_index for d in grid[:, 0, 0, 0]] == [0, 1]


def test_flat_mesh_over_processes_orders_devices_host_by_host():
    devices = [FakeDevice(i, i % 2) for i in range(8)]
    grid = device_grid(MeshConfig(data=-1, tensor=4), devices)
    for row in grid.reshape(2, 4):  # the tensor axis (4 devices) never crosses a process
        assert len({d.process_index for d in row}) == 1


def test_hybrid_mesh_on_one_process_names_the_mismatch():
    cfg = load_config(None, ["mesh.dcn_data=2"])
    with pytest.raises(ConfigError, match=r"mesh.dcn_data=2 .* 1 hosts/slices"):
        make_mesh(cfg.mesh)


@pytest.mark.parametrize("env,kind", [
    ({}, "single"),
    ({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"}, "single"),  # the sbatch script itself, not a task
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2"}, "slurm"),
    ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}, "single"),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}, "tpu"),
    ({"OMPI_MCA_orte_hnp_uri": "123.0;tcp://10.0.0.1:5000"}, "ompi"),
])
def test_cluster_detection_starts_jax_distributed_only_when_the_environment_says_so(env, kind):
    assert _detect_cluster(env) == kind


def test_data_parallel_size_counts_the_batch_axes():
    from jaxlm.parallel.mesh import data_parallel_size
    from jaxlm.parallel.sharding import resolve_rules

    mesh = make_mesh(load_config(None, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]).mesh)
    assert data_parallel_size(mesh, resolve_rules()) == 4
    assert np.prod(list(mesh.shape.values())) == jax.device_count()


@pytest.mark.parametrize("env,ids", [
    # one task per node: it drives every GPU the node gives it
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, [0, 1, 2, 3]),
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"}, list(range(8))),
    # one task per GPU, srun bound one GPU to each task: it is that task's device 0
    ({"SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NUM_NODES": "2", "CUDA_VISIBLE_DEVICES": "5"}, [0]),
    # one task per GPU, all GPUs visible: jax's default (GPU number SLURM_LOCALID)
    ({"SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NUM_NODES": "2", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, None),
])
def test_slurm_tasks_get_their_nodes_gpus(env, ids):
    from jaxlm.parallel.launch import _slurm_local_device_ids

    assert _slurm_local_device_ids(env) == ids


@pytest.mark.parametrize("env,words", [
    ({"JAXLM_COORDINATOR": "127.0.0.1:1234", "JAXLM_NUM_PROCESSES": "2"}, "JAXLM_PROCESS_ID must be"),
    ({"JAXLM_COORDINATOR": "127.0.0.1:1234", "JAXLM_NUM_PROCESSES": "2", "JAXLM_PROCESS_ID": "2"},
     r"JAXLM_PROCESS_ID=2 must be in \[0, JAXLM_NUM_PROCESSES=2\)"),
    ({"JAXLM_COORDINATOR": "127.0.0.1:1234", "JAXLM_NUM_PROCESSES": "2", "JAXLM_PROCESS_ID": "0",
      "JAXLM_LOCAL_DEVICE_IDS": "0,x"}, "comma-separated list"),
])
def test_bad_launch_variables_are_one_line_errors_before_any_connection(env, words, monkeypatch):
    from jaxlm.parallel.launch import initialize
    from jaxlm.errors import UserError

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match=words):
        initialize()


def test_without_launch_variables_initialize_stays_single_process(monkeypatch):
    from jaxlm.parallel.launch import initialize

    for k in ("JAXLM_COORDINATOR", "SLURM_STEP_NUM_TASKS", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    assert initialize() == "single" and jax.process_count() == 1
    monkeypatch.setenv("JAXLM_DISTRIBUTED", "off")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert initialize() == "single"
