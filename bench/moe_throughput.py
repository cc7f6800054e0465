"""MoE training throughput on this machine: jaxlm (dropless and dropping) against Hugging Face
``MixtralForCausalLM`` (torch CPU, eager and torch.compile) on configs/moe-bench.yaml, and the MoE
step time over a dense jaxlm model with the same active parameters (d_ff = top_k * expert d_ff).

Every figure is a median over timed full training steps (forward, loss with the MoE aux losses,
backward, clipping, AdamW) on random tokens. The jaxlm variants are compiled first and then timed
in interleaved rounds, so a load change on a shared machine hits them alike; read the ratios.

On CPU, `lax.ragged_dot` (the dropless grouped matmul) lowers to a dense fallback that multiplies
every row by every expert and masks, i.e. E times the expert FLOPs; the dropping path computes
capacity_factor times the active expert FLOPs. GPUs/TPUs run ragged_dot as a grouped matmul.

    pip install torch==2.13.0 transformers     # CPU build; any other torch spec pulls CUDA
    python bench/moe_throughput.py [--steps 10] [--rounds 3] [--no-torch] [--no-compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

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


def measure_jax(configs: dict, steps: int, rounds: int) -> dict:
    import jax
    import numpy as np

    from jaxlm.config import MeshConfig
    from jaxlm.data.batch import Batch
    from jaxlm.distributed import make_mesh
    from jaxlm.train.step import make_trainer

    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    runs = {}
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        trainer = make_trainer(cfg, mesh)
        B, T = cfg.train.global_batch, cfg.data.seq_len
        tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (B, T + 1), dtype=np.int32)
        batch = jax.device_put(Batch.from_tokens(tokens), trainer.batch_sharding)
        state = trainer.init_state()
        compiled = trainer.jit_train_step.lower(state, batch, trainer.frozen).compile()
        step = lambda s, b: compiled(s, b, trainer.frozen)  # noqa: E731
        for _ in range(2):  # warm-up
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        runs[name] = dict(step=step, state=state, batch=batch, times=[], tokens=B * T,
                          setup_s=time.perf_counter() - t0)
    for _ in range(rounds):
        for run in runs.values():
            for _ in range(steps):
                t0 = time.perf_counter()
                run["state"], metrics = run["step"](run["state"], run["batch"])
                jax.block_until_ready(metrics)
                run["times"].append(time.perf_counter() - t0)
            run["metrics"] = jax.device_get(metrics)
    out = {}
    for name, run in runs.items():
        t = statistics.median(run["times"])
        out[name] = dict(step_time_s=t, tokens_per_s=run["tokens"] / t, setup_s=run["setup_s"],
                         dropped=float(run["metrics"].get("moe_dropped_frac", 0.0)))
    return out


def measure_torch_mixtral(cfg, steps: int = 10, warmup: int = 3, compile: bool = False,
                          experts_implementation: str | None = None, seed: int = 0) -> dict:
    """Median wall time of one training step of HF MixtralForCausalLM (f32, torch CPU), the same
    step as jaxlm's: forward, next-token CE + router aux loss (coef from the config), backward,
    clip at 1.0, AdamW (lr 1e-3, betas 0.9/0.95, wd 0.1), zero_grad."""
    import torch
    import transformers
    from transformers import MixtralConfig, MixtralForCausalLM

    m, moe = cfg.model, cfg.moe
    t_setup = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=moe.d_ff or m.d_ff,
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
        head_dim=m.head_dim, max_position_embeddings=cfg.data.seq_len, rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings, num_local_experts=moe.n_experts,
        num_experts_per_tok=moe.top_k, output_router_logits=True, router_aux_loss_coef=moe.aux_loss_coef,
        router_jitter_noise=0.0, sliding_window=None, attention_dropout=0.0, use_cache=False,
    )
    config._attn_implementation = "sdpa"
    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    model = MixtralForCausalLM._from_config(config, dtype=torch.float32, **kwargs).train()
    experts = getattr(model.config, "_experts_implementation", "eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            foreach=True)
    fwd = torch.compile(model) if compile else model
    gen = torch.Generator().manual_seed(seed)
    B, T = cfg.train.global_batch, cfg.data.seq_len
    batches = [torch.randint(0, m.vocab_size, (B, T), generator=gen) for _ in range(4)]

    def step(tokens):
        out = fwd(input_ids=tokens, labels=tokens, use_cache=False)  # loss includes the aux loss
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    for i in range(warmup):
        step(batches[i % 4]).item()
    setup_s = time.perf_counter() - t_setup
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(batches[i % 4]).item()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return dict(step_time_s=t, tokens_per_s=B * T / t, setup_s=setup_s, experts=experts,
                n_params=sum(p.numel() for p in model.parameters()), torch_version=torch.__version__,
                transformers_version=transformers.__version__, num_threads=torch.get_num_threads())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the jaxlm variants")
    ap.add_argument("--torch-steps", type=int, default=10)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--torch-experts", nargs="*", default=[None],
                    help="HF experts_implementation values to time (default: HF's choice; also eager, grouped_mm)")
    args = ap.parse_args()

    import jax

    configs = jax_variants(Path(args.config))
    cfg = configs["jaxlm moe dropless"]
    m, moe = cfg.model, cfg.moe
    print(f"config {args.config}: vocab {m.vocab_size}, d_model {m.d_model}, {m.n_layers} layers, "
          f"{m.n_heads} heads (kv {m.n_kv_heads}), seq {cfg.data.seq_len}, batch {cfg.train.global_batch}, "
          f"{m.param_dtype}; {moe.n_experts} experts top-{moe.top_k} d_ff {moe.d_ff}, capacity_factor "
          f"{moe.capacity_factor}; {os.cpu_count()} cpus, jax {jax.__version__} on {jax.default_backend()}")
    print(f"\n{'variant':44} {'step ms':>9} {'tokens/s':>9} {'setup s':>8}", flush=True)

    def show(name, r):
        extra = f"  dropped {r['dropped']:.3f}" if "dropped" in r and "moe" in name else ""
        row = f"{name:44} {r['step_time_s'] * 1e3:9.1f} {r['tokens_per_s']:9.0f} {r['setup_s']:8.1f}"
        print(row + extra, flush=True)

    results = measure_jax(configs, args.steps, args.rounds)
    for name, r in results.items():
        show(name, r)
    if not args.no_torch:
        for experts in args.torch_experts:
            for compile in (False,) if args.no_compile else (False, True):
                r = measure_torch_mixtral(cfg, steps=args.torch_steps, compile=compile, experts_implementation=experts)
                name = f"torch Mixtral {'compile' if compile else 'eager'} (experts={r['experts']})"
                results[name] = r
                show(name, r)
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
