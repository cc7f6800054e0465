"""The torch peer of the throughput benchmarks: Hugging Face LlamaForCausalLM (dense configs) or
MixtralForCausalLM (MoE configs), built from a jaxlm config, on CPU or CUDA.

`torch_runner(cfg, ...)` builds the same decoder-only model that jaxlm trains (RMSNorm pre-norm,
RoPE, SwiGLU, no biases, ties as configured) with f32 parameters, and returns a harness runner
for one complete training step: forward (optionally under bf16 autocast), next-token
cross-entropy (plus Mixtral's router aux loss), backward, gradient clipping at 1.0, AdamW (lr 1e-3,
betas 0.9/0.95, weight decay 0.1; fused where the build has it) and zero_grad, on random tokens.

    pip install torch==2.13.0 transformers     # CPU build; any other torch spec pulls CUDA
    python bench/torch_peer.py [--steps 10] [--attn sdpa eager]   # the bench config, eager + compile
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_line, summary, time_interleaved, usable_cpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def hf_config(cfg, attn_implementation: str = "sdpa"):
    """The transformers config of the model `cfg` describes (Mixtral when cfg.moe.n_experts)."""
    from transformers import LlamaConfig, MixtralConfig

    m, moe = cfg.model, cfg.moe
    common = dict(vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
                  num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim,
                  max_position_embeddings=cfg.data.seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
                  tie_word_embeddings=m.tie_embeddings, attention_dropout=0.0, use_cache=False)
    if moe.n_experts:
        config = MixtralConfig(**common, intermediate_size=moe.d_ff or m.d_ff, num_local_experts=moe.n_experts,
                               num_experts_per_tok=moe.top_k, output_router_logits=True,
                               router_aux_loss_coef=moe.aux_loss_coef, router_jitter_noise=0.0, sliding_window=None)
    else:
        config = LlamaConfig(**common, intermediate_size=m.d_ff, hidden_act="silu", attention_bias=False,
                             mlp_bias=False)
    config._attn_implementation = attn_implementation
    return config


def adamw(params, fused: bool | None = True):
    """AdamW as jaxlm's optimizer is set up; fused (one kernel for all tensors) where available."""
    import torch

    kwargs = dict(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    if fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(params, foreach=True, **kwargs)


def torch_runner(cfg, *, device: str = "cpu", bf16: bool = False, compile: bool = False,
                 attn_implementation: str = "sdpa", experts_implementation: str | None = None,
                 fused_adamw: bool = True, seed: int = 0):
    """`((step, sync), tokens per step, info)` for the HF peer of `cfg`'s model on `device`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if device == "cpu":
        torch.set_num_threads(usable_cpus())
    torch.manual_seed(seed)
    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    model = AutoModelForCausalLM.from_config(hf_config(cfg, attn_implementation), dtype=torch.float32,
                                             **kwargs).to(device).train()
    opt = adamw(model.parameters(), fused_adamw)
    fwd = torch.compile(model) if compile else model
    B, T, V = cfg.train.global_batch, cfg.data.seq_len, cfg.model.vocab_size
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, V, (B, T), generator=gen).to(device) for _ in range(4)]
    counter = [0]

    def step():
        tokens = batches[counter[0] % len(batches)]
        counter[0] += 1
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            # labels=tokens: HF shifts them and takes the mean next-token cross-entropy (+ aux loss)
            loss = fwd(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    info = dict(arch=type(model).__name__, attn=model.config._attn_implementation,
                experts=getattr(model.config, "_experts_implementation", None) if cfg.moe.n_experts else None,
                optimizer="AdamW(fused)" if opt.defaults.get("fused") else "AdamW(foreach)",
                torch=torch.__version__, transformers=transformers.__version__,
                device_kind=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                n_params=sum(p.numel() for p in model.parameters()))
    return (step, lambda loss: loss.item()), B * T, info  # .item() waits for the step's kernels


def main() -> None:
    import argparse

    from jaxlm.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "bench.yaml"))
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (one step each)")
    ap.add_argument("--attn", nargs="+", default=["sdpa", "eager"])
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()

    cfg = load_config(args.config)
    print(machine_line())
    runners, tokens = {}, 0
    for attn in args.attn:
        for compile in (False,) if args.no_compile else (False, True):
            runner, tokens, info = torch_runner(cfg, compile=compile, attn_implementation=attn)
            runners[f"{info['arch']} {info['attn']} {'compile' if compile else 'eager'}"] = runner
    results = time_interleaved(runners, rounds=args.steps, warmup=3)
    print(f"torch {info['torch']}, transformers {info['transformers']}, {info['optimizer']}")
    for name, times in results.items():
        r = summary(times, tokens)
        print(f"{name:36} {r['step_time_s'] * 1e3:9.1f} ms  {r['cpu_step_time_s'] * 1e3:9.1f} cpu ms  "
              f"{r['tokens_per_s']:9.0f} tok/s  warmup {r['warmup_s']:.1f}s")


if __name__ == "__main__":
    main()
