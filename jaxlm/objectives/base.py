"""The interface every objective implements, and what all of them share.

An objective says how a batch becomes model inputs and a loss. Losses are returned as sums over
tokens; the step divides by the global token count (`Objective.count`), so microbatches and
data-parallel shards combine into the exact global mean.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxlm.config import Config, MoEConfig
from jaxlm.data.batch import Batch


class Objective(abc.ABC):
    """The interface the train and eval steps call. `model` is the merged NNX model; `key` is a
    PRNG key derived from (seed, step, microbatch), or None where the step must be deterministic;
    `frozen` is a pytree of fixed arrays the objective asked for (e.g. a teacher's parameters)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def extra_fields(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """The objective's own per-row batch fields: {name: (row shape, dtype)}."""
        return {}

    def frozen(self, mesh, rules) -> Any:
        """Fixed arrays the loss reads (e.g. a teacher's params) as ShapeDtypeStructs carrying their
        shardings on `mesh`: all that lowering a step needs (`jaxlm compile` for devices it lacks)."""
        return {}

    def load_frozen(self, abstract, initial_params: Callable[[], Any]) -> Any:
        """The arrays `frozen()` describes, read and placed in their shardings. `initial_params()`
        gives the whole parameter tree the run started from (what a reference policy copies)."""
        return abstract

    def count(self, batch: Batch) -> jax.Array:
        """The normaliser of the loss sums: tokens that count."""
        return jnp.sum(batch.loss_mask.astype(jnp.float32))

    @abc.abstractmethod
    def loss(self, model, batch: Batch, key, frozen) -> tuple[jax.Array, dict, dict]:
        """(objective sum, {metric: sum} reported as sum / count, model aux metrics such as MoE's)."""

    @abc.abstractmethod
    def eval_sums(self, model, batch: Batch, frozen) -> dict:
        """{"loss_sum", "count"}: eval_loss = loss_sum / count over the validation batches."""


def forward(model, batch: Batch, key=None, inputs=None):
    """The model on a batch (its own inputs unless `inputs` replaces them): (logits, aux)."""
    tokens = batch.inputs if inputs is None else inputs
    return model(tokens, batch.positions, batch.segment_ids, rng=key)


def moe_loss(aux: dict, moe: MoEConfig) -> jax.Array:
    """MoE auxiliary losses, averaged over MoE layers so the coefficients do not depend on depth:
    aux_loss_coef * load-balancing loss + z_loss_coef * router z-loss."""
    total = jnp.zeros((), jnp.float32)
    if "moe_aux_loss" in aux:
        total += moe.aux_loss_coef * jnp.mean(aux["moe_aux_loss"])
    if "moe_z_loss" in aux:
        total += moe.z_loss_coef * jnp.mean(aux["moe_z_loss"])
    return total
