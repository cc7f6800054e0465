"""The optax chain: global-norm clipping -> AdamW with a decay mask, on a warmup schedule."""

from __future__ import annotations

import jax
import optax

from jaxlm.config import OptimConfig

NO_DECAY_LEAVES = ("scale", "bq_Hd", "bk_Kd", "bv_Kd")  # RMSNorm gains, attention biases
EMBEDDING_LEAVES = ("table_VD",)


def make_schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine to min_lr, WSD (stable, then linear decay), or constant."""
    warmup = min(o.warmup_steps, total_steps)
    rest = max(total_steps - warmup, 1)
    ramp = optax.linear_schedule(0.0, o.lr, warmup) if warmup else optax.constant_schedule(o.lr)
    if o.schedule == "cosine":
        after = optax.cosine_decay_schedule(o.lr, rest, alpha=o.min_lr / o.lr)
    elif o.schedule == "wsd":
        decay = max(int(round(o.decay_fraction * total_steps)), 1)
        stable = max(rest - decay, 0)
        after = optax.join_schedules(
            [optax.constant_schedule(o.lr), optax.linear_schedule(o.lr, o.min_lr, decay)], [stable])
    else:
        after = optax.constant_schedule(o.lr)
    return optax.join_schedules([ramp, after], [warmup])


def decay_mask(params, decay_embeddings: bool):
    """True for leaves that get weight decay: matrices, not norm gains or biases, embeddings by option."""

    def decayed(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in NO_DECAY_LEAVES:
            return False
        return decay_embeddings or name not in EMBEDDING_LEAVES

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(o: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(o, total_steps)
    adamw = optax.adamw(
        schedule, b1=o.beta1, b2=o.beta2, eps=o.eps, weight_decay=o.weight_decay,
        mask=lambda p: decay_mask(p, o.decay_embeddings))
    chain = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    return optax.chain(*chain, adamw), schedule
