"""Training objectives. Losses are returned as sums with a token count so that microbatches
and data-parallel shards combine into the exact global mean."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.config import MoEConfig


def next_token_loss(logits_BTV, targets_BT, mask_BT, z_loss_coef: float = 0.0) -> dict:
    """Cross-entropy (f32, via logsumexp) and the z-loss (PaLM: coef * logsumexp^2), summed over
    unmasked tokens. Returns {"ce_sum", "z_sum", "count"}."""
    logits = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    mask = mask_BT.astype(jnp.float32)
    return {
        "ce_sum": jnp.sum((lse_BT - target_logit_BT) * mask),
        "z_sum": z_loss_coef * jnp.sum(lse_BT**2 * mask),
        "count": jnp.sum(mask),
    }


def moe_loss(aux: dict, moe: MoEConfig) -> jax.Array:
    """MoE auxiliary losses, averaged over MoE layers so the coefficients do not depend on depth:
    aux_loss_coef * load-balancing loss + z_loss_coef * router z-loss."""
    total = jnp.zeros((), jnp.float32)
    if "moe_aux_loss" in aux:
        total += moe.aux_loss_coef * jnp.mean(aux["moe_aux_loss"])
    if "moe_z_loss" in aux:
        total += moe.z_loss_coef * jnp.mean(aux["moe_z_loss"])
    return total
