"""The block training prints when it starts: what model, on what data, on which devices and mesh,
with which kernels, and where MFU's peak comes from."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from jaxlm.config import Config, DataConfig
from jaxlm.data.sources import is_prepared


def describe_data(d: DataConfig) -> str:
    if d.mixture:
        parts = ", ".join(f"{s.path} (weight {s.weight:g})" for s in d.mixture)
        return f"a mixture of {len(d.mixture)} sources: {parts}"
    if d.path is None:
        return "the embedded default corpus (the Python standard library's source files)"
    return f"{d.path} (prepared token shards)" if is_prepared(d.path) else d.path


def describe_mesh(mesh: Mesh) -> str:
    used = [f"{name} {size}" for name, size in mesh.shape.items() if size > 1]
    return " x ".join(used) if used else "one device"


def startup_block(cfg: Config, trainer, params, peak_source: str) -> str:
    """Five lines; `trainer.cfg` has the kernels resolved for the mesh's platform."""
    m, moe, t = trainer.cfg.model, cfg.moe, cfg.train
    n = sum(int(x.size) for x in jax.tree.leaves(params))
    shape = f"{m.n_layers} layers, d_model {m.d_model}" + (f", {moe.n_experts} experts top-{moe.top_k}"
                                                           if moe.n_experts else "")
    device = trainer.mesh.devices.flat[0]
    processes = jax.process_count()
    gmm = f", MoE grouped matmul {m.gmm_impl}" if moe.n_experts else ""
    return "\n".join([
        f"training {n:,} parameters ({shape}) for {t.steps} steps: objective {t.objective}, "
        f"optimizer {cfg.optim.name}",
        f"  data     {describe_data(cfg.data)}; tokenizer {cfg.data.tokenizer}",
        f"  devices  {trainer.mesh.devices.size} x {device.device_kind} ({device.platform}), {processes} "
        f"process{'es' if processes > 1 else ''}; mesh {describe_mesh(trainer.mesh)}",
        f"  kernels  attention {m.attention_impl}, projections {m.projection_impl}{gmm}, layers "
        f"{'scanned' if m.scan_layers else 'unrolled'}",
        f"  MFU peak {peak_source}",
    ])
