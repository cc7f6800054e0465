"""Train state, its shardings, and the pure jitted train/eval steps.

The state is a plain pytree {"step", "params", "opt_state"}; params are a pure dict merged
into the NNX model (graphdef) inside the step. Randomness is derived from (seed, step), so
the state needs no RNG of its own and a resumed run draws the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.config import Config
from jaxlm.model.transformer import Transformer
from jaxlm.sharding import batch_sharding, constrain, param_shardings, resolve_rules, use_mesh_rules
from jaxlm.train.objectives import moe_loss, next_token_loss
from jaxlm.train.optim import make_optimizer

BATCH_KEYS_2D = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


@dataclass
class Trainer:
    """Everything compiled for one config on one mesh."""

    cfg: Config
    mesh: Mesh
    rules: dict
    graphdef: Any
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: Any
    train_step: Callable  # (state, batch) -> (state, metrics)
    eval_step: Callable  # (params, batch) -> {"ce_sum", "count"}
    loss_and_grads: Callable  # (params, batch) -> (loss, grads), deterministic (no router noise)
    init_state: Callable  # () -> state, created directly in its shardings

    @property
    def batch_sharding(self) -> NamedSharding:
        return batch_sharding(self.mesh, self.rules)


def build_model(cfg: Config, seed: int) -> Transformer:
    return Transformer(cfg.model, cfg.moe, nnx.Rngs(params=seed))


def make_trainer(cfg: Config, mesh: Mesh) -> Trainer:
    rules = resolve_rules(cfg.mesh.rules)
    optimizer, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg, cfg.train.seed)))
    p_shardings = param_shardings(abstract, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(abstract))
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt_shardings = optax.tree_utils.tree_map_params(
        optimizer, lambda _, s: s, abstract_opt, p_shardings, transform_non_params=lambda _: replicated)
    state_shardings = {"step": replicated, "params": p_shardings, "opt_state": opt_shardings}

    def init_state():
        params = nnx.to_pure_dict(nnx.state(build_model(cfg, cfg.train.seed)))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}

    def loss_fn(params, batch, n_tokens, key, n_micro):
        with use_mesh_rules(mesh, rules):
            model = nnx.merge(graphdef, params)
            logits, aux = model(batch["inputs"], batch.get("positions"), batch.get("segment_ids"), rng=key)
            sums = next_token_loss(logits, batch["targets"], batch["loss_mask"], cfg.train.z_loss_coef)
            extra = moe_loss(aux, cfg.moe) / n_micro
            loss = (sums["ce_sum"] + sums["z_sum"]) / n_tokens + extra
            return loss, {"ce_sum": sums["ce_sum"], "aux": {k: jnp.mean(v) for k, v in aux.items()}}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch):
        M = cfg.train.microbatches
        n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        key = jax.random.fold_in(jax.random.key(cfg.train.seed), state["step"])
        if M == 1:
            (_, info), grads = grad_fn(state["params"], batch, n_tokens, key, 1)
        else:
            # rows j*M + i form microbatch i: every device keeps its own rows (no resharding)
            micro = jax.tree.map(lambda a: jnp.swapaxes(a.reshape(a.shape[0] // M, M, *a.shape[1:]), 0, 1), batch)

            def accumulate(carry, xs):
                mb, i = xs
                with use_mesh_rules(mesh, rules):
                    mb = {k: constrain(v, ("batch", "length")) for k, v in mb.items()}
                (_, info), g = grad_fn(state["params"], mb, n_tokens, jax.random.fold_in(key, i), M)
                return jax.tree.map(jnp.add, carry, (g, info)), None

            zero_info = jax.eval_shape(lambda: grad_fn(state["params"], jax.tree.map(lambda a: a[0], micro),
                                                       n_tokens, key, M)[0][1])
            zeros = jax.tree.map(jnp.zeros_like, (state["params"], zero_info))
            (grads, info), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(M)))
            info["aux"] = jax.tree.map(lambda v: v / M, info["aux"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "loss": info["ce_sum"] / n_tokens,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state["step"]),
            **info["aux"],
        }
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    def eval_step(params, batch):
        with use_mesh_rules(mesh, rules):
            logits, _ = nnx.merge(graphdef, params)(batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
            sums = next_token_loss(logits, batch["targets"], batch["loss_mask"])
        return {"ce_sum": sums["ce_sum"], "count": sums["count"]}

    def loss_and_grads(params, batch):
        n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        (loss, _), grads = grad_fn(params, batch, n_tokens, None, 1)
        return loss, grads

    data_sharding = batch_sharding(mesh, rules)
    return Trainer(
        cfg=cfg, mesh=mesh, rules=rules, graphdef=graphdef, optimizer=optimizer, schedule=schedule,
        state_shardings=state_shardings,
        train_step=jax.jit(train_step, in_shardings=(state_shardings, data_sharding),
                           out_shardings=(state_shardings, replicated), donate_argnums=0),
        eval_step=jax.jit(eval_step, in_shardings=(p_shardings, data_sharding), out_shardings=replicated),
        init_state=jax.jit(init_state, out_shardings=state_shardings),
        loss_and_grads=jax.jit(loss_and_grads, in_shardings=(p_shardings, data_sharding),
                               out_shardings=(replicated, p_shardings)),
    )
