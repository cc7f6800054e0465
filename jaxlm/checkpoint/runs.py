"""One way to load a run directory for the verbs that read one (generate, eval, export, distillation):
its config, tokenizer and parameters at a step (`--step N|best`, else the newest valid), read
straight into a mesh's shardings; and a step-0 run written around given parameters (import)."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from jaxlm import checkpoint as ckpt
from jaxlm.config import Config, ConfigError, LoraConfig, MeshConfig, from_dict, to_yaml
from jaxlm.errors import UserError
from jaxlm.model import lora
from jaxlm.model.build import abstract_params, build_model
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.sharding import param_shardings, resolve_rules
from jaxlm.tokenizer.tokenizer import Tokenizer, load_tokenizer


def config_of(step_dir: Path) -> Config:
    raw = ckpt.read_meta(step_dir).get("config")
    if not isinstance(raw, dict):
        raise UserError(f"{step_dir}: its metadata holds no config")
    try:
        return from_dict(Config, raw, prefix="")
    except ConfigError as e:
        raise UserError(f"{step_dir}: the saved config does not fit this jaxlm: {e}") from None


def load_params(step_dir: Path) -> tuple[Config, dict]:
    """(config, params as host numpy arrays): only the params are read, not the optimizer state."""
    cfg = config_of(step_dir)
    target = abstract_params(cfg)
    restore_args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype), target)
    with ocp.PyTreeCheckpointer() as ckptr:
        state = ckptr.restore((step_dir / "state").absolute(), args=ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
    ckpt.check_restored(step_dir, state)
    return cfg, state["params"]


def write_step0(run_dir: Path, cfg: Config, params: dict, trainer, masks: dict | None = None,
                pruned: dict | None = None) -> None:
    """run_dir/config.yaml and checkpoints/0 that `jaxlm train` resumes from, so training starts
    from `params` (the whole tree, in `trainer.param_shardings`). Weights only: the optimizer's
    initial state is made when training starts (restore_state), so neither this write nor the disk
    holds AdamW's two moments (2x the parameters). `masks` (with `pruned`, their summary for the
    metadata): the pruning masks training keeps applying (`jaxlm prune`)."""
    from jaxlm.data.pipeline import BatchIterator
    from jaxlm.data.sources import data_fingerprint

    step = jax.device_put(jnp.zeros((), jnp.int32), trainer.state_shardings["step"])
    state = {"step": step, "params": params, **({"masks": masks} if masks is not None else {})}
    fresh_data = BatchIterator(None, cfg.train.global_batch).get_state()
    meta = ckpt.make_meta(cfg, 0, 0, fresh_data, ckpt.tokenizer_identity(cfg.data.tokenizer),
                          data_fingerprint(cfg.data))
    meta[ckpt.WEIGHTS_ONLY] = True
    if pruned is not None:
        meta[ckpt.PRUNED] = pruned
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = ckpt.CheckpointWriter(run_dir / ckpt.CHECKPOINTS, cfg.checkpoint)
    try:
        writer.save(0, state, meta)
        writer.wait()
    finally:
        writer.close()
    if jax.process_index() == 0:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))


@dataclass
class Run:
    cfg: Config
    params: dict  # pure dict, placed on `mesh`
    tokenizer: Tokenizer
    step: int
    path: Path  # the step directory
    mesh: Mesh

    def model(self) -> nnx.Module:
        """The trained model as an nnx module (its training config, the restored parameters),
        for calling it directly: a notebook, an evaluation, a sampler that takes a module."""
        return nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: build_model(self.cfg, 0))), self.params)


def checkpoint_tokenizer(meta: dict, where: Path) -> Tokenizer:
    """The tokenizer the run trained with; refuses one whose content changed since."""
    saved = meta.get("tokenizer") or {}
    spec = saved.get("spec") or meta["config"]["data"]["tokenizer"]
    tok = Tokenizer.from_encoding(load_tokenizer(spec))
    if saved.get("hash") and saved["hash"] != tok.hash:
        raise UserError(f"{where}: the tokenizer {spec!r} changed since training (hash {saved['hash'][:12]} -> "
                        f"{tok.hash[:12]}); restore the original tokenizer")
    return tok


def inference_mesh(mesh_cfg: MeshConfig) -> Mesh:
    """The run's mesh where it fits the devices present, else every device on the data axis."""
    try:
        return make_mesh(mesh_cfg)
    except ConfigError as e:
        print(f"jaxlm: note: the run's mesh does not fit here ({e}); using mesh.data={len(jax.devices())}",
              file=sys.stderr)
        return make_mesh(MeshConfig())


def load_run(run_dir: str, step: int | None = None, mesh: Mesh | None = None, merge: bool = True) -> Run:
    """The run at `step`; a LoRA run with its adapters merged into the weights unless `merge` is
    False (then the parameters and config are the training ones, as the train and eval steps take)."""
    path = ckpt.find_step(run_dir, step)
    meta = ckpt.read_meta(path)
    cfg = from_dict(Config, meta["config"], prefix="")
    tokenizer = checkpoint_tokenizer(meta, path)
    mesh = inference_mesh(cfg.mesh) if mesh is None else mesh
    abstract = nnx.state(nnx.eval_shape(lambda: build_model(cfg, 0)))
    shardings = param_shardings(abstract, mesh, resolve_rules(cfg.mesh.rules))
    target = jax.tree.map(lambda v, sh: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh),
                          nnx.to_pure_dict(abstract), shardings)
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
    with ocp.PyTreeCheckpointer() as ckptr:
        state = ckptr.restore((path / "state").absolute(), args=ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
    ckpt.check_restored(path, state)
    cfg, params = merged_lora(cfg, state["params"], shardings) if merge else (cfg, state["params"])
    return Run(cfg, params, tokenizer, int(meta["step"]), path, mesh)


def merged_lora(cfg: Config, params: dict, shardings) -> tuple[Config, dict]:
    """A LoRA run as inference runs it: adapters folded into the weights (W + (alpha / r) B A, so
    decoding costs what the base model's does) and the config without adapters."""
    if not cfg.lora.rank:
        return cfg, params
    base_shardings = lora.split_adapters(shardings)[0]
    merged = jax.jit(lambda p: lora.merge(p, cfg.lora.scale), out_shardings=base_shardings)(params)
    return dataclasses.replace(cfg, lora=LoraConfig()), merged
