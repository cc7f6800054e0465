"""Causal attention forward+backward on XLA:CPU: which formulation is fastest?

Standalone research script (no jaxlm imports). Times ``jax.jit(jax.value_and_grad(loss))`` where
``loss = sum(attention(q, k, v) * cotangent)`` for B=8, T=256, H=4, head_dim=64, float32, for many
formulations of causal multi-head attention, plus the same attention with the q/k/v/o projections
from d_model=256 (where layout choices can be folded into the projection matmuls), and torch 2.13's
``F.scaled_dot_product_attention(is_causal=True)`` forward+backward for orientation.

Every variant's loss and gradients are checked against the naive reference (assert: max abs
error <= 1e-5 relative to max(1, max |ref|) per tensor; 5e-5 for the projected block's weight
gradients, which sum over 2048 rows). Timing is interleaved: each round runs every variant (in a shuffled order) for a
few iterations, and the table reports the median over rounds (and the minimum), so a noisy or
shared machine biases all variants alike.

    python bench/attention_variants.py                  # core + projected-block tables
    python bench/attention_variants.py --flags          # also: XLA_FLAGS sweep (one subprocess each)
    taskset -c 0 python bench/attention_variants.py --clock cpu   # stable on a busy machine

Inputs use the model's layout [B, T, H, d]; a variant that wants [B, H, T, d] pays for its own
transposes (in the projected-block table, it can instead fold them into the projection einsums).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from functools import partial

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a stray libtpu install otherwise probes for TPUs

import jax
import jax.numpy as jnp
import numpy as np

B, T, H, DH, DM = 8, 256, 4, 64, 256
NEG = -1e30  # finite "minus infinity" for masked logits (exp underflows to exactly 0)
# The projected block's weight gradients sum over B*T = 2048 rows (|grad| ~ 50); different matmul
# backends (YNNPACK vs Eigen, via XLA_FLAGS) reorder those sums, so they are checked at 5e-5 of
# their scale. Core attention outputs/gradients are checked at 1e-5.
BLOCK_TOL = 5e-5


# ---------------------------------------------------------------------------------------------
# Core attention formulations: f(q, k, v) with q, k, v [B, T, H, d] -> [B, T, H, d]
# ---------------------------------------------------------------------------------------------


def _causal(T_q: int, T_k: int, offset: int = 0) -> jax.Array:
    """[T_q, T_k] bool, True where query (offset + t) may see key s."""
    return (jnp.arange(T_q)[:, None] + offset) >= jnp.arange(T_k)[None, :]


def attn_naive(q, k, v):
    """(a) reference: einsum in model layout, where-mask, f32 softmax, einsum back."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bthd,bshd->bhts", q, k) * scale
    s = jnp.where(_causal(q.shape[1], k.shape[1]), s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", p, v)


def attn_bhtd(q, k, v):
    """(b) transpose once to [B, H, T, d], batch-leading matmuls, transpose the output back."""
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bhtd,bhsd->bhts", q * scale, k)
    s = jnp.where(_causal(q.shape[2], k.shape[2]), s, NEG)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhts,bhsd->bhtd", p, v).transpose(0, 2, 1, 3)


def attn_bias(q, k, v):
    """(d) additive bias mask (0 / -1e30) instead of jnp.where."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    bias = jnp.where(_causal(q.shape[1], k.shape[1]), 0.0, NEG).astype(jnp.float32)
    s = jnp.einsum("bthd,bshd->bhts", q, k) * scale + bias
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", p, v)


def attn_manual_softmax(q, k, v):
    """(g) hand-written softmax (stop-gradient max), normalise after P@V (T*d divides, not T*T)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bthd,bshd->bhts", q * scale, k)
    s = jnp.where(_causal(q.shape[1], k.shape[1]), s, NEG)
    m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
    e = jnp.exp(s - m)
    l = e.sum(-1)  # [b h t]
    o = jnp.einsum("bhts,bshd->bthd", e, v)
    return o / l.transpose(0, 2, 1)[..., None]


def attn_jax_causal(q, k, v):
    """(c) jax.nn.dot_product_attention(implementation='xla', is_causal=True)."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def attn_jax_mask(q, k, v):
    """(c') jax.nn.dot_product_attention with an explicit boolean mask."""
    mask = _causal(q.shape[1], k.shape[1])[None, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


# --- (e) custom_vjp, flash-attention style backward -----------------------------------------------
# All in [B, H, T, d]. Forward saves q, k, v, o and the row logsumexp; the backward recomputes
# P = exp(S - lse) (one extra q k^T matmul) and uses dS = P * (dP - rowsum(dO * O)), so it never
# stores a T x T tensor between forward and backward and never differentiates through max/where.


def _flash_fwd_math(q, k, v):
    """q already scaled. Returns o [b h t d], lse [b h t 1]."""
    s = jnp.einsum("bhtd,bhsd->bhts", q, k)
    s = jnp.where(_causal(q.shape[2], k.shape[2]), s, NEG)
    m = s.max(-1, keepdims=True)
    e = jnp.exp(s - m)
    l = e.sum(-1, keepdims=True)
    o = jnp.einsum("bhts,bhsd->bhtd", e, v) / l
    return o, m + jnp.log(l)


@jax.custom_vjp
def flash_bhtd(q, k, v):
    """Causal softmax(q k^T / sqrt(d)) v for q, k, v [B, H, T, d]; hand-written backward."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    return _flash_fwd_math(q * scale, k, v)[0]


def _flash_fwd(q, k, v):
    scale = 1.0 / math.sqrt(q.shape[-1])
    o, lse = _flash_fwd_math(q * scale, k, v)
    return o, (q, k, v, o, lse)


def _flash_bwd(res, do):
    q, k, v, o, lse = res
    scale = 1.0 / math.sqrt(q.shape[-1])
    qs = q * scale
    s = jnp.einsum("bhtd,bhsd->bhts", qs, k)
    s = jnp.where(_causal(q.shape[2], k.shape[2]), s, NEG)
    p = jnp.exp(s - lse)
    dv = jnp.einsum("bhts,bhtd->bhsd", p, do)
    dp = jnp.einsum("bhtd,bhsd->bhts", do, v)
    delta = jnp.sum(do * o, axis=-1, keepdims=True)
    ds = p * (dp - delta)
    dq = jnp.einsum("bhts,bhsd->bhtd", ds, k) * scale
    dk = jnp.einsum("bhts,bhtd->bhsd", ds, qs)
    return dq, dk, dv


flash_bhtd.defvjp(_flash_fwd, _flash_bwd)


def attn_flash(q, k, v):
    """(e) custom_vjp flash-style backward (recompute P from lse), model layout in/out."""
    t = lambda x: x.transpose(0, 2, 1, 3)
    return t(flash_bhtd(t(q), t(k), t(v)))


# --- (e2) custom_vjp that saves P instead of recomputing it ----------------------------------------


@jax.custom_vjp
def savep_bhtd(q, k, v):
    scale = 1.0 / math.sqrt(q.shape[-1])
    return _flash_fwd_math(q * scale, k, v)[0]


def _savep_fwd(q, k, v):
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bhtd,bhsd->bhts", q * scale, k)
    s = jnp.where(_causal(q.shape[2], k.shape[2]), s, NEG)
    m = s.max(-1, keepdims=True)
    e = jnp.exp(s - m)
    p = e / e.sum(-1, keepdims=True)
    o = jnp.einsum("bhts,bhsd->bhtd", p, v)
    return o, (q, k, v, o, p)


def _savep_bwd(res, do):
    q, k, v, o, p = res
    scale = 1.0 / math.sqrt(q.shape[-1])
    dv = jnp.einsum("bhts,bhtd->bhsd", p, do)
    dp = jnp.einsum("bhtd,bhsd->bhts", do, v)
    delta = jnp.sum(do * o, axis=-1, keepdims=True)
    ds = p * (dp - delta)
    dq = jnp.einsum("bhts,bhsd->bhtd", ds, k) * scale
    dk = jnp.einsum("bhts,bhtd->bhsd", ds, q) * scale
    return dq, dk, dv


savep_bhtd.defvjp(_savep_fwd, _savep_bwd)


def attn_savep(q, k, v):
    """(e2) custom_vjp that keeps P (T x T) from the forward: no recompute matmul."""
    t = lambda x: x.transpose(0, 2, 1, 3)
    return t(savep_bhtd(t(q), t(k), t(v)))


# --- (e3) custom_vjp in the model layout [B, T, H, d] (no explicit transposes) --------------------


@jax.custom_vjp
def flash_bthd(q, k, v):
    """Same math as flash_bhtd, but every einsum reads/writes [B, T, H, d] directly."""
    return _flash_bthd_fwd(q, k, v)[0]


def _flash_bthd_math(qs, k, v):
    s = jnp.einsum("bthd,bshd->bhts", qs, k)
    s = jnp.where(_causal(qs.shape[1], k.shape[1]), s, NEG)
    m = s.max(-1, keepdims=True)
    e = jnp.exp(s - m)
    l = e.sum(-1, keepdims=True)  # [b h t 1]
    o = jnp.einsum("bhts,bshd->bthd", e, v) / l[..., 0].transpose(0, 2, 1)[..., None]
    return o, m + jnp.log(l)


def _flash_bthd_fwd(q, k, v):
    scale = 1.0 / math.sqrt(q.shape[-1])
    o, lse = _flash_bthd_math(q * scale, k, v)
    return o, (q, k, v, o, lse)


def _flash_bthd_bwd(res, do):
    q, k, v, o, lse = res
    scale = 1.0 / math.sqrt(q.shape[-1])
    qs = q * scale
    s = jnp.einsum("bthd,bshd->bhts", qs, k)
    s = jnp.where(_causal(q.shape[1], k.shape[1]), s, NEG)
    p = jnp.exp(s - lse)
    dv = jnp.einsum("bhts,bthd->bshd", p, do)
    dp = jnp.einsum("bthd,bshd->bhts", do, v)
    delta = jnp.sum(do * o, axis=-1).transpose(0, 2, 1)[..., None]  # [b h t 1]
    ds = p * (dp - delta)
    dq = jnp.einsum("bhts,bshd->bthd", ds, k) * scale
    dk = jnp.einsum("bhts,bthd->bshd", ds, qs)
    return dq, dk, dv


flash_bthd.defvjp(_flash_bthd_fwd, _flash_bthd_bwd)


def attn_flash_bthd(q, k, v):
    """(e3) custom_vjp flash-style, einsums straight on [B, T, H, d]."""
    return flash_bthd(q, k, v)


# --- (e4) custom_vjp + causal block skipping -------------------------------------------------------
# Query block i only multiplies against keys [0, (i + 1) * bs): with T=256, bs=128 does 3/4 of the
# T x T work, bs=64 does 10/16. Python-unrolled, ragged shapes, all static.


def _make_blocked(bs: int):
    @jax.custom_vjp
    def f(q, k, v):
        return fwd(q, k, v)[0]

    def fwd(q, k, v):
        Tq = q.shape[2]
        scale = 1.0 / math.sqrt(q.shape[-1])
        qs = q * scale
        outs, lses = [], []
        for i in range(Tq // bs):
            hi = (i + 1) * bs
            o_i, lse_i = _flash_fwd_math_off(qs[:, :, i * bs:hi], k[:, :, :hi], v[:, :, :hi], i * bs)
            outs.append(o_i)
            lses.append(lse_i)
        o = jnp.concatenate(outs, axis=2)
        return o, (q, k, v, o, jnp.concatenate(lses, axis=2))

    def bwd(res, do):
        q, k, v, o, lse = res
        Tq = q.shape[2]
        scale = 1.0 / math.sqrt(q.shape[-1])
        qs = q * scale
        delta = jnp.sum(do * o, axis=-1, keepdims=True)
        dqs, dk, dv = [], jnp.zeros_like(k), jnp.zeros_like(v)
        for i in range(Tq // bs):
            lo, hi = i * bs, (i + 1) * bs
            s = jnp.einsum("bhtd,bhsd->bhts", qs[:, :, lo:hi], k[:, :, :hi])
            s = jnp.where(_causal(bs, hi, lo), s, NEG)
            p = jnp.exp(s - lse[:, :, lo:hi])
            do_i = do[:, :, lo:hi]
            dv = dv.at[:, :, :hi].add(jnp.einsum("bhts,bhtd->bhsd", p, do_i))
            dp = jnp.einsum("bhtd,bhsd->bhts", do_i, v[:, :, :hi])
            ds = p * (dp - delta[:, :, lo:hi])
            dqs.append(jnp.einsum("bhts,bhsd->bhtd", ds, k[:, :, :hi]) * scale)
            dk = dk.at[:, :, :hi].add(jnp.einsum("bhts,bhtd->bhsd", ds, qs[:, :, lo:hi]))
        return jnp.concatenate(dqs, axis=2), dk, dv

    f.defvjp(fwd, bwd)
    return f


def _flash_fwd_math_off(qs, k, v, offset):
    s = jnp.einsum("bhtd,bhsd->bhts", qs, k)
    s = jnp.where(_causal(qs.shape[2], k.shape[2], offset), s, NEG)
    m = s.max(-1, keepdims=True)
    e = jnp.exp(s - m)
    l = e.sum(-1, keepdims=True)
    o = jnp.einsum("bhts,bhsd->bhtd", e, v) / l
    return o, m + jnp.log(l)


blocked128_bhtd = _make_blocked(128)
blocked64_bhtd = _make_blocked(64)


def attn_blocked128(q, k, v):
    """(e4) custom_vjp flash-style + causal block skipping, 2 query blocks of 128."""
    t = lambda x: x.transpose(0, 2, 1, 3)
    return t(blocked128_bhtd(t(q), t(k), t(v)))


def attn_blocked64(q, k, v):
    """(e4') same with 4 query blocks of 64."""
    t = lambda x: x.transpose(0, 2, 1, 3)
    return t(blocked64_bhtd(t(q), t(k), t(v)))


def attn_highest(q, k, v):
    """(g) naive under jax.default_matmul_precision('highest') (f32 on CPU is already exact f32)."""
    with jax.default_matmul_precision("highest"):
        return attn_naive(q, k, v)


# --- (h) THE CANDIDATE: custom_vjp, model-layout I/O, fast dot forms, causal block skipping ------
# q, k, v and the output are [B, T, H, d] (what a [D, H*d] projection produces after a free
# reshape). Internally [B, H, T, d]: q/k/v/dO are transposed once. Every matmul is one of the two
# forms XLA:CPU runs fast (YNNPACK "A @ B" / "A @ B^T", or Eigen "A^T @ B" with a [d, s] output):
# the backward's dV = P^T dO and dK = dS^T Q are computed as dO^T P / Q^T dS ([B, H, d, T]) and
# transposed straight to [B, T, H, d], instead of the slow "P^T dO -> [s, d]" form autodiff picks.
# Query block i (of size `block`) only touches keys [0, (i + 1) * block): block=T is plain
# causal, block=128 skips 1/4 of the T x T work at T=256, block=64 skips 3/8.


def make_causal_attention(block: int | None = None):
    """Return causal_attention(q, k, v) -> out, all [B, T, H, d] (any float32 T divisible by block)."""

    def blocks(T):
        bs = T if block is None or block >= T else block
        assert T % bs == 0, (T, bs)
        return [(i * bs, (i + 1) * bs) for i in range(T // bs)]

    def fwd(q, k, v):
        T, d = q.shape[1], q.shape[-1]
        scale = 1.0 / math.sqrt(d)
        qh = (q * scale).transpose(0, 2, 1, 3)  # [B, H, T, d], pre-scaled
        kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        outs, lses = [], []
        for lo, hi in blocks(T):
            s = jnp.einsum("bhtd,bhsd->bhts", qh[:, :, lo:hi], kh[:, :, :hi])
            s = jnp.where(_causal(hi - lo, hi, lo), s, NEG)
            m = jnp.max(s, axis=-1, keepdims=True)
            e = jnp.exp(s - m)
            l = jnp.sum(e, axis=-1, keepdims=True)
            outs.append(jnp.einsum("bhts,bhsd->bhtd", e, vh[:, :, :hi]) / l)
            lses.append(m + jnp.log(l))
        oh = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
        lse = lses[0] if len(lses) == 1 else jnp.concatenate(lses, axis=2)
        return oh.transpose(0, 2, 1, 3), (qh, kh, vh, oh, lse)

    def bwd(res, do):
        qh, kh, vh, oh, lse = res
        T, d = qh.shape[2], qh.shape[-1]
        scale = 1.0 / math.sqrt(d)
        doh = do.transpose(0, 2, 1, 3)
        delta = jnp.sum(doh * oh, axis=-1, keepdims=True)  # rowsum(dO * O) = rowsum(P * dP)
        dqs, dkT, dvT = [], None, None
        for lo, hi in blocks(T):
            q_i, do_i = qh[:, :, lo:hi], doh[:, :, lo:hi]
            s = jnp.einsum("bhtd,bhsd->bhts", q_i, kh[:, :, :hi])
            s = jnp.where(_causal(hi - lo, hi, lo), s, NEG)
            p = jnp.exp(s - lse[:, :, lo:hi])
            dp = jnp.einsum("bhtd,bhsd->bhts", do_i, vh[:, :, :hi])
            ds = p * (dp - delta[:, :, lo:hi])
            dqs.append(jnp.einsum("bhts,bhsd->bhtd", ds, kh[:, :, :hi]))
            dv_i = jnp.einsum("bhtd,bhts->bhds", do_i, p)  # (P^T dO)^T, [B, H, d, hi]
            dk_i = jnp.einsum("bhtd,bhts->bhds", q_i, ds)  # (dS^T Q)^T
            pad = [(0, 0), (0, 0), (0, 0), (0, T - hi)]
            dv_i, dk_i = (jnp.pad(x, pad) if hi < T else x for x in (dv_i, dk_i))
            dvT = dv_i if dvT is None else dvT + dv_i
            dkT = dk_i if dkT is None else dkT + dk_i
        dq = (dqs[0] if len(dqs) == 1 else jnp.concatenate(dqs, axis=2)) * scale
        return dq.transpose(0, 2, 1, 3), dkT.transpose(0, 3, 1, 2), dvT.transpose(0, 3, 1, 2)

    @jax.custom_vjp
    def causal_attention(q, k, v):
        return fwd(q, k, v)[0]

    causal_attention.defvjp(fwd, bwd)
    return causal_attention


causal_attention = make_causal_attention(None)
causal_attention_b128 = make_causal_attention(128)
causal_attention_b64 = make_causal_attention(64)


@jax.custom_vjp
def dense(x, w):
    """x [..., K] @ w [K, N] whose weight gradient is formed as x^T @ g directly.

    Autodiff emits dW = transpose(g^T @ x), which XLA:CPU lowers to a transposed copy of g plus
    a slow doubly-transposed dot; this is ~25% faster for the bench MLP block's forward+backward.
    """
    return x @ w


def _dense_fwd(x, w):
    return x @ w, (x, w)


def _dense_bwd(res, g):
    x, w = res
    K, N = w.shape
    dw = jax.lax.dot_general(x.reshape(-1, K), g.reshape(-1, N), (((0,), (0,)), ((), ())))
    return g @ w.T, dw


dense.defvjp(_dense_fwd, _dense_bwd)


CORE_VARIANTS = {
    "a naive bthd einsum+where": attn_naive,
    "b bhtd transpose once": attn_bhtd,
    "c jax.nn.dpa is_causal": attn_jax_causal,
    "c jax.nn.dpa mask": attn_jax_mask,
    "d additive bias mask": attn_bias,
    "g manual softmax, late norm": attn_manual_softmax,
    "g naive @ precision=highest": attn_highest,
    "e custom_vjp flash (bhtd)": attn_flash,
    "e custom_vjp flash (bthd)": attn_flash_bthd,
    "e custom_vjp save P": attn_savep,
    "e custom_vjp blocked 128": attn_blocked128,
    "e custom_vjp blocked 64": attn_blocked64,
    "h causal_attention (no blocks)": causal_attention,
    "h causal_attention block 128": causal_attention_b128,
    "h causal_attention block 64": causal_attention_b64,
}


# ---------------------------------------------------------------------------------------------
# Projected block: x [B, T, D] -> q/k/v projections -> causal attention -> output projection
# ---------------------------------------------------------------------------------------------


def block_model_layout(core):
    """Projections to [B, T, H, d] (the jaxlm layout), core attention, 'bthd,hdD->btD'."""

    def f(x, wq, wk, wv, wo):
        q = jnp.einsum("btD,Dhd->bthd", x, wq)
        k = jnp.einsum("btD,Dhd->bthd", x, wk)
        v = jnp.einsum("btD,Dhd->bthd", x, wv)
        return jnp.einsum("bthd,hdD->btD", core(q, k, v), wo)

    return f


def block_bhtd(core_bhtd):
    """Projections straight to [B, H, T, d] (transpose folded into the matmul), 'bhtd,hdD->btD'."""

    def f(x, wq, wk, wv, wo):
        q = jnp.einsum("btD,Dhd->bhtd", x, wq)
        k = jnp.einsum("btD,Dhd->bhtd", x, wk)
        v = jnp.einsum("btD,Dhd->bhtd", x, wv)
        return jnp.einsum("bhtd,hdD->btD", core_bhtd(q, k, v), wo)

    return f


def block_fused_qkv(core_bhtd):
    """(f) one projection einsum for q, k, v: weight [D, 3, H, d] -> [3, B, H, T, d]."""

    def f(x, wq, wk, wv, wo):
        w = jnp.stack([wq, wk, wv], axis=1)  # [D, 3, H, d]
        qkv = jnp.einsum("btD,Dnhd->nbhtd", x, w)
        return jnp.einsum("bhtd,hdD->btD", core_bhtd(qkv[0], qkv[1], qkv[2]), wo)

    return f


def block_fused_qkv_flat(core_bhtd):
    """(f') fused q/k/v as one plain [D, 3*H*d] matmul, then reshape/transpose to [B, H, T, d]."""

    def f(x, wq, wk, wv, wo):
        w = jnp.concatenate([wq.reshape(DM, -1), wk.reshape(DM, -1), wv.reshape(DM, -1)], axis=1)
        qkv = (x.reshape(-1, DM) @ w).reshape(B, T, 3, H, DH).transpose(2, 0, 3, 1, 4)
        out = core_bhtd(qkv[0], qkv[1], qkv[2]).transpose(0, 2, 1, 3).reshape(B * T, H * DH)
        return (out @ wo.reshape(H * DH, DM)).reshape(B, T, DM)

    return f


def block_dense(core_bthd, fused_qkv=False):
    """(h) x @ W[D, H*d] projections through `dense` (custom weight-grad), free reshapes to
    [B, T, H, d], model-layout attention core, `dense` output projection."""

    def f(x, wq, wk, wv, wo):
        if fused_qkv:
            w = jnp.concatenate([wq.reshape(DM, -1), wk.reshape(DM, -1), wv.reshape(DM, -1)], axis=1)
            qkv = dense(x, w).reshape(B, T, 3, H, DH)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q, k, v = (dense(x, w_.reshape(DM, -1)).reshape(B, T, H, DH) for w_ in (wq, wk, wv))
        return dense(core_bthd(q, k, v).reshape(B, T, H * DH), wo.reshape(H * DH, DM))

    return f


def _bhtd_of(core_bthd):
    t = lambda x: x.transpose(0, 2, 1, 3)
    return lambda q, k, v: t(core_bthd(t(q), t(k), t(v)))


BLOCK_VARIANTS = {
    "P naive, model layout": block_model_layout(attn_naive),
    "P jax.nn.dpa is_causal": block_model_layout(attn_jax_causal),
    "P flash bthd, model layout": block_model_layout(attn_flash_bthd),
    "P flash, proj->bhtd": block_bhtd(flash_bhtd),
    "P flash blocked128, proj->bhtd": block_bhtd(blocked128_bhtd),
    "P flash blocked64, proj->bhtd": block_bhtd(blocked64_bhtd),
    "P save P, proj->bhtd": block_bhtd(savep_bhtd),
    "P naive softmax, proj->bhtd": block_bhtd(_bhtd_of(attn_naive)),
    "P flash, fused qkv einsum": block_fused_qkv(flash_bhtd),
    "P flash, fused qkv flat": block_fused_qkv_flat(flash_bhtd),
    "P dense + naive": block_dense(attn_naive),
    "P dense + causal_attention": block_dense(causal_attention),
    "P dense + causal_attention b128": block_dense(causal_attention_b128),
    "P dense + causal_attention b64": block_dense(causal_attention_b64),
    "P dense fused qkv + causal_attn b128": block_dense(causal_attention_b128, fused_qkv=True),
}


# ---------------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------------


def make_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, H, DH)), jnp.float32) for _ in range(3))
    ct = jnp.asarray(rng.standard_normal((B, T, H, DH)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((B, T, DM)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal((DM, H, DH)) / math.sqrt(DM), jnp.float32) for _ in range(3)]
    wo = jnp.asarray(rng.standard_normal((H, DH, DM)) / math.sqrt(H * DH), jnp.float32)
    ct_block = jnp.asarray(rng.standard_normal((B, T, DM)), jnp.float32)
    return (q, k, v), ct, (x, *ws, wo), ct_block


def vg_fn(f, ct, n_args):
    loss = lambda *a: jnp.sum(f(*a) * ct)
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(n_args))))


def check(name, got, ref, tol=1e-5):
    (lv, gs), (rv, rs) = got, ref
    errs = [abs(float(lv) - float(rv)) / max(1.0, abs(float(rv)))]
    # Per tensor: max |got - ref| / max(1, max |ref|) (weight gradients of the projected block sum
    # over B*T = 2048 rows and reach ~50, so they are compared relative to their scale).
    errs += [float(jnp.max(jnp.abs(g - r)) / max(1.0, float(jnp.max(jnp.abs(r))))) for g, r in zip(gs, rs)]
    assert max(errs) <= tol, f"{name}: mismatch vs naive reference, max err {max(errs):.3g} > {tol}"
    return max(errs)


def time_interleaved(fns: dict, args: dict, rounds: int, iters: int, seed: int = 0, clock=time.perf_counter) -> dict:
    """fns: name -> callable(*args[name]) returning pytree. Returns name -> list of s/iter.

    clock: time.perf_counter (wall) or time.process_time (CPU time of all this process's threads,
    which on one core - taskset -c 0 - is the uncontended wall time even on a loaded machine).
    """
    order = list(fns)
    rnd = random.Random(seed)
    out = {n: [] for n in order}
    for _ in range(rounds):
        rnd.shuffle(order)
        for n in order:
            f, a = fns[n], args[n]
            jax.block_until_ready(f(*a))
            t0 = clock()
            for _ in range(iters):
                r = f(*a)
            jax.block_until_ready(r)
            out[n].append((clock() - t0) / iters)
    return out


def torch_sdpa_fn(q, k, v, ct):
    """torch F.scaled_dot_product_attention forward+backward; inputs laid out as HF does."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tq, tk, tv = (torch.tensor(np.asarray(x)).requires_grad_(True) for x in (q, k, v))
    tct = torch.tensor(np.asarray(ct))

    def run():
        for x in (tq, tk, tv):
            x.grad = None
        # HF Llama: [B, T, H, d] -> transpose(1, 2) view -> sdpa -> transpose back.
        o = F.scaled_dot_product_attention(tq.transpose(1, 2), tk.transpose(1, 2), tv.transpose(1, 2),
                                           is_causal=True)
        loss = (o.transpose(1, 2) * tct).sum()
        loss.backward()
        return loss.detach(), tq.grad, tk.grad, tv.grad

    return run


def torch_block_fn(xs, ct_block):
    import torch
    import torch.nn.functional as F

    ts = [torch.tensor(np.asarray(a)).requires_grad_(True) for a in xs]
    tct = torch.tensor(np.asarray(ct_block))

    def run():
        for a in ts:
            a.grad = None
        x, wq, wk, wv, wo = ts
        # HF-style: Linear projections, view to heads, transpose, sdpa, transpose back, o_proj.
        proj = lambda w: (x @ w.reshape(DM, H * DH)).view(B, T, H, DH).transpose(1, 2)
        o = F.scaled_dot_product_attention(proj(wq), proj(wk), proj(wv), is_causal=True)
        y = o.transpose(1, 2).reshape(B, T, H * DH) @ wo.reshape(H * DH, DM)
        loss = (y * tct).sum()
        loss.backward()
        return loss.detach(), *(a.grad for a in ts)

    return run


class _TorchWrap:
    """Adapter so torch closures go through time_interleaved (block_until_ready is a no-op)."""

    def __init__(self, run):
        self.run = run

    def __call__(self):
        return self.run()[0].item()


def run_tables(rounds: int, iters: int, only: list[str] | None, with_torch: bool, clock=time.perf_counter) -> dict:
    (q, k, v), ct, xs, ct_block = make_inputs()
    results = {}

    core = {n: f for n, f in CORE_VARIANTS.items() if not only or any(o in n for o in only)}
    block = {n: f for n, f in BLOCK_VARIANTS.items() if not only or any(o in n for o in only)}

    ref = vg_fn(attn_naive, ct, 3)(q, k, v)
    ref_block = vg_fn(block_model_layout(attn_naive), ct_block, 5)(*xs)
    fns, args, errs = {}, {}, {}
    for n, f in core.items():
        g = vg_fn(f, ct, 3)
        errs[n] = check(n, g(q, k, v), ref)
        fns[n], args[n] = g, (q, k, v)
    for n, f in block.items():
        g = vg_fn(f, ct_block, 5)
        errs[n] = check(n, g(*xs), ref_block, BLOCK_TOL)
        fns[n], args[n] = g, xs
    if with_torch:
        import torch

        run = torch_sdpa_fn(q, k, v, ct)
        tl, *tg = run()
        errs["torch sdpa (core)"] = check("torch sdpa", (float(tl), [jnp.asarray(t.numpy()) for t in tg]), ref, 1e-4)
        fns["torch sdpa (core)"], args["torch sdpa (core)"] = _TorchWrap(run), ()
        runb = torch_block_fn(xs, ct_block)
        tl, *tg = runb()
        errs["torch sdpa (block)"] = check("torch block", (float(tl), [jnp.asarray(t.numpy()) for t in tg]),
                                           ref_block, 1e-4)
        fns["torch sdpa (block)"], args["torch sdpa (block)"] = _TorchWrap(runb), ()

    times = time_interleaved(fns, args, rounds, iters, clock=clock)
    for n in fns:
        results[n] = dict(median_ms=1e3 * statistics.median(times[n]), min_ms=1e3 * min(times[n]),
                          max_err=errs[n])
    return results


def print_table(results: dict, title: str):
    print(f"\n{title}")
    for group, ref_name in (("core", "torch sdpa (core)"), ("block", "torch sdpa (block)")):
        names = [n for n in results if (n.startswith("P ") or n == "torch sdpa (block)") == (group == "block")]
        if not names:
            continue
        ref_ms = results.get(ref_name, {}).get("median_ms")
        print(f"  {'variant (' + group + ')':36} {'median ms':>10} {'min ms':>8} {'torch/jax':>10} {'max err':>9}")
        for n in sorted(names, key=lambda n: results[n]["median_ms"]):
            r = results[n]
            ratio = f"{ref_ms / r['median_ms']:10.2f}" if ref_ms else f"{'-':>10}"
            print(f"  {n:36} {r['median_ms']:10.2f} {r['min_ms']:8.2f} {ratio} {r['max_err']:9.1e}")


FLAG_SETS = {
    "default": "",
    "ynn off (plain XLA dots)": "--xla_cpu_experimental_ynn_fusion_type=",
    "ynn off + xnn dot": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_xnn_fusion_type=dot",
    "ynn +eltwise,+reduce": "--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce",
    "ynn +dot (dot fusions)": "--xla_cpu_experimental_ynn_fusion_type=+dot",
    "xnn graph greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "fast math": "--xla_cpu_enable_fast_math=true",
    "vector width 512": "--xla_cpu_prefer_vector_width=512",
    "no concurrency scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=false",
}


def run_flag_sweep(rounds: int, iters: int, variants: list[str], repeats: int, clock: str):
    """One subprocess per XLA_FLAGS set (flags are process-global); sets run interleaved."""
    per = {name: {} for name in FLAG_SETS}
    for rep in range(repeats):
        for name, flags in FLAG_SETS.items():
            env = dict(os.environ, XLA_FLAGS=flags)
            cmd = [sys.executable, __file__, "--json", "--no-torch", "--rounds", str(rounds), "--iters", str(iters),
                   "--clock", clock, "--only", *variants]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                per[name] = None
                print(f"flag set {name!r} failed: {p.stderr.strip().splitlines()[-1:]}")
                continue
            if per[name] is None:
                continue
            res = json.loads(p.stdout.strip().splitlines()[-1])
            for n, r in res.items():
                per[name].setdefault(n, []).append(r["median_ms"])
    names = sorted({n for d in per.values() if d for n in d})
    print("\nXLA_FLAGS sweep (median ms over subprocess repeats; each a median over rounds)")
    print(f"  {'flags':28} " + " ".join(f"{n[:26]:>26}" for n in names))
    for fs, d in per.items():
        if not d:
            continue
        print(f"  {fs:28} " + " ".join(f"{statistics.median(d[n]):26.2f}" for n in names))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None, help="substrings of variant names to run")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json", action="store_true", help="print results as one JSON line (for --flags)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time (use with taskset -c 0 on a busy machine)")
    ap.add_argument("--flags", action="store_true", help="also sweep XLA_FLAGS sets in subprocesses")
    ap.add_argument("--flag-variants", nargs="*",
                    default=["a naive", "h causal_attention block 128", "P dense + causal_attention b128",
                             "P naive, model"])
    ap.add_argument("--flag-repeats", type=int, default=3)
    args = ap.parse_args()

    if not args.json:
        print(f"jax {jax.__version__}, B={B} T={T} H={H} d={DH} D={DM} f32, cpus={os.cpu_count()} "
              f"(usable {len(os.sched_getaffinity(0))}), clock={args.clock}, load avg {os.getloadavg()[0]:.1f}, "
              f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    t0 = time.perf_counter()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    res = run_tables(args.rounds, args.iters, args.only, not args.no_torch, clock)
    if args.json:
        print(json.dumps(res))
        return
    print_table(res, f"forward+backward, {args.clock} ms (median of {args.rounds} interleaved rounds x {args.iters} iters); "
                     f"torch/jax > 1 means JAX is faster")
    print(f"(tables took {time.perf_counter() - t0:.0f}s)")
    if args.flags:
        run_flag_sweep(max(3, args.rounds // 2), args.iters, args.flag_variants, args.flag_repeats, args.clock)


if __name__ == "__main__":
    main()
