"""MoE training throughput on this machine: jaxlm (dropless and dropping) against Hugging Face
``MixtralForCausalLM`` (torch CPU, eager and torch.compile) on configs/moe-bench.yaml, and the MoE
step time over a dense jaxlm model with the same active parameters (d_ff = top_k * expert d_ff).

Every figure is a median over timed full training steps (forward, loss with the MoE aux losses,
backward, clipping, AdamW) on random tokens. All runners, jaxlm's and torch's, are compiled first
and then timed in interleaved rounds (bench/harness.py), so a load change on a shared machine hits
them alike; read the ratios.

On CPU, `lax.ragged_dot` (the dropless grouped matmul) lowers to a dense fallback that multiplies
every row by every expert and masks, i.e. E times the expert FLOPs; the dropping path computes
capacity_factor times the active expert FLOPs. GPUs/TPUs run ragged_dot as a grouped matmul.

    pip install torch==2.13.0 transformers     # CPU build; any other torch spec pulls CUDA
    python bench/moe_throughput.py [--rounds 10] [--no-torch] [--no-compile]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "moe-bench.yaml"


def jax_variants(path: Path) -> dict:
    """name -> Config: the MoE config with each impl, and the dense model with the same active MLP."""
    from jaxlm.config import load_config

    cfg = load_config(path)
    active_ff = cfg.moe.top_k * (cfg.moe.d_ff or cfg.model.d_ff)
    return {
        "jaxlm moe dropless": load_config(path, ["moe.impl=dropless"]),
        "jaxlm moe dropping": load_config(path, ["moe.impl=dropping"]),
        f"jaxlm dense d_ff={active_ff}": load_config(path, ["moe.n_experts=0", f"model.d_ff={active_ff}"]),
    }


def keep_last(step, store: dict, name: str):
    """step, also keeping its latest result (the metrics) in store[name]."""
    def wrapped():
        store[name] = step()
        return store[name]
    return wrapped


def measure(configs: dict, rounds: int, torch_modes: list[bool], torch_experts: list) -> dict:
    """name -> figures: the jaxlm variants and the Mixtral peer, all timed interleaved."""
    from harness import jaxlm_runner, summary, time_interleaved
    from torch_peer import torch_runner

    runners, tokens, last = {}, {}, {}
    for name, cfg in configs.items():
        (step, sync), tokens[name] = jaxlm_runner(cfg)
        runners[name] = (keep_last(step, last, name), sync)
    cfg = configs["jaxlm moe dropless"]
    for experts in torch_experts:
        for compile in torch_modes:
            runner, n, info = torch_runner(cfg, compile=compile, experts_implementation=experts)
            name = f"torch Mixtral {'compile' if compile else 'eager'} (experts={info['experts']})"
            runners[name], tokens[name] = runner, n
    out = {}
    for name, times in time_interleaved(runners, rounds, warmup=2).items():
        out[name] = summary(times, tokens[name])
        if name in last:
            out[name]["dropped"] = float(last[name].get("moe_dropped_frac", 0.0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--rounds", type=int, default=10, help="timed steps per runner (interleaved)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--torch-experts", nargs="*", default=[None],
                    help="HF experts_implementation values to time (default: HF's choice; also eager, grouped_mm)")
    args = ap.parse_args()

    import jax

    from harness import machine_line

    configs = jax_variants(Path(args.config))
    cfg = configs["jaxlm moe dropless"]
    m, moe = cfg.model, cfg.moe
    print(f"config {args.config}: vocab {m.vocab_size}, d_model {m.d_model}, {m.n_layers} layers, "
          f"{m.n_heads} heads (kv {m.n_kv_heads}), seq {cfg.data.seq_len}, batch {cfg.train.global_batch}, "
          f"{m.param_dtype}; {moe.n_experts} experts top-{moe.top_k} d_ff {moe.d_ff}, capacity_factor "
          f"{moe.capacity_factor}; jax {jax.__version__} on {jax.default_backend()}; {machine_line()}")
    torch_modes = [] if args.no_torch else [False] + ([] if args.no_compile else [True])
    results = measure(configs, args.rounds, torch_modes, args.torch_experts)
    print(f"\n{'variant':44} {'step ms':>9} {'cpu ms':>9} {'tokens/s':>9} {'warmup s':>9}")
    for name, r in results.items():
        extra = f"  dropped {r['dropped']:.3f}" if "dropped" in r and "moe" in name else ""
        print(f"{name:44} {r['step_time_s'] * 1e3:9.1f} {r['cpu_step_time_s'] * 1e3:9.1f} "
              f"{r['tokens_per_s']:9.0f} {r['warmup_s']:9.1f}{extra}")
    dense = next(r for n, r in results.items() if "dense" in n)
    drop, dropless = results["jaxlm moe dropping"], results["jaxlm moe dropless"]
    print(f"\nMoE step time / dense with the same active parameters (target <= 1.5): "
          f"dropping {drop['step_time_s'] / dense['step_time_s']:.2f}, "
          f"dropless {dropless['step_time_s'] / dense['step_time_s']:.2f}")
    print(f"dropless / dropping step time on {jax.default_backend()}: "
          f"{dropless['step_time_s'] / drop['step_time_s']:.2f}")
    for name, r in results.items():
        if name.startswith("torch"):
            print(f"jaxlm dropping tokens/s over {name}: {drop['tokens_per_s'] / r['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
