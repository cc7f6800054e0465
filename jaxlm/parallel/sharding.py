"""Logical axis names -> mesh axes, from one rules table.

Parameters carry logical names in their `axes` metadata (`nnx.Param(v, axes=("embed", "mlp"))`),
activations get them through `constrain(x, ("batch", "length", "embed"))`. `spec_for` turns names
into a PartitionSpec with two general rules:
  * a mesh axis is used at most once per array: the first dimension that asks for it gets it
    (so x_BTD shards its batch over `fsdp` and leaves `embed` whole, while w_DF shards `embed`);
  * a dimension whose size the mesh axes do not divide stays unsharded on those axes.
Leading dimensions without names (the stacked-layer axis of scanned blocks) are never sharded.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

DEFAULT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp", "expert"),
    "length": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "expert": "expert",
    "expert_mlp": "tensor",
}


def resolve_rules(overrides: dict[str, Any] | None = None) -> dict[str, tuple[str, ...]]:
    from jaxlm.errors import ConfigError

    for name in overrides or {}:
        if name not in DEFAULT_RULES:  # a typo would otherwise shard nothing, silently
            raise ConfigError(f"mesh.rules.{name}: no such logical axis; expected one of {', '.join(DEFAULT_RULES)}")
    rules = {**DEFAULT_RULES, **(overrides or {})}
    out = {}
    for name, target in rules.items():
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        for axis in axes:
            if axis not in MESH_AXES:
                raise ConfigError(f"mesh.rules.{name}={target!r} names unknown mesh axis {axis!r}; expected {MESH_AXES}")
        out[name] = axes
    return out


def spec_for(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh, rules: dict) -> PartitionSpec:
    lead = len(shape) - len(axes)
    used: set[str] = set()
    spec: list[Any] = [None] * lead
    for size, name in zip(shape[lead:], axes):
        chosen = []
        for axis in rules.get(name, ()) if name else ():
            n = mesh.shape[axis]
            if axis in used or n == 1:
                continue
            if size % (n * _prod(mesh.shape[a] for a in chosen)):
                continue
            chosen.append(axis)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return PartitionSpec(*spec)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: dict):
    """NamedShardings for a (pure-dict) parameter tree, from each Param's `axes` metadata."""

    def one(var):
        axes = var.get_metadata().get("axes", ())
        return NamedSharding(mesh, spec_for(var.shape, axes, mesh, rules))

    return nnx.to_pure_dict(jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


# Parameters at least this large should be split by fsdp; smaller ones (norm scales, biases) may
# stay whole on every device at little cost.
LARGE_PARAM_ELEMENTS = 2**14


def underused_fsdp(abstract_state: nnx.State, mesh: Mesh, rules: dict) -> list[str]:
    """Warns once (and returns the lines) for each large parameter that a rule asks to shard over
    `fsdp` but stays whole because the axis does not divide its dimension: with fsdp > 1 every
    device then holds all of it (MaxText's assert_params_sufficiently_sharded, as a warning)."""
    n = mesh.shape.get("fsdp", 1)
    if n == 1:
        return []
    found = []
    flat = nnx.to_flat_state(abstract_state)
    for path, var in flat:
        axes = var.get_metadata().get("axes", ())
        if math.prod(var.shape) < LARGE_PARAM_ELEMENTS:
            continue
        spec = spec_for(var.shape, axes, mesh, rules)
        if any("fsdp" in _entries(e) for e in spec):
            continue
        lead = len(var.shape) - len(axes)
        wanted = [(name, var.shape[lead + i]) for i, name in enumerate(axes) if name and "fsdp" in rules.get(name, ())]
        if wanted:
            name, size = wanted[0]
            found.append(f"parameter {'.'.join(map(str, path))} {tuple(var.shape)} is not sharded over fsdp={n}: "
                         f"its '{name}' dimension ({size}) is not divisible by {n}")
    for line in found:
        if line not in _WARNED:
            _WARNED.add(line)
            print(f"jaxlm: warning: {line}; every device holds a full copy", file=sys.stderr)
    return found


_WARNED: set[str] = set()


def _entries(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


# -------------------------------------------------------------- activation constraints

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("jaxlm_sharding", default=None)


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules: dict):
    """While tracing under this context, `constrain` pins activations to the mesh."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh_rules() -> tuple[Mesh, dict] | None:
    """The (mesh, rules) of the enclosing `use_mesh_rules`, or None outside one (e.g. a model
    called eagerly on one device). Code that places work per device (MoE's shard_map) reads it."""
    return _ACTIVE.get()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(x.shape, axes, mesh, rules)))


def unshard(x: jax.Array, axes: Sequence[str | None], whole: Sequence[str]) -> jax.Array:
    """`x` (logical `axes`) with the dimensions named in `whole` gathered whole, the others as
    the rules split them. No constraint where that is how `x` is split already, so programs
    whose mesh does not split those dimensions are unchanged."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = spec_for(x.shape, [None if a in whole else a for a in axes], mesh, rules)
    if spec == spec_for(x.shape, axes, mesh, rules):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, rules: dict, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] input array: batch over the data-parallel axes."""
    axes = tuple(a for a in rules.get("batch", ()) if mesh.shape[a] > 1)
    first = axes if len(axes) > 1 else (axes[0] if axes else None)
    return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))
