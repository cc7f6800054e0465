"""Which parameters are trained: one partition of the model's parameter tree into (trainable, frozen).

The train step's state holds only the trainable part (so the optimizer state is sized by it); the
frozen part travels in the step's `frozen` argument, read but never updated. A leaf is frozen whole
when its path ('segments/0/units/blocks/0/attn/wq_DHd') matches one of `train.freeze` (regular
expressions, searched), or in part: `train.freeze_layers: N` freezes the rows of the first N
transformer layers in every layer-stacked leaf, which is split along its layer axis (the rows
are joined again inside the step, before the model runs).

With nothing frozen the partition is the identity: no leaf moves and the step is unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from jaxlm.config import Config, ConfigError
from jaxlm.model.transformer import layer_plan

Tree = dict  # a nested dict of arrays (nnx.to_pure_dict)


def flatten(tree: Tree, prefix: tuple = ()) -> dict[tuple, object]:
    """{(key, ...): leaf} of a nested dict (keys as they are: layer stacks have int keys)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def unflatten(flat: dict[tuple, object]) -> Tree:
    out: Tree = {}
    for path, v in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return out


def path_name(path: tuple) -> str:
    """'segments/0/units/blocks/0/attn/wq_DHd': what train.freeze patterns are searched in."""
    return "/".join(str(k) for k in path)


def layer_rows(cfg: Config) -> dict[str, list[int]]:
    """For each layer-stacked block 'segments/s/units/blocks/j', the transformer layer of each row."""
    out, offset = {}, 0
    for s, (unit, repeats) in enumerate(layer_plan(cfg.model, cfg.moe)):
        for j in range(len(unit)):
            out[f"segments/{s}/units/blocks/{j}"] = [offset + r * len(unit) + j for r in range(repeats)]
        offset += len(unit) * repeats
    return out


@dataclass(frozen=True)
class Partition:
    """frozen_leaves: paths (key tuples) frozen whole; frozen_rows: path -> n, its rows [0, n) frozen."""

    frozen_leaves: frozenset = frozenset()
    frozen_rows: dict = field(default_factory=dict)

    @property
    def trivial(self) -> bool:
        return not self.frozen_leaves and not self.frozen_rows

    def split(self, params: Tree) -> tuple[Tree, Tree]:
        """(trainable, frozen) halves of a full parameter tree (or of a tree of its shardings or
        shapes: a leaf split by rows must then be an array or ShapeDtypeStruct)."""
        if self.trivial:
            return params, {}
        trainable, frozen = {}, {}
        for path, leaf in flatten(params).items():
            if path in self.frozen_leaves:
                frozen[path] = leaf
            elif path in self.frozen_rows:
                n = self.frozen_rows[path]
                frozen[path], trainable[path] = _rows(leaf, 0, n), _rows(leaf, n, None)
            else:
                trainable[path] = leaf
        return unflatten(trainable), unflatten(frozen)

    def merge(self, trainable: Tree, frozen: Tree) -> Tree:
        """The full parameter tree again (inside the step: rows are concatenated)."""
        if self.trivial:
            return trainable
        flat, frozen_flat = flatten(trainable), flatten(frozen)
        for path, leaf in frozen_flat.items():
            flat[path] = jnp.concatenate([leaf, flat[path]]) if path in self.frozen_rows else leaf
        return unflatten(flat)


def _rows(leaf, start: int, stop: int | None):
    """Rows [start, stop) of an array, or the same slice of a ShapeDtypeStruct; a sharding is kept."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        n = leaf.shape[0] if stop is None else stop
        return jax.ShapeDtypeStruct((n - start, *leaf.shape[1:]), leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.sharding.Sharding):
        return leaf
    return leaf[start:stop]


def make_partition(cfg: Config, abstract_params: Tree) -> Partition:
    """The partition `train.freeze` and `train.freeze_layers` ask for; a pattern that matches no
    parameter, or a freeze that leaves nothing to train, is a one-line ConfigError."""
    t = cfg.train
    paths = list(flatten(abstract_params))
    frozen = set()
    for pattern in t.freeze:
        hits = {p for p in paths if re.search(pattern, path_name(p))}
        if not hits:
            raise ConfigError(f"train.freeze: {pattern!r} matches no parameter; the parameters are "
                              f"{', '.join(map(path_name, paths))}")
        frozen |= hits
    rows = {}
    if t.freeze_layers:
        for block, layers in layer_rows(cfg).items():
            n = sum(layer < t.freeze_layers for layer in layers)
            for p in paths:
                if path_name(p).startswith(block + "/") and p not in frozen and n:
                    if n == len(layers):
                        frozen.add(p)
                    else:
                        rows[p] = n
    if len(frozen) == len(paths):
        raise ConfigError("train.freeze and train.freeze_layers freeze every parameter; nothing would be trained")
    return Partition(frozenset(frozen), rows)
