"""GPU training throughput: jaxlm (default config, auto kernels) against Hugging Face
LlamaForCausalLM / MixtralForCausalLM in torch eager and torch.compile, on one GPU, in one run.

Models (vocab 32000, f32 parameters, bf16 compute, AdamW; the accelerator issue's table):
  124m          D768 L12 H12 F2048, T1024, B16
  0.9b          D2048 L16 H16 KV8 F5632, T2048, B8
  moe-dropless  D768 L8 H12, 8 experts top-2 F2048, T1024, B8 (torch: Mixtral)
  moe-dropping  the same with moe.impl=dropping (jaxlm only)

The torch peer trains the same model under bf16 autocast with attn_implementation="sdpa" and fused
AdamW (bench/torch_peer.py). Every measurement runs in its own process (XLA_FLAGS are read once per
process, and JAX and torch must not share the GPU's memory); each prints tokens/s, MFU (FLOPs from
jaxlm.tools.accounting over jaxlm.tools.devices' dense bf16 peak for the device) and the ratios to the peers.

    python bench/gpu_throughput.py                                 # all models, jaxlm + torch
    python bench/gpu_throughput.py --models 124m --variants attention_impl=xla,scan_layers=false
    python bench/gpu_throughput.py --models 124m 0.9b --no-torch --deterministic both
    python bench/gpu_throughput.py --models moe-dropless moe-dropping --variants gmm_impl=ragged_dot
    python bench/gpu_throughput.py --smoke                         # tiny shapes, 2 steps, CPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import jaxlm_runner, machine_line, run_child, summary, time_interleaved, variant_overrides  # noqa: E402

COMMON = ["model.vocab_size=32000", "model.param_dtype=float32", "model.compute_dtype=bfloat16",
          "model.tie_embeddings=false", "mesh.data=1", "train.eval_every=0"]
MODELS = {
    "124m": ["model.d_model=768", "model.n_layers=12", "model.n_heads=12", "model.n_kv_heads=12", "model.d_ff=2048",
             "data.seq_len=1024", "model.max_seq_len=1024", "train.global_batch=16"],
    "0.9b": ["model.d_model=2048", "model.n_layers=16", "model.n_heads=16", "model.n_kv_heads=8", "model.d_ff=5632",
             "data.seq_len=2048", "model.max_seq_len=2048", "train.global_batch=8"],
    "moe-dropless": ["model.d_model=768", "model.n_layers=8", "model.n_heads=12", "model.n_kv_heads=12",
                     "model.d_ff=2048", "moe.n_experts=8", "moe.top_k=2", "moe.d_ff=2048", "moe.impl=dropless",
                     "data.seq_len=1024", "model.max_seq_len=1024", "train.global_batch=8"],
}
MODELS["moe-dropping"] = [o.replace("impl=dropless", "impl=dropping") for o in MODELS["moe-dropless"]]
TORCH_PEER = {"124m", "0.9b", "moe-dropless"}  # HF has no capacity-dropping Mixtral
# --smoke: the same structure (GQA, MoE) at toy size, appended after the model's own overrides
SMOKE = ["model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.d_ff=128",
         "moe.d_ff=64", "moe.n_experts=4", "data.seq_len=32", "model.max_seq_len=32", "train.global_batch=2"]


def config_overrides(model: str, smoke: bool, extra: list[str] = ()) -> list[str]:
    kv = ["model.n_kv_heads=2"] if smoke and model == "0.9b" else ["model.n_kv_heads=4"] if smoke else []
    smoke_moe = [o for o in SMOKE if not o.startswith("moe.")] if "moe" not in model else SMOKE
    return COMMON + MODELS[model] + (smoke_moe + kv if smoke else []) + list(extra)


# ----------------------------------------------------------------------------- one measurement (a child)


def measure(job: dict) -> dict:
    """Runs in a fresh process: times one runner for one model and returns its figures."""
    from jaxlm.parallel import determinism
    from jaxlm.config import load_config

    cfg = load_config(None, job["overrides"])
    if job["runner"] == "jaxlm":
        determinism.configure(cfg.train.deterministic)  # before JAX starts its backend
        import jax

        from jaxlm.model import kernels
        from jaxlm.train.metrics import measure_peak_flops

        platform = jax.default_backend()
        deterministic = determinism.check(cfg.train.deterministic, platform)
        runner, tokens = jaxlm_runner(cfg)
        resolved = kernels.resolve(cfg.model, platform, deterministic, cfg.data.seq_len)
        info = dict(device_kind=jax.devices()[0].device_kind, deterministic=deterministic,
                    attention=resolved.attention_impl, projection=resolved.projection_impl,
                    gmm=resolved.gmm_impl if cfg.moe.n_experts else None)
        if platform == "cpu":  # no table entry: MFU against this machine's f32 matmul
            info["measured_peak"] = measure_peak_flops()
    else:
        import torch

        from torch_peer import torch_runner

        device = "cuda" if torch.cuda.is_available() else "cpu"
        runner, tokens, info = torch_runner(cfg, device=device, bf16=True, compile=job["runner"] == "torch.compile")
    times = time_interleaved({job["runner"]: runner}, job["rounds"], job["iters"], warmup=job["warmup"])
    return {**job, **info, **summary(times[job["runner"]], tokens)}


# ----------------------------------------------------------------------------- the parent


def make_jobs(models, variants, deterministic, torch: bool, smoke: bool, rounds: int, iters: int, warmup: int):
    modes = {"auto": [None], "true": [True], "false": [False], "both": [False, True]}[deterministic]
    jobs = []
    for model in models:
        for variant in [""] + list(variants):
            for mode in modes:
                extra = variant_overrides(variant) + ([] if mode is None else [f"train.deterministic={str(mode).lower()}"])
                label = " ".join(filter(None, ["jaxlm", variant, {None: "", True: "deterministic",
                                                                    False: "non-deterministic"}[mode]]))
                jobs.append(dict(model=model, runner="jaxlm", label=label,
                                 overrides=config_overrides(model, smoke, extra)))
        if torch and model in TORCH_PEER:
            for runner in ("torch eager", "torch.compile"):
                jobs.append(dict(model=model, runner=runner, label=runner, overrides=config_overrides(model, smoke)))
    for job in jobs:
        job.update(rounds=rounds, iters=iters, warmup=warmup)
    return jobs


def peak_for(row: dict, measured: float | None) -> float | None:
    from jaxlm.tools import devices

    known = devices.lookup(row.get("device_kind", ""))
    return known.bf16_flops if known else measured


def run(jobs: list[dict], out: Path | None = None) -> list[dict]:
    """Each job in its own process; prints a row as each finishes (a failure is a row, not the end)."""
    from jaxlm.tools.accounting import train_flops_per_step
    from jaxlm.config import load_config

    rows, measured = [], None
    print(f"{'model':13} {'runner':58} {'step ms':>9} {'tokens/s':>10} {'MFU':>6} {'warmup s':>9}  kernels", flush=True)
    for job in jobs:
        try:
            row = run_child([__file__, "--child", json.dumps(job)])
        except RuntimeError as e:
            row = {**job, "error": str(e)}
            print(f"{job['model']:13} {job['label']:58} failed: {str(e).splitlines()[-1][:200]}", flush=True)
            rows.append(row)
            continue
        measured = row.get("measured_peak", measured)
        peak = peak_for(row, measured)
        flops = train_flops_per_step(load_config(None, job["overrides"]))
        row.update(flops=flops, peak=peak, mfu=flops / row["step_time_s"] / peak if peak else None)
        kernels = (f"attn {row['attention']}, proj {row['projection']}" + (f", gmm {row['gmm']}" if row.get("gmm") else "")
                   if "attention" in row else row.get("optimizer", ""))
        mfu = f"{row['mfu']:6.1%}" if row["mfu"] else f"{'-':>6}"
        print(f"{job['model']:13} {job['label']:58} {row['step_time_s'] * 1e3:9.1f} {row['tokens_per_s']:10.0f} "
              f"{mfu} {row['warmup_s']:9.1f}  {kernels}", flush=True)
        rows.append(row)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def ratios(rows: list[dict]) -> None:
    ok = [r for r in rows if "error" not in r]
    print("\nratios (tokens/s):")
    for model in dict.fromkeys(r["model"] for r in ok):
        mine = [r for r in ok if r["model"] == model]
        for r in (r for r in mine if r["runner"] == "jaxlm"):
            for peer in (p for p in mine if p["runner"] != "jaxlm"):
                print(f"  {model:13} {r['label']} / {peer['label']}: {r['tokens_per_s'] / peer['tokens_per_s']:.2f}x")
    by = {(r["model"], r["label"]): r["tokens_per_s"] for r in ok}
    if ("moe-dropless", "jaxlm") in by and ("moe-dropping", "jaxlm") in by:
        print(f"  jaxlm MoE dropless / dropping: {by['moe-dropless', 'jaxlm'] / by['moe-dropping', 'jaxlm']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--variants", nargs="*", default=[], metavar="K=V,K=V",
                    help="jaxlm variants timed beside the default (model.* keys may drop 'model.')")
    ap.add_argument("--deterministic", choices=["auto", "true", "false", "both"], default="auto",
                    help="train.deterministic for the jaxlm runs (both: time each)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--rounds", type=int, default=5, help="timed blocks per measurement")
    ap.add_argument("--iters", type=int, default=4, help="steps per timed block (one sync per block)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps: proves the script on a CPU")
    ap.add_argument("--out", type=Path, help="also append each row as a JSON line to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return
    if args.smoke:
        args.rounds, args.iters, args.warmup = 2, 1, 1
    print(machine_line())
    jobs = make_jobs(args.models, args.variants, args.deterministic, not args.no_torch, args.smoke,
                     args.rounds, args.iters, args.warmup)
    ratios(run(jobs, args.out))


if __name__ == "__main__":
    main()
