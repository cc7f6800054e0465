"""Training throughput of the bench config: jaxlm vs Hugging Face LlamaForCausalLM (torch CPU).

Prints step time, CPU time per step, tokens/s and MFU (matmul FLOPs from jaxlm.tools.accounting over
jaxlm.train.metrics.peak_flops: the device table's bf16 peak, else a measured matmul) for jaxlm,
any jaxlm variants, and the torch peer (eager, torch.compile), all timed interleaved in one run
on random token batches (bench/harness.py), and the ratios.

    python bench/throughput.py [--rounds 20] [--no-torch] [config overrides...]
    python bench/throughput.py --variants attention_impl=xla projection_impl=xla,scan_layers=false
    python bench/throughput.py --ab-xla-flags=--xla_cpu_experimental_ynn_fusion_type= --repeats 6

--ab-xla-flags times jaxlm in child processes alternating without (A) and with (B) the extra
XLA_FLAGS (XLA reads them once per process), and times torch.compile in this process between them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (jaxlm_runner, load_average, machine_line, run_child, summary, table,  # noqa: E402
                     time_interleaved, variant_overrides)

REPO = Path(__file__).resolve().parents[1]


def measure(cfg_path: str, overrides: list[str], variants: list[str], rounds: int, torch_modes: list[bool]) -> list[dict]:
    """One interleaved run: jaxlm, each variant, then the torch peer in each mode. Rows of figures."""
    from jaxlm.tools.accounting import train_flops_per_step
    from jaxlm.config import load_config

    cfg = load_config(cfg_path, ["mesh.data=1"] + overrides)
    configs = {"jaxlm": cfg} | {f"jaxlm {v}": load_config(cfg_path, ["mesh.data=1"] + overrides + variant_overrides(v))
                                for v in variants}
    runners, tokens = {}, {}
    for name, c in configs.items():
        runners[name], tokens[name] = jaxlm_runner(c)
    for compile in torch_modes:
        from torch_peer import torch_runner

        name = "torch.compile" if compile else "torch eager"
        runners[name], tokens[name], _ = torch_runner(cfg, compile=compile)
    results = time_interleaved(runners, rounds, warmup=3)
    from jaxlm.train.metrics import peak_flops

    peak = peak_flops(cfg)
    rows = []
    for name, times in results.items():
        r = summary(times, tokens[name])
        flops = train_flops_per_step(configs.get(name, cfg))
        rows.append(dict(name=name, **r, mfu=flops / r["step_time_s"] / peak, peak=peak, flops=flops))
    return rows


def show(rows: list[dict]) -> None:
    for r in rows:
        r.update(ms=r["step_time_s"] * 1e3, cpu_ms=r["cpu_step_time_s"] * 1e3)
    print(table(rows, [("", "name", "<40"), ("step ms", "ms", "9.1f"), ("cpu ms", "cpu_ms", "9.1f"),
                       ("tokens/s", "tokens_per_s", "10.0f"), ("MFU", "mfu", "7.1%"), ("warmup s", "warmup_s", "9.1f")]))
    base = rows[0]["tokens_per_s"]
    for r in rows[1:]:
        print(f"jaxlm / {r['name']}: {base / r['tokens_per_s']:.2f}x")


def ab_xla_flags(args, flags: str) -> None:
    """Alternating A/B child processes for jaxlm; torch.compile timed here between the pairs."""
    from jaxlm.config import load_config
    from torch_peer import torch_runner

    base_env = dict(os.environ)
    env_b = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    child = [__file__, "--json", "--no-torch", "--rounds", str(args.rounds), "--config", args.config, *args.overrides]
    cfg = load_config(args.config, args.overrides)
    torch_step, tokens, _ = torch_runner(cfg, compile=True)
    torch_times = time_interleaved({"torch.compile": torch_step}, 0, warmup=3)["torch.compile"]
    runs = {"A": [], "B": []}
    print(f"A: XLA_FLAGS={base_env.get('XLA_FLAGS', '')!r}   B: XLA_FLAGS={env_b['XLA_FLAGS']!r}")
    print(f"{'repeat':>6} {'order':>5} {'A ms':>8} {'B ms':>8} {'A cpu':>8} {'B cpu':>8} {'B/A tok/s':>9} "
          f"{'torch.compile ms':>17} {'load':>5}", flush=True)
    for rep in range(args.repeats):
        order = "AB" if rep % 2 == 0 else "BA"
        got = {}
        for which in order:
            got[which] = run_child(child, base_env if which == "A" else env_b)[0]
            runs[which].append(got[which])
        t = time_interleaved({"torch.compile": torch_step}, args.rounds, warmup=1)["torch.compile"]
        torch_times["wall"] += t["wall"]
        torch_times["cpu"] += t["cpu"]
        a, b = got["A"], got["B"]
        print(f"{rep:>6} {order:>5} {a['step_time_s'] * 1e3:8.1f} {b['step_time_s'] * 1e3:8.1f} "
              f"{a['cpu_step_time_s'] * 1e3:8.1f} {b['cpu_step_time_s'] * 1e3:8.1f} "
              f"{b['tokens_per_s'] / a['tokens_per_s']:9.3f} {statistics.median(t['wall']) * 1e3:17.1f} "
              f"{load_average():5.1f}", flush=True)
    med = lambda which, key: statistics.median(r[key] for r in runs[which])
    tc = summary(torch_times, tokens)
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(runs["A"], runs["B"])]
    print(f"\nmedians over {args.repeats} repeats (each a median of {args.rounds} steps):")
    for which in "AB":
        print(f"  jaxlm {which}: {med(which, 'step_time_s') * 1e3:.1f} ms/step (cpu {med(which, 'cpu_step_time_s') * 1e3:.1f} ms), "
              f"{med(which, 'tokens_per_s'):.0f} tok/s, {med(which, 'tokens_per_s') / tc['tokens_per_s']:.2f}x torch.compile")
    print(f"  torch.compile: {tc['step_time_s'] * 1e3:.1f} ms/step (cpu {tc['cpu_step_time_s'] * 1e3:.1f} ms), "
          f"{tc['tokens_per_s']:.0f} tok/s")
    print(f"  B/A tokens/s per repeat: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}; load avg now {load_average():.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "bench.yaml"))
    ap.add_argument("--rounds", type=int, default=20, help="timed steps per runner (interleaved)")
    ap.add_argument("--variants", nargs="*", default=[], metavar="K=V,K=V",
                    help="jaxlm variants timed beside the default (model.* keys may drop 'model.')")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch peer")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--ab-xla-flags", metavar="FLAGS", help="A/B jaxlm without/with these XLA_FLAGS")
    ap.add_argument("--repeats", type=int, default=6, help="A/B pairs (with --ab-xla-flags)")
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    if args.ab_xla_flags is not None:
        print(machine_line())
        return ab_xla_flags(args, args.ab_xla_flags)
    torch_modes = [] if args.no_torch else [False] + ([] if args.no_compile else [True])
    rows = measure(args.config, args.overrides, args.variants, args.rounds, torch_modes)
    if args.json:
        print(json.dumps(rows))
        return
    import jax

    from jaxlm.config import load_config

    m = load_config(args.config, args.overrides)
    print(f"jax {jax.__version__} on {jax.default_backend()}; {machine_line()}")
    print(f"config {args.config}: vocab {m.model.vocab_size}, d_model {m.model.d_model}, {m.model.n_layers} layers, "
          f"{m.model.n_heads} heads (kv {m.model.n_kv_heads}), d_ff {m.model.d_ff}, seq {m.data.seq_len}, batch "
          f"{m.train.global_batch}, {m.model.compute_dtype}; peak {rows[0]['peak'] / 1e9:.1f} GFLOP/s, "
          f"train FLOPs/step {rows[0]['flops'] / 1e9:.2f} G; medians of {args.rounds} interleaved steps")
    show(rows)


if __name__ == "__main__":
    main()
