"""The timing harness every benchmark here shares.

A runner is a pair `(step, sync)`: `step()` starts one unit of work (a train step, an attention
forward+backward) and returns something `sync(result)` waits on, so asynchronous backends (JAX,
CUDA) are timed to completion. `time_interleaved` times several runners round by round in a
shuffled order, each block of `iters` steps synchronised once at its end, and records both the
wall clock and this process's CPU time per step; a load change on a shared machine then hits every
runner alike, and the ratios stay readable even when the absolute figures swing. The CPU-time
column is the stable one on a busy machine when the process is pinned to one core
(`taskset -c 0`): there it is the uncontended wall time.

Measurements that need a fresh process (XLA_FLAGS are read once, when JAX starts its backend; one
GPU shared by JAX and torch) run through `run_child`, which reads the child's last stdout line as
JSON.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

# The benchmarks time this checkout's jaxlm, installed or not (the GPU machine has a bare copy).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

Runner = tuple[Callable[[], Any], Callable[[Any], Any]]


def usable_cpus() -> int:
    """os.cpu_count(), narrowed to the CPUs this process may run on (taskset / cgroup cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float:
    return os.getloadavg()[0]


def machine_line() -> str:
    """One line that says where a figure was measured (printed at the top of every bench)."""
    return (f"cpus {os.cpu_count()} (usable {usable_cpus()}), load avg {load_average():.1f}, "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def time_interleaved(runners: dict[str, Runner], rounds: int, iters: int = 1, warmup: int = 1,
                     seed: int = 0) -> dict[str, dict]:
    """Per runner: `warmup` untimed steps (compilation), then `rounds` timed blocks of `iters` steps.

    Returns name -> {"wall": [s/step per block], "cpu": [...], "warmup_s": s}. Before each timed
    block one untimed step lets the previous runner's threads and queues go quiet.
    """
    out = {}
    for name, (step, sync) in runners.items():
        t0 = time.perf_counter()
        for _ in range(max(1, warmup)):
            sync(step())
        out[name] = {"wall": [], "cpu": [], "warmup_s": time.perf_counter() - t0}
    order, rnd = list(runners), random.Random(seed)
    for _ in range(rounds):
        rnd.shuffle(order)
        for name in order:
            step, sync = runners[name]
            sync(step())
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(iters):
                result = step()
            sync(result)
            out[name]["wall"].append((time.perf_counter() - t0) / iters)
            out[name]["cpu"].append((time.process_time() - c0) / iters)
    return out


def summary(times: dict, tokens_per_step: int | None = None) -> dict:
    """Medians (and the minimum) of one runner's `time_interleaved` record, with tokens/s."""
    wall = statistics.median(times["wall"])
    out = {"step_time_s": wall, "min_step_time_s": min(times["wall"]),
           "cpu_step_time_s": statistics.median(times["cpu"]), "warmup_s": times["warmup_s"]}
    if tokens_per_step:
        out["tokens_per_s"] = tokens_per_step / wall
    return out


def jaxlm_runner(cfg, seed: int = 0) -> tuple[Runner, int]:
    """jaxlm's train step for `cfg` on one device, on one fixed random batch: `((step, sync),
    tokens per step)`. The state is donated and carried from step to step, as in training."""
    import jax
    import numpy as np

    from jaxlm.data.batch import Batch
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.train.step import make_trainer

    trainer = make_trainer(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    B, T, V = cfg.train.global_batch, cfg.data.seq_len, cfg.model.vocab_size
    tokens = np.random.default_rng(seed).integers(0, V, (B, T + 1)).astype(np.int32)
    batch = jax.device_put(Batch.from_tokens(tokens), trainer.batch_sharding)
    state = [trainer.init_state()]

    def step():
        state[0], metrics = trainer.train_step(state[0], batch)
        return metrics

    return (step, jax.block_until_ready), B * T


def variant_overrides(spec: str) -> list[str]:
    """'attention_impl=xla,scan_layers=false' -> model.* config overrides (dotted keys pass unchanged)."""
    return [kv if "." in kv.split("=")[0] else f"model.{kv}" for kv in spec.split(",") if kv]


def run_child(argv: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Runs `python argv...` and returns its last stdout line parsed as JSON; a failure raises
    RuntimeError carrying the end of the child's stderr."""
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"child {' '.join(argv[:3])} ... exited {proc.returncode}:\n{tail}")
    return json.loads(lines[-1])


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows of dicts -> aligned text; columns are (header, key, format) with format like '10.1f'."""
    widths = [max(len(h), int(f.split(".")[0].lstrip("<>") or 0)) for h, _, f in columns]
    widths[0] = max([widths[0]] + [len(str(r.get(columns[0][1], ""))) for r in rows])
    head = "  ".join(h.rjust(w) if i else h.ljust(w) for i, ((h, _, _), w) in enumerate(zip(columns, widths)))
    lines = [head]
    for r in rows:
        cells = []
        for i, ((_, key, fmt), w) in enumerate(zip(columns, widths)):
            v = r.get(key)
            cell = "-" if v is None else format(v, fmt.lstrip("<>")) if not isinstance(v, str) else v
            cells.append(cell.ljust(w) if i == 0 else cell.rjust(w))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def trl_chat_tokenizer(hf_dir):
    """The HF export's tokenizer as TRL's trainers take it: jaxlm's default chat template, end of
    text as padding."""
    from transformers import AutoTokenizer

    from jaxlm.data.chat import DEFAULT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    tokenizer.chat_template = DEFAULT_TEMPLATE
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def trl_step_clock(times: list[float]):
    """A transformers TrainerCallback appending each optimizer step's wall time to `times`."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    return StepClock()
