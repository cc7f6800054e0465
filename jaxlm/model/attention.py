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
from jaxlm.model.layers import dtype_of, project, rope, weight
from jaxlm.sharding import constrain


def attention_mask(T: int, causal: bool, segment_ids_BT: jax.Array | None) -> jax.Array | None:
    """Boolean mask [B or 1, T, T]: True where query t may attend to key s."""
    mask = jnp.tril(jnp.ones((1, T, T), dtype=bool)) if causal else None
    if segment_ids_BT is not None:
        same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
        mask = same if mask is None else mask & same
    return mask


def dot_product_attention(q_BTKGd, k_BSKd, v_BSKd, mask_BTS) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v in f32, masked; returns [B, T, K, G, d].

    The gradient is written by hand (flash-attention algebra: P is recomputed from the saved
    log-sum-exp, dS = P * (dP - rowsum(dO * O))) with every matmul in a form XLA:CPU runs fast;
    autodiff's own backward of this function is ~2x slower on CPU and no faster elsewhere.
    """
    if mask_BTS is None:
        mask_BTS = jnp.ones((1, q_BTKGd.shape[1], k_BSKd.shape[1]), bool)
    return _attention(q_BTKGd, k_BSKd, v_BSKd, mask_BTS)


def _scores(qh_BKQd, kh_BKSd, mask_BQS):
    """Masked logits [B, K, Q, S]; Q = G*T query rows (the G heads sharing a kv head, stacked)."""
    s = jnp.einsum("bkqd,bksd->bkqs", qh_BKQd, kh_BKSd, preferred_element_type=jnp.float32)
    return jnp.where(mask_BQS[:, None], s, jnp.finfo(jnp.float32).min)


def _attention_fwd(q_BTKGd, k_BSKd, v_BSKd, mask_BTS):
    B, T, K, G, d = q_BTKGd.shape
    scale = 1.0 / math.sqrt(d)
    # 4-D [B, K, G*T, d] layouts: every matmul is a plain batched "A @ B" or "A @ B^T"
    qh = (q_BTKGd * scale).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, d)
    kh, vh = k_BSKd.transpose(0, 2, 1, 3), v_BSKd.transpose(0, 2, 1, 3)
    mask = jnp.broadcast_to(mask_BTS[:, None], (mask_BTS.shape[0], G, T, mask_BTS.shape[-1]))
    mask = mask.reshape(mask_BTS.shape[0], G * T, -1)
    s = _scores(qh, kh, mask)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    oh = (jnp.einsum("bkqs,bksd->bkqd", e.astype(vh.dtype), vh) / total).astype(vh.dtype)
    lse = m + jnp.log(total)
    out = oh.reshape(B, K, G, T, d).transpose(0, 3, 1, 2, 4)
    return out, (qh, kh, vh, oh, lse, mask)


def _attention_bwd(res, do_BTKGd):
    qh, kh, vh, oh, lse, mask = res
    B, T, K, G, d = do_BTKGd.shape
    doh = do_BTKGd.transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, d)
    delta = jnp.sum(doh.astype(jnp.float32) * oh, axis=-1, keepdims=True)  # rowsum(P * dP)
    p = jnp.exp(_scores(qh, kh, mask) - lse)
    dp = jnp.einsum("bkqd,bksd->bkqs", doh, vh, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta)).astype(qh.dtype)
    p = p.astype(vh.dtype)
    dq = jnp.einsum("bkqs,bksd->bkqd", ds, kh) / math.sqrt(d)
    # dV = P^T dO and dK = dS^T Q, formed as [B, K, d, S] (the fast dot form) then transposed
    dv_T = jnp.einsum("bkqd,bkqs->bkds", doh, p)
    dk_T = jnp.einsum("bkqd,bkqs->bkds", qh, ds)
    dq = dq.reshape(B, K, G, T, d).transpose(0, 3, 1, 2, 4)
    return dq, dk_T.transpose(0, 3, 1, 2), dv_T.transpose(0, 3, 1, 2), None


@jax.custom_vjp
def _attention(q_BTKGd, k_BSKd, v_BSKd, mask_BTS):
    return _attention_fwd(q_BTKGd, k_BSKd, v_BSKd, mask_BTS)[0]


_attention.defvjp(_attention_fwd, _attention_bwd)


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
        q_BTHd = project(x_BTD, cast(self.wq_DHd))
        k_BTKd = project(x_BTD, cast(self.wk_DKd))
        v_BTKd = project(x_BTD, cast(self.wv_DKd))
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
        return project(out_BTHd, cast(self.wo_HdD), n_in=2)
