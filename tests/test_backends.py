"""jaxlm.parallel.backends: a machine without a TPU starts JAX on the CPU without the TPU runtime's errors."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from jaxlm.parallel import backends

TPU_RUNTIME_ERROR = "TPU_WORKER_HOSTNAMES"  # in the lines libtpu prints when it finds no TPU
START_JAX = "import os; {} import jax; print(os.environ.get('JAX_PLATFORMS'), jax.devices()[0].platform)"


def start_jax(skip: bool) -> subprocess.CompletedProcess:
    """A fresh process that starts JAX's default backend after `import jaxlm` (skip) or alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    return subprocess.run([sys.executable, "-c", START_JAX.format("import jaxlm;" if skip else "")], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_without_a_tpu_or_gpu_plugin_jax_starts_on_the_cpu_without_the_tpu_runtime_errors(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS")  # restored after the test
    if not backends.skip_absent_tpu():
        pytest.skip("this machine has no libtpu, a GPU plugin or a Google PCI device: nothing to skip")
    noisy = start_jax(skip=False)
    assert noisy.returncode == 0 and noisy.stdout.split()[-1] == "cpu"
    if TPU_RUNTIME_ERROR not in noisy.stderr:
        pytest.skip("this libtpu starts quietly without a TPU")  # the control: there is noise to remove
    quiet = start_jax(skip=True)
    assert quiet.returncode == 0 and quiet.stdout.split() == ["cpu", "cpu"]
    assert "TPU" not in quiet.stderr, quiet.stderr


def test_an_explicit_choice_or_a_gpu_plugin_is_left_to_jax(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert not backends.skip_absent_tpu() and os.environ["JAX_PLATFORMS"] == "cuda"
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(backends.metadata, "entry_points", lambda group: ["xla_cuda12"] if group == "jax_plugins" else [])
    assert not backends.skip_absent_tpu() and "JAX_PLATFORMS" not in os.environ
