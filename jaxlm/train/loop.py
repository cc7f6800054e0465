"""The training loop: data -> train_step -> metrics, with periodic evaluation, checkpoints,
resume and preemption (SIGTERM/SIGINT: finish the step, save, exit cleanly)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import checkpoint as ckpt
from jaxlm.parallel import determinism
from jaxlm.checkpoint import resume as resuming
from jaxlm.tools.accounting import train_flops_per_step
from jaxlm.config import Config, ConfigError, to_yaml
from jaxlm.config.checks import check_data_paths
from jaxlm.data.pipeline import to_global
from jaxlm.data.sources import build_data, data_fingerprint
from jaxlm.parallel.mesh import data_parallel_size, make_mesh
from jaxlm.parallel.sharding import resolve_rules
from jaxlm.train.guard import FiniteCheck, RunDirLock
from jaxlm.train.metrics import MetricsLogger, TokenCount, peak_flops
from jaxlm.train.step import Trainer, make_trainer


def check_batch(cfg: Config, mesh) -> None:
    dp = data_parallel_size(mesh, resolve_rules(cfg.mesh.rules))
    micro = cfg.train.global_batch // cfg.train.microbatches
    if micro % dp:
        raise ConfigError(
            f"train.global_batch={cfg.train.global_batch} (per microbatch {micro}) must be divisible by the "
            f"data-parallel size {dp} (mesh data x fsdp x expert = {dict(mesh.shape)})")


def evaluate(trainer: Trainer, params, batches: list[dict]) -> dict:
    totals = [trainer.eval_step(params, to_global(b, trainer.batch_sharding)) for b in batches]
    ce = sum(float(t["loss_sum"]) for t in totals)
    count = sum(float(t["count"]) for t in totals)
    loss = ce / max(count, 1.0)
    return {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 50.0)))}


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


def _truncate_metrics(path: Path, step: int) -> None:
    """Keeps the records up to `step` (the resumed one) so resumed records are not duplicates."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _set_aside(path: Path) -> Path:
    """Renames `path` to the first free `path.N`: the records of a start that left no checkpoint
    (checkpoint.every=0, or killed before its first save) are kept, not mixed with the new run's."""
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    return path.rename(path.with_name(f"{path.name}.{n}"))


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"jaxlm: {msg}", file=sys.stderr, flush=True)


def train(cfg: Config, mesh=None, resume: str | None = None) -> list[dict]:
    """Trains per `cfg`; returns the logged metric records (also in run_dir/metrics.jsonl).

    If run_dir/checkpoints holds checkpoints (or `resume` names one), training continues from
    the newest valid one, bit-exactly where the mesh is the same.
    """
    check_data_paths(cfg)
    mesh = make_mesh(cfg.mesh) if mesh is None else mesh
    check_batch(cfg, mesh)
    platform = mesh.devices.flat[0].platform
    deterministic = {"deterministic": determinism.check(cfg.train.deterministic, platform), "platform": platform,
                     "mesh": dict(mesh.shape)}
    t = cfg.train
    preemption = Preemption()  # early: a signal during start-up stops after the first step
    writer = None
    run_dir = Path(t.run_dir)
    lock = RunDirLock(run_dir)
    try:
        batches, eval_batches = build_data(cfg)
        fingerprint = data_fingerprint(cfg.data)
        trainer = make_trainer(cfg, mesh)
        tokenizer = ckpt.tokenizer_identity(cfg.data.tokenizer)
        lock.acquire()  # before anything in run_dir is read or moved
        restored = resuming.restore_for_training(cfg, trainer, run_dir, resume, tokenizer, fingerprint)
        tokens_per_step = t.global_batch * cfg.data.seq_len
        if restored is None:
            state, tokens_seen = trainer.init_state(), 0
            if t.init_from:
                from jaxlm.export.hf_load import load_hf_params

                state["params"] = load_hf_params(t.init_from, cfg, trainer.state_shardings["params"])
                _say(f"initialised from {t.init_from}")
        else:
            state, meta = restored
            batches.set_state(meta["data"])
            tokens_seen = int(meta["tokens_seen"])
            note = determinism.resume_note(meta.get("determinism"), deterministic)
            if note:
                _say(note)
        start = int(state["step"])
        stopper = EarlyStopping(t.early_stop_patience, None if restored is None else meta.get("early_stop"))
        if stopper.stopped():  # it stopped early here; one more evaluation without a new best would stop again
            _say(f"{run_dir} stopped early at step {start} (best eval loss {stopper.best:.4f} at step "
                 f"{stopper.best_step}, then {stopper.stale} evaluations without a new best; "
                 f"train.early_stop_patience={t.early_stop_patience}); to train on, raise train.early_stop_patience, "
                 "or use a new train.run_dir")
            return []
        if start >= t.steps:  # one line and touch nothing: no config rewrite, no new TensorBoard events file
            _say(f"{run_dir} is finished (its checkpoint is at step {start}, train.steps={t.steps}); to train on, "
                 f"raise train.steps (e.g. train.steps={start + t.steps}), or use a new train.run_dir")
            return []
        if restored is not None:
            _say(f"resumed from step {start} ({tokens_seen} tokens seen)")
        if jax.process_index() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
            if restored is not None:
                _truncate_metrics(run_dir / "metrics.jsonl", start)
            elif (run_dir / "metrics.jsonl").exists():
                kept = _set_aside(run_dir / "metrics.jsonl")
                _say(f"no checkpoint in {run_dir} to resume from: training starts at step 0; the earlier start's "
                     f"metrics.jsonl is kept as {kept.name}")
        every = cfg.checkpoint.every
        writer = ckpt.CheckpointWriter(run_dir / ckpt.CHECKPOINTS, cfg.checkpoint) if every > 0 else None

        def save(step: int, eval_loss: float | None) -> None:
            checks.check_state(step, state)  # never a non-finite checkpoint
            meta = {**ckpt.make_meta(cfg, step, tokens.seen, batches.get_state(), tokenizer, fingerprint),
                    "determinism": deterministic, "eval_loss": eval_loss, "early_stop": stopper.state()}
            writer.save(step, state, meta)

        def last_good() -> str:
            if writer is None:
                return "no checkpoints are written (checkpoint.every=0)"
            writer.wait()
            return ckpt.newest_valid(writer.directory)

        checks = FiniteCheck(last_good)

        flops = train_flops_per_step(cfg)
        tokens = TokenCount(tokens_seen)  # real tokens: packed rows' padding does not count
        peak = peak_flops(cfg)
        logger = MetricsLogger(run_dir, t.steps, start, t.progress)
        try:
            clock, clock_step = None, start
            early = None
            for step in range(start, t.steps):
                state, metrics = trainer.train_step(state, to_global(next(batches), trainer.batch_sharding))
                done = step + 1
                checks.push(done, metrics)  # checks the previous step: this one is queued, the host need not wait
                if writer is not None:
                    writer.poll()  # a failed background save stops the run now, not at the next save
                tokens.add(metrics.pop("tokens", tokens_per_step))
                logger.advance()
                is_last = done == t.steps
                stop = preemption.should_stop()
                is_eval = bool(t.eval_every and eval_batches and (done % t.eval_every == 0 or is_last))
                is_log = done % t.log_every == 0 or is_last or done == start + 1 or stop or is_eval
                eval_loss = None
                if is_log:
                    metrics = jax.device_get(metrics)
                    now = time.perf_counter()
                    real = tokens.lap()  # since the previous log
                    if clock is not None:  # the first step (compilation) is not timed
                        step_time = (now - clock) / (done - clock_step)
                        metrics.update(step_time=step_time, tokens_per_s=real / (now - clock),
                                       mfu=flops / tokens_per_step * real / (now - clock) / peak)
                    clock, clock_step = now, done
                    if is_eval:  # before the save, which keeps the best checkpoints by eval loss
                        metrics.update(evaluate(trainer, state["params"], eval_batches))
                        eval_loss = metrics["eval_loss"]
                        early = stopper.update(done, eval_loss)
                        clock = time.perf_counter()  # evaluation time is not step time
                if writer is not None and (done % every == 0 or is_last or stop or early):
                    save(done, eval_loss)  # returns once the arrays are off the devices; writing goes on
                if is_log:
                    logger.log(done, metrics)
                if early:
                    if writer is not None:
                        writer.wait()
                    logger.write(f"jaxlm: {early}")
                    break
                if stop:
                    if writer is not None:
                        writer.wait()
                    where = f"checkpoint {run_dir / ckpt.CHECKPOINTS / str(done)}" if writer else \
                        "no checkpoint (checkpoint.every=0)"
                    sig = preemption.signal or "a stop signal (to another process)"
                    logger.write(f"jaxlm: {sig} received: stopped after step {done}; {where}")
                    break
            checks.check()
        finally:
            logger.close()
    finally:
        preemption.close()
        if writer is not None:
            writer.close()  # waits for a save in flight
        lock.release()
    return logger.history
