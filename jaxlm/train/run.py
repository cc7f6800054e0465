"""`jaxlm train CONFIG [section.key=value ...]`: trains, or resumes when run_dir has checkpoints."""

from __future__ import annotations

import argparse

from jaxlm.config import load_config, to_yaml
from jaxlm.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # optional for argparse (which would also call `overrides` required); main() says what is missing
    parser.add_argument("config", nargs="?", help="YAML config file (e.g. configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*",
                        help="dotted overrides, e.g. model.n_layers=2 optim.lr=3e-4; `jaxlm config` lists every key")
    parser.add_argument("--run-dir", help="where metrics, TensorBoard events and checkpoints go (train.run_dir)")
    parser.add_argument("--resume", metavar="PATH",
                        help="resume from this checkpoint (RUN_DIR/checkpoints/STEP), or the newest valid one "
                             "under a run or checkpoints directory; default: the newest valid one in run_dir")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def main(args: argparse.Namespace) -> int:
    from jaxlm.train.loop import train

    return run_verb(args, "train", train)


def run_verb(args: argparse.Namespace, verb: str, train) -> int:
    """`jaxlm VERB CONFIG [overrides]` for a verb that trains: `train(cfg, resume=...)` does the work."""
    if args.config is None or "=" in args.config:
        raise UserError(f"give a YAML config file first, then any overrides: jaxlm {verb} configs/tiny.yaml "
                        "[section.key=value ...]; `jaxlm config` lists every key")
    overrides = list(args.overrides) + ([f"train.run_dir={args.run_dir}"] if args.run_dir else [])
    cfg = load_config(args.config, overrides)
    if (cfg.train.objective == "grpo") != (verb == "rl"):
        raise UserError(f"train.objective={cfg.train.objective} runs with "
                        f"`jaxlm {'rl' if cfg.train.objective == 'grpo' else 'train'} {args.config}`: "
                        "grpo samples its own rows from the policy (`jaxlm rl`), the others read data (`jaxlm train`)")
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from jaxlm.parallel import determinism
    from jaxlm.parallel.launch import initialize

    determinism.configure(cfg.train.deterministic)  # XLA reads its flags when JAX starts
    initialize()
    history = train(cfg, resume=args.resume)
    if history:
        last = history[-1]
        summary = ", ".join(f"{k} {last[k]:.4f}" for k in ("loss", "eval_loss", "reward_mean", "accuracy") if k in last)
        verb = "done" if last["step"] >= cfg.train.steps else "stopped"
        print(f"{verb}: step {last['step']}, {summary}; metrics in {cfg.train.run_dir}/metrics.jsonl")
    return 0
