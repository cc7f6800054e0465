"""The decoder LM: embed -> scanned blocks -> final norm -> logits.

Layers are grouped into *segments*: a unit of block kinds repeated n times (for a dense model,
one segment of unit ("dense",) x n_layers; MoE configs interleave dense and MoE blocks). Each
segment's parameters are stacked along a leading layer axis and run under one `lax.scan`, so
a 48-layer model compiles one unit, not 48 blocks.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig, MoEConfig
from jaxlm.model.attention import Attention
from jaxlm.model.kernels import AttentionMask, concrete, project
from jaxlm.model.layers import MLP, Embed, RMSNorm, dropout, dtype_of, weight
from jaxlm.sharding import constrain

REMAT_POLICIES: dict[str, Callable | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def layer_plan(cfg: ModelConfig, moe: MoEConfig) -> list[tuple[tuple[str, ...], int]]:
    """[(unit kinds, repeats)]: layer i is MoE iff i >= first_dense and (i - first_dense + 1) % every == 0."""
    if not moe.n_experts:
        return [(("dense",), cfg.n_layers)]
    first = min(moe.first_dense, cfg.n_layers)
    rest = cfg.n_layers - first
    unit = ("dense",) * (moe.every - 1) + ("moe",)
    plan = [(("dense",), first), (unit, rest // moe.every), (("dense",), rest % moe.every)]
    return [(u, n) for u, n in plan if n > 0]


class Block(nnx.Module):
    """One transformer layer; `norm` picks pre-norm, post-norm or no norm."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, kind: str, rngs: nnx.Rngs):
        pdt = dtype_of(cfg.param_dtype)
        self.norm_kind = cfg.norm
        self.dropout = cfg.dropout
        self.attn = Attention(cfg, rngs)
        if kind == "moe":
            from jaxlm.model.moe import MoEBlock

            self.ffn = MoEBlock(cfg, moe, rngs)
        else:
            self.ffn = MLP(cfg, cfg.d_ff, rngs)
        if cfg.norm != "none":
            self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
            self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)

    def __call__(self, x_BTD, positions_BT, mask: AttentionMask, rng) -> tuple[jax.Array, dict]:
        """`rng` is a key for stochastic layers (dropout, MoE router noise), or None for
        deterministic. The feed-forward (dense MLP or MoE) returns (output, aux metrics) either way."""
        keys = [None] * 3 if rng is None else [jax.random.fold_in(rng, 1000 + i) for i in range(3)]
        drop = lambda y, key: dropout(y, self.dropout, key)  # on each residual branch
        attn = lambda h: drop(self.attn(h, positions_BT, mask, keys[2]), keys[0])

        def ffn(h):
            y_BTD, aux = self.ffn(h, rng=rng)
            return drop(y_BTD, keys[1]), aux

        if self.norm_kind == "pre":
            x_BTD = x_BTD + attn(self.norm1(x_BTD))
            y_BTD, aux = ffn(self.norm2(x_BTD))
            x_BTD = x_BTD + y_BTD
        elif self.norm_kind == "post":
            x_BTD = self.norm1(x_BTD + attn(x_BTD))
            y_BTD, aux = ffn(x_BTD)
            x_BTD = self.norm2(x_BTD + y_BTD)
        else:
            x_BTD = x_BTD + attn(x_BTD)
            y_BTD, aux = ffn(x_BTD)
            x_BTD = x_BTD + y_BTD
        return constrain(x_BTD, ("batch", "length", "embed")), aux


class Unit(nnx.Module):
    """Blocks of the given kinds applied in order; aux metrics are summed over them."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, kinds: tuple[str, ...], rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, moe, kind, rngs) for kind in kinds])

    def __call__(self, x_BTD, positions_BT, mask, rng):
        total: dict = {}
        for i, block in enumerate(self.blocks):
            x_BTD, aux = block(x_BTD, positions_BT, mask, None if rng is None else jax.random.fold_in(rng, i))
            for k, v in aux.items():
                total[k] = total.get(k, 0.0) + v
        return x_BTD, total


class Segment(nnx.Module):
    """`repeats` copies of a Unit with parameters stacked on a leading axis, run by lax.scan."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, kinds: tuple[str, ...], repeats: int, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=repeats)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return Unit(cfg, moe, kinds, rngs)

        self.units = create(rngs)
        self.repeats = repeats
        self.scan = concrete(cfg.scan_layers, "scan_layers")
        self.remat = cfg.remat

    def __call__(self, x_BTD, positions_BT, mask, rng):
        graphdef, stacked = nnx.split(self.units)
        keys = None if rng is None else jax.random.split(rng, self.repeats)

        def body(x, xs):
            unit_state, key = xs
            return nnx.merge(graphdef, unit_state)(x, positions_BT, mask, key)

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
        if self.scan:
            return jax.lax.scan(body, x_BTD, (stacked, keys))
        per_layer = []
        for i in range(self.repeats):
            x_BTD, aux = body(x_BTD, jax.tree.map(lambda a: a[i], (stacked, keys)))
            per_layer.append(aux)
        return x_BTD, jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer) if per_layer[0] else {}


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig, rngs: nnx.Rngs):
        pdt, cdt = dtype_of(cfg.param_dtype), dtype_of(cfg.compute_dtype)
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs, pdt, cdt, cfg.projection_impl)
        self.segments = nnx.List([Segment(cfg, moe, kinds, n, rngs) for kinds, n in layer_plan(cfg, moe)])
        if cfg.norm == "pre":
            self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        if not cfg.tie_embeddings:
            self.lm_head_DV = weight(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.d_model, pdt)

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, rng=None):
        """Returns (logits [B, T, V], aux metrics {name: [n_units]} from MoE layers).

        `rng`: a key for training-time noise (dropout, MoE router), None for deterministic evaluation.
        Keys are folded from it per segment, layer and site, so a step's masks depend only on
        (seed, step): a resumed run draws the same ones.
        """
        cfg = self.cfg
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        mask = AttentionMask(cfg.causal, segment_ids_BT)
        x_BTD = self.embed(tokens_BT)
        x_BTD = dropout(x_BTD, cfg.dropout, None if rng is None else jax.random.fold_in(rng, 1000))
        aux: dict = {}
        for i, segment in enumerate(self.segments):
            key = None if rng is None else jax.random.fold_in(rng, i)
            x_BTD, seg_aux = segment(x_BTD, positions_BT, mask, key)
            for k, v in seg_aux.items():
                aux[k] = jnp.concatenate([aux[k], v]) if k in aux else v
        if cfg.norm == "pre":
            x_BTD = self.final_norm(x_BTD)
        if cfg.tie_embeddings:
            logits_BTV = self.embed.attend(x_BTD)
        else:
            logits_BTV = project(x_BTD, self.lm_head_DV[...].astype(dtype_of(cfg.compute_dtype)),
                                 impl=cfg.projection_impl)
        return constrain(logits_BTV, ("batch", "length", "vocab")), aux
