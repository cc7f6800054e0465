"""Export and import cost on configs/ckpt-100m.yaml (97.5M params, random init, no training):
wall time and peak resident memory (RSS) of each operation, each in a fresh process (so its
peak is its own, imports and JAX start-up included):

  export hf     jaxlm export --format hf (f32 and bf16): model.safetensors + tokenizer files
  export gguf   jaxlm export --format gguf (f32 and q8_0)
  import        jaxlm import of the f32 HF export into a new run (step-0 checkpoint)
  peer          transformers: from_pretrained + save_pretrained of the same HF export (if installed)

The f32 parameters are 390 MB: an export that holds the params plus one converted shard or
tensor at a time peaks near 2x that plus the runtime (~0.5 GB of JAX/orbax).

    python bench/export_bench.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "ckpt-100m.yaml"
ENV = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "PYTHONPATH": str(REPO)}


WRAPPER = """
import resource, runpy, sys
sys.argv = ["jaxlm", *sys.argv[1:]]
try:
    runpy.run_module("jaxlm.cli", run_name="__main__", alter_sys=True)
finally:
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def measured(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of `jaxlm ARGS` in a fresh process (its own peak, read by itself)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], env=ENV, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: jaxlm {' '.join(args)}\n{proc.stderr[-2000:]}")
    peak_kb = int(proc.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return seconds, peak_kb / 1024


def make_run(run_dir: Path) -> None:
    """A step-0 checkpoint of the random-init model (what `jaxlm export` reads)."""
    import jax

    from jaxlm.config import load_config
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.checkpoint.runs import write_step0
    from jaxlm.train.step import make_trainer

    cfg = load_config(CONFIG, [f"train.run_dir={run_dir}", "mesh.data=1", "checkpoint.async_save=false"])
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    write_step0(run_dir, cfg, trainer.jit_init_params(), trainer)


PEER = """
import resource, sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model.save_pretrained(sys.argv[2])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="write outputs here and keep them (default: a temporary directory)")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="export_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    run = root / "run"
    if not run.exists():
        print(f"making a random-init step-0 checkpoint of {CONFIG.name} in {run} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--make-run", str(run)], env=ENV, check=True)
    export = lambda fmt, dtype, out: (f"export {fmt} {dtype}", out, ["export", str(run), "--format", fmt, "--dtype",
                                                                  dtype, "-o", str(root / out), "--force"])
    jobs = [export("hf", "f32", "hf"), export("hf", "bf16", "hf-bf16"), export("gguf", "f32", "m.gguf"),
            export("gguf", "q8_0", "m-q8.gguf"),
            ("import hf -> run", "imported", ["import", str(root / "hf"), "-o", str(root / "imported"), "--force",
                                              "mesh.data=1", "checkpoint.async_save=false"])]
    print(f"{'operation':<22}{'wall s':>9}{'peak RSS MiB':>15}{'output MB':>12}")
    for name, output, cmd in jobs:
        seconds, peak = measured(cmd)
        out = root / output
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else out.stat().st_size
        print(f"{name:<22}{seconds:>9.1f}{peak:>15.0f}{size / 1e6:>12.0f}", flush=True)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("peer: transformers not installed")
    else:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PEER, str(root / "hf"), str(root / "peer")], env=ENV,
                              capture_output=True, text=True)
        if proc.returncode == 0:
            peak = int(proc.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0]) / 1024
            print(f"{'peer: HF load+save':<22}{time.perf_counter() - start:>9.1f}{peak:>15.0f}"
                  "  (transformers from_pretrained + save_pretrained of the f32 export)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--make-run":
        make_run(Path(sys.argv[2]))
    else:
        main()
