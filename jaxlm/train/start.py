"""Where a run starts: `train.init_from` (a Hugging Face directory or a jaxlm run at
`train.init_from_step`), else the seeded initialisation.

A started run's weights come from the source; LoRA adapters are always fresh (B = 0), so the
starting policy is the base model. A jaxlm run trained with LoRA is read with its adapters merged
into its weights (W + (alpha / r) B A): fine-tuning an SFT-LoRA run starts from what it computes.
The same function gives DPO its reference policy (the start), on a fresh start and on a resume.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from flax import nnx

from jaxlm import checkpoint as ckpt
from jaxlm.checkpoint import runs
from jaxlm.checkpoint.resume import UNLOCKED
from jaxlm.config import Config, LoraConfig, to_dict
from jaxlm.errors import UserError, warn
from jaxlm.model import lora
from jaxlm.model.build import build_model
from jaxlm.parallel.sharding import param_shardings


def initial_params(cfg: Config, trainer) -> dict:
    """The whole parameter tree the run starts from, in `trainer.param_shardings`."""
    source = cfg.train.init_from
    if not source:
        return trainer.jit_init_params()
    base_shardings, adapter_shardings = lora.split_adapters(trainer.param_shardings)
    if Path(source, "config.json").is_file():
        from jaxlm.export.hf_load import load_hf_params

        base = load_hf_params(source, without_lora(cfg), base_shardings)
    else:
        base = run_params(cfg, source, cfg.train.init_from_step, trainer, base_shardings)
    if not adapter_shardings:
        return base
    # only the adapters are initialised (XLA drops the rest of the init from the program)
    fresh = jax.jit(lambda: lora.split_adapters(trainer.jit_init_params())[1], out_shardings=adapter_shardings)()
    return lora.join_adapters(base, fresh)


def without_lora(cfg: Config) -> Config:
    return dataclasses.replace(cfg, lora=LoraConfig())


def run_params(cfg: Config, run_dir: str, step, trainer, base_shardings) -> dict:
    """The weights of a jaxlm run's checkpoint (adapters merged) for `cfg`'s model, in `base_shardings`."""
    step_dir = ckpt.find_step(run_dir, step)
    meta = ckpt.read_meta(step_dir)
    src = runs.config_of(step_dir)
    where = f"train.init_from={run_dir!r} ({step_dir})"
    if bad := model_differences(src, cfg):
        raise UserError(f"{where} is a different model: {', '.join(bad)}; set these as in that run")
    saved, mine = meta.get("tokenizer") or {}, ckpt.tokenizer_identity(cfg.data.tokenizer)
    if saved.get("hash") and mine.get("hash") and saved["hash"] != mine["hash"]:
        raise UserError(f"{where} was trained with tokenizer {saved.get('spec')!r} but data.tokenizer="
                        f"{cfg.data.tokenizer!r}; they must be the same")
    if src.prune.masked and not cfg.prune.masked:
        warn(f"{where} was pruned (prune.method={src.prune.method}) but this config prunes nothing: its pruned "
             "weights start at zero and train again; set prune as in that run to keep them zero")
    abstract = nnx.state(nnx.eval_shape(lambda: build_model(src, 0)))
    shardings = param_shardings(abstract, trainer.mesh, trainer.rules)
    target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                          nnx.to_pure_dict(abstract), shardings)
    params = ckpt.restore_params(step_dir, target)
    if not src.lora.rank:
        return params
    return jax.jit(lambda p: lora.merge(p, src.lora.scale), out_shardings=base_shardings)(params)


def model_differences(src: Config, cfg: Config) -> list[str]:
    """'key (that run -> this config)' for every model/moe setting that changes the function."""
    old, new = to_dict(src), to_dict(cfg)
    out = []
    for section in ("model", "moe"):
        for key, value in new[section].items():
            name = f"{section}.{key}"
            if name not in UNLOCKED and old[section].get(key) != value:
                out.append(f"{name} ({old[section].get(key)!r} -> {value!r})")
    return out
