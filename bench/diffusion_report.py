"""Masked diffusion vs autoregressive, and distillation, on TinyShakespeare at equal steps.

Trains, on the same data, batches and step count:
  AR       configs/tiny.yaml (next-token); eval = NLL per byte on the validation batches
  MDLM     configs/mdlm-tiny.yaml (same model, bidirectional, +1 vocab slot for <|mask|>);
           eval = the ELBO bound on the NLL per byte (diffusion.eval_t_samples seeded t per row)
then samples from the MDLM with each sampler (MDLM ancestral, LLaDA remasking, block diffusion)
at 3, 16 and 64 steps with their tokens/s, and trains a small student (2 layers, d_model 64) with
and without the AR model as its teacher (train.objective=distill), reporting both eval losses.

    python bench/diffusion_report.py [--steps 200] [--student-steps 200] [--out /tmp/diffusion_report]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's jaxlm, not an installed one
sys.path.insert(0, str(REPO / "bench"))
from data import bench_data  # noqa: E402


def run(config: str, out: Path, name: str, steps: int, *overrides: str) -> tuple[dict, Path]:
    """Trains one run (checkpoint at the end); returns its last record and run dir."""
    from jaxlm.config import load_config
    from jaxlm.train.loop import train

    run_dir = out / name
    cfg = load_config(REPO / "configs" / config, [
        f"data.path={bench_data('tinyshakespeare/input.txt')}", f"train.steps={steps}", f"train.eval_every={steps}", "train.eval_batches=8",
        "train.progress=false", f"train.run_dir={run_dir}", f"checkpoint.every={steps}", "checkpoint.async_save=false",
        "mesh.data=1", *overrides])
    t0 = time.perf_counter()
    last = train(cfg, mesh=_one_device_mesh(cfg))[-1]
    print(f"  {name}: {steps} steps in {time.perf_counter() - t0:.0f} s, eval_loss {last['eval_loss']:.4f}",
          flush=True)
    return last, run_dir


def _one_device_mesh(cfg):
    from jaxlm.parallel.mesh import make_mesh

    return make_mesh(cfg.mesh, devices=jax.devices()[:1])


def load_model(run_dir: Path):
    """The run's model with the parameters of its newest checkpoint, and its config."""
    from jaxlm.checkpoint.runs import load_run

    run = load_run(str(run_dir))
    return run.model(), run.cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="training steps of the AR and MDLM runs")
    ap.add_argument("--student-steps", type=int, default=200, help="training steps of each student")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens each sampler generates")
    ap.add_argument("--out", default="/tmp/diffusion_report", help="where the runs go")
    args = ap.parse_args()
    out = Path(args.out)
    bench_data("tinyshakespeare/input.txt")  # or a one-line exit saying where to put it
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; TinyShakespeare, byte tokens, "
          f"d_model 128, 4 layers, batch 16 x 128, {args.steps} steps each", flush=True)

    ar, ar_dir = run("tiny.yaml", out, "ar", args.steps)
    mdlm, mdlm_dir = run("mdlm-tiny.yaml", out, "mdlm", args.steps, "diffusion.eval_t_samples=8")
    print("\n| model | eval NLL / byte | perplexity |\n|---|---|---|")
    print(f"| AR (next-token) | {ar['eval_loss']:.4f} | {math.exp(ar['eval_loss']):.2f} |")
    print(f"| MDLM (ELBO bound) | <= {mdlm['eval_loss']:.4f} | <= {math.exp(mdlm['eval_loss']):.2f} |")

    from jaxlm.tokenizer.tokenizer import load_tokenizer
    from jaxlm.inference.diffusion import sample_block, sample_mdlm, sample_remask

    tok = load_tokenizer("bytes")
    model, cfg = load_model(mdlm_dir)
    prompt = tok.encode("ROMEO:\n")
    n = args.new_tokens
    samplers = {
        "mdlm ancestral": lambda s: sample_mdlm(model, prompt, n, s, 0, schedule=cfg.diffusion.schedule),
        "llada remasking": lambda s: sample_remask(model, prompt, n, s, 0),
        "block diffusion (16)": lambda s: sample_block(model, prompt, n, s, 16, 0),
    }
    print(f"\nSamples from the MDLM ({n} new bytes after {'ROMEO:'!r}, temperature 1, seed 0):")
    for name, sample in samplers.items():
        for steps in (3, 16, 64):
            result = sample(steps)
            text = tok.decode(result.tokens[0, len(prompt):].tolist())
            print(f"\n[{name}, {steps} steps ({result.steps} model calls): {result.tokens_per_s:.0f} tokens/s]")
            print(repr(text))

    student = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=172"]
    print(f"\nDistillation: student d_model 64, 2 layers, {args.student_steps} steps; teacher = the AR run", flush=True)
    alone, _ = run("tiny.yaml", out, "student_alone", args.student_steps, *student)
    taught, _ = run("tiny.yaml", out, "student_distilled", args.student_steps, *student, "train.objective=distill",
                    f"train.teacher={ar_dir}", "distill.weight=0.5", "distill.temperature=2.0")
    print("\n| student | eval NLL / byte | perplexity |\n|---|---|---|")
    print(f"| without teacher | {alone['eval_loss']:.4f} | {math.exp(alone['eval_loss']):.2f} |")
    print(f"| distilled (weight 0.5, tau 2) | {taught['eval_loss']:.4f} | {math.exp(taught['eval_loss']):.2f} |")
    print(f"| teacher (AR above) | {ar['eval_loss']:.4f} | {math.exp(ar['eval_loss']):.2f} |")


if __name__ == "__main__":
    main()
