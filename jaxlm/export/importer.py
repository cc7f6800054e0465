"""`jaxlm import HF_DIR -o RUN_DIR`: a Hugging Face checkpoint as a step-0 jaxlm run to fine-tune."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxlm.config import Config
from jaxlm.errors import warn
from jaxlm.export.hf_load import load_params, read_source


def add_arguments(parser) -> None:
    parser.add_argument("hf_dir", help="a Hugging Face model directory (Llama, Mixtral or Qwen2-MoE, safetensors)")
    parser.add_argument("-o", "--output", required=True, help="the run directory to create")
    parser.add_argument("--config", help="a YAML config for everything but the model (data, optim, train, ...); "
                                         "its model and moe sections are replaced by the checkpoint's")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.path=corpus.txt train.steps=1000")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")


def import_run(hf_dir: str | Path, run_dir: Path, config: str | None = None, overrides: list[str] = (),
               force: bool = False, devices=None) -> Config:
    """Writes run_dir/config.yaml and a step-0 checkpoint holding the HF weights (placed on a mesh of
    `devices`, default all); returns the config."""
    from jaxlm.config import load_config
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.export.atomic import atomic_output
    from jaxlm.checkpoint.runs import write_step0
    from jaxlm.train.step import make_trainer

    src = read_source(hf_dir)
    from_checkpoint = [f"{section}.{k}={json.dumps(v)}" for section, obj in (("model", src.model), ("moe", src.moe))
                       for k, v in dataclasses.asdict(obj).items()]
    if src.tokenizer is not None:
        from_checkpoint.append(f"data.tokenizer={json.dumps(src.tokenizer)}")
    cfg = load_config(config, from_checkpoint + list(overrides) + [f"train.run_dir={json.dumps(str(run_dir))}"])
    if src.tokenizer is None:
        warn(f"{src.path} has no tokenizer jaxlm reads (tokenizer.json, or vocab.json + merges.txt); data.tokenizer is "
                   f"{cfg.data.tokenizer!r}: set it to the tokenizer of this model before training")
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, devices))
    params = load_params(src, cfg, trainer.param_shardings)
    with atomic_output(run_dir, force, directory=True) as tmp:
        write_step0(tmp, cfg, params, trainer)
    return cfg


def main(args) -> int:
    run_dir = Path(args.output)
    import_run(args.hf_dir, run_dir, args.config, args.overrides, args.force)
    print(f"imported {args.hf_dir} into {run_dir}; fine-tune with: jaxlm train {run_dir / 'config.yaml'}")
    return 0
