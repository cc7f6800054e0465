"""A run directory's checkpoint for inference: its config, tokenizer and parameters (only the
parameters are read, straight into the inference mesh's shardings)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from jaxlm import checkpoint as ckpt
from jaxlm.config import Config, ConfigError, MeshConfig, from_dict
from jaxlm.tokenizer.tokenizer import Tokenizer, load_tokenizer
from jaxlm.distributed import make_mesh
from jaxlm.errors import UserError
from jaxlm.sharding import param_shardings, resolve_rules
from jaxlm.train.step import build_model


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


def load_run(run_dir: str, step: int | None = None, mesh: Mesh | None = None) -> Run:
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
    return Run(cfg, state["params"], tokenizer, int(meta["step"]), path, mesh)
