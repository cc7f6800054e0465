"""Weight-only int8 quantization: per-output-channel symmetric scales (decoding, and QLoRA's frozen base).

w ~= values * scale with values = round(w / scale) in [-127, 127] and scale = max |w| / 127 over
the weight's input dimensions, one per output channel (and per stacked layer). The matmul takes
the int8 values converted to the compute dtype inside the jitted step and scales its output:
x @ (values * scale) = (x @ values) * scale. (XLA:CPU runs a mixed int8 x f32 dot_general about
2.5x slower than this form; backends that fuse the convert into the matmul read 1 byte per weight.)

`kernels.project` calls any weight object with a `.project(x, n_in)` method, so a quantized weight
stands in for an array inside an nnx.Param. Quantized: the dense projections (`projection_weights`:
attention q/k/v/o, dense and shared-expert MLPs, the untied output head). Kept as they are: the
embedding table (a gather, and with tied embeddings also the output head), norms, the MoE router
and routed experts (they run through `ragged_dot`, which takes one dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.model.attention import Attention
from jaxlm.model.build import build_model
from jaxlm.model.layers import MLP


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Int8Weight:
    """An int8 weight and its f32 scales; stands in for the array inside an nnx.Param."""

    values: jax.Array  # int8, the weight's shape [..., *in, *out]
    scale: jax.Array  # f32, the same with the input dimensions reduced to 1
    n_in: int = field(metadata=dict(static=True))

    def __getitem__(self, key):  # the model reads `param[...]`
        return self

    def astype(self, dtype):  # and casts it to the compute dtype: the values stay int8
        return self

    def project(self, x: jax.Array, n_in: int) -> jax.Array:
        """x [..., *in] @ w as one matmul on the int8 values, scaled per output channel."""
        assert n_in == self.n_in, (n_in, self.n_in)
        lead, k = x.shape[: x.ndim - n_in], math.prod(x.shape[x.ndim - n_in:])
        out = self.values.shape[n_in:]
        y = x.reshape(-1, k) @ self.values.reshape(k, -1).astype(x.dtype)
        return (y * self.scale.reshape(-1).astype(x.dtype)).reshape(*lead, *out)

    def dequantize(self) -> jax.Array:
        """values * scale in f32 (exact for `quantize(..., exact=True)`: see there)."""
        return self.values.astype(jnp.float32) * self.scale


def quantize(w: jax.Array, first_in: int, n_in: int, exact: bool = False) -> Int8Weight:
    """Symmetric int8 with one scale per output channel (input dims first_in..first_in+n_in).

    exact=True rounds each scale to 16 significant bits, so values * scale (7 + 16 bits) is exact in
    f32 and quantize(dequantize(q)) == q bit for bit: a float copy of the quantized weight (a
    checkpoint's) re-quantizes to the same bytes (the largest value stays +-127, so max |w| / 127 of
    the copy is the scale again). The scale moves by at most 2^-17 of itself."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=tuple(range(first_in, first_in + n_in)), keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    if exact:
        mantissa, exponent = jnp.frexp(scale)  # scale = mantissa * 2^exponent, mantissa in [0.5, 1)
        scale = jnp.ldexp(jnp.round(mantissa * 2.0**16) / 2.0**16, exponent)
    return Int8Weight(jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8), scale, n_in)


def projection_weights(cfg) -> dict[tuple, tuple[int, int]]:
    """{parameter path: (first input dim, number of input dims)} of every weight `project` reads."""
    model = nnx.eval_shape(lambda: build_model(cfg, 0))
    found = {}
    for path, node in nnx.iter_graph(model):
        names = {Attention: ("wq_DHd", "wk_DKd", "wv_DKd", "wo_HdD"), MLP: ("w_gate_DF", "w_up_DF", "w_down_FD")}
        for kind, params in names.items():
            if isinstance(node, kind):
                for name in params:
                    if hasattr(node, name):
                        var = getattr(node, name)
                        lead = len(var.shape) - len(var.get_metadata()["axes"])
                        found[(*path, name)] = (lead, 2 if name == "wo_HdD" else 1)
    if not cfg.model.tie_embeddings:
        found[("lm_head_DV",)] = (0, 1)
    return found
