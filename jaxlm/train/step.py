"""The pure train and eval steps, and the Trainer that jits them for one config on one mesh.

As in nanodo, the step is a module-level pure function of (state, batch, frozen); everything
static it needs (model graph, objective, optimizer, mesh) travels in a `StepSpec`, and
`make_trainer` only binds the spec and jits with explicit shardings. The state is a plain pytree
{"step", "params", "opt_state"}; params are a pure dict merged into the NNX model inside the step.
Randomness is derived from (seed, step), so the state needs no RNG of its own and a resumed run
draws the same numbers.

The state holds only what is trained. What is read but not trained is `frozen`:
{"params": the frozen part of the model's parameters (`partition.py`: `train.freeze`,
`train.freeze_layers`), "objective": fixed arrays the objective asked for (a teacher), "masks": the
pruning masks (`pruning.py`), multiplied into the weights after every update}; all are empty by
default. A checkpoint keeps the whole parameter tree (`Trainer.saved_state`), so a run
directory loads the same way whatever was frozen.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.parallel import determinism
from jaxlm.config import Config, MoEConfig, TrainConfig
from jaxlm.data.batch import Batch
from jaxlm.model import kernels
from jaxlm.model.build import build_model
from jaxlm.parallel.sharding import (batch_sharding, constrain, param_shardings, resolve_rules, underused_fsdp,
                            use_mesh_rules)
from jaxlm.objectives import Objective, make_objective, moe_loss
from jaxlm.train.optim import make_optimizer, opt_state_shardings
from jaxlm.train.partition import Partition, make_partition
from jaxlm.train import pruning


@dataclass(frozen=True)
class StepSpec:
    """The static half of the step: what is compiled in, not passed in."""

    graphdef: Any
    objective: Objective
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    train: TrainConfig
    moe: MoEConfig
    mesh: Mesh
    rules: dict
    partition: Partition


def model_of(params, frozen, spec: StepSpec):
    """The NNX model with the trained `params` and the frozen ones joined."""
    return nnx.merge(spec.graphdef, spec.partition.merge(params, frozen["params"]))


def loss_fn(params, batch: Batch, frozen, key, n_tokens, n_micro: int, spec: StepSpec):
    """The objective's loss (its sum over `batch` / the global token count) plus the MoE losses
    (per microbatch, so they are divided by the number of microbatches). Returns (loss, info)."""
    with use_mesh_rules(spec.mesh, spec.rules):
        total, sums, aux = spec.objective.loss(model_of(params, frozen, spec), batch, key, frozen["objective"])
        loss = total / n_tokens + moe_loss(aux, spec.moe) / n_micro
        return loss, {"sums": sums, "aux": {k: jnp.mean(v) for k, v in aux.items()}}


def grads_and_info(params, batch: Batch, frozen, key, n_tokens, spec: StepSpec):
    """Gradients of the global mean loss and the summed metrics, over train.microbatches.

    Rows j*M + i form microbatch i, so every device keeps its own rows (no resharding); the sums
    make accumulation exact: the result equals one pass over the whole batch.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    M = spec.train.microbatches
    if M == 1:
        (_, info), grads = grad_fn(params, batch, frozen, key, n_tokens, 1, spec)
        return grads, info
    micro = batch.map(lambda a: jnp.swapaxes(a.reshape(a.shape[0] // M, M, *a.shape[1:]), 0, 1))

    def accumulate(carry, xs):
        mb, i = xs
        with use_mesh_rules(spec.mesh, spec.rules):
            mb = mb.map(lambda v: constrain(v, ("batch",) + (None,) * (v.ndim - 1)))
        mb_key = None if key is None else jax.random.fold_in(key, i)
        (_, info), g = grad_fn(params, mb, frozen, mb_key, n_tokens, M, spec)
        return jax.tree.map(jnp.add, carry, (g, info)), None

    first = micro.map(lambda a: a[0])
    zero_info = jax.eval_shape(lambda: grad_fn(params, first, frozen, key, n_tokens, M, spec)[0][1])
    zeros = jax.tree.map(jnp.zeros_like, (params, zero_info))
    (grads, info), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(M)))
    info["aux"] = jax.tree.map(lambda v: v / M, info["aux"])
    return grads, info


def step_key(train: TrainConfig, step) -> jax.Array:
    return jax.random.fold_in(jax.random.key(train.seed), step)


def train_step(state, batch: Batch, frozen, spec: StepSpec):
    """One optimizer step: (state, batch, frozen) -> (new state, metrics)."""
    n_tokens = jnp.maximum(spec.objective.count(batch), 1.0)
    grads, info = grads_and_info(state["params"], batch, frozen, step_key(spec.train, state["step"]), n_tokens, spec)
    updates, opt_state = spec.optimizer.update(grads, state["opt_state"], state["params"])
    params = pruning.masked(optax.apply_updates(state["params"], updates), frozen["masks"])  # pruned stay 0
    metrics = {
        **{k: v / n_tokens for k, v in info["sums"].items()},
        "grad_norm": optax.tree.norm(grads),
        "lr": spec.schedule(state["step"]),
        **info["aux"],
    }
    if batch.segment_ids is not None:  # packed rows: the real tokens, for throughput (else every position is)
        metrics["tokens"] = jnp.sum(batch.token_mask(), dtype=jnp.int32)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def eval_step(params, batch: Batch, frozen, spec: StepSpec) -> dict:
    """The objective's deterministic validation sums {"loss_sum", "count"} on one batch."""
    with use_mesh_rules(spec.mesh, spec.rules):
        return spec.objective.eval_sums(model_of(params, frozen, spec), batch, frozen["objective"])


def loss_and_grads(params, batch: Batch, frozen, spec: StepSpec):
    """The loss and its gradients without noise (key None) or an update: for tests across meshes."""
    n_tokens = jnp.maximum(spec.objective.count(batch), 1.0)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, frozen, None, n_tokens, 1, spec)
    return loss, grads


def init_params(cfg: Config) -> dict:
    return nnx.to_pure_dict(nnx.state(build_model(cfg, cfg.train.seed)))


def fresh_state(params, optimizer: optax.GradientTransformation) -> dict:
    """Step 0 around the trained parameters: the optimizer's state is initialised for them only."""
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


# ----------------------------------------------------------------------------- the Trainer


@dataclass
class Trainer:
    """The pure steps jitted for one config on one mesh, with their shardings.

    It also holds the frozen arrays its steps read: the frozen part of the model's parameters
    (set by `init_state`, `state_from_params` or `adopt`) and the objective's own (read on first use).
    """

    cfg: Config  # with the kernels resolved for the mesh's platform
    spec: StepSpec
    param_shardings: Any  # the whole parameter tree's
    state_shardings: Any  # the trained parameters' and their optimizer state's
    abstract_frozen: Any  # {"params", "objective"} as ShapeDtypeStructs carrying their shardings
    jit_train_step: Callable  # (state, batch, frozen) -> (state, metrics)
    jit_eval_step: Callable  # (params, batch, frozen) -> {"loss_sum", "count"}
    jit_loss_and_grads: Callable  # (params, batch, frozen) -> (loss, grads)
    jit_init_params: Callable  # () -> the whole parameter tree, created in its shardings
    jit_fresh_state: Callable  # trained params -> step-0 state
    jit_all_kept: Callable | None = None  # () -> masks keeping every weight (with pruning)
    jit_prune: Callable | None = None  # (params, sparsity) -> (pruned params, masks)
    frozen_params: Any = dataclasses.field(default_factory=dict)
    masks: Any = None  # the pruning masks (None: not made yet, or no pruning)

    @functools.cached_property
    def objective_frozen(self):
        """The objective's fixed arrays, read on first use: lowering alone never reads them."""
        return self.spec.objective.load_frozen(self.abstract_frozen["objective"], self.initial_params)

    @property
    def frozen(self) -> dict:
        return {"params": self.frozen_params, "objective": self.objective_frozen, "masks": self.masks or {}}

    @property
    def has_masks(self) -> bool:
        return self.cfg.prune.masked

    def prune(self, state, step: int) -> dict:
        """The state with new masks computed from its weights at prune.*'s sparsity for `step`."""
        from jaxlm.compress.prune import sparsity_at

        params, self.masks = self.jit_prune(state["params"], sparsity_at(self.cfg.prune, step))
        return {**state, "params": params}

    @property
    def mesh(self) -> Mesh:
        return self.spec.mesh

    @property
    def rules(self) -> dict:
        return self.spec.rules

    @property
    def graphdef(self):
        return self.spec.graphdef

    @property
    def partition(self) -> Partition:
        return self.spec.partition

    @property
    def batch_sharding(self) -> NamedSharding:
        return batch_sharding(self.mesh, self.rules)

    def initial_params(self):
        """The whole parameter tree the run starts from: train.init_from, else the seeded init."""
        from jaxlm.train.start import initial_params

        return initial_params(self.cfg, self)

    def init_state(self) -> dict:
        """Step 0 from the config's initialisation (seeded by train.seed)."""
        return self.state_from_params(self.jit_init_params())

    def state_from_params(self, params) -> dict:
        """Step 0 around a whole parameter tree in `param_shardings` (initialised, imported): its
        frozen part is kept here, the rest trained."""
        trained, self.frozen_params = self.partition.split(params)
        if self.has_masks and self.masks is None:
            self.masks = self.jit_all_kept()
        return self.jit_fresh_state(trained)

    def saved_state(self, state) -> dict:
        """What a checkpoint holds: the state with the whole parameter tree (and the pruning masks)."""
        saved = {**state, "params": self.partition.merge(state["params"], self.frozen_params, held=False)}
        return {**saved, "masks": self.masks} if self.has_masks else saved

    def adopt(self, saved) -> dict:
        """The train state from a restored `saved_state` (its frozen parameters are kept here)."""
        trained, self.frozen_params = self.partition.split(saved["params"])
        saved = dict(saved)
        self.masks = saved.pop("masks", self.masks)
        return {**saved, "params": trained}

    def train_step(self, state, batch: Batch):
        return self.jit_train_step(state, batch, self.frozen)

    def eval_step(self, params, batch: Batch) -> dict:
        return self.jit_eval_step(params, batch, self.frozen)

    def loss_and_grads(self, params, batch: Batch):
        return self.jit_loss_and_grads(params, batch, self.frozen)

    def abstract_params(self):
        """The whole parameter tree as ShapeDtypeStructs carrying their shardings."""
        return _with_shardings(jax.eval_shape(self.jit_init_params), self.param_shardings)

    def abstract_state(self):
        """The train state as ShapeDtypeStructs carrying its shardings (never allocated)."""
        trained, _ = self.partition.split(jax.eval_shape(self.jit_init_params))
        return _with_shardings(jax.eval_shape(self.jit_fresh_state, trained), self.state_shardings)

    def abstract_saved_state(self):
        """The checkpointed state (whole parameter tree) as ShapeDtypeStructs with shardings."""
        masks = {"masks": self.abstract_frozen["masks"]} if self.has_masks else {}
        return {**self.abstract_state(), "params": self.abstract_params(), **masks}

    def abstract_batch(self) -> Batch:
        """The global batch the data pipeline yields for this config, as ShapeDtypeStructs."""
        c = self.cfg
        return Batch.abstract(c.train.global_batch, c.data.seq_len, c.data.packing, self.batch_sharding,
                              self.spec.objective.extra_fields())

    def lower_train_step(self, platforms: tuple[str, ...] | None = None):
        """The train step lowered for this config's abstract state and batch (`jaxlm compile`);
        `platforms` (e.g. ("cuda",)) lowers for a backend this machine lacks, without compiling."""
        traced = self.jit_train_step.trace(self.abstract_state(), self.abstract_batch(), self.abstract_frozen)
        return traced.lower(lowering_platforms=platforms)


def _with_shardings(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def make_trainer(cfg: Config, mesh: Mesh, platform: str | None = None) -> Trainer:
    """The jitted steps of `cfg` on `mesh`. Kernels are chosen for `platform` (default: the mesh's
    devices'); another platform is only for lowering (`lower_train_step(platforms=...)`)."""
    platform = platform or mesh.devices.flat[0].platform
    deterministic = determinism.resolve(cfg.train.deterministic, platform)
    cfg = dataclasses.replace(cfg, model=kernels.resolve(cfg.model, platform, deterministic, cfg.data.seq_len))
    rules = resolve_rules(cfg.mesh.rules)
    optimizer, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg, cfg.train.seed)))
    p_shardings = param_shardings(abstract, mesh, rules)
    underused_fsdp(abstract, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_params = _with_shardings(nnx.to_pure_dict(abstract), p_shardings)
    partition = make_partition(cfg, abstract_params)
    trained, frozen_params = partition.split(abstract_params)
    trained_shardings = jax.tree.map(lambda s: s.sharding, trained)
    plain = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), trained)
    abstract_opt = jax.eval_shape(optimizer.init, plain)
    opt_shardings = opt_state_shardings(abstract_opt, plain, trained_shardings, replicated)  # any optimizer
    state_shardings = {"step": replicated, "params": trained_shardings, "opt_state": opt_shardings}
    objective = make_objective(cfg)
    spec = StepSpec(graphdef=graphdef, objective=objective, optimizer=optimizer, schedule=schedule,
                    train=cfg.train, moe=cfg.moe, mesh=mesh, rules=rules, partition=partition)
    data = batch_sharding(mesh, rules)
    masks = pruning.abstract_masks(cfg, abstract_params)
    abstract_frozen = {"params": frozen_params, "objective": objective.frozen(mesh, rules), "masks": masks}
    frozen_shardings = jax.tree.map(lambda s: s.sharding, abstract_frozen)
    bind = lambda fn: functools.partial(fn, spec=spec)
    return Trainer(
        cfg=cfg, spec=spec, param_shardings=p_shardings, state_shardings=state_shardings,
        abstract_frozen=abstract_frozen,
        jit_train_step=jax.jit(bind(train_step), in_shardings=(state_shardings, data, frozen_shardings),
                               out_shardings=(state_shardings, replicated), donate_argnums=0),
        jit_eval_step=jax.jit(bind(eval_step), in_shardings=(trained_shardings, data, frozen_shardings),
                              out_shardings=replicated),
        jit_loss_and_grads=jax.jit(bind(loss_and_grads), in_shardings=(trained_shardings, data, frozen_shardings),
                                   out_shardings=(replicated, trained_shardings)),
        jit_init_params=jax.jit(functools.partial(init_params, cfg), out_shardings=p_shardings),
        jit_fresh_state=jax.jit(functools.partial(fresh_state, optimizer=optimizer), out_shardings=state_shardings),
        jit_all_kept=pruning.all_kept(masks) if masks else None,
        jit_prune=pruning.pruner(cfg, masks, p_shardings) if masks else None,
    )
