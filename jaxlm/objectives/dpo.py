"""Direct preference optimisation (`train.objective: dpo`, Rafailov et al. 2023).

Per pair (prompt x, chosen y_w, rejected y_l), with log-probabilities summed over the reply's
tokens (the loss mask: the assistant turn the chat template renders),

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

The reference is the frozen starting policy (`reference.py`: under LoRA the base model without its
adapters, else a copy of the starting parameters).

A batch row holds one pair: the chosen sequence in the core fields, the rejected one in `extra`.
Metrics are per pair: the loss, the reward margin beta * (logratio_w - logratio_l), the
preference accuracy (margin > 0) and the two implicit rewards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.data.batch import Batch
from jaxlm.objectives.base import forward
from jaxlm.objectives.reference import WithReference

REJECTED = ("rejected_inputs", "rejected_targets", "rejected_mask")


def dpo_terms(pol_w, pol_l, ref_w, ref_l, beta: float) -> dict:
    """Per-pair DPO loss, margin and implicit rewards from summed log-probabilities [P]."""
    reward_w, reward_l = beta * (pol_w - ref_w), beta * (pol_l - ref_l)
    margin = reward_w - reward_l
    return {"loss": -jax.nn.log_sigmoid(margin), "reward_margin": margin,
            "pref_accuracy": (margin > 0).astype(jnp.float32), "reward_chosen": reward_w, "reward_rejected": reward_l}


def sequence_logps(model, batch: Batch, key=None) -> tuple[jax.Array, jax.Array, dict]:
    """(chosen, rejected) log-probabilities [B] summed over each masked reply, one forward pass over
    both, and the model's aux metrics."""
    e = batch.extra
    both = Batch(inputs=jnp.concatenate([batch.inputs, e["rejected_inputs"]]),
                 targets=jnp.concatenate([batch.targets, e["rejected_targets"]]),
                 loss_mask=jnp.concatenate([batch.loss_mask, e["rejected_mask"]]))
    logits, aux = forward(model, both, key)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_BT = jnp.take_along_axis(logp, both.targets[..., None], axis=-1)[..., 0]
    seq_B = jnp.sum(token_BT * both.loss_mask.astype(jnp.float32), axis=-1)
    return seq_B[: batch.rows], seq_B[batch.rows:], aux


class DPO(WithReference):
    def extra_fields(self):
        return {k: ((self.cfg.data.seq_len,), jnp.int32) for k in REJECTED}

    def count(self, batch: Batch) -> jax.Array:
        """Pairs (rows with a reply to score)."""
        return jnp.sum(jnp.any(batch.loss_mask > 0, axis=-1).astype(jnp.float32))

    def terms(self, model, batch: Batch, key, frozen) -> tuple[dict, dict, jax.Array]:
        pol_w, pol_l, aux = sequence_logps(model, batch, key)
        ref_w, ref_l, _ = sequence_logps(self.reference(model, frozen), batch)
        valid = jnp.any(batch.loss_mask > 0, axis=-1).astype(jnp.float32)
        terms = dpo_terms(pol_w, pol_l, ref_w, ref_l, self.cfg.dpo.beta)  # no gradient: reference() stops it
        return terms, aux, valid

    def loss(self, model, batch, key, frozen):
        terms, aux, valid = self.terms(model, batch, key, frozen)
        sums = {k: jnp.sum(v * valid) for k, v in terms.items()}
        return sums["loss"], sums, aux

    def eval_sums(self, model, batch, frozen):
        terms, _, valid = self.terms(model, batch, None, frozen)
        return {"loss_sum": jnp.sum(terms["loss"] * valid), "count": jnp.sum(valid)}
