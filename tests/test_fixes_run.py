"""A run guards its directory and its checkpoints: one run per directory, no non-finite checkpoint,
a failed save stops the run in one line, edited data refuses to resume, a finished run does nothing."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from jaxlm import checkpoint as ckpt
from jaxlm import cli
from jaxlm.config import load_config
from jaxlm.errors import RunFailed, UserError
from jaxlm.train.guard import RunDirLock
from jaxlm.train.loop import train

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
SMALL = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=2", "model.d_ff=64",
         "data.seq_len=16", "train.global_batch=8", "train.eval_every=0", "train.log_every=1",
         "train.progress=false", "train.peak_flops_per_device=1e12", "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, shakespeare_path) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_bytes(shakespeare_path.read_bytes()[:200_000])
    return path


def config(run_dir: Path, text: Path, *overrides: str):
    return load_config(TINY, SMALL + [f"data.path={text}", f"train.run_dir={run_dir}", *overrides])


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, text_file) -> Path:
    """4 steps, checkpoints at 2 and 4."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    train(config(run_dir, text_file, "train.steps=4", "checkpoint.every=2"))
    assert [s for s, _ in ckpt.step_dirs(run_dir / "checkpoints")] == [4, 2]
    return run_dir


def test_finished_run_prints_one_line_and_touches_nothing(base_run, tmp_path, text_file, capfd):
    run_dir = Path(shutil.copytree(base_run, tmp_path / "run"))
    files = lambda: {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.name != "run.lock"}  # noqa: E731
    before = files()
    capfd.readouterr()
    assert cli.main(["train", TINY, *SMALL, f"data.path={text_file}", f"train.run_dir={run_dir}",
                     "train.steps=4", "checkpoint.every=2"]) == 0
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"jaxlm: {run_dir} is finished (its checkpoint is at step 4, train.steps=4); to train on, "
                   "raise train.steps (e.g. train.steps=8), or use a new train.run_dir"]
    assert files() == before  # no new events file, no rewritten config


def test_edited_data_file_refuses_resume_unless_allowed(base_run, tmp_path, text_file):
    run_dir = Path(shutil.copytree(base_run, tmp_path / "run"))
    edited = tmp_path / "text.txt"
    raw = bytearray(text_file.read_bytes())
    raw[-10:] = b"x" * 10  # same size, last bytes changed
    edited.write_bytes(bytes(raw))
    # the data section may not change on resume, so the edited copy takes the original's path in
    # the saved config: point the saved config at the copy
    for meta_file in run_dir.rglob("meta/metadata"):
        meta = json.loads(meta_file.read_text())
        meta["config"]["data"]["path"] = str(edited)
        meta_file.write_text(json.dumps(meta))
        ckpt.write_manifest(meta_file.parent.parent)
    with pytest.raises(UserError) as err:
        train(config(run_dir, edited, "train.steps=6", "checkpoint.every=2"))
    message = str(err.value)
    assert f"the data changed since it was saved ({edited}: files differ" in message
    assert "train.allow_data_change=true" in message and "\n" not in message
    history = train(config(run_dir, edited, "train.steps=6", "checkpoint.every=2", "train.allow_data_change=true"))
    assert [r["step"] for r in history] == [5, 6]


def test_data_fingerprint_sees_an_edit_at_either_end_but_not_a_rename(tmp_path):
    from jaxlm.config import DataConfig
    from jaxlm.data.sources import data_fingerprint

    path = tmp_path / "a.txt"
    path.write_bytes(bytes(range(256)) * 2000)

    def fingerprint():
        return data_fingerprint(DataConfig(path=str(path)))[0]["sha256"]

    original = fingerprint()
    raw = bytearray(path.read_bytes())
    for where in (0, len(raw) - 1):
        edited = raw.copy()
        edited[where] ^= 1
        path.write_bytes(bytes(edited))
        assert fingerprint() != original, where
    path.write_bytes(bytes(raw) + b"more")
    assert fingerprint() != original
    path.write_bytes(bytes(raw))
    assert fingerprint() == original


def test_non_finite_loss_stops_at_that_step_and_never_saves_it(tmp_path, text_file, capfd):
    run_dir = tmp_path / "run"
    capfd.readouterr()
    # lr 1e30: step 1 is finite, its update makes every later loss overflow
    code = cli.main(["train", TINY, *SMALL, f"data.path={text_file}", f"train.run_dir={run_dir}", "train.steps=20",
                     "checkpoint.every=1", "optim.lr=1e30", "optim.min_lr=0", "optim.schedule=constant"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("jaxlm train: error: non-finite values at step "), err
    bad = int(err[-1].split("non-finite values at step ")[1].split()[0])
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert bad >= 2 and [r["step"] for r in logged] == list(range(1, bad))
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in logged)
    assert max(s for s, _ in ckpt.step_dirs(run_dir / "checkpoints")) == bad - 1  # each step before it, not it
    assert f"last good checkpoint: {(run_dir / 'checkpoints' / str(bad - 1)).absolute()} (step {bad - 1})" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_a_non_finite_state_is_not_saved_even_when_its_loss_was_finite(tmp_path):
    from jaxlm.train.guard import FiniteCheck

    check = FiniteCheck(lambda: "last good checkpoint: none")
    check.push(3, {"loss": jax.numpy.float32(1.0), "grad_norm": jax.numpy.float32(2.0)})
    state = {"step": np.int32(3), "params": {"w": np.array([1.0, np.inf], np.float32)}}
    with pytest.raises(RunFailed, match="the parameters after step 3 are not finite"):
        check.check_state(3, state)
    check.check_state(3, {"step": np.int32(3), "params": {"w": np.ones(2, np.float32)}})  # finite: no error


def test_second_run_on_a_locked_run_dir_exits_2_naming_the_holder(tmp_path, text_file):
    run_dir = tmp_path / "run"
    holder = RunDirLock(run_dir).acquire()
    try:
        with pytest.raises(UserError) as err:
            train(config(run_dir, text_file, "train.steps=2"))
        assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]  # the second run wrote nothing
    finally:
        holder.release()
    assert f"is in use by another run (pid {os.getpid()} on host {socket.gethostname()}, since " in str(err.value)
    assert not run_dir.exists()  # the holder made the directory and wrote nothing in it: its release removes it


def test_lock_of_a_killed_run_does_not_block_a_restart(tmp_path):
    run_dir = tmp_path / "run"
    code = ("import sys, time; from jaxlm.train.guard import RunDirLock; RunDirLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"pid {proc.pid} on host"):
            RunDirLock(run_dir).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    RunDirLock(run_dir).acquire().release()  # the kernel dropped the killed holder's lock


def _fail_json_save_at(monkeypatch, step: int) -> None:
    """Makes the checkpoint writer's metadata write fail with ENOSPC (a full disk) at `step`."""
    original = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def failing(self, x, directory):
        if x.get("step") == step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
        return await original(self, x, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", failing)


def test_failed_async_save_is_noticed_without_another_save(tmp_path, monkeypatch):
    from jaxlm.config import CheckpointConfig

    _fail_json_save_at(monkeypatch, 1)
    writer = ckpt.CheckpointWriter(tmp_path / "checkpoints", CheckpointConfig(async_save=True))
    try:
        writer.save(1, {"w": np.ones(4, np.float32)}, {"step": 1})
        deadline = time.time() + 60
        while writer.saving() and time.time() < deadline:
            time.sleep(0.01)
        with pytest.raises(RunFailed, match="saving checkpoint step 1 .* failed: No space left on device"):
            writer.poll()  # no second save, no wait: the poll alone reports it
    finally:
        writer.close()


def test_disk_full_during_a_save_is_one_line_exit_1_and_keeps_the_previous_checkpoint(
        tmp_path, text_file, monkeypatch, capfd):
    run_dir = tmp_path / "run"
    _fail_json_save_at(monkeypatch, 4)
    attempted, save = [], ckpt.CheckpointWriter.save
    monkeypatch.setattr(ckpt.CheckpointWriter, "save", lambda self, step, *a: attempted.append(step) or save(self, step, *a))
    capfd.readouterr()
    code = cli.main(["train", TINY, *SMALL, f"data.path={text_file}", f"train.run_dir={run_dir}", "train.steps=40",
                     "checkpoint.every=2", "checkpoint.keep=1"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1, err  # no orbax traceback
    free = ckpt.human_bytes(shutil.disk_usage(tmp_path).free).split()[1]
    directory = (run_dir / "checkpoints").absolute()
    assert err[0].startswith(f"jaxlm train: error: saving checkpoint step 4 to {directory} failed: No space left on "
                             f"device; ") and f" {free} free there; " in err[0]
    assert f"last good checkpoint: {directory / '2'} (step 2) (kept)" in err[0]
    assert [s for s, _ in ckpt.step_dirs(directory)] == [2] and ckpt.verify(directory / "2") is None
    assert attempted == [2, 4]  # the failed save was noticed before the next one (at 6) began


@pytest.mark.parametrize("case", ["checkpoint", "metrics"])
def test_a_file_system_that_refuses_writes_mid_run_gives_exactly_one_line(tmp_path, text_file, case):
    """A real write failure, not a patched one: the training process may write no file larger than
    the limit (RLIMIT_FSIZE, no root needed), so tensorstore fails a checkpoint's writes while others
    are in flight (orbax then closed its event loop; each pending write's callback used to print
    "Event loop is closed", each failed task "exception was never retrieved"), or metrics.jsonl and
    TensorBoard's events fail (tensorboardX's writer thread died, the run then blocked forever on its
    full queue)."""
    import resource

    limit, extra = (60_000, ["checkpoint.every=2"]) if case == "checkpoint" else (4_000, ["checkpoint.every=0"])

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), not the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run_dir = tmp_path / "run"
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}  # no cache file may hit the limit
    proc = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", TINY, *SMALL, f"data.path={text_file}",
                           f"train.run_dir={run_dir}", "train.steps=80", *extra], preexec_fn=limit_file_size,
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr[-5000:]
    if case == "checkpoint":
        assert proc.returncode == 1
        assert err[0].startswith(f"jaxlm train: error: saving checkpoint step 2 to {run_dir / 'checkpoints'} failed: "
                                 "File too large; "), err
    else:  # whichever file reaches the limit first
        assert proc.returncode == 2 and err[0] in [f"jaxlm train: error: {run_dir / name}: File too large"
                                                   for name in ("metrics.jsonl", "tensorboard")], err


def test_stop_message_is_not_written_onto_the_progress_bar_line(tmp_path, text_file, capfd):
    run_dir = tmp_path / "run"
    cfg = config(run_dir, text_file, "train.steps=100000", "checkpoint.every=0", "train.progress=true")

    def interrupt():
        while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    train(cfg)
    err = capfd.readouterr().err
    line = next(line for line in err.split("\n") if "SIGINT received" in line)
    # what the terminal shows of the line is what follows its last carriage return
    assert line.split("\r")[-1].startswith("jaxlm: SIGINT received: stopped after step"), repr(line)
