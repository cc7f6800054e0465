"""Structured pruning: whole FFN channels or attention heads removed, giving a smaller model config.

A plan says which channels (heads) each layer keeps; `shrink` cuts any parameter tree of the
original shape by it, so a plan chosen on the trained weights can cut an earlier step's weights
too (rewinding). Layers are stacked ([L, ...] leaves), so every layer keeps the same number: the
sparsity's share is removed from each layer, the lowest-scoring ones by their weights' L1 or L2
norm. A channel f is scored over everything that reads or writes it: column f of the gate and up
projections and row f of the down projection. Attention is cut by kv group (a key/value head and
the G query heads that read it), so grouped-query attention keeps its shape: its score covers
those heads' query, key, value and output weights (and biases). The result is an ordinary config
(model.d_ff, or model.n_heads, n_kv_heads and an explicit d_head), trained, decoded and exported as
any other.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxlm.config import Config, ConfigError

FFN = ("w_gate_DF", "w_up_DF", "w_down_FD")
ATTN = ("wq_DHd", "wk_DKd", "wv_DKd", "wo_HdD", "bq_Hd", "bk_Kd", "bv_Kd")
# axis (counted from the end) that holds the unit: the channel F, the query head H or the kv head K
UNIT_AXIS = {"w_gate_DF": -1, "w_up_DF": -1, "w_down_FD": -2, "wq_DHd": -2, "wk_DKd": -2, "wv_DKd": -2,
             "wo_HdD": -3, "bq_Hd": -2, "bk_Kd": -2, "bv_Kd": -2}


def _blocks(flat: dict, anchor: str) -> list[tuple]:
    """Parent paths of the modules that hold `anchor` (every MLP, or every attention)."""
    return sorted({path[:-1] for path in flat if path[-1] == anchor}, key=str)


def _norm(a: np.ndarray, axes: tuple, norm: str) -> np.ndarray:
    a = np.abs(a.astype(np.float64))
    return a.sum(axes) if norm == "l1" else (a ** 2).sum(axes)  # l2 ranks as its square


def _per_unit(w: np.ndarray, name: str, group: int) -> np.ndarray:
    """w [*lead, ...] moved to [*lead, units, rest...], with `group` consecutive units summed as one."""
    axis = w.ndim + UNIT_AXIS[name]
    moved = np.moveaxis(w, axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // group, group)


def _scores(leaves: dict, norm: str, lead: int, group_of: dict) -> np.ndarray:
    """[*lead, units]: each unit's norm over every leaf (sums of |w| or of w^2)."""
    total = 0.0
    for name, w in leaves.items():
        per = _per_unit(w, name, group_of.get(name, 1))  # [*lead, ..., units, group]
        axes = tuple(range(lead, per.ndim - 2)) + (per.ndim - 1,)
        total = total + _norm(per, axes, norm)
    return total


def _keep(scores: np.ndarray, n_keep: int) -> np.ndarray:
    """[*lead, n_keep] indices, ascending, of the highest scores per layer (ties: the earlier kept)."""
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :n_keep]
    return np.sort(order, axis=-1)


def plan(cfg: Config, params: dict) -> dict:
    """{module path: (kept unit indices [*lead, n], units per index)} for prune.method ffn or heads,
    chosen on `params` (flat: {path tuple: array})."""
    p, m = cfg.prune, cfg.model
    if cfg.moe.n_experts or cfg.lora.rank:
        raise ConfigError(f"prune.method={p.method} cuts dense models without adapters: this run has "
                          f"moe.n_experts={cfg.moe.n_experts}, lora.rank={cfg.lora.rank}")
    if p.method == "ffn":
        names, units, group_of = FFN, m.d_ff, {}
    else:
        g = m.n_heads // m.n_kv_heads
        names, units, group_of = ATTN, m.n_kv_heads, {"wq_DHd": g, "wo_HdD": g, "bq_Hd": g}
    n_keep = units - round(p.sparsity * units)
    if n_keep < 1:
        raise ConfigError(f"prune.sparsity={p.sparsity} would remove all {units} {p.method} units of each layer")
    out = {}
    for block in _blocks(params, names[1]):
        leaves = {n: np.asarray(params[(*block, n)]) for n in names if (*block, n) in params}
        lead = leaves[names[1]].ndim - (3 if p.method == "heads" else 2)
        out[block] = (_keep(_scores(leaves, p.norm, lead, group_of), n_keep), group_of)
    return out


def shrink(cfg: Config, params: dict, cuts: dict) -> tuple[Config, dict]:
    """(the smaller config, `params` (flat) with only the kept units of every cut module)."""
    out = dict(params)
    for block, (kept, group_of) in cuts.items():
        for path in [q for q in params if q[:-1] == block and q[-1] in UNIT_AXIS]:
            out[path] = _take(np.asarray(params[path]), kept, UNIT_AXIS[path[-1]], group_of.get(path[-1], 1))
    kept = next(iter(cuts.values()))[0].shape[-1]
    m = cfg.model
    if cfg.prune.method == "ffn":
        model = dataclasses.replace(m, d_ff=kept)
    else:
        g = m.n_heads // m.n_kv_heads
        model = dataclasses.replace(m, n_heads=kept * g, n_kv_heads=kept, d_head=m.head_dim)
    return dataclasses.replace(cfg, model=model), out


def _take(w: np.ndarray, kept: np.ndarray, unit_axis: int, group: int) -> np.ndarray:
    """w with only the kept units along its unit axis, per layer (`group` consecutive units per index)."""
    if group > 1:
        kept = (kept[..., :, None] * group + np.arange(group)).reshape(*kept.shape[:-1], -1)
    moved = np.moveaxis(w, w.ndim + unit_axis, -1)  # [*lead, ..., units]
    lead = kept.ndim - 1
    index = kept.reshape(*kept.shape[:-1], *([1] * (moved.ndim - lead - 1)), kept.shape[-1])
    return np.moveaxis(np.take_along_axis(moved, index, axis=-1), -1, w.ndim + unit_axis)
