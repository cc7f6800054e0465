"""The GRPO run (`jaxlm rl`): the training loop with rollouts from the current policy as its data.

Every grpo.mu steps the current policy samples a rollout batch (`rollout.py`): prompts, O
completions each with the KV-cache decoder, rewards, group advantages; then the old policy's and
the reference's log-probs are computed once, on the devices, and the same batch feeds the next mu
optimizer steps (the pure train step, `train.objective: grpo`). Everything else (checkpoints,
LoRA, the mesh, metrics, preemption) is the training loop's. A run stops and saves only between
rollout batches (config checks keep train.steps and checkpoint.every multiples of mu; a stop
signal waits for the batch's last step), so a resume starts a new batch, seeded by its index.
"""

from __future__ import annotations

import functools
import time

import jax

from jaxlm.config import Config
from jaxlm.data.batch import Batch
from jaxlm.data.pipeline import to_global
from jaxlm.inference.decode import Decoder
from jaxlm.model import lora
from jaxlm.parallel.sharding import use_mesh_rules
from jaxlm.rl.rewards import Rewards
from jaxlm.rl.rollout import Prompts, Rollouts, roll_out, rollout_metrics
from jaxlm.train.loop import StepPlan, TrainingRun, train
from jaxlm.tokenizer.tokenizer import load_tokenizer
from jaxlm.train.step import StepSpec, model_of


class PromptPosition:
    """The data position a checkpoint records: rollouts are drawn by index, so only the count."""

    def __init__(self):
        self.rollouts = 0

    def get_state(self) -> dict:
        return {"rollouts": self.rollouts}

    def set_state(self, state: dict) -> None:
        self.rollouts = int(state.get("rollouts", 0))


def rollout_logps(params, batch: Batch, frozen, spec: StepSpec) -> dict:
    """The old policy's and the reference's log-probs of a rollout batch (the objective's)."""
    with use_mesh_rules(spec.mesh, spec.rules):
        return spec.objective.rollout_logps(model_of(params, frozen, spec), batch, frozen["objective"])


def decoding_params(params: dict, cfg: Config) -> dict:
    """The policy's whole parameter tree as the decoder reads it: LoRA's adapters folded in."""
    return lora.merge(params, cfg.lora.scale) if cfg.lora.rank else params


class GRPORun(TrainingRun):
    def _data(self):
        cfg = self.cfg
        self.text_tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.prompts = Prompts(cfg, self.text_tokenizer)
        self.rewards = Rewards(cfg.grpo)
        return PromptPosition(), []

    @functools.cached_property
    def decoder(self) -> Decoder:
        return Decoder(self.cfg, self._policy_params(), self.mesh)

    @functools.cached_property
    def _jit_logps(self):
        return jax.jit(functools.partial(rollout_logps, spec=self.trainer.spec))

    @functools.cached_property
    def _jit_merge(self):
        return jax.jit(functools.partial(decoding_params, cfg=self.cfg))

    def _policy_params(self) -> dict:
        return self._jit_merge(self.trainer.saved_state(self.state)["params"])

    def _roll_out(self, index: int) -> tuple[Batch, dict]:
        start = time.perf_counter()
        self.decoder.params = self._policy_params()
        r: Rollouts = roll_out(self.decoder, self.prompts, self.rewards, self.text_tokenizer, self.cfg, index)
        batch = to_global(Batch.from_arrays(r.rows), self.trainer.batch_sharding)
        fields = self.trainer.spec.objective.rollout_fields()
        logps = self._jit_logps(self.state["params"], batch, self.trainer.frozen) if fields else {}
        batch = Batch(batch.inputs, batch.targets, batch.loss_mask, extra={**batch.extra, **logps})
        self.last_rollout = r
        metrics = {**rollout_metrics(r, self.cfg.grpo.group_size), **{k.replace("/", "_"): float(v.mean())
                   for k, v in r.scores.items() if k.startswith("reward/")}}
        metrics["rollout_time"] = time.perf_counter() - start
        return batch, metrics

    def _step(self, done: int) -> dict:
        step = done - 1
        if step % self.cfg.grpo.mu == 0:
            self.rollout_batch, self.rollout_info = self._roll_out(step // self.cfg.grpo.mu)
            self.batches.rollouts = step // self.cfg.grpo.mu + 1
        start = time.perf_counter()
        self.state, metrics = self.trainer.train_step(self.state, self.rollout_batch)
        metrics = jax.block_until_ready(metrics)  # the update's own time (rollouts dominate: no overlap lost)
        self.profiler.step(done, self.state)
        self.checks.push(done, metrics)
        if self.writer is not None:
            self.writer.poll()
        self.tokens.add(int(self.rollout_batch.loss_mask.sum()))
        self.logger.advance()
        return {**metrics, **self.rollout_info, "update_time": time.perf_counter() - start}

    def _plan(self, done: int) -> StepPlan:
        plan = super()._plan(done)
        if done % self.cfg.grpo.mu:  # only between rollout batches: a resume starts a new one
            plan.stop = False
        return plan


def train_grpo(cfg: Config, mesh=None, resume: str | None = None) -> list[dict]:
    """Trains with GRPO per `cfg` (train.objective: grpo); returns the metric records."""
    return train(cfg, mesh, resume, run_class=GRPORun)
