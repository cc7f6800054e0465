"""The training loop: data -> train_step -> metrics, with periodic evaluation."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

from jaxlm.accounting import train_flops_per_step
from jaxlm.config import Config, ConfigError, to_yaml
from jaxlm.data.pipeline import to_global
from jaxlm.data.sources import build_data
from jaxlm.distributed import data_parallel_size, make_mesh
from jaxlm.sharding import resolve_rules
from jaxlm.train.metrics import MetricsLogger, measure_peak_flops
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
    ce = sum(float(t["ce_sum"]) for t in totals)
    count = sum(float(t["count"]) for t in totals)
    loss = ce / max(count, 1.0)
    return {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 50.0)))}


def train(cfg: Config, mesh=None) -> list[dict]:
    """Trains per `cfg`; returns the logged metric records (also in run_dir/metrics.jsonl)."""
    mesh = make_mesh(cfg.mesh) if mesh is None else mesh
    check_batch(cfg, mesh)
    t = cfg.train
    batches, eval_batches = build_data(cfg)

    trainer = make_trainer(cfg, mesh)
    state = trainer.init_state()
    run_dir = Path(t.run_dir)
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    flops = train_flops_per_step(cfg)
    peak = t.peak_flops_per_device * jax.device_count() if t.peak_flops_per_device else measure_peak_flops()
    tokens_per_step = t.global_batch * cfg.data.seq_len
    logger = MetricsLogger(run_dir, t.steps, int(state["step"]), t.progress)
    try:
        start = int(state["step"])
        clock, clock_step = None, start
        for step in range(start, t.steps):
            state, metrics = trainer.train_step(state, to_global(next(batches), trainer.batch_sharding))
            done = step + 1
            logger.advance()
            is_last = done == t.steps
            if done % t.log_every == 0 or is_last or done == start + 1:
                metrics = jax.device_get(metrics)
                now = time.perf_counter()
                if clock is not None:  # the first step (compilation) is not timed
                    step_time = (now - clock) / (done - clock_step)
                    metrics.update(step_time=step_time, tokens_per_s=tokens_per_step / step_time,
                                   mfu=flops / step_time / peak)
                clock, clock_step = now, done
                if t.eval_every and eval_batches and (done % t.eval_every == 0 or is_last):
                    metrics.update(evaluate(trainer, state["params"], eval_batches))
                    clock = time.perf_counter()  # evaluation time is not step time
                logger.log(done, metrics)
    finally:
        logger.close()
    return logger.history
