"""Reading parameters out of a run's checkpoint, and writing a step-0 run around given parameters."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxlm import checkpoint as ckpt
from jaxlm.config import Config, ConfigError, from_dict, to_yaml
from jaxlm.errors import UserError


def config_of(step_dir: Path) -> Config:
    raw = ckpt.read_meta(step_dir).get("config")
    if not isinstance(raw, dict):
        raise UserError(f"{step_dir}: its metadata holds no config")
    try:
        return from_dict(Config, raw, prefix="")
    except ConfigError as e:
        raise UserError(f"{step_dir}: the saved config does not fit this jaxlm: {e}") from None


def abstract_params(cfg: Config) -> dict:
    """The parameter tree of `cfg` as ShapeDtypeStructs (nothing allocated)."""
    from jaxlm.train.step import build_model

    model = nnx.eval_shape(lambda: build_model(cfg, 0))
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(nnx.state(model)))


def load_params(step_dir: Path) -> tuple[Config, dict]:
    """(config, params as host numpy arrays): only the params are read, not the optimizer state."""
    cfg = config_of(step_dir)
    target = abstract_params(cfg)
    restore_args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype), target)
    with ocp.PyTreeCheckpointer() as ckptr:
        state = ckptr.restore((step_dir / "state").absolute(), args=ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
    return cfg, state["params"]


def write_step0(run_dir: Path, cfg: Config, params: dict, trainer) -> None:
    """run_dir/config.yaml and checkpoints/0 (params, fresh optimizer state) that `jaxlm train`
    resumes from, so training starts from `params`. `params` carry the trainer's shardings."""
    from jaxlm.data.pipeline import BatchIterator
    from jaxlm.data.sources import data_fingerprint

    opt_init = jax.jit(trainer.spec.optimizer.init, out_shardings=trainer.state_shardings["opt_state"])
    step = jax.device_put(jnp.zeros((), jnp.int32), trainer.state_shardings["step"])
    state = {"step": step, "params": params, "opt_state": opt_init(params)}
    fresh_data = BatchIterator(None, cfg.train.global_batch).get_state()
    meta = ckpt.make_meta(cfg, 0, 0, fresh_data, ckpt.tokenizer_identity(cfg.data.tokenizer),
                          data_fingerprint(cfg.data))
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = ckpt.CheckpointWriter(run_dir / ckpt.CHECKPOINTS, cfg.checkpoint)
    try:
        writer.save(0, state, meta)
        writer.wait()
    finally:
        writer.close()
    if jax.process_index() == 0:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
