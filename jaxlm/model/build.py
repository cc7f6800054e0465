"""`build_model`: the one way a config becomes a model, for training, inference and export alike."""

from __future__ import annotations

import jax
from flax import nnx

from jaxlm.config import Config
from jaxlm.model.transformer import Transformer


def build_model(cfg: Config, seed: int) -> Transformer:
    return Transformer(cfg.model, cfg.moe, nnx.Rngs(params=seed))


def abstract_params(cfg: Config) -> dict:
    """The parameter tree of `cfg` as ShapeDtypeStructs (nothing allocated)."""
    model = nnx.eval_shape(lambda: build_model(cfg, 0))
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(nnx.state(model)))
