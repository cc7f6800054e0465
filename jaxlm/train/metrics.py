"""Where metrics go: console progress bar, metrics.jsonl and TensorBoard, from process 0 only."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.tools import devices
from jaxlm.config import Config


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, progress: bool):
        self.enabled = jax.process_index() == 0
        self.history: list[dict] = []
        self.bar = self.tb = self.jsonl = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        from tensorboardX import SummaryWriter

        # purge_step drops events a resumed run is about to write again
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}, "time": round(time.time(), 3)}
        self.history.append(record)
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            shown = {k: f"{record[k]:.4g}" for k in ("loss", "eval_loss", "lr", "tokens_per_s", "mfu") if k in record}
            self.bar.set_postfix(shown, refresh=False)

    def write(self, line: str) -> None:
        """A message on its own line above the progress bar (never appended to the bar's line)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


class TokenCount:
    """Tokens trained on, padding excluded. A step's count may be a device scalar (the train
    step's `tokens` metric): it is summed only when read, so counting never makes the host wait."""

    def __init__(self, seen: int):
        self._seen, self._lap, self._pending = seen, seen, []

    def add(self, n) -> None:
        self._pending.append(n)

    @property
    def seen(self) -> int:
        if self._pending:
            self._seen += sum(int(n) for n in jax.device_get(self._pending))
            self._pending = []
        return self._seen

    def lap(self) -> int:
        """Tokens since the previous lap (or the start)."""
        before, self._lap = self._lap, self.seen
        return self._lap - before


def _plain(v):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()


def measure_peak_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """The matmul FLOP/s this process reaches on its first device (a measured peak for MFU)."""
    a = jax.device_put(jnp.ones((n, n), dtype), jax.local_devices()[0])
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops(cfg: Config) -> float:
    """Peak FLOP/s of all devices together, the denominator of MFU.

    `train.peak_flops_per_device` when set; else the table's dense bf16 peak of a known device
    when the model computes in bf16; else a measured matmul in the compute dtype. XLA:CPU's
    simulated devices share the host's cores and one device's matmul already uses them all, so
    on CPU the measurement counts once per process (host), elsewhere once per device.
    """
    if cfg.train.peak_flops_per_device:
        return cfg.train.peak_flops_per_device * jax.device_count()
    device = jax.devices()[0]
    known = devices.lookup(device.device_kind)
    if known is not None and cfg.model.compute_dtype == "bfloat16":
        return known.bf16_flops * jax.device_count()
    measured = measure_peak_flops(dtype=jnp.dtype(cfg.model.compute_dtype))
    return measured * (jax.process_count() if device.platform == "cpu" else jax.device_count())
