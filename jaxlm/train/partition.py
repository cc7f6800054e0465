"""Which parameters are trained: one partition of the model's parameter tree into (trainable, frozen).

The train step's state holds only the trainable part (so the optimizer state is sized by it); the
frozen part travels in the step's `frozen` argument, read but never updated. A leaf is frozen whole
when its path ('segments/0/units/blocks/0/attn/wq_DHd') matches one of `train.freeze` (regular
expressions, searched), or in part: `train.freeze_layers: N` freezes the rows of the first N
transformer layers in every layer-stacked leaf, which is split along its layer axis (the rows
are joined again inside the step, before the model runs).

With `lora.rank > 0` every leaf outside the LoRA adapters is frozen (model/lora.py), and with
`lora.quantize` (QLoRA) the frozen matrices are *held* quantized by a jaxlm/compress scheme (int8
per channel, or 4-bit in groups): the step reads them through their `.project` (dequantized in the
matmul). A checkpoint gets them dequantized, which re-quantizes to the same bytes (a symmetric
scheme maps each group's largest weight to -2^(bits-1), so the dequantized copy gives the same
scale back), so a resumed run holds exactly what the uninterrupted one held.

`lora.trainable_tokens` (peft's trainable_token_indices) trains chosen rows of frozen leaves: the
listed tokens' rows of the input embedding and of the untied output head. The trainable half holds
those rows alone ([n, D] or [D, n]); the frozen half holds the whole leaf, whose rows the step
overwrites with the trained ones (so a checkpoint holds the leaf with its trained rows).

With nothing frozen the partition is the identity: no leaf moves and the step is unchanged.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm.compress.quantize import quantize, quantized_weights
from jaxlm.compress.schemes import SCHEMES
from jaxlm.config import Config, ConfigError
from jaxlm.model.lora import is_adapter
from jaxlm.model.transformer import layer_plan
from jaxlm.parallel.sharding import resolve_rules, spec_for

Tree = dict  # a nested dict of arrays (nnx.to_pure_dict)
TOKEN_AXES = {"embed/table_VD": 0, "lm_head_DV": 1}  # leaves with a vocabulary axis: which one


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
    """frozen_leaves: paths (key tuples) frozen whole; frozen_rows: path -> n, its rows [0, n) frozen;
    held: frozen leaves held quantized, path -> (first input dim, input dims, transposed, logical
    axes of the quantized arrays, dtype) as `compress.quantized_weights` gives them; scheme: the
    compress scheme they are held in; rules: the logical-axis rules that place them."""

    frozen_leaves: frozenset = frozenset()
    frozen_rows: dict = field(default_factory=dict)
    held: dict = field(default_factory=dict)
    scheme: str = "int8"
    rules: dict = field(default_factory=dict)
    token_rows: dict = field(default_factory=dict)  # path -> (vocab axis, token ids): those rows trained

    @property
    def trivial(self) -> bool:
        return not self.frozen_leaves and not self.frozen_rows and not self.token_rows

    def split(self, params: Tree) -> tuple[Tree, Tree]:
        """(trainable, frozen) halves of a full parameter tree (or of a tree of its shardings or
        shapes: a leaf split by rows must then be an array or ShapeDtypeStruct)."""
        if self.trivial:
            return params, {}
        trainable, frozen = {}, {}
        for path, leaf in flatten(params).items():
            if path in self.held:
                frozen[path] = self._hold(leaf, *self.held[path][:4])
            elif path in self.frozen_leaves:
                frozen[path] = leaf
            elif path in self.frozen_rows:
                n = self.frozen_rows[path]
                frozen[path], trainable[path] = _rows(leaf, 0, n), _rows(leaf, n, None)
            elif path in self.token_rows:
                frozen[path], trainable[path] = leaf, _token_rows(leaf, *self.token_rows[path])
            else:
                trainable[path] = leaf
        return unflatten(trainable), unflatten(frozen)

    def merge(self, trainable: Tree, frozen: Tree, held: bool = True) -> Tree:
        """The full parameter tree again (inside the step: rows are concatenated); held=False gives
        held leaves back as arrays of their dtype (what a checkpoint keeps)."""
        if self.trivial:
            return trainable
        flat, frozen_flat = flatten(trainable), flatten(frozen)
        for path, leaf in frozen_flat.items():
            if path in self.frozen_rows:
                flat[path] = jnp.concatenate([leaf, flat[path]])
            elif path in self.token_rows:
                axis, ids = self.token_rows[path]
                index = (slice(None),) * axis + (jnp.asarray(ids),)
                flat[path] = leaf.at[index].set(flat[path].astype(leaf.dtype))
            else:
                flat[path] = leaf
        for path in self.held if not held else ():
            flat[path] = flat[path].dequantize().astype(self.held[path][4])
        return unflatten(flat)

    def _hold(self, leaf, first_in: int, n_in: int, transposed: bool, axes: tuple):
        """The quantized form of a frozen leaf (an array, or a ShapeDtypeStruct); on a mesh its codes
        and scales are placed by the logical axes they carry, as decoding places them."""
        fn = functools.partial(quantize, scheme=SCHEMES[self.scheme], first_in=first_in, n_in=n_in,
                               transposed=transposed, axes=axes)
        sharding = getattr(leaf, "sharding", None)
        shapes = jax.eval_shape(fn, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        out = None
        if isinstance(sharding, NamedSharding):
            mesh = sharding.mesh
            out = jax.tree.map(lambda s: NamedSharding(mesh, spec_for(s.shape, axes, mesh, self.rules)), shapes)
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return shapes if out is None else jax.tree.map(
                lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, out)
        return jax.jit(fn, out_shardings=out)(leaf)


def _rows(leaf, start: int, stop: int | None):
    """Rows [start, stop) of an array, or the same slice of a ShapeDtypeStruct; a sharding is kept."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        n = leaf.shape[0] if stop is None else stop
        return jax.ShapeDtypeStruct((n - start, *leaf.shape[1:]), leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.sharding.Sharding):
        return leaf
    return leaf[start:stop]


def _token_rows(leaf, axis: int, ids: tuple):
    """The rows `ids` along `axis` of an array (or the same of a ShapeDtypeStruct, or a sharding):
    a few rows, replicated."""
    sharding = getattr(leaf, "sharding", leaf if isinstance(leaf, jax.sharding.Sharding) else None)
    replicated = NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else sharding
    if isinstance(leaf, jax.sharding.Sharding):
        return replicated
    if isinstance(leaf, jax.ShapeDtypeStruct):
        shape = list(leaf.shape)
        shape[axis] = len(ids)
        return jax.ShapeDtypeStruct(tuple(shape), leaf.dtype, sharding=replicated)
    return jnp.take(leaf, jnp.asarray(ids), axis=axis)


def make_partition(cfg: Config, abstract_params: Tree) -> Partition:
    """The partition `train.freeze`, `train.freeze_layers` and `lora` ask for; a pattern that matches
    no parameter, or a freeze that leaves nothing to train, is a one-line ConfigError."""
    t = cfg.train
    flat = flatten(abstract_params)
    paths = list(flat)
    frozen = {p for p in paths if not is_adapter(p)} if cfg.lora.rank else set()
    if cfg.lora.rank and len(frozen) == len(paths):
        raise ConfigError(f"lora.targets={cfg.lora.targets} (experts: {cfg.lora.experts}) adapt no projection of "
                          "this model")
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
    token_rows = {}
    if cfg.lora.rank and cfg.lora.trainable_tokens:
        ids = tuple(cfg.lora.trainable_tokens)
        token_rows = {p: (TOKEN_AXES[path_name(p)], ids) for p in frozen if path_name(p) in TOKEN_AXES}
        frozen -= set(token_rows)
    held = {}
    if cfg.lora.rank and cfg.lora.quantize != "none":
        matrices = quantized_weights(cfg)
        held = {p: (*matrices[p], flat[p].dtype) for p in frozen if p in matrices}
    return Partition(frozenset(frozen), rows, held, cfg.lora.quantize, resolve_rules(cfg.mesh.rules), token_rows)
