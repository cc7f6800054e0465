"""Unstructured pruning: masks over the model's projection matrices (magnitude, N:M) and the cubic
schedule of gradual pruning.

A mask is a bool array shaped as its weight (True = kept). Training holds the masks in the step's
`frozen` and multiplies them into the trained weights after every optimizer update (train/step.py),
so a pruned weight is exactly zero whatever the optimizer, the microbatches or the mesh.

Ranking is exact and deterministic: the k = round(sparsity * size) smallest |w| are pruned, ties
broken by position (a stable sort), so a mask is a function of the weights alone. "Per layer" ranks
within each matrix of each transformer layer (a layer-stacked leaf [L, ...] has L of them);
"global" ranks every pruned weight of the model together. N:M keeps the n largest |w| of every
group of m consecutive inputs, for each output (the layout sparse tensor cores skip).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxlm.compress.quantize import quantized_weights
from jaxlm.config import Config, ConfigError, PruneConfig

# prune.targets (and lora.targets) -> the parameter names they select
TARGET_NAMES = {"q": "wq_DHd", "k": "wk_DKd", "v": "wv_DKd", "o": "wo_HdD", "gate": "w_gate_DF", "up": "w_up_DF",
                "down": "w_down_FD"}


def prunable(cfg: Config) -> dict[tuple, tuple[int, int]]:
    """{parameter path: (first input dim, number of input dims)} of the matrices prune.targets selects."""
    names = {TARGET_NAMES[t] for t in cfg.prune.targets}
    return {path: (first_in, n_in) for path, (first_in, n_in, _, _) in quantized_weights(cfg).items()
            if path[-1] in names}


def _as_KN(w: jax.Array, first_in: int, n_in: int) -> jax.Array:
    """w [*lead, *in, *out] as [*lead, K, N]."""
    lead, shape = w.shape[:first_in], w.shape[first_in:]
    return w.reshape(*lead, math.prod(shape[:n_in]), -1)


def keep_largest(scores: jax.Array, sparsity: float) -> jax.Array:
    """True except at the round(sparsity * n) smallest scores of the last axis (ties: earlier pruned)."""
    k = jnp.round(jnp.asarray(sparsity, jnp.float32) * scores.shape[-1])  # traced: no compile per sparsity
    order = jnp.argsort(scores, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)  # each score's place in the sorted order
    return rank >= k


def magnitude_masks(weights: dict, leads: dict, sparsity: float, scope: str) -> dict:
    """{path: mask}: per layer (each matrix of each layer ranked alone) or global (all together)."""
    if scope == "layer":
        return {p: keep_largest(jnp.abs(w).reshape(*w.shape[:leads[p]], -1).astype(jnp.float32),
                                sparsity).reshape(w.shape) for p, w in weights.items()}
    flat = jnp.concatenate([jnp.abs(w).astype(jnp.float32).reshape(-1) for w in weights.values()])
    keep = keep_largest(flat, sparsity)
    out, start = {}, 0
    for p, w in weights.items():
        out[p] = keep[start:start + w.size].reshape(w.shape)
        start += w.size
    return out


def nm_mask(w: jax.Array, first_in: int, n_in: int, n: int, m: int) -> jax.Array:
    """Keeps the n largest |w| in each group of m consecutive inputs, per output (ties: earlier kept)."""
    w_KN = _as_KN(w, first_in, n_in)
    K, N = w_KN.shape[-2:]
    groups = jnp.abs(w_KN).astype(jnp.float32).reshape(*w_KN.shape[:-2], K // m, m, N)
    order = jnp.argsort(-groups, axis=-2, stable=True)
    rank = jnp.argsort(order, axis=-2, stable=True)
    return (rank < n).reshape(w.shape)


def check_nm(cfg: Config, shapes: dict) -> None:
    """Every pruned matrix's input size must be a multiple of prune.m (one-line ConfigError)."""
    p = cfg.prune
    for path, (first_in, n_in) in prunable(cfg).items():
        k = math.prod(shapes[path].shape[first_in:first_in + n_in])
        if k % p.m:
            raise ConfigError(f"prune.m={p.m} must divide the input size {k} of {'/'.join(map(str, path))}")


def compute_masks(weights: dict, cfg: Config, sparsity: float) -> dict:
    """{path: mask} for the prunable weights `weights` ({path: array}) by prune.method."""
    p, which = cfg.prune, prunable(cfg)
    if p.method == "nm":
        return {path: nm_mask(w, *which[path], p.n, p.m) for path, w in weights.items()}
    return magnitude_masks(weights, {path: which[path][0] for path in weights}, sparsity, p.scope)


def apply_masks(params_flat: dict, masks_flat: dict) -> dict:
    """The flat parameters with every masked one multiplied by its mask (others as they are)."""
    return {path: jnp.where(masks_flat[path], w, jnp.zeros((), w.dtype)) if path in masks_flat else w
            for path, w in params_flat.items()}


# ----------------------------------------------------------------------------- when


def is_event(p: PruneConfig, step: int) -> bool:
    """Whether masks are (re)computed after `step`: start_step alone (one-shot), or every `every` steps
    from start_step to end_step (gradual; end_step always)."""
    if not p.masked:
        return False
    if not p.every:
        return step == p.start_step
    return p.start_step <= step <= p.end_step and ((step - p.start_step) % p.every == 0 or step == p.end_step)


def sparsity_at(p: PruneConfig, step: int) -> float:
    """Zhu & Gupta's cubic schedule: s_f + (s_i - s_f) (1 - (t - a) / (b - a))^3 on [a, b], s_f after;
    nm has its fixed 1 - n/m."""
    if p.method == "nm":
        return 1 - p.n / p.m
    a, b = p.start_step, p.end_step
    if not p.every or step >= b:
        return p.sparsity
    frac = min(max((step - a) / (b - a), 0.0), 1.0)
    return p.sparsity + (p.initial_sparsity - p.sparsity) * (1 - frac) ** 3


def sparsity_report(masks_flat: dict, total_params: int) -> dict:
    """{"sparsity": zeros / masked weights, "effective_params": parameters that are not pruned}."""
    masked = sum(int(m.size) for m in masks_flat.values())
    kept = sum(int(m.sum()) for m in masks_flat.values())
    return {"sparsity": 1 - kept / max(masked, 1), "effective_params": total_params - (masked - kept)}
