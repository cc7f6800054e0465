"""The optimizers of `optim.name` compared on one config (the tiny one by default): the loss after
N steps of real training (the embedded default corpus, each from the same initialisation and data
order) and the step time, timed interleaved on one fixed batch in this process.

    python bench/optimizers.py [--steps 150] [--rounds 10] [--lr muon=0.01 ...] [config overrides...]

Each optimizer runs at the learning rate of LRS unless --lr says otherwise (untuned: Lion's is a
tenth of AdamW's, as its authors advise; Muon's update RMS is matched to AdamW's, so it shares
AdamW's; SGD needs a far larger one); everything else (schedule, warmup, weight decay 0.1,
clipping) is the config's. The loss columns: the mean training loss of the last 10% of steps and
the evaluation loss after the last step (4 validation batches).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import jaxlm_runner, machine_line, summary, table, time_interleaved  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NAMES = ["adamw", "lion", "adafactor", "muon", "sgd"]
LRS = {"adamw": 3e-3, "lion": 3e-4, "adafactor": 3e-3, "muon": 3e-3, "sgd": 0.3}


def final_losses(cfg) -> dict:
    from jaxlm.train.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg.train.run_dir = tmp
        history = train(cfg)
    tail = [r["loss"] for r in history if r["step"] > 0.9 * cfg.train.steps]
    return {"train_loss": sum(tail) / len(tail), "eval_loss": history[-1]["eval_loss"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds of the step")
    p.add_argument("--lr", nargs="*", default=[], metavar="NAME=LR", help="learning rates other than LRS")
    p.add_argument("--only", nargs="*", default=NAMES, choices=NAMES)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    from jaxlm.config import load_config

    lrs = LRS | {k: float(v) for k, v in (item.split("=") for item in args.lr)}
    configs = {}
    for name in args.only:
        configs[name] = load_config(args.config, [
            f"optim.name={name}", f"optim.lr={lrs[name]}", f"optim.min_lr={lrs[name] / 10}",
            f"train.steps={args.steps}", f"train.eval_every={args.steps}", "train.log_every=1",
            "train.progress=false", "checkpoint.every=0", "mesh.data=1", *args.overrides])
    print(machine_line(), flush=True)
    rows = []
    for name, cfg in configs.items():
        print(f"training {name} for {args.steps} steps ...", file=sys.stderr, flush=True)
        rows.append({"name": name, "lr": lrs[name], **final_losses(cfg)})
    runners = {name: jaxlm_runner(cfg) for name, cfg in configs.items()}
    times = time_interleaved({k: v[0] for k, v in runners.items()}, args.rounds, iters=3, warmup=2)
    for row in rows:
        r = summary(times[row["name"]], runners[row["name"]][1])
        row.update(step_ms=1e3 * r["step_time_s"], cpu_ms=1e3 * r["cpu_step_time_s"])
    print(machine_line())
    print(table(rows, [("optimizer", "name", "<10"), ("lr", "lr", "8.1e"), ("train loss", "train_loss", "11.4f"),
                       ("eval loss", "eval_loss", "10.4f"), ("ms/step", "step_ms", "8.1f"),
                       ("cpu ms/step", "cpu_ms", "12.1f")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
