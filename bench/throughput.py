"""Training throughput of the bench config: jaxlm vs Hugging Face LlamaForCausalLM (torch CPU).

Prints step time, tokens/s and MFU (matmul FLOPs from jaxlm.accounting over this machine's
measured f32 matmul peak) for jaxlm, then the torch peer, eager and torch.compile, measured in
the same run on random token batches, and the ratios. Usage:

    python bench/throughput.py [--steps 20] [--no-torch] [config overrides...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]


def time_jaxlm(cfg, steps: int, warmup: int) -> dict:
    from jaxlm.data.batch import Batch
    from jaxlm.distributed import make_mesh
    from jaxlm.train.step import make_trainer

    trainer = make_trainer(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    state = trainer.init_state()
    B, T, V = cfg.train.global_batch, cfg.data.seq_len, cfg.model.vocab_size
    tokens = np.random.default_rng(0).integers(0, V, (B, T + 1)).astype(np.int32)
    batch = jax.device_put(Batch.from_tokens(tokens), trainer.batch_sharding)
    t0 = time.perf_counter()
    for _ in range(warmup):
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    setup = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    step_time = statistics.median(times)
    return {"step_time_s": step_time, "tokens_per_s": B * T / step_time, "setup_s": setup}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "bench.yaml"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch peer")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from jaxlm.accounting import train_flops_per_step
    from jaxlm.config import load_config
    from jaxlm.train.metrics import measure_peak_flops

    cfg = load_config(args.config, ["mesh.data=1"] + args.overrides)
    m = cfg.model
    peak = measure_peak_flops()
    flops = train_flops_per_step(cfg)
    print(f"bench config: vocab {m.vocab_size}, d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads "
          f"(kv {m.n_kv_heads}), d_ff {m.d_ff}, seq {cfg.data.seq_len}, batch {cfg.train.global_batch}, "
          f"{m.compute_dtype}; remat {m.remat}")
    print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s; train FLOPs/step (matmul): {flops / 1e9:.2f} G")
    rows = [("jaxlm", time_jaxlm(cfg, args.steps, args.warmup))]
    if not args.no_torch:
        from torch_peer import measure_torch_llama

        shape = dict(vocab=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                     n_kv_heads=m.n_kv_heads, d_ff=m.d_ff, seq_len=cfg.data.seq_len, batch=cfg.train.global_batch)
        rows.append(("torch eager", measure_torch_llama(**shape, steps=args.steps, warmup=args.warmup)))
        rows.append(("torch.compile", measure_torch_llama(**shape, steps=args.steps, warmup=args.warmup, compile=True)))
    print(f"{'':<15}{'step ms':>10}{'tokens/s':>12}{'MFU':>8}{'setup s':>10}")
    for name, r in rows:
        mfu = flops / r["step_time_s"] / peak
        print(f"{name:<15}{r['step_time_s'] * 1e3:>10.1f}{r['tokens_per_s']:>12.0f}{mfu:>8.1%}{r['setup_s']:>10.1f}")
    base = rows[0][1]["tokens_per_s"]
    for name, r in rows[1:]:
        print(f"jaxlm / {name}: {base / r['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
