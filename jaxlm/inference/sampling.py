"""Sampling: greedy (temperature 0), temperature, top-k and top-p (nucleus), seeded.

`probabilities` is the distribution a token is drawn from after every filter; speculative
decoding needs it for both models, `sample` draws from it (or takes the argmax when greedy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxlm.errors import UserError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose mass reaches p

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:
            raise UserError(f"--temperature {self.temperature} must be a finite number >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k} must be >= 0 (0 = no limit)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_logits(logits_BV: jax.Array, s: Sampling) -> jax.Array:
    """f32 logits / temperature with the tokens top-k and top-p exclude set to -inf."""
    logits = logits_BV.astype(jnp.float32) / s.temperature
    if 0 < s.top_k < logits.shape[-1]:
        kth_B1 = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_B1, -jnp.inf, logits)
    if s.top_p < 1:
        sorted_BV = jnp.sort(logits, axis=-1)[..., ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        # the smallest logit still kept: tokens whose predecessors' mass is below p (the first always)
        cutoff_B1 = jnp.min(jnp.where(mass_before_BV < s.top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff_B1, -jnp.inf, logits)
    return logits


def probabilities(logits_BV: jax.Array, s: Sampling) -> jax.Array:
    """The f32 distribution `sample` draws from (one-hot at the argmax when greedy)."""
    if s.greedy:
        return jax.nn.one_hot(jnp.argmax(logits_BV, axis=-1), logits_BV.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(filtered_logits(logits_BV, s), axis=-1)


def sample(logits_BV: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """One token id per row, int32 [B]."""
    if s.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits_BV, s), axis=-1).astype(jnp.int32)
