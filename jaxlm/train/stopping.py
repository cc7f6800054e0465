"""Why a run stops before its last step: a signal (SIGTERM/SIGINT, agreed by every process) or no
improvement in the eval loss for `train.early_stop_patience` evaluations."""

from __future__ import annotations

import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class Preemption:
    """SIGTERM/SIGINT set a flag; `should_stop()` is called once per step by every process.

    One process: the flag itself. Several: every step each process contributes its flag to a
    tiny max all-reduce over all devices (gloo on CPU, the usual collectives elsewhere) and reads
    the previous step's result, so all processes stop after the same step without waiting on the
    current one. (JAX's reached_preemption_sync_point needs the coordination service's preemption
    notifier, which handles SIGTERM only and is absent in single-process runs.)
    """

    def __init__(self):
        self.signal: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)
        self._pending = None
        if jax.process_count() > 1:
            sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("p",)), PartitionSpec("p"))
            replicated = NamedSharding(sharding.mesh, PartitionSpec())
            self._sharding = sharding
            self._max = jax.jit(jnp.max, out_shardings=replicated)

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, self._previous[signal.SIGINT])

    def should_stop(self) -> bool:
        if jax.process_count() == 1:
            return self.signal is not None
        agreed = self._pending is not None and int(self._pending) > 0
        local = np.full((jax.local_device_count(),), int(self.signal is not None), np.int32)
        self._pending = self._max(jax.make_array_from_process_local_data(self._sharding, local))
        return agreed

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class EarlyStopping:
    """Stops after `patience` evaluations in a row without a new best eval loss (0 = never)."""

    def __init__(self, patience: int, saved: dict | None = None):
        """`saved`: `state()` from the checkpoint a run resumes from, so it stops where an
        uninterrupted run would."""
        self.patience, self.best, self.best_step, self.stale = patience, float("inf"), None, 0
        if saved and saved.get("best") is not None:
            self.best, self.best_step, self.stale = float(saved["best"]), saved["best_step"], int(saved["stale"])

    def state(self) -> dict:
        """JSON for the checkpoint meta (no best yet: null, as JSON has no infinity)."""
        best = None if self.best_step is None else self.best
        return {"best": best, "best_step": self.best_step, "stale": self.stale}

    def stopped(self) -> bool:
        return bool(self.patience) and self.stale >= self.patience

    def update(self, step: int, eval_loss: float) -> str | None:
        """The reason to stop now, or None."""
        if eval_loss < self.best:
            self.best, self.best_step, self.stale = eval_loss, step, 0
            return None
        self.stale += 1
        if self.stopped():
            return (f"early stop after step {step}: eval loss has not improved for {self.stale} evaluations "
                    f"(train.early_stop_patience={self.patience}); best {self.best:.4f} at step {self.best_step}")
        return None
