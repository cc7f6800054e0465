"""Weights and KV caches one array per layer at the decoder's jit boundary.

The model stacks each segment's layers on a leading axis and scans them. For decoding on XLA:CPU
that costs a copy of every layer's weights per token: a dot cannot read a slice of a larger
buffer, so the scan's dynamic-slice writes each layer's matrices out before its matmuls (3x the
weights' bytes moved per token), and the scanned caches are copied into a fresh stacked output.
The decoder therefore holds one array per layer and runs the layers unrolled: inside the jitted
program `join` stacks them back for the model, and XLA folds each layer's slice of that stack to
the layer's own argument, so nothing is copied and a donated cache is updated in place. Caches
are always per layer; quantized weights stay stacked and scanned (decode.py says why).

  params: params["segments"][i]["units"] (every leaf [n, ...]) -> a list of n per-layer subtrees
  caches: caches[i][j] (KVCache [n, B, S, K, d], application j) -> caches[i][r][j] ([B, S, K, d])
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _unstack(tree) -> list:
    n = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda a: a[r], tree) for r in range(n)]


def _stack(layers: list):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


def split_params(params: dict) -> dict:
    """The model's parameters with every segment's stacked units as a list of per-layer subtrees."""
    segments = {i: {**seg, "units": _unstack(seg["units"])} for i, seg in params["segments"].items()}
    return {**params, "segments": segments}


def join_params(params: dict) -> dict:
    """split_params undone (inside a jitted program, where the stack costs nothing); parameters
    that were not split (the decoder keeps quantized weights stacked) are returned as they are."""
    segments = {i: {**seg, "units": _stack(seg["units"]) if isinstance(seg["units"], list) else seg["units"]}
                for i, seg in params["segments"].items()}
    return {**params, "segments": segments}


def split_caches(caches: list) -> list:
    """Stacked caches (one list per segment, one KVCache [n, ...] per block application) -> per
    segment, per layer, per application, one KVCache [B, S, K, d]."""
    return [[list(layer) for layer in zip(*[_unstack(c) for c in seg])] for seg in caches]


def join_caches(caches: list) -> list:
    return [[_stack([layer[j] for layer in seg]) for j in range(len(seg[0]))] for seg in caches]


def cache_length(caches: list) -> int:
    """S, the positions each row of split caches holds."""
    return caches[0][0][0].k_BSKd.shape[1]
