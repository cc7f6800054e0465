"""Eval loss and weight bytes per quantization scheme on a model trained here (the README's table).

Trains configs/tiny.yaml on TinyShakespeare (byte tokens; --steps, default 300; an existing run in
--out is reused), then scores the held-out last 5% of the text (the run's own validation split)
with `jaxlm eval`'s code, once in f32 and once per scheme of `--quantize`, and prints a markdown
table: scheme, bits per quantized weight, all weight bytes and their ratio to f32, eval loss.

    python bench/quantize_report.py [--steps 300] [--out /tmp/quantize_report]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's jaxlm, not an installed one
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def trained_run(out: Path, steps: int) -> Path:
    from jaxlm import checkpoint as ckpt
    from jaxlm.config import load_config
    from jaxlm.errors import UserError
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.train.loop import train

    run_dir = out / "tiny"
    try:
        ckpt.find_step(run_dir, steps)
        print(f"reusing {run_dir} (step {steps})", flush=True)
        return run_dir
    except UserError:  # not trained yet
        pass
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"data.path={SHAKESPEARE}", f"train.steps={steps}", f"train.eval_every={steps}", "train.progress=false",
        f"train.run_dir={run_dir}", f"checkpoint.every={steps}", "checkpoint.async_save=false", "mesh.data=1"])
    t0 = time.perf_counter()
    last = train(cfg, mesh=make_mesh(cfg.mesh, devices=jax.devices()[:1]))[-1]
    print(f"trained {steps} steps in {time.perf_counter() - t0:.0f} s, eval_loss {last['eval_loss']:.4f}", flush=True)
    return run_dir


def held_out_text(out: Path) -> Path:
    """The last 5% of the bytes (data.val_fraction of one document: the run never trained on them)."""
    data = SHAKESPEARE.read_bytes()
    path = out / "val.txt"
    path.write_bytes(data[len(data) - int(len(data) * 0.05):])
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="/tmp/quantize_report")
    args = ap.parse_args()
    if not SHAKESPEARE.is_file():
        raise SystemExit(f"needs {SHAKESPEARE}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from jaxlm.checkpoint.runs import load_run
    from jaxlm.compress.quantize import quantize_params, quantized_weights, weight_bytes
    from jaxlm.compress.schemes import SCHEMES
    from jaxlm.inference.cli_eval import evaluate

    run_dir = trained_run(out, args.steps)
    val = held_out_text(out)
    run = load_run(str(run_dir))
    m = run.cfg.model
    n_quantized = sum(_leaf(run.params, path).size for path in quantized_weights(run.cfg))
    f32_bytes = weight_bytes(run.params)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; configs/tiny.yaml (d_model {m.d_model}, "
          f"{m.n_layers} layers, d_ff {m.d_ff}, vocab {m.vocab_size}) after {args.steps} steps on TinyShakespeare; "
          f"eval on the held-out last 5% ({val.stat().st_size:,} bytes); load {os.getloadavg()[0]:.1f}\n", flush=True)
    print("| scheme | bits / quantized weight | weight bytes | vs f32 | eval loss (nats/byte) | vs f32 |")
    print("|---|---|---|---|---|---|")
    base = evaluate(str(run_dir), str(val))["loss"]
    print(f"| f32 | 32 | {f32_bytes:,} | 1.000 | {base:.4f} | |", flush=True)
    for name in SCHEMES:
        q = quantize_params(run.params, run.cfg, name)
        nbytes = weight_bytes(q)
        bits = 8 * (nbytes - (f32_bytes - 4 * n_quantized)) / n_quantized  # the unquantized rest stays f32
        loss = evaluate(str(run_dir), str(val), quantize=name)["loss"]
        print(f"| {name} | {bits:.2f} | {nbytes:,} | {nbytes / f32_bytes:.3f} | {loss:.4f} | {loss - base:+.4f} |",
              flush=True)


def _leaf(params: dict, path: tuple):
    for key in path:
        params = params[key]
    return params


if __name__ == "__main__":
    main()
