"""train.deterministic: which XLA flags are set, when, and what the run says."""

import os

import pytest

from jaxlm.parallel import determinism
from jaxlm.config import ConfigError

FAKE = "--xla_gpu_flag_no_xla_has_zz=true"


def test_only_flags_this_xla_knows_are_offered():
    assert determinism.known_xla_flags(["--xla_gpu_deterministic_ops=true", FAKE]) == [
        "--xla_gpu_deterministic_ops=true"]


def test_configure_sets_known_gpu_flags_only_when_asked_and_a_gpu_may_start(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setattr(determinism, "GPU_FLAGS", determinism.GPU_FLAGS + (FAKE,))
    monkeypatch.setattr(determinism, "gpu_plugin_installed", lambda: False)
    assert determinism.configure(True) == []  # no GPU: nothing to do
    monkeypatch.setattr(determinism, "gpu_plugin_installed", lambda: True)
    assert determinism.configure("auto") == [] and determinism.configure(False) == []  # auto = fast on GPU
    assert determinism.configure(True) == ["--xla_gpu_deterministic_ops=true"]  # never the unknown one
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 --xla_gpu_deterministic_ops=true"
    assert determinism.configure(True) == []  # already there


def test_auto_is_deterministic_where_free_and_the_gpu_run_says_when_it_is_not(capsys, monkeypatch):
    assert determinism.check("auto", "cpu") and determinism.check("auto", "tpu")
    assert capsys.readouterr().err == ""
    assert not determinism.check("auto", "gpu")
    assert "may differ in the last bits" in capsys.readouterr().err
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.raises(ConfigError, match="needs XLA_FLAGS=--xla_gpu_deterministic_ops=true"):
        determinism.check(True, "gpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
    assert determinism.check(True, "gpu") and capsys.readouterr().err == ""


def test_a_resume_that_changes_determinism_or_the_mesh_says_so():
    mesh8, mesh4x2 = {"data": 8, "fsdp": 1}, {"data": 4, "fsdp": 2}
    cpu = {"deterministic": True, "platform": "cpu", "mesh": mesh8}
    gpu_fast = {"deterministic": False, "platform": "gpu", "mesh": mesh8}
    assert determinism.resume_note(cpu, cpu) is None and determinism.resume_note(None, cpu) is None
    assert determinism.resume_note(cpu, gpu_fast) == (
        "the checkpoint was written with deterministic=true on CPU, this run is deterministic=false on GPU: "
        "the resumed run need not match an uninterrupted one bit for bit")
    assert determinism.resume_note(cpu, {**cpu, "mesh": mesh4x2}) == (
        "the checkpoint was written on mesh data=8, this run's is data=4 fsdp=2: "
        "the resumed run need not match an uninterrupted one bit for bit")
    assert "; and on mesh data=8, this run's is one device:" in determinism.resume_note(
        cpu, {**gpu_fast, "mesh": {"data": 1, "fsdp": 1}})
    before_mesh_record = {"deterministic": True, "platform": "cpu"}  # checkpoints of earlier versions
    assert determinism.resume_note(before_mesh_record, {**cpu, "mesh": mesh4x2}) is None
