"""Group relative policy optimisation (`train.objective: grpo`, Shao et al. 2024), the loss only.

A batch row is one rollout: a prompt and one of its O sampled completions, right-padded; the loss
mask covers the completion's tokens (its end-of-text too, so stopping is learned). `jaxlm/rl/`
samples the rows and fills the per-token fields [B, T]: the advantage (its completion's, on every
token: rows share the batch's [B, T] sharding), and the log-probabilities of the
old policy (the one that sampled, computed once per rollout batch) and of the reference. Per
completion token, with ratio = pi / pi_old,

    loss = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) + beta * k3,
    k3   = ref / pi - log(ref / pi) - 1   (Schulman's unbiased, non-negative KL estimator)

averaged over every completion token of the batch (token-mean, as DAPO and Dr. GRPO). Log-probs
are of the sampling distribution (logits / temperature, as TRL). Advantages are per group of O
completions of one prompt: (r - mean) / (std + 1e-4), or r - mean (Dr. GRPO).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data.batch import Batch
from jaxlm.objectives.base import forward
from jaxlm.objectives.reference import WithReference

ADVANTAGE_EPS = 1e-4


def group_advantages(rewards_JO, normalise: str = "std") -> np.ndarray:
    """Advantages [J, O] of J prompts' groups of O completions' rewards, each against its own group only
    (the sample std, ddof=1, as TRL and DeepSeekMath's implementation)."""
    r = np.asarray(rewards_JO, np.float64)
    equal = np.ptp(r, axis=1, keepdims=True) == 0  # exactly no advantage (a float mean can miss by an ulp)
    centred = np.where(equal, 0.0, r - r.mean(axis=1, keepdims=True))
    if normalise == "none":
        return centred.astype(np.float32)
    return (centred / (r.std(axis=1, ddof=1, keepdims=True) + ADVANTAGE_EPS)).astype(np.float32)


def token_logps(model, batch: Batch, temperature: float, key=None) -> tuple[jax.Array, dict]:
    """log pi(target | inputs) per position [B, T] at `temperature`, and the model's aux metrics."""
    logits, aux = forward(model, batch, key)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.take_along_axis(logp, batch.targets[..., None], axis=-1)[..., 0], aux


def grpo_terms(logp_BT, old_BT, ref_BT, adv_BT, clip_low: float, clip_high: float, beta: float) -> dict:
    """Per-token loss, k3 KL and clipping indicator [B, T] (the mask is applied by the caller)."""
    ratio = jnp.exp(logp_BT - old_BT)
    adv = adv_BT
    clipped = jnp.clip(ratio, 1 - clip_low, 1 + clip_high)
    policy = -jnp.minimum(ratio * adv, clipped * adv)
    log_ref_ratio = ref_BT - logp_BT
    kl = jnp.exp(log_ref_ratio) - log_ref_ratio - 1
    was_clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
    return {"loss": policy + beta * kl, "kl": kl, "clip_fraction": was_clipped.astype(jnp.float32)}


class GRPO(WithReference):
    def extra_fields(self):
        row = (self.cfg.data.seq_len,)
        return {"old_logp": (row, jnp.float32), "ref_logp": (row, jnp.float32), "advantage": (row, jnp.float32)}

    @property
    def keeps_copy(self) -> bool:
        return super().keeps_copy and self.cfg.grpo.beta > 0

    def rollout_logps(self, model, batch: Batch, frozen) -> dict:
        """What the sampling policy and the reference give the rollouts, once per rollout batch:
        {"old_logp", "ref_logp"} [B, T] (ref_logp = old_logp when beta = 0: no reference is read)."""
        t = self.cfg.grpo.temperature
        old, _ = token_logps(model, batch, t)
        ref = token_logps(self.reference(model, frozen), batch, t)[0] if self.cfg.grpo.beta > 0 else old
        return {"old_logp": jax.lax.stop_gradient(old), "ref_logp": ref}

    def terms(self, model, batch: Batch, key, frozen) -> tuple[dict, dict]:
        g, e = self.cfg.grpo, batch.extra
        logp, aux = token_logps(model, batch, g.temperature, key)
        terms = grpo_terms(logp, e["old_logp"], e["ref_logp"], e["advantage"], g.clip_low, g.clip_high, g.beta)
        mask = batch.loss_mask.astype(jnp.float32)
        return {k: jnp.sum(v * mask) for k, v in terms.items()}, aux

    def loss(self, model, batch, key, frozen):
        sums, aux = self.terms(model, batch, key, frozen)
        return sums["loss"], sums, aux

    def eval_sums(self, model, batch, frozen):
        sums, _ = self.terms(model, batch, None, frozen)
        return {"loss_sum": sums["loss"], "count": self.count(batch)}
