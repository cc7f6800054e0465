"""The optax chain: global-norm clipping -> the optimizer `optim.name` names (AdamW, Lion, Adafactor,
Muon or SGD) with its weight-decay mask, on one learning-rate schedule."""

from __future__ import annotations

from typing import Callable

import jax
import optax
from optax.contrib import MuonDimensionNumbers

from jaxlm.config import OptimConfig
from jaxlm.config.checks import wsd_decay_steps

NO_DECAY_LEAVES = ("scale", "bq_Hd", "bk_Kd", "bv_Kd")  # RMSNorm gains, attention biases
EMBEDDING_LEAVES = ("table_VD",)
SHAPE_LETTERS = set("DFVHKdE")  # the parameter letters of jaxlm/model/__init__.py
MUON_RMS = 0.2  # Muon's update RMS matched to AdamW's (Liu et al. 2025), so one optim.lr serves both
USUAL_MOMENTUM = {"sgd": 0.9, "muon": 0.95}


def make_schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine to min_lr, WSD (stable, then linear decay), or constant."""
    warmup = min(o.warmup_steps, total_steps)
    rest = max(total_steps - warmup, 1)
    ramp = optax.linear_schedule(0.0, o.lr, warmup) if warmup else optax.constant_schedule(o.lr)
    if o.schedule == "cosine":
        after = optax.cosine_decay_schedule(o.lr, rest, alpha=o.min_lr / o.lr)
    elif o.schedule == "wsd":
        decay = wsd_decay_steps(o.decay_fraction, total_steps)
        stable = max(rest - decay, 0)
        after = optax.join_schedules(
            [optax.constant_schedule(o.lr), optax.linear_schedule(o.lr, o.min_lr, decay)], [stable])
    else:
        after = optax.constant_schedule(o.lr)
    return optax.join_schedules([ramp, after], [warmup])


def _leaf_name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def decay_mask(params, decay_embeddings: bool):
    """True for leaves that get weight decay: matrices, not norm gains or biases, embeddings by option."""

    def decayed(path, _):
        name = _leaf_name(path)
        if name in NO_DECAY_LEAVES:
            return False
        return decay_embeddings or name not in EMBEDDING_LEAVES

    return jax.tree_util.tree_map_with_path(decayed, params)


def muon_dims(name: str, ndim: int) -> MuonDimensionNumbers | None:
    """How Muon sees parameter `name` (e.g. `wq_DHd`) as a batch of 2-D matrices, or None for AdamW.

    The letters after the last `_` name the trailing axes. Axes before them (the layer axis that
    stacks a segment's blocks) and a leading expert axis `E` are batch axes: each layer's and each
    expert's matrix is orthogonalised on its own. Every hidden matrix reads or writes the residual
    stream `D`: reading it (`DF`, `DHd`, `DE`) D is the reduction axis and the rest the output;
    writing it (`FD`, `HdD`) D is the output and the rest the reduction. The embedding and the
    output head (`V`), norm gains and any name not in this form go to AdamW, as Muon's authors do.
    """
    head, _, letters = name.rpartition("_")
    if not head or not letters or not set(letters) <= SHAPE_LETTERS or "V" in letters or ndim < len(letters):
        return None
    first = ndim - len(letters)  # stacked layers
    if len(letters) > 2 and letters[0] == "E":  # stacked experts
        letters, first = letters[1:], first + 1
    if len(letters) < 2:
        return None
    if letters[0] == "D":
        return MuonDimensionNumbers((first,), tuple(range(first + 1, ndim)))
    if letters[-1] == "D":
        return MuonDimensionNumbers(tuple(range(first, ndim - 1)), (ndim - 1,))
    return None


def muon_dim_tree(params):
    """`muon_dims` for every leaf of `params` (None: the leaf goes to AdamW)."""
    return jax.tree_util.tree_map_with_path(lambda path, x: muon_dims(_leaf_name(path), x.ndim), params)


def _adamw(o: OptimConfig, lr, decay, momentum) -> optax.GradientTransformation:
    return optax.adamw(lr, b1=o.beta1, b2=o.beta2, eps=o.eps, weight_decay=o.weight_decay, mask=decay)


def _lion(o: OptimConfig, lr, decay, momentum) -> optax.GradientTransformation:
    return optax.lion(lr, b1=o.beta1, b2=o.beta2, weight_decay=o.weight_decay, mask=decay)


def _adafactor(o: OptimConfig, lr, decay, momentum) -> optax.GradientTransformation:
    # optax adds Adafactor's decay after the learning rate: scaled by it here, so optim.weight_decay
    # means what it means for AdamW; the lr is absolute (not relative to each parameter's scale)
    return optax.adafactor(lr, multiply_by_parameter_scale=False, weight_decay_mask=decay,
                           weight_decay_rate=lambda step: o.weight_decay * lr(step))


def _muon(o: OptimConfig, lr, decay, momentum) -> optax.GradientTransformation:
    # Muon on the hidden matrices (all decayed), AdamW without decay on the rest (modded-nanogpt's
    # split); update RMS matched to AdamW's, so one lr and schedule serve both (Moonlight's recipe)
    return optax.contrib.muon(lr, beta=momentum, eps=o.eps, weight_decay=o.weight_decay, adam_b1=o.beta1,
                              adam_b2=o.beta2, adam_weight_decay=0.0, muon_weight_dimension_numbers=muon_dim_tree,
                              consistent_rms=MUON_RMS)


def _sgd(o: OptimConfig, lr, decay, momentum) -> optax.GradientTransformation:
    return optax.chain(optax.add_decayed_weights(o.weight_decay, decay), optax.sgd(lr, momentum=momentum))


OPTIMIZERS: dict[str, Callable] = {"adamw": _adamw, "lion": _lion, "adafactor": _adafactor, "muon": _muon,
                                   "sgd": _sgd}


def opt_state_shardings(abstract_state, abstract_params, param_shardings, replicated):
    """Shardings of an optimizer state: a leaf that is a copy of a parameter (its path ends with
    the parameter's path and it has the parameter's shape) is sharded like it; anything else (step
    counts, Adafactor's factored row and column statistics) is small and replicated. Unlike
    optax.tree_map_params this runs no init on placeholders, which masked, partitioned and factored
    optimizers (Muon, Adafactor) cannot do."""
    flat = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]
    by_path = {tuple(path): (p.shape, s) for (path, p), (_, s) in zip(flat(abstract_params), flat(param_shardings))}
    lengths = sorted({len(path) for path in by_path}, reverse=True)

    def sharding(path, leaf):
        for n in lengths:
            shape, found = by_path.get(tuple(path[-n:]), (None, None))
            if found is not None:
                return found if tuple(shape) == tuple(leaf.shape) else replicated
        return replicated

    return jax.tree_util.tree_map_with_path(sharding, abstract_state)


def make_optimizer(o: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(o, total_steps)
    momentum = USUAL_MOMENTUM.get(o.name) if o.momentum is None else o.momentum
    core = OPTIMIZERS[o.name](o, schedule, lambda p: decay_mask(p, o.decay_embeddings), momentum)
    chain = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    return optax.chain(*chain, core), schedule
