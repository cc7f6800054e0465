"""Autoregressive next-token prediction: cross-entropy on the targets (and PaLM's z-loss)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.objectives.base import Objective, forward


class NextToken(Objective):
    """Autoregressive cross-entropy on the targets, plus PaLM's z-loss when train.z_loss_coef > 0."""

    def loss(self, model, batch, key, frozen):
        logits, aux = forward(model, batch, key)
        sums = next_token_loss(logits, batch.targets, batch.loss_mask, self.cfg.train.z_loss_coef)
        return sums["ce_sum"] + sums["z_sum"], {"loss": sums["ce_sum"]}, aux

    def eval_sums(self, model, batch, frozen):
        logits, _ = forward(model, batch)
        sums = next_token_loss(logits, batch.targets, batch.loss_mask)
        return {"loss_sum": sums["ce_sum"], "count": sums["count"]}


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
