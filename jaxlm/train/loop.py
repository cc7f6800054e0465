"""The training loop: data -> train_step -> metrics, with periodic evaluation, checkpoints,
resume and preemption (SIGTERM/SIGINT: finish the step, save, exit cleanly).

`train()` reads as its schedule: start (restore or initialise), then per step: take the step,
decide what this step also does (log, evaluate, save, stop), do it. `TrainingRun` holds what
the steps share; each decision is one small method.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from jaxlm import checkpoint as ckpt
from jaxlm.checkpoint import resume as resuming
from jaxlm.compress.prune import is_event, sparsity_report
from jaxlm.config import Config, ConfigError, to_yaml
from jaxlm.config.checks import check_data_paths, wsd_decay_steps
from jaxlm.data.pipeline import to_global
from jaxlm.data.sources import build_data, data_fingerprint
from jaxlm.parallel import determinism
from jaxlm.parallel.mesh import data_parallel_size, make_mesh
from jaxlm.parallel.sharding import resolve_rules
from jaxlm.tools.accounting import train_flops_per_step
from jaxlm.train.guard import FiniteCheck, RunDirLock
from jaxlm.train.metrics import MetricsLogger, TokenCount, mfu_peak
from jaxlm.train.profile import Profiler
from jaxlm.train.step import Trainer, make_trainer
from jaxlm.train.stopping import EarlyStopping, Preemption
from jaxlm.train.summary import startup_block


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


def decay_start(cfg: Config) -> int | None:
    """WSD's last step before its decay: the checkpoint an extended run branches from (kept)."""
    if cfg.optim.schedule != "wsd":
        return None
    return cfg.train.steps - wsd_decay_steps(cfg.optim.decay_fraction, cfg.train.steps)


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


@dataclass
class StepPlan:
    """What a finished step also does."""

    log: bool
    evaluate: bool
    stop: bool  # a stop signal was agreed
    last: bool


class TrainingRun:
    """One start of `train()`: its data, trainer, state and the writers it owns."""

    def __init__(self, cfg: Config, mesh):
        self.cfg, self.t, self.mesh = cfg, cfg.train, mesh
        platform = mesh.devices.flat[0].platform
        self.determinism = {"deterministic": determinism.check(cfg.train.deterministic, platform),
                            "platform": platform, "mesh": dict(mesh.shape)}
        self.run_dir = Path(cfg.train.run_dir)
        self.preemption = Preemption()  # early: a signal during start-up stops after the first step
        self.lock = RunDirLock(self.run_dir)
        self.writer = self.logger = self.profiler = None
        self.meta: dict = {}
        self.early: str | None = None
        self.branch = decay_start(cfg)

    # ------------------------------------------------------------------ start

    def start(self, resume: str | None) -> bool:
        """Data, trainer and the first state (restored or new); False when there is nothing to train."""
        cfg = self.cfg
        self.batches, self.eval_batches = self._data()
        self.fingerprint = data_fingerprint(cfg.data)
        self.trainer = make_trainer(cfg, self.mesh)
        self.tokenizer = ckpt.tokenizer_identity(cfg.data.tokenizer)
        self.lock.acquire()  # before anything in run_dir is read or moved
        restored = resuming.restore_for_training(cfg, self.trainer, self.run_dir, resume, self.tokenizer,
                                                 self.fingerprint)
        self.state = self._restore(restored) if restored else self._initialise()
        self.start_step = int(self.state["step"])
        self.tokens = TokenCount(self.tokens_seen)  # real tokens: packed rows' padding does not count
        self.stopper = EarlyStopping(self.t.early_stop_patience, self.meta.get("early_stop"))
        if self._nothing_to_do():
            return False
        if restored:
            _say(f"resumed from step {self.start_step} ({self.tokens_seen} tokens seen)")
        self._prepare_run_dir(resumed=bool(restored))
        if self.cfg.checkpoint.every > 0:
            keep = [self.branch] if self.branch is not None else []
            self.writer = ckpt.CheckpointWriter(self.run_dir / ckpt.CHECKPOINTS, cfg.checkpoint, keep_steps=keep)
        self.checks = FiniteCheck(self._last_good)
        self.flops = train_flops_per_step(cfg)
        self.peak, peak_source = mfu_peak(cfg)  # and where it came from (table, setting, measured and cached)
        _say(startup_block(cfg, self.trainer, self.trainer.abstract_params(), peak_source))
        self.logger = MetricsLogger(self.run_dir, self.t.steps, self.start_step, self.t.progress, cfg=cfg)
        self.profiler = Profiler(self.t.profile, self.run_dir, self.start_step, self.logger.write)
        return True

    def _data(self):
        """(training batches, fixed evaluation batches); a subclass may draw its rows otherwise (rl)."""
        return build_data(self.cfg)

    def _initialise(self) -> dict:
        self.tokens_seen = 0
        if not self.t.init_from:
            state = self.trainer.init_state()
        else:
            state = self.trainer.state_from_params(self.trainer.initial_params())
            _say(f"initialised from {self.t.init_from}")
        return self.trainer.prune(state, 0) if is_event(self.cfg.prune, 0) else state  # pruning at step 0

    def _restore(self, restored) -> dict:
        state, self.meta = restored
        self.batches.set_state(self.meta["data"])
        self.tokens_seen = int(self.meta["tokens_seen"])
        note = determinism.resume_note(self.meta.get("determinism"), self.determinism)
        if note:
            _say(note)
        return state

    def _nothing_to_do(self) -> bool:
        """Says why, in one line, when the run stopped early or is finished (and touches nothing)."""
        t, start, stopper = self.t, self.start_step, self.stopper
        if stopper.stopped():  # it stopped early here; one more evaluation without a new best would stop again
            _say(f"{self.run_dir} stopped early at step {start} (best eval loss {stopper.best:.4f} at step "
                 f"{stopper.best_step}, then {stopper.stale} evaluations without a new best; "
                 f"train.early_stop_patience={t.early_stop_patience}); to train on, raise train.early_stop_patience, "
                 "or use a new train.run_dir")
            return True
        if start >= t.steps:  # no config rewrite, no new TensorBoard events file
            _say(f"{self.run_dir} is finished (its checkpoint is at step {start}, train.steps={t.steps}); to train on, "
                 f"raise train.steps (e.g. train.steps={start + t.steps}), or use a new train.run_dir")
            return True
        return False

    def _prepare_run_dir(self, resumed: bool) -> None:
        if jax.process_index() != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
        metrics = self.run_dir / "metrics.jsonl"
        if resumed:
            _truncate_metrics(metrics, self.start_step)
        elif metrics.exists():
            kept = _set_aside(metrics)
            _say(f"no checkpoint in {self.run_dir} to resume from: training starts at step 0; the earlier start's "
                 f"metrics.jsonl is kept as {kept.name}")

    # ------------------------------------------------------------------ the steps

    def run(self) -> None:
        self.clock, self.clock_step = None, self.start_step
        for step in range(self.start_step, self.t.steps):
            done = step + 1
            metrics = self._step(done)
            plan = self._plan(done)
            eval_loss = None
            if plan.log:
                metrics = self._timed(jax.device_get(metrics), done)
                if plan.evaluate:  # before the save, which keeps the best checkpoints by eval loss
                    metrics.update(evaluate(self.trainer, self.state["params"], self.eval_batches))
                    eval_loss = metrics["eval_loss"]
                    self.early = self.stopper.update(done, eval_loss)
                    self.clock = time.perf_counter()  # evaluation time is not step time
            if self._should_save(done, plan):
                self._save(done, eval_loss)  # returns once the arrays are off the devices; writing goes on
            if plan.log:
                self.logger.log(done, metrics)
            if self.early or plan.stop:
                self._stop(done)
                break
        self.checks.check()

    def _step(self, done: int) -> dict:
        batch = to_global(next(self.batches), self.trainer.batch_sharding)
        self.state, metrics = self.trainer.train_step(self.state, batch)
        if is_event(self.cfg.prune, done):  # new masks from the updated weights (saved with them)
            self.state = self.trainer.prune(self.state, done)
        self.profiler.step(done, self.state)  # starts the trace before its first step, writes it after its last
        self.checks.push(done, metrics)  # checks the previous step: this one is queued, the host need not wait
        if self.writer is not None:
            self.writer.poll()  # a failed background save stops the run now, not at the next save
        self.tokens.add(metrics.pop("tokens", self.t.global_batch * self.cfg.data.seq_len))
        self.logger.advance()
        return metrics

    def _plan(self, done: int) -> StepPlan:
        t = self.t
        last = done == t.steps
        stop = self.preemption.should_stop()
        evaluate_now = bool(t.eval_every and self.eval_batches and (done % t.eval_every == 0 or last))
        log = done % t.log_every == 0 or last or done == self.start_step + 1 or stop or evaluate_now
        return StepPlan(log=log, evaluate=evaluate_now, stop=stop, last=last)

    def _timed(self, metrics: dict, done: int) -> dict:
        """Adds step time, tokens/s and MFU since the last record (the first step, compiling, is not timed);
        tokens/s and MFU count real tokens only."""
        now = time.perf_counter()
        real = self.tokens.lap()  # since the previous record
        if self.clock is not None:
            step_time = (now - self.clock) / (done - self.clock_step)
            tokens_per_step = self.t.global_batch * self.cfg.data.seq_len  # the FLOPs count every position
            metrics.update(step_time=step_time, tokens_per_s=real / (now - self.clock),
                           mfu=self.flops / tokens_per_step * real / (now - self.clock) / self.peak)
        self.clock, self.clock_step = now, done
        return metrics

    def _should_save(self, done: int, plan: StepPlan) -> bool:
        if self.writer is None:
            return False
        every = self.cfg.checkpoint.every
        return done % every == 0 or plan.last or plan.stop or bool(self.early) or done == self.branch

    def _save(self, step: int, eval_loss: float | None) -> None:
        self.checks.check_state(step, self.state)  # never a non-finite checkpoint
        meta = {**ckpt.make_meta(self.cfg, step, self.tokens.seen, self.batches.get_state(), self.tokenizer,
                                 self.fingerprint),
                "determinism": self.determinism, "eval_loss": eval_loss, "early_stop": self.stopper.state()}
        if self.trainer.has_masks:  # for `jaxlm checkpoint ls`
            meta[ckpt.PRUNED] = pruned_summary(self.trainer, self.state["params"])
        self.writer.save(step, self.trainer.saved_state(self.state), meta)

    def _stop(self, done: int) -> None:
        if self.writer is not None:
            self.writer.wait()
        if self.early:
            self.logger.write(f"jaxlm: {self.early}")
            return
        where = f"checkpoint {self.run_dir / ckpt.CHECKPOINTS / str(done)}" if self.writer else \
            "no checkpoint (checkpoint.every=0)"
        sig = self.preemption.signal or "a stop signal (to another process)"
        self.logger.write(f"jaxlm: {sig} received: stopped after step {done}; {where}")

    def _last_good(self) -> str:
        if self.writer is None:
            return "no checkpoints are written (checkpoint.every=0)"
        self.writer.wait()
        return ckpt.newest_valid(self.writer.directory)

    # ------------------------------------------------------------------ the end

    def close(self) -> None:
        """Releases everything, in order; a save in flight is waited for."""
        try:
            if self.profiler is not None:
                self.profiler.close()  # a run stopped inside the traced steps still writes the trace
        finally:
            self._close_writers()

    def _close_writers(self) -> None:
        try:
            if self.logger is not None:
                self.logger.close()
        finally:
            self.preemption.close()
            if self.writer is not None:
                self.writer.close()
            self.lock.release()

    @property
    def history(self) -> list[dict]:
        return self.logger.history if self.logger is not None else []


def pruned_summary(trainer: Trainer, params) -> dict:
    """{"sparsity", "effective_params"} of the trainer's masks (`params`: the whole tree, as pruning
    freezes nothing)."""
    from jaxlm.train.partition import flatten

    total = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    return sparsity_report(flatten(jax.device_get(trainer.masks)), total)


def train(cfg: Config, mesh=None, resume: str | None = None,
          run_class: type[TrainingRun] = TrainingRun) -> list[dict]:
    """Trains per `cfg`; returns the logged metric records (also in run_dir/metrics.jsonl).

    If run_dir/checkpoints holds checkpoints (or `resume` names one), training continues from
    the newest valid one, bit-exactly where the mesh is the same. `run_class` is the run that owns
    the steps (`jaxlm/rl/loop.py`'s GRPORun draws its rows from rollouts). An extended WSD run (train.steps
    raised, the schedule otherwise the same) continues from the checkpoint kept where the old
    schedule's decay began, so it equals a run that had the longer schedule from the start.
    """
    check_data_paths(cfg)
    mesh = make_mesh(cfg.mesh) if mesh is None else mesh
    check_batch(cfg, mesh)
    run = run_class(cfg, mesh)
    try:
        if run.start(resume):
            run.run()
    finally:
        run.close()
    return run.history
