"""Torch peer for the throughput benchmark: Hugging Face ``LlamaForCausalLM`` trained on CPU.

``measure_torch_llama`` builds the same decoder-only Llama that jaxlm trains in the bench config
(RMSNorm pre-norm, RoPE, SwiGLU, untied embeddings, no biases), in float32, and times complete
training steps: forward, next-token cross-entropy loss, backward, gradient clipping at 1.0,
AdamW step (lr 1e-3, weight decay 0.1) and zero_grad, on random token batches.

Install (CPU build; any torch spec other than this exact pin pulls a multi-GB CUDA build):

    pip install torch==2.13.0 transformers

Run ``python bench/torch_peer.py`` for the bench-config figures (eager and torch.compile, sdpa and
eager attention). Only this file's ``__main__`` prints; the function just returns numbers.
On a busy machine wall-clock figures swing by 2-5x; ``taskset -c 0 python bench/torch_peer.py``
(one core, one thread) makes the per-step CPU time column a stable figure.
"""

from __future__ import annotations

import os
import statistics
import time


def _usable_cpus() -> int:
    """os.cpu_count(), narrowed to the CPUs this process may run on (taskset / cgroup cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _best_adamw(params, lr: float, weight_decay: float, impl: str | None):
    import torch

    kwargs = dict(lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), eps=1e-8)
    if impl == "fused":
        return torch.optim.AdamW(params, fused=True, **kwargs)
    if impl == "foreach":
        return torch.optim.AdamW(params, foreach=True, **kwargs)
    if impl == "for":
        return torch.optim.AdamW(params, foreach=False, **kwargs)
    # Default: fused (measured fastest on CPU with torch 2.13); fall back to foreach where absent.
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def build_torch_llama_step(
    vocab: int,
    d_model: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    d_ff: int,
    seq_len: int,
    batch: int,
    compile: bool = False,
    *,
    attn_implementation: str = "sdpa",
    compile_mode: str | None = None,
    optimizer_impl: str | None = None,
    num_threads: int | None = None,
    seed: int = 0,
):
    """Build the HF Llama + AdamW and return ``(step, info)``; ``step()`` runs one full training
    step on the next of 4 pre-drawn random batches and returns the loss as a float.

    Used by ``measure_torch_llama`` and by experiments that interleave torch steps with other work.
    The first calls compile when ``compile`` (warm up before timing).
    """
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(num_threads or _usable_cpus())
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=d_ff,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=d_model // n_heads,
        hidden_act="silu",
        max_position_embeddings=seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        use_cache=False,
        torch_dtype=torch.float32,
    )
    config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(config).to(torch.float32)
    model.config._attn_implementation = attn_implementation
    model.train()
    opt = _best_adamw(model.parameters(), 1e-3, 0.1, optimizer_impl)
    opt_name = "fused" if opt.defaults.get("fused") else ("foreach" if opt.defaults.get("foreach") else "for")

    fwd = model
    if compile:
        fwd = torch.compile(model, mode=compile_mode) if compile_mode else torch.compile(model)

    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, vocab, (batch, seq_len), generator=gen) for _ in range(4)]
    counter = [0]

    def step() -> float:
        tokens = batches[counter[0] % len(batches)]
        counter[0] += 1
        # labels=tokens: HF shifts internally and takes the mean next-token cross-entropy.
        out = fwd(input_ids=tokens, labels=tokens, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()  # CPU eager is synchronous; .item() also ends any async work

    info = dict(
        attn_implementation=model.config._attn_implementation,
        compile=compile,
        compile_mode=(compile_mode or "default") if compile else None,
        optimizer=f"AdamW({opt_name})",
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        num_threads=torch.get_num_threads(),
        n_params=sum(p.numel() for p in model.parameters()),
    )
    return step, info


def measure_torch_llama(
    vocab: int,
    d_model: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    d_ff: int,
    seq_len: int,
    batch: int,
    steps: int = 10,
    warmup: int = 3,
    compile: bool = False,
    *,
    attn_implementation: str = "sdpa",
    compile_mode: str | None = None,
    optimizer_impl: str | None = None,
    num_threads: int | None = None,
    seed: int = 0,
) -> dict:
    """Median wall time of one full training step of HF LlamaForCausalLM on torch CPU.

    Returns a dict with ``step_time_s`` (median over ``steps`` timed steps), ``tokens_per_s``
    (batch * seq_len / step_time_s), ``min_step_time_s``, ``step_times_s`` (all timed steps),
    ``cpu_step_time_s`` (median process CPU time per step: robust to other load on the
    machine when run on one core, e.g. under ``taskset -c 0``), ``setup_s`` (model build + warmup, which includes torch.compile's compilation when
    ``compile``), ``attn_implementation`` (the one HF actually used), ``compile``,
    ``compile_mode``, ``optimizer``, ``torch_version``, ``transformers_version``, ``num_threads``
    and ``n_params``.
    """
    t_setup = time.perf_counter()
    step, info = build_torch_llama_step(
        vocab, d_model, n_layers, n_heads, n_kv_heads, d_ff, seq_len, batch, compile,
        attn_implementation=attn_implementation, compile_mode=compile_mode,
        optimizer_impl=optimizer_impl, num_threads=num_threads, seed=seed,
    )
    for _ in range(max(1, warmup)):
        step()
    setup_s = time.perf_counter() - t_setup

    times, cpu_times = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    step_time = statistics.median(times)
    return dict(
        step_time_s=step_time,
        tokens_per_s=batch * seq_len / step_time,
        min_step_time_s=min(times),
        cpu_step_time_s=statistics.median(cpu_times),
        step_times_s=times,
        setup_s=setup_s,
        **info,
    )


BENCH_CONFIG = dict(
    vocab=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=688, seq_len=256, batch=8
)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--attn", nargs="+", default=["sdpa", "eager"])
    ap.add_argument("--compile-modes", nargs="*", default=["default"],
                    help="torch.compile modes to try besides eager (default, reduce-overhead, max-autotune, ...)")
    ap.add_argument("--optimizers", nargs="*", default=[None], help="fused / foreach / for (default: fused)")
    args = ap.parse_args()

    print(f"bench config: {BENCH_CONFIG}, cpus={os.cpu_count()} (usable {_usable_cpus()}), "
          f"load avg {os.getloadavg()[0]:.1f}")
    print(f"{'attn':6} {'mode':16} {'adamw':8} {'step ms':>9} {'min ms':>8} {'cpu ms':>8} {'tok/s':>9} {'setup s':>8}")
    for attn in args.attn:
        for opt_impl in args.optimizers:
            for mode in [None] + list(args.compile_modes):
                t0 = time.perf_counter()
                r = measure_torch_llama(
                    **BENCH_CONFIG, steps=args.steps, warmup=args.warmup,
                    compile=mode is not None,
                    compile_mode=None if mode in (None, "default") else mode,
                    attn_implementation=attn, optimizer_impl=opt_impl,
                )
                wall = time.perf_counter() - t0
                label = "eager" if mode is None else f"compile:{mode}"
                print(f"{r['attn_implementation']:6} {label:16} {r['optimizer'][6:-1]:8} "
                      f"{r['step_time_s'] * 1e3:9.1f} {r['min_step_time_s'] * 1e3:8.1f} "
                      f"{r['cpu_step_time_s'] * 1e3:8.1f} {r['tokens_per_s']:9.0f} {r['setup_s']:8.1f}"
                      f"   (total {wall:.1f}s)", flush=True)
    print(f"torch {r['torch_version']}, transformers {r['transformers_version']}, threads {r['num_threads']}, "
          f"params {r['n_params']}")


if __name__ == "__main__":
    main()
