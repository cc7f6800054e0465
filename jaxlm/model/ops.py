"""Small operations the layers and the kernels both use: below both, so neither imports the other."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout: zero a `rate` share of x and scale the rest by 1/(1-rate). A None key
    (evaluation, generation, export) or rate 0 leaves x untouched."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
