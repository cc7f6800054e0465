"""Pruning masks in training: their shapes and shardings, applying them in the step, and the jitted
programs that make them (all kept, or computed from the weights at a pruning step).

The masks are `frozen["masks"]`: a nested dict holding a bool array for each pruned matrix
(`compress.prune.prunable`), placed as its weight. They are read by the step, never updated by it;
the loop replaces them at the steps prune.start_step/end_step/every name, and a checkpoint saves
them beside the parameters, so a resumed run prunes exactly what the uninterrupted one pruned.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.compress.prune import apply_masks, check_nm, compute_masks, prunable
from jaxlm.config import Config
from jaxlm.train.partition import flatten, unflatten


def abstract_masks(cfg: Config, abstract_params: dict) -> dict:
    """The masks as bool ShapeDtypeStructs carrying their weights' shardings ({} without pruning)."""
    if not cfg.prune.masked:
        return {}
    flat = flatten(abstract_params)
    if cfg.prune.method == "nm":
        check_nm(cfg, flat)
    return unflatten({path: jax.ShapeDtypeStruct(flat[path].shape, jnp.bool_, sharding=flat[path].sharding)
                      for path in prunable(cfg)})


def masked(params: dict, masks: dict) -> dict:
    """`params` with each masked weight zeroed where its mask is False (inside the step)."""
    if not masks:
        return params
    return unflatten(apply_masks(flatten(params), flatten(masks)))


def all_kept(abstract: dict):
    """A jitted () -> masks that keep every weight, in their shardings."""
    shardings = jax.tree.map(lambda s: s.sharding, abstract)
    return jax.jit(lambda: jax.tree.map(lambda s: jnp.ones(s.shape, jnp.bool_), abstract), out_shardings=shardings)


def pruner(cfg: Config, abstract: dict, param_shardings):
    """A jitted (params, sparsity) -> (masked params, masks): the masks of prune.method at `sparsity`,
    computed from the weights as they are (already pruned weights are zero, so they stay pruned)."""
    mask_shardings = jax.tree.map(lambda s: s.sharding, abstract)

    def prune(params, sparsity):
        flat = flatten(params)
        masks = compute_masks({path: flat[path] for path in flatten(abstract)}, cfg, sparsity)
        return unflatten(apply_masks(flat, masks)), unflatten(masks)

    return jax.jit(prune, out_shardings=(param_shardings, mask_shardings))
