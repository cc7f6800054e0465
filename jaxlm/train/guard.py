"""What keeps a run from damaging itself: one run per directory, and nothing non-finite kept.

`RunDirLock` takes an exclusive `flock` on run_dir/run.lock (process 0 only: all processes of a
run share the directory). The kernel drops the lock when its holder exits, however it exits, so
a killed run never blocks a restart.

`FiniteCheck` stops training at the first non-finite loss or gradient norm. It reads each step's
metrics one step late, once the next step is queued, so the host never waits on the step in
flight; before a checkpoint it checks the step just taken and the state itself.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import math
import os
import socket
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from jaxlm.errors import RunFailed, UserError
from jaxlm.parallel.mesh import all_processes_agree

LOCK_FILE = "run.lock"


class RunDirLock:
    """`acquire()` holds the run directory for this run until `release()` or exit; a second run
    gets a UserError naming the holder."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.fd, self.created = Path(run_dir), None, []

    def acquire(self) -> RunDirLock:
        holder = None
        if jax.process_index() == 0:
            self.created = [d for d in (self.run_dir.absolute(), *self.run_dir.absolute().parents) if not d.exists()]
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe_holder(os.pread(fd, 4096, 0))
                os.close(fd)
            else:
                self.fd = fd
                since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode(), 0)
        if not all_processes_agree(holder is None):
            raise UserError(f"train.run_dir={self.run_dir} is in use by another run ({holder or 'see process 0'}); "
                            "wait for it to finish, stop it, or use another train.run_dir")
        return self

    def release(self) -> None:
        if self.fd is not None:
            if self.created and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
                # a run that failed before writing anything (a bad --resume, say) leaves no directory behind
                os.unlink(self.run_dir / LOCK_FILE)
                with contextlib.suppress(OSError):  # a parent someone else has since written into stays
                    for directory in self.created:  # the run directory, then the parents made for it
                        directory.rmdir()
            os.close(self.fd)  # releases the lock; otherwise the file stays (removing it would race a new holder)
            self.fd = None


def _describe_holder(raw: bytes) -> str:
    try:
        info = json.loads(raw)
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "a process that is still starting"


@jax.jit
def all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


class FiniteCheck:
    """Raises RunFailed naming the first step whose loss or gradient norm is not finite."""

    KEYS = ("loss", "grad_norm")

    def __init__(self, last_good: Callable[[], str]):
        self.last_good = last_good  # () -> a phrase naming the newest checkpoint kept
        self.pending: tuple[int, dict] | None = None

    def push(self, step: int, metrics: dict) -> None:
        """Checks the previous step (done by now or nearly), then remembers this one."""
        self.check()
        self.pending = (step, {k: metrics[k] for k in self.KEYS if k in metrics})

    def check(self) -> None:
        """Checks the step remembered last (waits for it)."""
        if self.pending is None:
            return
        step, values = self.pending
        self.pending = None
        values = {k: float(v) for k, v in jax.device_get(values).items()}
        if not all(math.isfinite(v) for v in values.values()):
            shown = ", ".join(f"{k} {v}" for k, v in values.items())
            raise RunFailed(f"non-finite values at step {step} ({shown}); stopped without saving it; "
                            f"{self.last_good()}. Lower optim.lr or raise optim.warmup_steps (both may change "
                            "on resume), or check the model config (e.g. model.norm_eps)")

    def check_state(self, step: int, state) -> None:
        """Before a save: the step just taken and every parameter and optimizer value."""
        self.check()
        if not bool(all_finite(state)):
            raise RunFailed(f"the parameters after step {step} are not finite; stopped without saving them; "
                            f"{self.last_good()}. Lower optim.lr or raise optim.warmup_steps (both may change "
                            "on resume)")
