"""The preallocated KV cache: one KVCache [B, S, K, d] per layer and block application (per
segment, per layer, per application: the decoder's per-layer layout, per_layer.py), batch sharded
over the data axes and kv heads over tensor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from jaxlm.config import ModelConfig, MoEConfig
from jaxlm.model.attention import KVCache
from jaxlm.model.ops import dtype_of
from jaxlm.model.transformer import layer_plan
from jaxlm.parallel.sharding import spec_for

CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")


def cache_shapes(cfg: ModelConfig, moe: MoEConfig, batch: int, length: int) -> list[list[tuple[int, ...]]]:
    """Per segment, one [n_units, B, S, K, d] shape per application of a block of its unit (each
    block is applied model.share_blocks times)."""
    return [[(n, batch, length, cfg.n_kv_heads, cfg.head_dim)] * (len(kinds) * cfg.share_blocks)
            for kinds, n in layer_plan(cfg, moe)]


def init_caches(cfg: ModelConfig, moe: MoEConfig, batch: int, length: int, mesh: Mesh, rules: dict) -> list:
    """Zeroed caches for `batch` rows of `length` positions, in the compute dtype, placed by the
    rules: caches[segment][layer][application], each a KVCache [B, S, K, d]."""
    dtype = dtype_of(cfg.compute_dtype)

    def zeros(shape):
        sharding = NamedSharding(mesh, spec_for(shape, CACHE_AXES, mesh, rules))
        return jnp.zeros(shape, dtype, device=sharding)

    return [[[KVCache(zeros(s[1:]), zeros(s[1:])) for s in unit] for _ in range(unit[0][0])]
            for unit in cache_shapes(cfg, moe, batch, length)]


def cache_bytes(caches) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(caches))


def bucket(length: int, multiple: int = 64) -> int:
    """Cache lengths are rounded up so that nearby lengths share one compiled program."""
    return -(-length // multiple) * multiple
