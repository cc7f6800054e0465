"""LoRA against full fine-tuning on one config (configs/bench.yaml by default): optimizer-state bytes
and train-step time, measured in the same process, interleaved round by round.

    python bench/lora_bench.py [configs/bench.yaml] [--rank 8] [--rounds 6] [--iters 3] [overrides ...]

Goals (issue #27): LoRA's optimizer state <= 3% of full fine-tuning's bytes, its step <= 0.75x.
The LoRA step skips the frozen weights' gradients (the step differentiates only the adapters) and
their AdamW update; the activations' gradients are still computed. Both steps run on one device on
the same fixed random batch (the next-token objective; SFT differs only in its loss mask).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import jaxlm_runner, machine_line, summary, time_interleaved  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def optimizer_bytes(cfg) -> int:
    import jax

    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.train.step import make_trainer

    trainer = make_trainer(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state()["opt_state"]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=str(REPO / "configs" / "bench.yaml"))
    p.add_argument("overrides", nargs="*")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()
    from jaxlm.config import load_config

    print(machine_line(), flush=True)
    cfgs = {"full": load_config(args.config, args.overrides),
            f"lora r={args.rank}": load_config(args.config, args.overrides + [f"lora.rank={args.rank}"])}
    opt = {name: optimizer_bytes(cfg) for name, cfg in cfgs.items()}
    runners, tokens = {}, 0
    for name, cfg in cfgs.items():
        runners[name], tokens = jaxlm_runner(cfg)
    times = time_interleaved(runners, rounds=args.rounds, iters=args.iters)
    full, lora = (summary(times[name], tokens) for name in cfgs)
    name = f"lora r={args.rank}"
    result = {"config": Path(args.config).name, "full_opt_bytes": opt["full"], "lora_opt_bytes": opt[name],
              "opt_bytes_ratio": opt[name] / opt["full"], "full_step_s": full["step_time_s"],
              "lora_step_s": lora["step_time_s"], "step_time_ratio": lora["step_time_s"] / full["step_time_s"],
              "full_cpu_step_s": full["cpu_step_time_s"], "lora_cpu_step_s": lora["cpu_step_time_s"]}
    print(f"optimizer state: full {opt['full'] / 2**20:.2f} MiB, {name} {opt[name] / 2**20:.3f} MiB "
          f"({100 * result['opt_bytes_ratio']:.2f}%; goal <= 3%)")
    print(f"step time (median of {args.rounds} rounds x {args.iters}): full {full['step_time_s'] * 1e3:.1f} ms, "
          f"{name} {lora['step_time_s'] * 1e3:.1f} ms ({result['step_time_ratio']:.2f}x; goal <= 0.75x)")
    print(machine_line())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
