"""LoRA against full fine-tuning on one config (configs/bench.yaml by default): optimizer-state bytes,
the compiled step's FLOPs and bytes (XLA's cost analysis) and train-step time, measured in the same
process, the variants interleaved round by round.

    python bench/lora_bench.py [configs/bench.yaml] [--rank 8] [--rounds 6] [--iters 3] [overrides ...]

Variants: full fine-tuning; LoRA on every projection (q, k, v, o, gate, up, down); LoRA on q and v
(peft's default for Llama). Goals (issue #27): LoRA's optimizer state <= 3% of full fine-tuning's
bytes, its step <= 0.75x. The LoRA step skips the frozen weights' gradients (the step
differentiates only the adapters) and their AdamW update; the activations' gradients, the
embedding gather and the softmax over the vocabulary cost the same. In float32 each adapter is
folded into its weight for the matmul (model/lora.py: merged_project), so it adds no passes over
the activations: XLA bytes 0.86x of full -> 0.75x, step 0.86x -> 0.78x (load 1.7-3.4; q, v: 0.72x). Every variant runs on one
device on the same fixed random batch (the next-token objective; SFT differs only in its mask).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import jaxlm_runner, machine_line, summary, time_interleaved  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def static_costs(cfg) -> dict:
    """Optimizer-state bytes and XLA's FLOPs and bytes of the compiled step (a scanned layer loop
    counts once in XLA's figures: compare them between variants, not with accounting)."""
    import jax

    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.train.step import make_trainer

    trainer = make_trainer(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    opt = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state()["opt_state"]))
    compiled = trainer.jit_train_step.trace(trainer.abstract_state(), trainer.abstract_batch(),
                                            trainer.abstract_frozen).lower().compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"opt_bytes": opt, "flops": cost.get("flops", 0.0), "bytes": cost.get("bytes accessed", 0.0)}


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
    variants = {"full": [], "lora all": [f"lora.rank={args.rank}"],
                "lora q,v": [f"lora.rank={args.rank}", "lora.targets=[q,v]"]}
    cfgs = {name: load_config(args.config, args.overrides + extra) for name, extra in variants.items()}
    static = {name: static_costs(cfg) for name, cfg in cfgs.items()}
    runners, tokens = {}, 0
    for name, cfg in cfgs.items():
        runners[name], tokens = jaxlm_runner(cfg)
    times = time_interleaved(runners, rounds=args.rounds, iters=args.iters)
    rows = {name: {**static[name], **summary(times[name], tokens)} for name in cfgs}
    full = rows["full"]
    print(f"{'variant':10} {'opt state':>12} {'vs full':>8} {'XLA flops':>9} {'XLA bytes':>9} {'step':>9} "
          f"{'vs full':>7} {'cpu step':>9} {'vs full':>7}")
    for name, r in rows.items():
        print(f"{name:10} {r['opt_bytes'] / 2**20:9.3f} MiB {r['opt_bytes'] / full['opt_bytes']:8.2%} "
              f"{r['flops'] / full['flops']:9.2f} {r['bytes'] / full['bytes']:9.2f} "
              f"{r['step_time_s'] * 1e3:6.0f} ms {r['step_time_s'] / full['step_time_s']:7.2f} "
              f"{r['cpu_step_time_s'] * 1e3:6.0f} ms {r['cpu_step_time_s'] / full['cpu_step_time_s']:7.2f}")
    print(f"rank {args.rank}, median of {args.rounds} rounds x {args.iters} steps; goals: optimizer state <= 3% "
          f"of full, step <= 0.75x")
    print(machine_line())
    print(json.dumps({"config": Path(args.config).name, "rank": args.rank, **{k: rows[k] for k in rows}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
