"""Export and import cost on configs/ckpt-100m.yaml (97.5M params, random init, no training):
wall time and peak resident memory (RSS) of each operation, each in a fresh process (so its
peak is its own, imports and JAX start-up included):

  export hf     jaxlm export --format hf (f32 and bf16): model.safetensors + tokenizer files
  export gguf   jaxlm export --format gguf (f32 and q8_0)
  import        jaxlm import of the f32 HF export into a new run (step-0 checkpoint)
  peer          transformers: from_pretrained + save_pretrained of the same HF export (if installed)

The f32 parameters are 390 MB: an export that holds the params plus one converted shard or
tensor at a time peaks near 2x that plus the runtime (~0.5 GB of JAX/orbax).

Then the import of a Hugging Face model of Qwen2.5-0.5B's shape (494M parameters, tied head,
q/k/v biases; random weights, saved once with save_pretrained in f32 and in bf16), each load in a
fresh process, timed from the call (imports and start-up excluded) to parameters in memory:

  transformers  AutoModelForCausalLM.from_pretrained (the peer), in the file's dtype
  jaxlm load    read_source + load_params onto one device (what train.init_from does)
  second load   the same load again in the same process, into the memory the first gave back
  first touch   a fresh process filling as many bytes as the model's: what new memory costs here
                (on a VM the host may back each page at its first touch; transformers allocates
                nothing, it maps the file, whose pages are already in memory)
  jaxlm import  the whole `jaxlm import` verb (load + a step-0 run with its AdamW state), whole process

"peak - base" is the peak RSS above the process's RSS just before the load: what loading adds.
Each load finds the file in the page cache (read once before it). transformers maps the file and
reads a weight at its first use, so its row "+ first read" touches every weight once.
Goal: jaxlm load no slower than transformers, adding at most 1.2x the model's size.

    python bench/export_bench.py [--keep DIR] [--import-only]
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


QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=True)

MAKE_QWEN = """
import sys, torch, transformers
cfg = transformers.Qwen2Config(**eval(sys.argv[1]))
torch.manual_seed(0)
model = transformers.Qwen2ForCausalLM(cfg)
model.save_pretrained(sys.argv[2])
model.to(torch.bfloat16).save_pretrained(sys.argv[3])
"""

# Each prints: seconds of the load, CPU seconds of the load (all threads), RSS before it (MiB),
# peak RSS of the process (MiB). CPU seconds are the figure to compare on a loaded machine.
RSS = "int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize() / 2**20"
CPU = "sum(resource.getrusage(resource.RUSAGE_SELF)[:2])"
PEER_LOAD = f"""
import resource, sys, time, torch, transformers
base, cpu = {RSS}, {CPU}
start = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
if sys.argv[2] == "touch":  # from_pretrained maps the file: the weights are read at first use
    for p in model.parameters():
        p.detach().reshape(-1)[::512].sum()
seconds = time.perf_counter() - start
print("RESULT", seconds, {CPU} - cpu, base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
JAXLM_LOAD = f"""
import resource, sys, time, jax
from jaxlm.config import Config
from jaxlm.export.hf_load import load_params, read_source
from jaxlm.model.build import abstract_params
from jaxlm.parallel.mesh import make_mesh
jax.devices()  # start-up: the backend starts before the clock, as torch is imported before the peer's
base, cpu = {RSS}, {CPU}
start = time.perf_counter()
src = read_source(sys.argv[1])
src.model.param_dtype = sys.argv[2]
cfg = Config(model=src.model, moe=src.moe)
mesh = make_mesh(cfg.mesh, jax.devices()[:1])
shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), abstract_params(cfg))
params = jax.block_until_ready(load_params(src, cfg, shardings))
seconds = time.perf_counter() - start
if sys.argv[3] == "again":  # a second load into the memory the first one gave back
    del params
    base, cpu = {RSS}, {CPU}
    start = time.perf_counter()
    params = jax.block_until_ready(load_params(src, cfg, shardings))
    seconds = time.perf_counter() - start
print("RESULT", seconds, {CPU} - cpu, base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

# A fresh process's first touch of anonymous memory: on a virtual machine the host may back each
# page only then, which costs system time that a load into memory the process reuses does not pay.
FIRST_TOUCH = f"""
import resource, sys, time
import numpy as np
base, cpu = {RSS}, {CPU}
start = time.perf_counter()
np.ones(int(float(sys.argv[1]) * 2**20), np.uint8)
print("RESULT", time.perf_counter() - start, {CPU} - cpu, base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def warm(hf_dir: Path) -> None:
    """Reads the weights once, so that each load finds them in the page cache, not on the disk."""
    for f in hf_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def load_measured(code: str, *args: str) -> tuple[float, float, float, float]:
    proc = subprocess.run([sys.executable, "-c", code, *args], env=ENV, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {code.splitlines()[1]} {args}\n{proc.stderr[-2000:]}")
    seconds, cpu, base, peak = map(float, proc.stdout.rsplit("RESULT", 1)[1].split())
    return seconds, cpu, base, peak


def import_bench(root: Path) -> None:
    f32, bf16 = root / "qwen-0.5b-f32", root / "qwen-0.5b-bf16"
    if not f32.exists():
        print("making a random Qwen2.5-0.5B-shaped model with transformers ...", flush=True)
        subprocess.run([sys.executable, "-c", MAKE_QWEN, repr(QWEN_05B), str(f32), str(bf16)], env=ENV, check=True)
    print(f"\n{'load (Qwen2.5-0.5B shape)':<34}{'s':>7}{'CPU s':>7}{'base MiB':>10}{'peak MiB':>10}{'peak-base':>11}"
          f"{'model MiB':>11}{'(peak-base)/model':>19}")
    for hf_dir, dtype in ((f32, "float32"), (bf16, "bfloat16")):
        size = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors")) / 2**20
        short = {"float32": "f32", "bfloat16": "bf16"}[dtype]
        for name, code, args in (("transformers from_pretrained", PEER_LOAD, [str(hf_dir), "lazy"]),
                                 ("  + first read of every weight", PEER_LOAD, [str(hf_dir), "touch"]),
                                 ("jaxlm load", JAXLM_LOAD, [str(hf_dir), dtype, "once"]),
                                 ("  second load, memory reused", JAXLM_LOAD, [str(hf_dir), dtype, "again"]),
                                 ("first touch of as much memory", FIRST_TOUCH, [str(size)])):
            warm(hf_dir)
            seconds, cpu, base, peak = load_measured(code, *args)
            print(f"{name + ' ' + short:<34}{seconds:>7.1f}{cpu:>7.1f}{base:>10.0f}{peak:>10.0f}"
                  f"{peak - base:>11.0f}{size:>11.0f}{(peak - base) / size:>19.2f}", flush=True)
    seconds, peak = measured(["import", str(f32), "-o", str(root / "qwen-run"), "--force", "mesh.data=1",
                              "checkpoint.async_save=false"])
    print(f"{'jaxlm import f32 (whole process)':<34}{seconds:>7.1f}{'':>17}{peak:>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="write outputs here and keep them (default: a temporary directory)")
    parser.add_argument("--import-only", action="store_true", help="only the import of the Qwen2.5-shaped model")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="export_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    if args.import_only:
        import_bench(root)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        return
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
        import_bench(root)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--make-run":
        make_run(Path(sys.argv[2]))
    else:
        main()
