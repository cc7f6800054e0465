"""Group relative policy optimisation (`train.objective: grpo`, Shao et al. 2024), the loss only.

A batch row is one rollout: a prompt and one of its O sampled completions, right-padded; the loss
mask covers the completion's tokens (its end-of-text too, so stopping is learned). `jaxlm/rl/`
samples the rows and fills the per-row fields: the advantage [B, T] (its completion's, on every
token: rows share the batch's [B, T] sharding), and, once per rollout batch, the log-probabilities
[B, K] of the old policy (the one that sampled; only for mu > 1) and of the reference (only for
beta > 0) over the completion window: the K = max_new_tokens columns from a row's first completion
target, the only ones projected onto the vocabulary. Per completion token, with ratio = pi / pi_old,

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


def completion_window(batch: Batch, K: int) -> tuple[jax.Array, jax.Array]:
    """The K columns from each row's first completion target on (a completion has at most K
    tokens): indices [B, K] and whether each counts (its loss mask; 0 past the row's end)."""
    T = batch.loss_mask.shape[1]
    cols_BK = jnp.argmax(batch.loss_mask > 0, axis=1)[:, None] + jnp.arange(K)[None]
    inside_BK = cols_BK < T
    cols_BK = jnp.minimum(cols_BK, T - 1)
    return cols_BK, jnp.take_along_axis(batch.loss_mask, cols_BK, axis=1) * inside_BK


def token_logps(model, batch: Batch, cols_BK, temperature: float, key=None) -> tuple[jax.Array, dict]:
    """log pi(target | inputs) [B, K] at the columns `cols_BK`, at `temperature`, and the model's aux
    metrics. Only those columns are projected onto the vocabulary."""
    logits, aux = model(batch.inputs, batch.positions, batch.segment_ids, rng=key, logits_at_BK=cols_BK)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    targets_BK = jnp.take_along_axis(batch.targets, cols_BK, axis=1)
    return jnp.take_along_axis(logp, targets_BK[..., None], axis=-1)[..., 0], aux


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
    """With mu = 1 the policy being updated is the one that sampled: old log-probs are the policy's
    own, gradient stopped (ratio 1, as TRL), so no forward pass computes them ahead; with beta = 0
    no reference is read. Rows hold only the fields that are computed."""

    def rollout_fields(self) -> tuple[str, ...]:
        """The per-token log-probs computed once per rollout batch (`rollout_logps`)."""
        g = self.cfg.grpo
        return ("old_logp",) * (g.mu > 1) + ("ref_logp",) * (g.beta > 0)

    def extra_fields(self):
        window = (self.cfg.grpo.max_new_tokens,)
        return {**{k: (window, jnp.float32) for k in self.rollout_fields()},
                "advantage": ((self.cfg.data.seq_len,), jnp.float32)}

    @property
    def keeps_copy(self) -> bool:
        return super().keeps_copy and self.cfg.grpo.beta > 0

    def rollout_logps(self, model, batch: Batch, frozen) -> dict:
        """What the sampling policy and the reference give the rollouts, once per rollout batch:
        {"old_logp", "ref_logp"} [B, K] (the completion window), each where `rollout_fields` has it."""
        g, fields, out = self.cfg.grpo, self.rollout_fields(), {}
        cols_BK, _ = completion_window(batch, g.max_new_tokens)
        if "old_logp" in fields:
            out["old_logp"] = jax.lax.stop_gradient(token_logps(model, batch, cols_BK, g.temperature)[0])
        if "ref_logp" in fields:
            out["ref_logp"] = token_logps(self.reference(model, frozen), batch, cols_BK, g.temperature)[0]
        return out

    def terms(self, model, batch: Batch, key, frozen) -> tuple[dict, dict]:
        g, e = self.cfg.grpo, batch.extra
        cols_BK, mask_BK = completion_window(batch, g.max_new_tokens)
        logp, aux = token_logps(model, batch, cols_BK, g.temperature, key)
        own = jax.lax.stop_gradient(logp)
        old, ref = e.get("old_logp", own), e.get("ref_logp", own)  # absent: mu = 1, beta = 0 (KL 0)
        advantage = jnp.take_along_axis(e["advantage"], cols_BK, axis=1)
        terms = grpo_terms(logp, old, ref, advantage, g.clip_low, g.clip_high, g.beta)
        mask = mask_BK.astype(jnp.float32)
        return {k: jnp.sum(v * mask) for k, v in terms.items()}, aux

    def loss(self, model, batch, key, frozen):
        sums, aux = self.terms(model, batch, key, frozen)
        return sums["loss"], sums, aux

    def eval_sums(self, model, batch, frozen):
        sums, _ = self.terms(model, batch, None, frozen)
        return {"loss_sum": sums["loss"], "count": self.count(batch)}
