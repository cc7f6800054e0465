"""`build_model`: the one way a config becomes a model, for training, inference and export alike."""

from __future__ import annotations

import jax
from flax import nnx

from jaxlm.config import Config
from jaxlm.model.transformer import Transformer


def build_model(cfg: Config, seed: int) -> Transformer:
    """The model of `cfg`, with LoRA adapters on its targeted projections when lora.rank > 0 (drawn
    from a stream of their own, so the base weights are those of the same seed without LoRA)."""
    if not cfg.lora.rank:
        return Transformer(cfg.model, cfg.moe, nnx.Rngs(params=seed))
    rngs = nnx.Rngs(params=seed, lora=jax.random.fold_in(jax.random.key(seed), LORA_STREAM))
    return Transformer(cfg.model, cfg.moe, rngs, cfg.lora)


LORA_STREAM = 0x10A


def abstract_params(cfg: Config) -> dict:
    """The parameter tree of `cfg` as ShapeDtypeStructs (nothing allocated)."""
    model = nnx.eval_shape(lambda: build_model(cfg, 0))
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(nnx.state(model)))
