"""Checkpoints under signals: SIGKILL mid-run and resume, SIGTERM and SIGINT saving where they
stop, and two processes agreeing on the stop step (test_checkpoint.py holds the rest)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jaxlm import checkpoint as ckpt
from jaxlm.train.loop import train
from test_checkpoint import BASE, EVERY, REPO, RUN, STEPS, TINY, config, metrics
from test_checkpoint import base_run  # noqa: F401
# (base_run is a fixture: imported, it runs once more for this module)


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory) -> dict:
    """Subprocesses share one compilation cache: the resumed process runs the killed one's binary."""
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONUNBUFFERED": "1"}


def start_train(run_dir: Path, env: dict, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jaxlm.cli", "train", TINY, *BASE, *overrides, f"train.run_dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> int:
    """Polls metrics.jsonl until it reaches `step`; returns the last step logged."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            last = metrics(run_dir)[-1]["step"]
        except (FileNotFoundError, IndexError, ValueError):
            last = 0
        if last >= step:
            return last
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"training did not reach step {step} in {timeout}s")


def test_sigkill_mid_run_then_resume_gives_bit_identical_losses(base_run, tmp_path, cache_env):
    run_dir = tmp_path / "run"
    proc = start_train(run_dir, cache_env, *RUN)
    killed_at = wait_for_step(run_dir, proc, 15)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    assert metrics(run_dir)[-1]["step"] < STEPS

    resumed = start_train(run_dir, cache_env, *RUN)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    restored = int(err.split("resumed from step ")[1].split()[0])
    assert restored % EVERY == 0 and restored <= killed_at  # steps after the checkpoint were redone

    got = [(r["step"], r["loss"]) for r in metrics(run_dir)]
    assert got == [(r["step"], r["loss"]) for r in metrics(base_run)]  # bit for bit, each step once


def test_sigterm_finishes_the_step_saves_there_and_exits_zero(tmp_path, cache_env):
    run_dir = tmp_path / "run"
    proc = start_train(run_dir, cache_env, "train.steps=5000", "checkpoint.every=1000")
    seen = wait_for_step(run_dir, proc, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = metrics(run_dir)[-1]["step"]
    # promptly, at a step boundary: steps take ~20 ms here, so the bound leaves a loaded machine's
    # scheduling half a second between reading the metrics and the signal landing
    assert seen <= stopped <= seen + 25
    assert f"SIGTERM received: stopped after step {stopped}" in err
    (newest, path), = ckpt.step_dirs(run_dir / "checkpoints")
    assert newest == stopped and ckpt.verify(path) is None
    assert ckpt.read_meta(path)["data"] == {"next_index": stopped}


def test_sigint_in_process_stops_with_checkpoint_and_returns(tmp_path):
    run_dir = tmp_path / "run"
    cfg = config("train.steps=5000", "checkpoint.every=1000", f"train.run_dir={run_dir}")

    def interrupt():
        while True:
            try:
                if metrics(run_dir):
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    threading.Thread(target=interrupt, daemon=True).start()
    history = train(cfg)  # returns instead of raising KeyboardInterrupt
    assert history[-1]["step"] < 5000
    assert [s for s, _ in ckpt.step_dirs(run_dir / "checkpoints")] == [history[-1]["step"]]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_agree_on_the_stop_step_when_one_gets_sigterm(tmp_path, cache_env):
    run_dir = tmp_path / "run"
    env = {**cache_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAXLM_COORDINATOR": f"127.0.0.1:{_free_port()}", "JAXLM_NUM_PROCESSES": "2"}
    procs = [start_train(run_dir, {**env, "JAXLM_PROCESS_ID": str(i)}, "mesh.fsdp=4", "train.steps=5000",
                         "checkpoint.every=1000") for i in range(2)]
    try:
        wait_for_step(run_dir, procs[0], 5, timeout=400)
        procs[1].send_signal(signal.SIGTERM)  # only the second process is told
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    stops = {int(o.split("stopped: step ")[1].split(",")[0]) for o, _ in outs}
    assert len(stops) == 1
    (newest, path), = ckpt.step_dirs(run_dir / "checkpoints")
    assert newest == stops.pop() and ckpt.verify(path) is None
