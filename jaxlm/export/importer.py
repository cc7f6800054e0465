"""`jaxlm import HF_DIR -o RUN_DIR`: a Hugging Face checkpoint as a step-0 jaxlm run to fine-tune.

The run's config gets the checkpoint's model and moe sections, and fine-tuning defaults for what
the user did not set (a small peak learning rate with a short warmup and a cosine decay, no weight
decay: pretraining's lr 1e-3 would wreck the weights in a few steps).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxlm.config import Config
from jaxlm.errors import warn
from jaxlm.export.hf_load import load_params, read_source

FINE_TUNING = {"optim.lr": 2e-5, "optim.min_lr": 2e-6, "optim.schedule": "cosine", "optim.warmup_steps": 10,
               "optim.weight_decay": 0.0}


def add_arguments(parser) -> None:
    parser.add_argument("hf_dir", help="a Hugging Face model directory (safetensors): Llama, Mistral, Mixtral, "
                                       "Qwen2, Qwen2-MoE, Qwen3 or Qwen3-MoE")
    parser.add_argument("-o", "--output", required=True, help="the run directory to create")
    parser.add_argument("--config", help="a YAML config for everything but the model (data, optim, train, ...); "
                                         "its model and moe sections are replaced by the checkpoint's")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.path=corpus.txt train.steps=1000")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")


def fine_tuning_defaults(config: str | None, overrides: list[str]) -> list[str]:
    """FINE_TUNING as overrides, for the keys neither the config file nor the overrides set."""
    from jaxlm.config.load import read_yaml

    raw = read_yaml(Path(config)) if config and Path(config).is_file() else {}  # its `base:` chain included
    given = {item.partition("=")[0] for item in overrides}
    in_file = lambda key: isinstance(raw, dict) and key.split(".")[1] in (raw.get(key.split(".")[0]) or {})
    return [f"{key}={value}" for key, value in FINE_TUNING.items() if key not in given and not in_file(key)]


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
    if src.tokenizer is not None:  # GPT-2 files or a tokenizer.json: the model directory is the tokenizer
        from_checkpoint.append(f"data.tokenizer={json.dumps(src.tokenizer)}")
    from_checkpoint += fine_tuning_defaults(config, list(overrides))
    cfg = load_config(config, from_checkpoint + list(overrides) + [f"train.run_dir={json.dumps(str(run_dir))}"])
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, devices))
    params = load_params(src, cfg, trainer.param_shardings)
    with atomic_output(run_dir, force, directory=True) as tmp:
        write_step0(tmp, cfg, params, trainer)
    if src.tokenizer is None:
        warn(f"{src.path} has no tokenizer (tokenizer.json, or vocab.json + merges.txt); data.tokenizer is "
             f"{cfg.data.tokenizer!r}: set it to the tokenizer of this model before training")
    return cfg


def next_steps(cfg: Config, run_dir: Path) -> str:
    """What to run next, and what must be set first."""
    o = cfg.optim
    lines = [f"fine-tuning settings: optim.lr={o.lr:g} ({o.schedule} to {o.min_lr:g} after {o.warmup_steps} warmup "
             f"steps), train.steps={cfg.train.steps}, data.seq_len={cfg.data.seq_len}, data.tokenizer={cfg.data.tokenizer}"]
    train = f"jaxlm train {run_dir / 'config.yaml'}"
    if cfg.data.path is None and not cfg.data.mixture:
        lines.append("set data.path to your training text first (otherwise it trains on jaxlm's embedded demo corpus):")
        train += " data.path=YOUR_DATA"
    lines.append(f"fine-tune with: {train}")
    lines.append(f"then export with: jaxlm export {run_dir} --format hf -o OUT_DIR")
    return "\n".join(lines)


def main(args) -> int:
    run_dir = Path(args.output)
    cfg = import_run(args.hf_dir, run_dir, args.config, args.overrides, args.force)
    print(f"imported {args.hf_dir} into {run_dir}")
    print(next_steps(cfg, run_dir))
    return 0
