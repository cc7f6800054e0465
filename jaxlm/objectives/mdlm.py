"""Masked diffusion LM (MDLM, Sahoo et al. 2024): `train.objective: mdlm`.

The forward process masks each token of a clean sequence x0 independently with probability
1 - alpha_t, into the absorbing `<|mask|>` state (id `model.vocab_size - 1`, reserved: the
tokenizer must leave it free). A bidirectional model (model.causal=false) predicts x0 from x_t
with the SUBS parameterisation: the mask token is never predicted (its logit is -inf) and
unmasked positions copy their input, so only masked positions carry loss. The continuous-time
negative ELBO is

    E_t [ -alpha'_t / (1 - alpha_t) * sum_{masked i} -log p(x0_i | x_t) ]

per token, which bounds the next-token NLL from above: exp(bound) bounds the perplexity.

t is drawn per sequence (per packed document: each document gets its own t, and attention stays
inside it through the segment ids) from U(t_min, 1), stratified across the batch so the bound's
estimate has low variance. Evaluation averages `diffusion.eval_t_samples` evenly spread t per
sequence, drawn from a key fixed by the seed and the batch, so repeated evaluations agree.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxlm.config import Config, ConfigError, DiffusionConfig
from jaxlm.data.batch import Batch
from jaxlm.objectives.base import Objective, forward

MASK = "<|mask|>"
LOGLINEAR_EPS = 1e-3  # MDLM's log-linear schedule leaves this fraction unmasked at t = 1
GOLDEN = (math.sqrt(5) - 1) / 2  # additive-recurrence offset between documents of one row


def mask_id(vocab_size: int) -> int:
    """The `<|mask|>` id: the last slot of the model's vocabulary."""
    return vocab_size - 1


# ----------------------------------------------------------------------------- schedules


def alpha(schedule: str, t):
    """alpha_t, the probability that a token is still clean at time t in [0, 1]."""
    if schedule == "linear":
        return 1.0 - t
    if schedule == "loglinear":  # MDLM's default: sigma(t) = -log(1 - (1 - eps) t), alpha = exp(-sigma)
        return 1.0 - (1.0 - LOGLINEAR_EPS) * t
    if schedule == "cosine":
        return jnp.cos(0.5 * jnp.pi * t)
    raise ValueError(f"unknown schedule {schedule!r}")


def elbo_weight(schedule: str, t):
    """-alpha'_t / (1 - alpha_t), the weight of a masked token's cross-entropy at time t."""
    a, da = jax.jvp(lambda s: alpha(schedule, s), (t,), (jnp.ones_like(t),))
    return -da / (1.0 - a)


# ----------------------------------------------------------------------------- the forward process


def sample_t(key, rows: int, segment_ids_BT, d: DiffusionConfig, offset=0.0):
    """t [B, T] in [t_min, 1): one draw per (row, document). Low discrepancy: row b takes
    u + b/B (mod 1) for one uniform u, the n-th document of a row adds n * golden ratio."""
    seg_BT = jnp.zeros((rows, 1), jnp.int32) if segment_ids_BT is None else segment_ids_BT
    if d.low_discrepancy:
        u_B = jax.random.uniform(key, ()) + jnp.arange(rows) / rows
        u_BT = jnp.mod(u_B[:, None] + GOLDEN * seg_BT + offset, 1.0)
    else:
        u_BS = jax.random.uniform(key, (rows, seg_BT.shape[1] + 1))
        u_BT = jnp.mod(jnp.take_along_axis(u_BS, seg_BT, axis=1) + offset, 1.0)
    return jnp.broadcast_to(d.t_min + (1.0 - d.t_min) * u_BT, (rows, seg_BT.shape[1]))


def mask_tokens(key, x0_BT, t_BT, schedule: str, mask: int):
    """(x_t, masked): each token replaced by `mask` with probability 1 - alpha_t."""
    masked_BT = jax.random.uniform(key, x0_BT.shape) < 1.0 - alpha(schedule, t_BT)
    return jnp.where(masked_BT, mask, x0_BT), masked_BT


def subs_logits(logits_BTV, mask: int):
    """SUBS: the mask token gets zero probability (logit -inf)."""
    return logits_BTV.astype(jnp.float32).at[..., mask].set(-jnp.inf)


class MDLM(Objective):
    """The MDLM continuous-time ELBO, per token; eval_loss is the bound on the NLL per token."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.mask = mask_id(cfg.model.vocab_size)
        _check_mask_room(cfg)

    def nelbo_BT(self, model, batch: Batch, key, t_BT, rng=None) -> tuple[jax.Array, jax.Array, dict]:
        """(per-token weighted cross-entropy [B, T], 0 where not masked or not scored; the scored
        mask [B, T]; the model's aux metrics)."""
        # x0 is the token sequence itself: the inputs hold every token once (packed rows: each
        # document whole, <|endoftext|> included), the target-side fields are not read
        x0_BT = batch.inputs
        x_t, masked_BT = mask_tokens(key, x0_BT, t_BT, self.cfg.diffusion.schedule, self.mask)
        logits, aux = forward(model, batch, rng, inputs=x_t)
        logits = subs_logits(logits, self.mask)
        ce_BT = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, x0_BT[..., None], -1)[..., 0]
        scored_BT = masked_BT & batch.token_mask()  # padding is never scored
        weighted_BT = jnp.where(scored_BT, elbo_weight(self.cfg.diffusion.schedule, t_BT) * ce_BT, 0.0)
        return weighted_BT, scored_BT, aux

    def count(self, batch: Batch) -> jax.Array:
        """The sequences' real tokens (the bound is per input token, not per next-token target)."""
        if batch.segment_ids is None:  # rows of one piece of text: real where the loss mask is 1
            return super().count(batch)
        return jnp.sum(batch.token_mask().astype(jnp.float32))

    def nelbo_sum(self, model, batch: Batch, key, t_BT, rng=None) -> tuple[jax.Array, dict, dict]:
        """(the bound summed over tokens, {mask_rate: masked tokens}, aux)."""
        weighted_BT, scored_BT, aux = self.nelbo_BT(model, batch, key, t_BT, rng)
        return jnp.sum(weighted_BT), {"mask_rate": jnp.sum(scored_BT.astype(jnp.float32))}, aux

    def loss(self, model, batch, key, frozen):
        if key is None:  # deterministic callers (gradient checks across meshes) get the eval noise
            key = eval_key(self.cfg.train.seed, batch)
        t_key, mask_key, model_key = jax.random.split(key, 3)
        t_BT = sample_t(t_key, batch.rows, batch.segment_ids, self.cfg.diffusion)
        total, sums, aux = self.nelbo_sum(model, batch, mask_key, t_BT, model_key)
        return total, {"loss": total, **sums}, aux

    def eval_sums(self, model, batch, frozen):
        n = self.cfg.diffusion.eval_t_samples
        t_key, key = jax.random.split(eval_key(self.cfg.train.seed, batch))

        def one(total, k):
            # the k-th of n evenly spread t per document: u + k/n (mod 1), the same u for all k
            t_BT = sample_t(t_key, batch.rows, batch.segment_ids, self.cfg.diffusion, offset=k / n)
            return total + self.nelbo_sum(model, batch, jax.random.fold_in(key, k), t_BT)[0], None

        total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), jnp.arange(n))
        return {"loss_sum": total, "count": n * self.count(batch)}


def eval_key(seed: int, batch: Batch):
    """A key fixed by the seed and the batch's tokens: the same batch always draws the same noise."""
    T = batch.inputs.shape[1]
    digest = jnp.sum(batch.inputs.astype(jnp.uint32) * (jnp.arange(T, dtype=jnp.uint32) * jnp.uint32(2654435761) + 1))
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0x6D646C6D), digest)


def _check_mask_room(cfg: Config) -> None:
    """The tokenizer's ids must stay below the reserved mask id."""
    from jaxlm.tokenizer.tokenizer import load_tokenizer
    from jaxlm.errors import UserError

    try:
        n_vocab = load_tokenizer(cfg.data.tokenizer).n_vocab
    except UserError:
        return  # an unloadable tokenizer is reported by the data pipeline, which needs it too
    if n_vocab > cfg.model.vocab_size - 1:
        raise ConfigError(f"train.objective=mdlm reserves id model.vocab_size-1 for {MASK}, but data.tokenizer="
                          f"{cfg.data.tokenizer!r} has {n_vocab} tokens; set model.vocab_size >= {n_vocab + 1}")
