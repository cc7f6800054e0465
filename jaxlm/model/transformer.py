"""The decoder LM: embed -> scanned blocks -> final norm -> logits.

Layers are grouped into *segments*: a unit of block kinds repeated n times (for a dense model,
one segment of unit ("dense",) x n_layers; MoE configs interleave dense and MoE blocks). Each
segment's parameters are stacked along a leading layer axis and run under one `lax.scan`, so
a 48-layer model compiles one unit, not 48 blocks. With model.share_blocks = k (MobileLLM's
immediate block-wise sharing) each block is applied k times in a row: n_layers blocks of
parameters, n_layers * k layers of compute, each application with its own KV cache in decoding.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig, MoEConfig
from jaxlm.model.attention import Attention, KVCache
from jaxlm.model.kernels import AttentionMask, concrete, project
from jaxlm.model.layers import MLP, Embed, RMSNorm, weight
from jaxlm.model.ops import dropout, dtype_of
from jaxlm.parallel.sharding import constrain

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

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, kind: str, rngs: nnx.Rngs, lora=None):
        pdt = dtype_of(cfg.param_dtype)
        self.norm_kind = cfg.norm
        self.dropout = cfg.dropout
        self.attn = Attention(cfg, rngs, lora)
        if kind == "moe":
            from jaxlm.model.moe import MoEBlock

            self.ffn = MoEBlock(cfg, moe, rngs, lora)
        else:
            self.ffn = MLP(cfg, cfg.d_ff, rngs, lora)
        if cfg.norm != "none":
            self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
            self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)

    def __call__(self, x_BTD, positions_BT, mask: AttentionMask, rng, cache: KVCache | None = None):
        """(x, aux metrics, cache). `rng` is a key for stochastic layers (dropout, MoE router noise),
        or None for deterministic. The feed-forward (dense MLP or MoE) returns (output, aux) either
        way. Decode mode: `cache` is this layer's KVCache, returned updated; None in training."""
        keys = [None] * 3 if rng is None else [jax.random.fold_in(rng, 1000 + i) for i in range(3)]
        drop = lambda y, key: dropout(y, self.dropout, key)  # on each residual branch

        def attn(h):
            nonlocal cache
            if cache is None:
                return drop(self.attn(h, positions_BT, mask, keys[2]), keys[0])
            out, cache = self.attn.cached(h, positions_BT, mask, cache)
            return out

        # real tokens (segment id 0 is a packed row's padding): MoE routes only these
        valid_BT = None if mask.segment_ids_BT is None else mask.segment_ids_BT > 0

        def ffn(h):
            y_BTD, aux = self.ffn(h, rng=rng, valid_BT=valid_BT)
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
        return constrain(x_BTD, ("batch", "length", "embed")), aux, cache


class Unit(nnx.Module):
    """Blocks of the given kinds applied in order, each `cfg.share_blocks` times in a row; aux
    metrics are summed over the applications."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, kinds: tuple[str, ...], rngs: nnx.Rngs, lora=None):
        self.blocks = nnx.List([Block(cfg, moe, kind, rngs, lora) for kind in kinds])
        self.share = cfg.share_blocks

    def __call__(self, x_BTD, positions_BT, mask, rng, caches: list | None = None):
        """(x, summed aux, caches); `caches` (decode mode) holds one KVCache per application of a
        block (block i's r-th at i * share + r)."""
        total: dict = {}
        new_caches = []
        for j in range(len(self.blocks) * self.share):
            block = self.blocks[j // self.share]
            x_BTD, aux, cache = block(x_BTD, positions_BT, mask, None if rng is None else jax.random.fold_in(rng, j),
                                      None if caches is None else caches[j])
            new_caches.append(cache)
            for k, v in aux.items():
                total[k] = total.get(k, 0.0) + v
        return x_BTD, total, None if caches is None else new_caches


class Segment(nnx.Module):
    """`repeats` copies of a Unit with parameters stacked on a leading axis, run by lax.scan."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, kinds: tuple[str, ...], repeats: int, rngs: nnx.Rngs,
                 lora=None):
        @nnx.split_rngs(splits=repeats)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return Unit(cfg, moe, kinds, rngs, lora)

        self.units = create(rngs)
        self.repeats = repeats
        self.scan = concrete(cfg.scan_layers, "scan_layers")
        self.remat = cfg.remat

    def __call__(self, x_BTD, positions_BT, mask, rng, caches: list | None = None):
        """(x, aux {name: [repeats]}, caches). Decode mode: `caches` as `_decode` says."""
        graphdef, stacked = nnx.split(self.units)
        if caches is not None:
            x_BTD, caches = self._decode(graphdef, stacked, x_BTD, positions_BT, mask, caches)
            return x_BTD, {}, caches
        keys = None if rng is None else jax.random.split(rng, self.repeats)

        def body(x, xs):
            unit_state, key, unit_caches = xs
            x, aux, unit_caches = nnx.merge(graphdef, unit_state)(x, positions_BT, mask, key, unit_caches)
            return x, (aux, unit_caches)

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
        if self.scan:
            x_BTD, (aux, _) = jax.lax.scan(body, x_BTD, (stacked, keys, None))
            return x_BTD, aux, None
        per_layer = []
        for i in range(self.repeats):
            x_BTD, out = body(x_BTD, jax.tree.map(lambda a: a[i], (stacked, keys, None)))
            per_layer.append(out)
        stack = lambda *xs: jnp.stack(xs)
        aux = jax.tree.map(stack, *[a for a, _ in per_layer]) if per_layer[0][0] else {}
        return x_BTD, aux, None

    def _decode(self, graphdef, stacked, x_BTD, positions_BT, mask, caches: list):
        """Decode mode (deterministic, no aux). Unrolled: `caches[i]` is layer i's KVCaches
        [B, S, K, d] (the decoder holds them per layer, inference/per_layer.py): nothing is stacked
        or sliced. Scanned: one KVCache [repeats, B, S, K, d] per block application rides the scan's
        carry whole, each unit writing its layer's slots in place (KVCache.layer)."""
        def unit(state, x, cs):
            x, _, cs = nnx.merge(graphdef, state)(x, positions_BT, mask, None, cs)
            return x, cs

        if not self.scan:
            per_layer = []
            for i in range(self.repeats):
                x_BTD, layer_caches = unit(jax.tree.map(lambda a: a[i], stacked), x_BTD, caches[i])
                per_layer.append(layer_caches)
            return x_BTD, per_layer

        def body(carry, xs):
            x, cs = carry
            unit_state, i = xs
            x, cs = unit(unit_state, x, [KVCache(c.k_BSKd, c.v_BSKd, i) for c in cs])
            return (x, [KVCache(c.k_BSKd, c.v_BSKd) for c in cs]), None

        return jax.lax.scan(body, (x_BTD, caches), (stacked, jnp.arange(self.repeats)))[0]


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig, rngs: nnx.Rngs, lora=None):
        """`lora`: a LoraConfig whose rank > 0 gives the targeted projections adapters (model/lora.py)."""
        pdt, cdt = dtype_of(cfg.param_dtype), dtype_of(cfg.compute_dtype)
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs, pdt, cdt, cfg.projection_impl)
        self.segments = nnx.List([Segment(cfg, moe, kinds, n, rngs, lora) for kinds, n in layer_plan(cfg, moe)])
        if cfg.norm == "pre":
            self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        if not cfg.tie_embeddings:
            self.lm_head_DV = weight(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.d_model, pdt)

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, rng=None, logits_at_BK=None):
        """Returns (logits [B, T, V], aux metrics {name: [n_units]} from MoE layers).

        `logits_at_BK`: column indices per row; the logits are then [B, K, V] at those columns only
        (the vocabulary projection is a large share of a small model's work: GRPO needs completions').

        `rng`: a key for training-time noise (dropout, MoE router), None for deterministic evaluation.
        Keys are folded from it per segment, layer and site, so a step's masks depend only on
        (seed, step): a resumed run draws the same ones.
        """
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        mask = AttentionMask(self.cfg.causal, segment_ids_BT)
        x_BTD = self.embed(tokens_BT)
        x_BTD = dropout(x_BTD, self.cfg.dropout, None if rng is None else jax.random.fold_in(rng, 1000))
        x_BTD, aux, _ = self._layers(x_BTD, positions_BT, mask, rng, None)
        if logits_at_BK is not None:
            x_BTD = jnp.take_along_axis(x_BTD, logits_at_BK[..., None], axis=1)
        return self._logits(x_BTD), aux

    def decode(self, tokens_BT, positions_BT, caches: list) -> tuple[jax.Array, list]:
        """Decode mode: logits [B, T, V] of T new tokens per row at `positions_BT` (rows may be at
        different lengths), attending over and writing into `caches`, per segment: a list per layer
        of KVCaches when layers are unrolled, one list of stacked KVCaches when they are scanned
        (Segment._decode; jaxlm/inference/cache.py). Deterministic; returns (logits, updated caches)."""
        mask = AttentionMask(True, q_positions_BT=positions_BT)
        x_BTD, _, caches = self._layers(self.embed(tokens_BT), positions_BT, mask, None, caches)
        return self._logits(x_BTD), caches

    def _layers(self, x_BTD, positions_BT, mask, rng, caches):
        aux: dict = {}
        new_caches = []
        for i, segment in enumerate(self.segments):
            key = None if rng is None else jax.random.fold_in(rng, i)
            x_BTD, seg_aux, seg_caches = segment(x_BTD, positions_BT, mask, key, None if caches is None else caches[i])
            new_caches.append(seg_caches)
            for k, v in seg_aux.items():
                aux[k] = jnp.concatenate([aux[k], v]) if k in aux else v
        return x_BTD, aux, None if caches is None else new_caches

    def _logits(self, x_BTD):
        cfg = self.cfg
        if cfg.norm == "pre":
            x_BTD = self.final_norm(x_BTD)
        if cfg.tie_embeddings:
            logits_BTV = self.embed.attend(x_BTD, cfg.scale_tied_logits)
        else:
            logits_BTV = project(x_BTD, self.lm_head_DV[...].astype(dtype_of(cfg.compute_dtype)),
                                 impl=cfg.projection_impl)
        return constrain(logits_BTV, ("batch", "length", "vocab"))
