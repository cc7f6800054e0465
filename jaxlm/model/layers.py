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
import numpy as np
from flax import nnx

from jaxlm.model.kernels import project
from jaxlm.model.lora import add_adapters, adapted
from jaxlm.model.ops import dtype_of
from jaxlm.parallel.sharding import constrain, unshard


def weight(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], fan_in: int, dtype) -> nnx.Param:
    std = 1.0 / math.sqrt(fan_in)
    value = std * jax.random.truncated_normal(rngs.params(), -3.0, 3.0, tuple(shape), jnp.float32)
    return nnx.Param(value.astype(dtype), axes=tuple(axes))


class RMSNorm(nnx.Module):
    """Normalises the last axis (d_model, or one head's width for q/k norm: axis "head_dim")."""

    def __init__(self, dim: int, eps: float, param_dtype, axis: str = "embed"):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=(axis,))
        self.eps = eps

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)).astype(x_BTD.dtype)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, rngs: nnx.Rngs, param_dtype, compute_dtype, projection_impl="auto"):
        self.table_VD = weight(rngs, (vocab, dim), ("vocab", "embed"), fan_in=1, dtype=param_dtype)
        self.compute_dtype = compute_dtype
        self.projection_impl = projection_impl

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        table = self.table_VD[...]
        if hasattr(table, "project"):  # quantized (jaxlm/compress/quantize.py): stored as the tied head's [D, V]
            x_BTD = table.gather_rows(tokens_BT).astype(self.compute_dtype)
        else:
            # the rows come out split like the tokens (batch) only from a table whose embed dim is
            # whole (fsdp's gather); from an fsdp-split table XLA would replicate them to reshard
            table_VD = unshard(table, ("vocab", "embed"), ("embed",))
            x_BTD = jnp.take(table_VD, tokens_BT, axis=0).astype(self.compute_dtype)
        return constrain(x_BTD, ("batch", "length", "embed"))

    def attend(self, x_BTD: jax.Array, scaled: bool = True) -> jax.Array:
        """Tied output projection: logits against the embedding table (divided by sqrt(D) if `scaled`)."""
        table = self.table_VD[...]
        w_DV = table if hasattr(table, "project") else table.astype(self.compute_dtype).T
        logits_BTV = project(x_BTD, w_DV, impl=self.projection_impl)
        return logits_BTV / math.sqrt(x_BTD.shape[-1]) if scaled else logits_BTV


class MLP(nnx.Module):
    """SwiGLU (gate * up, SiLU-gated) or a plain two-matrix MLP with SiLU or GELU."""

    def __init__(self, cfg, d_ff: int, rngs: nnx.Rngs, lora=None):
        D, pdt = cfg.d_model, dtype_of(cfg.param_dtype)
        self.kind = cfg.mlp
        self.compute_dtype = dtype_of(cfg.compute_dtype)
        self.projection_impl = cfg.projection_impl
        if self.kind == "swiglu":
            self.w_gate_DF = weight(rngs, (D, d_ff), ("embed", "mlp"), D, pdt)
        self.w_up_DF = weight(rngs, (D, d_ff), ("embed", "mlp"), D, pdt)
        self.w_down_FD = weight(rngs, (d_ff, D), ("mlp", "embed"), d_ff, pdt)
        add_adapters(self, lora, rngs)

    def __call__(self, x_BTD: jax.Array, rng: jax.Array | None = None, valid_BT=None) -> tuple[jax.Array, dict]:
        """Same calling convention as the MoE block: (output, aux metrics); `rng` drops LoRA inputs;
        `valid_BT` unused."""
        cdt = self.compute_dtype

        def proj(x, name, i):
            key = None if rng is None else jax.random.fold_in(rng, 2000 + i)
            return adapted(self, name, x, getattr(self, name)[...].astype(cdt), 1, cdt, self.projection_impl, key)

        up_BTF = proj(x_BTD, "w_up_DF", 1)
        if self.kind == "swiglu":
            h_BTF = jax.nn.silu(proj(x_BTD, "w_gate_DF", 2)) * up_BTF
        elif self.kind == "silu":
            h_BTF = jax.nn.silu(up_BTF)
        else:
            h_BTF = jax.nn.gelu(up_BTF)
        h_BTF = constrain(h_BTF, ("batch", "length", "mlp"))
        return proj(h_BTF, "w_down_FD", 3), {}


def rope_frequencies(head_dim: int, theta: float, scaling=None) -> np.ndarray:
    """RoPE's inverse frequencies [d/2] (f32), scaled if `scaling` (a RopeScalingConfig) is llama3,
    computed as transformers' `_compute_llama3_parameters` does, operation for operation."""
    inv_freq = np.float32(1.0) / (np.float32(theta) ** (np.arange(0, head_dim, 2).astype(np.float32)
                                                       / np.float32(head_dim)))
    if scaling is None or scaling.type == "none":
        return inv_freq
    low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(scaling.factor), inv_freq)
    smooth = ((np.float32(scaling.original_max_seq_len) / wavelen - np.float32(scaling.low_freq_factor))
              / np.float32(scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / np.float32(scaling.factor) + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope(x_BTHd: jax.Array, positions_BT: jax.Array, theta: float, scaling=None) -> jax.Array:
    """Rotary embedding, rotate-half convention (Llama / Hugging Face): pairs (i, i + d/2).
    `scaling`: a RopeScalingConfig; None or type "none" is plain RoPE."""
    half = x_BTHd.shape[-1] // 2
    if scaling is None or scaling.type == "none":
        freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    else:
        freqs = jnp.asarray(rope_frequencies(2 * half, theta, scaling))
    angles_BTd = positions_BT[..., None].astype(jnp.float32) * freqs
    cos = jnp.cos(angles_BTd)[:, :, None, :]
    sin = jnp.sin(angles_BTd)[:, :, None, :]
    x = x_BTHd.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHd.dtype)
