"""Grouped-query attention (MHA when n_kv_heads == n_heads), causal or bidirectional.

Queries are grouped as [B, T, K, G, d] (G = H / K query heads per kv head) so keys and values
are never repeated in memory. Segment ids (packed documents) restrict attention to tokens of
the same document.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.model.layers import dtype_of, rope, weight
from jaxlm.sharding import constrain


def attention_mask(T: int, causal: bool, segment_ids_BT: jax.Array | None) -> jax.Array | None:
    """Boolean mask [B or 1, T, T]: True where query t may attend to key s."""
    mask = jnp.tril(jnp.ones((1, T, T), dtype=bool)) if causal else None
    if segment_ids_BT is not None:
        same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
        mask = same if mask is None else mask & same
    return mask


def dot_product_attention(q_BTKGd, k_BSKd, v_BSKd, mask_BTS) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v in f32, masked; returns [B, T, K, G, d]."""
    scale = 1.0 / math.sqrt(q_BTKGd.shape[-1])
    logits = jnp.einsum("btkgd,bskd->bkgts", q_BTKGd, k_BSKd, preferred_element_type=jnp.float32) * scale
    if mask_BTS is not None:
        logits = jnp.where(mask_BTS[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BSKd.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v_BSKd)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, H, K, d = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        pdt = dtype_of(cfg.param_dtype)
        self.cfg = cfg
        self.wq_DHd = weight(rngs, (D, H, d), ("embed", "heads", "head_dim"), D, pdt)
        self.wk_DKd = weight(rngs, (D, K, d), ("embed", "kv_heads", "head_dim"), D, pdt)
        self.wv_DKd = weight(rngs, (D, K, d), ("embed", "kv_heads", "head_dim"), D, pdt)
        self.wo_HdD = weight(rngs, (H, d, D), ("heads", "head_dim", "embed"), H * d, pdt)

    def __call__(self, x_BTD, positions_BT, mask_BTS) -> jax.Array:
        cfg = self.cfg
        cdt = dtype_of(cfg.compute_dtype)
        cast = lambda w: w[...].astype(cdt)
        q_BTHd = jnp.einsum("btd,dhk->bthk", x_BTD, cast(self.wq_DHd))
        k_BTKd = jnp.einsum("btd,dhk->bthk", x_BTD, cast(self.wk_DKd))
        v_BTKd = jnp.einsum("btd,dhk->bthk", x_BTD, cast(self.wv_DKd))
        if cfg.position == "rope":
            q_BTHd = rope(q_BTHd, positions_BT, cfg.rope_theta)
            k_BTKd = rope(k_BTKd, positions_BT, cfg.rope_theta)
        q_BTHd = constrain(q_BTHd, ("batch", "length", "heads", "head_dim"))
        k_BTKd = constrain(k_BTKd, ("batch", "length", "kv_heads", "head_dim"))
        v_BTKd = constrain(v_BTKd, ("batch", "length", "kv_heads", "head_dim"))
        B, T, H, d = q_BTHd.shape
        K = cfg.n_kv_heads
        out_BTKGd = dot_product_attention(q_BTHd.reshape(B, T, K, H // K, d), k_BTKd, v_BTKd, mask_BTS)
        out_BTHd = out_BTKGd.reshape(B, T, H, d)
        return jnp.einsum("bthk,hkd->btd", out_BTHd, cast(self.wo_HdD))
