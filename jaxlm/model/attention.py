"""Grouped-query attention (MHA when n_kv_heads == n_heads), causal or bidirectional.

Queries are grouped as [B, T, K, G, d] (G = H / K query heads per kv head) so keys and values
are never repeated in memory. Segment ids (packed documents) restrict attention to tokens of
the same document. How the attention itself is computed is the kernel seam's business
(`kernels.attention`, chosen by `model.attention_impl`).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.model.kernels import AttentionMask, attention
from jaxlm.model.layers import RMSNorm, rope, weight
from jaxlm.model.lora import add_adapters, adapted
from jaxlm.model.ops import dtype_of
from jaxlm.parallel.sharding import constrain


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    """Decode mode: one layer's keys and values for S positions per row, preallocated; slot s
    holds position s, so rows at different lengths share one cache (jaxlm/inference/cache.py).

    With `layer` set, k and v are a whole segment's caches stacked [n, B, S, K, d] and this is
    layer `layer` of them: a step then writes its slots in place in the stacked arrays, where
    slicing a layer out and stacking it back (scan's xs and ys) would copy every cache per step."""

    k_BSKd: jax.Array
    v_BSKd: jax.Array
    layer: jax.Array | int | None = None

    def write(self, k_BTKd, v_BTKd, positions_BT) -> "KVCache":
        rows_B1 = jnp.arange(k_BTKd.shape[0])[:, None]
        at = (rows_B1, positions_BT) if self.layer is None else (self.layer, rows_B1, positions_BT)
        axes = ("batch", "length", "kv_heads", "head_dim")
        put = lambda cache, new: constrain(cache.at[at].set(new.astype(cache.dtype)), axes)
        return KVCache(put(self.k_BSKd, k_BTKd), put(self.v_BSKd, v_BTKd), self.layer)

    def keys_values(self) -> tuple[jax.Array, jax.Array]:
        """This layer's keys and values [B, S, K, d]."""
        if self.layer is None:
            return self.k_BSKd, self.v_BSKd
        return self.k_BSKd[self.layer], self.v_BSKd[self.layer]


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora=None):
        D, H, K, d = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        pdt = dtype_of(cfg.param_dtype)
        self.cfg = cfg
        self.wq_DHd = weight(rngs, (D, H, d), ("embed", "heads", "head_dim"), D, pdt)
        self.wk_DKd = weight(rngs, (D, K, d), ("embed", "kv_heads", "head_dim"), D, pdt)
        self.wv_DKd = weight(rngs, (D, K, d), ("embed", "kv_heads", "head_dim"), D, pdt)
        self.wo_HdD = weight(rngs, (H, d, D), ("heads", "head_dim", "embed"), H * d, pdt)
        if cfg.attention_bias:  # zero at init, as Qwen2's nn.Linear biases after its init
            self.bq_Hd = nnx.Param(jnp.zeros((H, d), pdt), axes=("heads", "head_dim"))
            self.bk_Kd = nnx.Param(jnp.zeros((K, d), pdt), axes=("kv_heads", "head_dim"))
            self.bv_Kd = nnx.Param(jnp.zeros((K, d), pdt), axes=("kv_heads", "head_dim"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.norm_eps, pdt, axis="head_dim")
            self.k_norm = RMSNorm(d, cfg.norm_eps, pdt, axis="head_dim")
        add_adapters(self, lora, rngs)

    def qkv(self, x_BTD, positions_BT, key=None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Projected (biased, normalised per head, rotated) q [B, T, K, G, d], k and v [B, T, K, d];
        `key`: LoRA dropout."""
        cfg = self.cfg
        cdt = dtype_of(cfg.compute_dtype)

        def proj(name, i):
            k = None if key is None else jax.random.fold_in(key, i)
            return adapted(self, name, x_BTD, getattr(self, name)[...].astype(cdt), 1, cdt, cfg.projection_impl, k)

        q_BTHd, k_BTKd, v_BTKd = proj("wq_DHd", 1), proj("wk_DKd", 2), proj("wv_DKd", 3)
        if cfg.attention_bias:
            q_BTHd = q_BTHd + self.bq_Hd[...].astype(cdt)
            k_BTKd = k_BTKd + self.bk_Kd[...].astype(cdt)
            v_BTKd = v_BTKd + self.bv_Kd[...].astype(cdt)
        if cfg.qk_norm:
            q_BTHd, k_BTKd = self.q_norm(q_BTHd), self.k_norm(k_BTKd)
        if cfg.position == "rope":
            q_BTHd = rope(q_BTHd, positions_BT, cfg.rope_theta, cfg.rope_scaling)
            k_BTKd = rope(k_BTKd, positions_BT, cfg.rope_theta, cfg.rope_scaling)
        q_BTHd = constrain(q_BTHd, ("batch", "length", "heads", "head_dim"))
        k_BTKd = constrain(k_BTKd, ("batch", "length", "kv_heads", "head_dim"))
        v_BTKd = constrain(v_BTKd, ("batch", "length", "kv_heads", "head_dim"))
        B, T, H, d = q_BTHd.shape
        return q_BTHd.reshape(B, T, cfg.n_kv_heads, H // cfg.n_kv_heads, d), k_BTKd, v_BTKd

    def out(self, o_BTKGd, key=None) -> jax.Array:
        cfg = self.cfg
        B, T, K, G, d = o_BTKGd.shape
        cdt = dtype_of(cfg.compute_dtype)
        return adapted(self, "wo_HdD", o_BTKGd.reshape(B, T, K * G, d), self.wo_HdD[...].astype(cdt), 2, cdt,
                       cfg.projection_impl, key)

    def __call__(self, x_BTD, positions_BT, mask: AttentionMask, dropout_key=None) -> jax.Array:
        """`dropout_key` drops attention probabilities and (keys folded from it) LoRA inputs."""
        lora_key = None if dropout_key is None else jax.random.fold_in(dropout_key, 1)
        q_BTKGd, k_BTKd, v_BTKd = self.qkv(x_BTD, positions_BT, lora_key)
        dropout = (self.cfg.attention_dropout, dropout_key)
        out_key = None if lora_key is None else jax.random.fold_in(lora_key, 4)
        return self.out(attention(q_BTKGd, k_BTKd, v_BTKd, mask, self.cfg.attention_impl, dropout), out_key)

    def cached(self, x_BTD, positions_BT, mask: AttentionMask, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Decode mode: writes this step's keys and values at their positions, attends over the cache."""
        q_BTKGd, k_BTKd, v_BTKd = self.qkv(x_BTD, positions_BT)
        cache = cache.write(k_BTKd, v_BTKd, positions_BT)
        impl = self.cfg.attention_impl if self.cfg.attention_impl in ("xla", "cpu") else "xla"
        return self.out(attention(q_BTKGd, *cache.keys_values(), mask, impl)), cache
