"""XLA:CPU kernels: the same math as the references, written in the dot forms XLA:CPU runs fast,
each with a hand-written gradient (autodiff's own forms cost a transposed copy or a slow dot)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _scores(qh_BKQd, kh_BKSd, mask_BQS):
    """Masked logits [B, K, Q, S]; Q = G*T query rows (the G heads sharing a kv head, stacked)."""
    s = jnp.einsum("bkqd,bksd->bkqs", qh_BKQd, kh_BKSd, preferred_element_type=jnp.float32)
    return jnp.where(mask_BQS[:, None], s, jnp.finfo(jnp.float32).min)


def cpu_attention_fwd(q_BTKGd, k_BSKd, v_BSKd, mask_BTS):
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


def cpu_attention_bwd(res, do_BTKGd):
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
def cpu_attention(q_BTKGd, k_BSKd, v_BSKd, mask_BTS):
    """Flash-attention algebra with a hand-written gradient (P recomputed from the saved
    log-sum-exp, dS = P * (dP - rowsum(dO * O))), every matmul in a form XLA:CPU runs fast;
    autodiff's own backward of the same forward is ~2x slower on CPU. Any dense mask."""
    return cpu_attention_fwd(q_BTKGd, k_BSKd, v_BSKd, mask_BTS)[0]


cpu_attention.defvjp(cpu_attention_fwd, cpu_attention_bwd)


@jax.custom_vjp
def cpu_matmul(x_NK: jax.Array, w_KM: jax.Array) -> jax.Array:
    """x @ w whose weight gradient is written as x^T @ g: autodiff's form, transpose(g^T @ x),
    costs XLA:CPU a transposed copy and a slow dot (~1.3x slower per projection, the largest
    single cost of a CPU train step); elsewhere the two are the same."""
    return x_NK @ w_KM


def cpu_matmul_fwd(x_NK, w_KM):
    return x_NK @ w_KM, (x_NK, w_KM)


def cpu_matmul_bwd(res, g_NM):
    x_NK, w_KM = res
    dw_KM = jax.lax.dot_general(x_NK, g_NM, (((0,), (0,)), ((), ())))
    return g_NM @ w_KM.T, dw_KM.astype(w_KM.dtype)


cpu_matmul.defvjp(cpu_matmul_fwd, cpu_matmul_bwd)
