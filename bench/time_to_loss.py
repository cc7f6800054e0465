"""Time to a validation loss: wall seconds from start to the first evaluation at or below a target,
and the best validation loss, for a jaxlm config (nanoGPT's shakespeare_char task by default).

    python bench/time_to_loss.py configs/shakespeare-char-cpu.yaml --target 1.88 data.path=input.txt
    python bench/time_to_loss.py configs/shakespeare-char.yaml --target 1.47 data.path=input.txt   # GPU

The clock starts before the data is read and the step compiled, as a user's would. nanoGPT's
figures from the issue that set these goals are printed beside ours: they were measured on an H100
(GPU task) and a laptop (CPU recipe), not in this run; nanoGPT is not installed here.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from data import bench_data  # noqa: E402

SHAKESPEARE = bench_data("tinyshakespeare/input.txt", required=False)
NANOGPT = {  # config name -> the figure the issue reported for nanoGPT
    "shakespeare-char": "nanoGPT (H100, dropout 0.2): best val 1.4694 at step 1750 of a 127 s run",
    "shakespeare-char-cpu": "nanoGPT (README, laptop CPU): val 1.88 after ~3 minutes",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--target", type=float, required=True, help="validation loss to reach")
    return p.parse_intermixed_args(argv)  # overrides may come after --target, as the examples give them


def main() -> int:
    args = parse_args()
    t0 = time.time()
    from jaxlm.config import load_config
    from jaxlm.train.loop import train

    overrides = list(args.overrides)
    if not any(o.startswith("data.path=") for o in overrides) and SHAKESPEARE:
        overrides.append(f"data.path={SHAKESPEARE}")
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(args.config, overrides + [f"train.run_dir={run_dir}", "train.progress=false"])
        history = train(cfg)
    evals = [r for r in history if "eval_loss" in r]
    reached = next((r for r in evals if r["eval_loss"] <= args.target), None)
    best = min(evals, key=lambda r: r["eval_loss"])
    last = history[-1]
    import jax

    print(f"config {args.config} on {jax.devices()[0].device_kind} x {jax.device_count()} "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"jaxlm: best val loss {best['eval_loss']:.4f} at step {best['step']}; "
          + (f"reached {args.target} at step {reached['step']} after {reached['time'] - t0:.1f} s"
             if reached else f"did not reach {args.target}")
          + f"; {last['step']} steps in {last['time'] - t0:.1f} s")
    print(NANOGPT.get(Path(args.config).stem, "no published peer figure for this config"))
    return 0 if reached else 1


if __name__ == "__main__":
    sys.exit(main())
