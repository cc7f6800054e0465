"""Where metrics go: console progress bar, metrics.jsonl, TensorBoard and wandb, from process 0 only;
and the peak FLOP/s that MFU divides by."""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.tools import devices
from jaxlm.config import Config, to_dict
from jaxlm.cache_dir import cache_root


class MetricsLogger:
    """The sinks of process 0: metrics.jsonl, TensorBoard, wandb (when `cfg.train.wandb` names a
    project) and the progress bar."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, progress: bool, cfg: Config | None = None):
        self.enabled = jax.process_index() == 0
        self.history: list[dict] = []
        self.bar = self.tb = self.jsonl = self.wandb = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        # purge_step drops events a resumed run is about to write again
        self.tb = Events(run_dir / "tensorboard", purge_step=start_step + 1 if start_step else None)
        if cfg is not None and cfg.train.wandb.project is not None:
            self.wandb = WandbSink(cfg, run_dir, start_step)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}, "time": round(time.time(), 3)}
        self.history.append(record)
        if not self.enabled:
            return
        try:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        except OSError as e:  # a full disk, say: one line naming the file
            raise OSError(e.errno, e.strerror, self.jsonl.name) from None
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        self.tb.add_scalars(step, scalars)
        if self.wandb is not None:
            self.wandb.log(step, scalars)
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
        """Closes the outputs. A write that fails here (a full disk) is raised only if nothing else
        is failing already: the first failure is the run's one-line error."""
        failing = sys.exc_info()[1] is not None
        if self.bar is not None:
            self.bar.close()
        errors = []
        for out in (self.tb, self.wandb, self.jsonl):
            try:
                if out is not None:
                    out.close()
            except OSError as e:
                errors.append(e)
        if errors and not failing:
            raise errors[0]


class Events:
    """TensorBoard scalars, written synchronously with tensorboardX's EventsWriter. (Its
    SummaryWriter writes from a thread: a failed write, on a full disk, killed the thread, and
    the run then blocked forever on the thread's full queue; at exit it retried the flush.)"""

    def __init__(self, logdir: Path, purge_step: int | None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        logdir.mkdir(parents=True, exist_ok=True)
        self.logdir, self.writer = logdir, EventsWriter(str(logdir / "events"))
        if purge_step is not None:  # as SummaryWriter(purge_step=...) marks it
            self.writer.write_event(Event(step=purge_step, file_version="brain.Event:2"))
            self.writer.write_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))

    def add_scalars(self, step: int, values: dict) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        wall = time.time()
        try:
            for k, v in values.items():
                self.writer.write_event(Event(wall_time=wall, step=step, summary=scalar(k, v)))
            self.writer.flush()
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.logdir)) from None

    def close(self) -> None:
        try:
            self.writer.close()
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.logdir)) from None


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


class WandbSink:
    """Weights & Biases: the resolved config once, then every metric record at its step. The run id
    is kept in RUN_DIR/wandb_run_id, so a resumed run goes on in the same wandb run."""

    def __init__(self, cfg: Config, run_dir: Path, start_step: int):
        import wandb  # an optional extra: imported only when configured (checked at start-up)

        w = cfg.train.wandb
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if start_step and id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        # console="off": wandb leaves stdout/stderr alone (the progress bar, one-line errors)
        self.run = wandb.init(project=w.project, name=w.name or run_dir.resolve().name, mode=w.mode,
                              dir=str(run_dir), id=run_id, resume="allow", config=to_dict(cfg),
                              settings=wandb.Settings(console="off"))

    def log(self, step: int, scalars: dict) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


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
    """Peak FLOP/s of all devices together, the denominator of MFU (see `mfu_peak`)."""
    return mfu_peak(cfg)[0]


def mfu_peak(cfg: Config) -> tuple[float, str]:
    """(peak FLOP/s of all devices together, where it came from in a few words).

    `train.peak_flops_per_device` when set; else the table's dense bf16 peak of a known device
    when the model computes in bf16; else a matmul in the compute dtype, measured once per host and
    device kind and cached (`cached_peak`), so two runs of one model report the same MFU. XLA:CPU's
    simulated devices share the host's cores and one device's matmul already uses them all, so
    on CPU the measurement counts once per process (host), elsewhere once per device.
    """
    n = jax.device_count()
    if cfg.train.peak_flops_per_device:
        per = cfg.train.peak_flops_per_device
        return per * n, f"{_flops(per)} per device from train.peak_flops_per_device"
    device = jax.devices()[0]
    known = devices.lookup(device.device_kind)
    if known is not None and cfg.model.compute_dtype == "bfloat16":
        return known.bf16_flops * n, f"{_flops(known.bf16_flops)} per device, the {known.name} bf16 table entry"
    per, how = cached_peak(device, cfg.model.compute_dtype)
    count = jax.process_count() if device.platform == "cpu" else n
    where = "per host" if device.platform == "cpu" else "per device"
    return per * count, f"{_flops(per)} {where}, a {cfg.model.compute_dtype} matmul {how}"


def peak_cache_path() -> Path | None:
    root = cache_root()
    return None if root is None else Path(root) / "peak_flops.json"


def cached_peak(device, dtype: str) -> tuple[float, str]:
    """The measured matmul peak of this host's `device` kind in `dtype`, from the cache or measured
    now and written there (atomically: several processes of one host may race)."""
    path = peak_cache_path()
    if path is None:
        return measure_peak_flops(dtype=jnp.dtype(dtype)), "measured now (JAXLM_CACHE=off)"
    key = f"{socket.gethostname()}|{device.platform}|{device.device_kind}|{dtype}"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache, dict) and isinstance(cache.get(key), (int, float)) and cache[key] > 0:
        return float(cache[key]), f"measured earlier, cached in {path} (delete it to measure again)"
    measured = measure_peak_flops(dtype=jnp.dtype(dtype))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**(cache if isinstance(cache, dict) else {}), key: measured}, indent=1))
        os.replace(tmp, path)
        return measured, f"measured now, cached in {path}"
    except OSError:  # a read-only home: measure each run
        return measured, f"measured now (not cached: {path} is not writable)"


def _flops(x: float) -> str:
    for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if x >= scale:
            return f"{x / scale:.4g} {unit}"
    return f"{x:.4g} FLOP/s"
