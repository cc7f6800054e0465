"""Several processes act as one: same batches and losses as one process, no hang when one dies.

Real processes on 127.0.0.1 (jax.distributed + gloo), each with simulated CPU devices, bounded
in time. The 2 x 4-device and 1 x 8-device runs are shared by the tests of this module.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxlm.data.pipeline import BatchIterator, TokenStream, row_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
STEPS = 20
ARGS = ["model.n_layers=2", f"train.steps={STEPS}", "train.log_every=1", "train.progress=false",
        "train.eval_every=0", "train.peak_flops_per_device=1e12", "checkpoint.every=10"]
TIMEOUT = 400  # seconds for one run on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXLM_")}
    return {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            "PYTHONUNBUFFERED": "1", **extra}


def run_processes(n: int, devices: int, run_dir: Path) -> None:
    """`jaxlm train` in n processes (JAXLM_* env -> jaxlm.parallel.launch.initialize); all must exit 0 in time."""
    cmd = [sys.executable, "-m", "jaxlm.cli", "train", TINY, *ARGS, f"train.run_dir={run_dir}"]
    coordinator = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(n):
        env = process_env(devices) if n == 1 else process_env(
            devices, JAXLM_COORDINATOR=coordinator, JAXLM_NUM_PROCESSES=str(n), JAXLM_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} of {n} exited {p.returncode}:\n{out[-3000:]}"


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The tiny model trained by 2 processes x 4 devices and by 1 process x 8 devices."""
    out = {}
    for name, n, devices in (("two", 2, 4), ("one", 1, 8)):
        out[name] = tmp_path_factory.mktemp(name) / "run"
        run_processes(n, devices, out[name])
    return out


def test_each_process_reads_only_its_rows_and_together_they_form_the_global_batch():
    ds = row_dataset(TokenStream([np.arange(5000, dtype=np.uint16)], np.array([0])), 16, packing=False, seed=0,
                     what="training")
    whole = BatchIterator(ds, 8, process_index=0, process_count=1)
    parts = [BatchIterator(ds, 8, process_index=p, process_count=2) for p in range(2)]
    for _ in range(3):
        expected = next(whole)
        got = [next(it) for it in parts]
        assert all(g.inputs.shape == (4, 16) for g in got)
        for k in ("inputs", "targets", "loss_mask"):
            np.testing.assert_array_equal(np.concatenate([getattr(g, k) for g in got]), getattr(expected, k))


@pytest.mark.slow
def test_two_processes_of_four_devices_train_to_the_losses_of_one_process_of_eight(runs):
    two, one = losses(runs["two"]), losses(runs["one"])
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)
    assert two[-1] < two[0]  # and it did train


@pytest.mark.slow
def test_checkpoint_written_by_two_processes_restores_in_one_process(runs):
    import jax

    from jaxlm import checkpoint as ckpt
    from jaxlm.config import load_config
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.train.step import make_trainer

    step_dir = runs["two"] / "checkpoints" / str(STEPS)
    assert ckpt.verify(step_dir) is None
    # the digests both processes computed on their shards equal those of the arrays read back whole
    assert ckpt.verify(step_dir, arrays=True) is None
    restored = {}
    for mesh in ("mesh.data=8", "mesh.fsdp=8"):  # a layout unlike the writer's
        cfg = load_config(TINY, ARGS + ["mesh.data=1" if "fsdp" in mesh else "mesh.fsdp=1", mesh])
        trainer = make_trainer(cfg, make_mesh(cfg.mesh))
        restored[mesh] = ckpt.restore_state(step_dir, trainer)
        if mesh == "mesh.data=8":
            reference = ckpt.restore_state(runs["one"] / "checkpoints" / str(STEPS), trainer)
    a, b = restored.values()
    assert ckpt.state_equal(a, b)  # the same numbers whatever the reader's layout
    assert int(a["step"]) == STEPS and ckpt.read_meta(step_dir)["process_count"] == 2
    # every shard of every process was written: equal to the single-process run's state
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5),
                 a["params"], reference["params"])
    assert ckpt.read_meta(step_dir)["data"] == ckpt.read_meta(runs["one"] / "checkpoints" / str(STEPS))["data"]


@pytest.mark.slow
def test_multihost_script_stops_the_others_and_names_the_dead_process_within_60s(tmp_path):
    run_dir = tmp_path / "run"
    cmd = ["bash", str(REPO / "launch" / "multihost_cpu.sh"), "2", TINY, *ARGS[:1], "train.steps=100000",
           "train.log_every=1", "train.progress=false", "train.eval_every=0", "train.peak_flops_per_device=1e12",
           f"train.run_dir={run_dir}"]
    log = open(tmp_path / "out.txt", "w+")
    env = {**process_env(4), "TIME_LIMIT": str(TIMEOUT), "PYTHON": sys.executable}
    script = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + TIMEOUT
        while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
            assert script.poll() is None and time.time() < deadline, (tmp_path / "out.txt").read_text()[-3000:]
            time.sleep(0.5)  # both processes are past start-up and in the training loop
        pid = int(re.search(r"process 1 is pid (\d+)", (tmp_path / "out.txt").read_text()).group(1))
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        rc = script.wait(timeout=90)
        elapsed = time.time() - killed
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
    out = (tmp_path / "out.txt").read_text()
    assert rc != 0
    assert elapsed < 60, f"script took {elapsed:.0f}s to notice"
    assert re.search(rf"process 1 \(pid {pid}\) died", out), out[-2000:]
    for other in re.findall(r"process \d is pid (\d+)", out):  # nobody is left running
        assert not alive(int(other))


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited; only its exit status remains
