"""Int8 weight-only quantization for decoding (the weight type and quantizer live in
`jaxlm/model/quantized.py`, shared with QLoRA's frozen base): every projection weight of a
parameter tree replaced by its Int8Weight."""

from __future__ import annotations

import jax

from jaxlm.config import Config
from jaxlm.model.quantized import Int8Weight, projection_weights, quantize

__all__ = ["Int8Weight", "projection_weights", "quantize", "quantize_params", "weight_bytes"]


def quantize_params(params: dict, cfg: Config) -> dict:
    """The parameters with every projection weight replaced by its Int8Weight (jitted, in place of
    the original's placement)."""
    out = jax.tree.map(lambda x: x, params)
    for path, (first_in, n_in) in projection_weights(cfg).items():
        node = out
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = jax.jit(quantize, static_argnums=(1, 2))(node[path[-1]], first_in, n_in)
    return out


def weight_bytes(params) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
