"""Building blocks: initialisers, RMSNorm, embeddings, MLPs, RoPE.

Initialisation: every weight matrix is drawn from a truncated normal (at +-3 sigma) with
sigma = 1/sqrt(fan_in), where fan_in is the size of the contracted input dimensions. An
embedding table is a linear map from one-hot vectors (fan_in 1), so sigma = 1, as in CS336.
Tied output logits divide by sqrt(d_model) so the output projection keeps sigma = 1/sqrt(fan_in).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.sharding import constrain


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def weight(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], fan_in: int, dtype) -> nnx.Param:
    std = 1.0 / math.sqrt(fan_in)
    value = std * jax.random.truncated_normal(rngs.params(), -3.0, 3.0, tuple(shape), jnp.float32)
    return nnx.Param(value.astype(dtype), axes=tuple(axes))


def project(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """x [..., *in] @ w [*in, *out], contracting x's last n_in dims with w's first n_in.

    Done as one 2-D matmul whose weight gradient is written as x^T @ g: autodiff's own form,
    transpose(g^T @ x), costs XLA:CPU a transposed copy and a slow dot (~1.3x slower per
    projection, the largest single cost in a CPU train step); elsewhere the two are the same.
    """
    lead, k = x.shape[: x.ndim - n_in], math.prod(x.shape[x.ndim - n_in:])
    out = w.shape[n_in:]
    return _matmul(x.reshape(-1, k), w.reshape(k, -1)).reshape(*lead, *out)


@jax.custom_vjp
def _matmul(x_NK: jax.Array, w_KM: jax.Array) -> jax.Array:
    return x_NK @ w_KM


def _matmul_fwd(x_NK, w_KM):
    return x_NK @ w_KM, (x_NK, w_KM)


def _matmul_bwd(res, g_NM):
    x_NK, w_KM = res
    dw_KM = jax.lax.dot_general(x_NK, g_NM, (((0,), (0,)), ((), ())))
    return g_NM @ w_KM.T, dw_KM.astype(w_KM.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("embed",))
        self.eps = eps

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)).astype(x_BTD.dtype)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, rngs: nnx.Rngs, param_dtype, compute_dtype):
        self.table_VD = weight(rngs, (vocab, dim), ("vocab", "embed"), fan_in=1, dtype=param_dtype)
        self.compute_dtype = compute_dtype

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        x_BTD = jnp.take(self.table_VD[...], tokens_BT, axis=0).astype(self.compute_dtype)
        return constrain(x_BTD, ("batch", "length", "embed"))

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        """Tied output projection: logits against the embedding table."""
        table = self.table_VD[...].astype(self.compute_dtype)
        return project(x_BTD, table.T) / math.sqrt(x_BTD.shape[-1])


class MLP(nnx.Module):
    """SwiGLU (gate * up, SiLU-gated) or a plain two-matrix MLP with SiLU or GELU."""

    def __init__(self, d_model: int, d_ff: int, kind: str, rngs: nnx.Rngs, param_dtype, compute_dtype):
        self.kind = kind
        self.compute_dtype = compute_dtype
        if kind == "swiglu":
            self.w_gate_DF = weight(rngs, (d_model, d_ff), ("embed", "mlp"), d_model, param_dtype)
        self.w_up_DF = weight(rngs, (d_model, d_ff), ("embed", "mlp"), d_model, param_dtype)
        self.w_down_FD = weight(rngs, (d_ff, d_model), ("mlp", "embed"), d_ff, param_dtype)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cast = lambda w: w[...].astype(self.compute_dtype)
        up_BTF = project(x_BTD, cast(self.w_up_DF))
        if self.kind == "swiglu":
            h_BTF = jax.nn.silu(project(x_BTD, cast(self.w_gate_DF))) * up_BTF
        elif self.kind == "silu":
            h_BTF = jax.nn.silu(up_BTF)
        else:
            h_BTF = jax.nn.gelu(up_BTF)
        h_BTF = constrain(h_BTF, ("batch", "length", "mlp"))
        return project(h_BTF, cast(self.w_down_FD))


def rope(x_BTHd: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half convention (Llama / Hugging Face): pairs (i, i + d/2)."""
    half = x_BTHd.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BTd = positions_BT[..., None].astype(jnp.float32) * freqs
    cos = jnp.cos(angles_BTd)[:, :, None, :]
    sin = jnp.sin(angles_BTd)[:, :, None, :]
    x = x_BTHd.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHd.dtype)
