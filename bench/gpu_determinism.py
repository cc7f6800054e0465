"""Bit-exact training on GPU: two clean runs, and a run killed (SIGKILL) and resumed, compared step
by step, for train.deterministic=true and false; and what determinism costs in tokens/s.

The runs are `jaxlm train` processes (which set XLA's determinism flags themselves) on the tiny
config widened to d384 L6 (6 heads, 2 kv heads, d_ff 1024), bf16 compute, on TinyShakespeare: 80
steps, a checkpoint every 20, loss logged every step. The killed run gets SIGKILL as soon as its
metrics show step 50; the rerun resumes from its newest checkpoint. Losses are compared exactly
(bits) and as a max difference. The throughput part times the 124M and 0.9B models of
bench/gpu_throughput.py in deterministic and non-deterministic mode (each in its own process).

    python bench/gpu_determinism.py [TINYSHAKESPEARE] [--parts runs throughput] [--out FILE]
    python bench/gpu_determinism.py --smoke          # tiny shapes on a CPU: proves the script
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_throughput  # noqa: E402
from harness import machine_line  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
from data import bench_data  # noqa: E402

DEFAULT_DATA = bench_data("tinyshakespeare/input.txt", required=False)
WIDE = ["model.d_model=384", "model.n_layers=6", "model.n_heads=6", "model.n_kv_heads=2", "model.d_ff=1024"]
SMOKE = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128",
         "data.seq_len=32", "train.global_batch=4"]


def train_command(run_dir: Path, data: Path, mode: str, steps: int, every: int, shape: list[str]) -> list[str]:
    return [sys.executable, "-m", "jaxlm.cli", "train", "configs/tiny.yaml", *shape,
            "model.compute_dtype=bfloat16", f"data.path={data}", f"train.steps={steps}", f"checkpoint.every={every}",
            "train.log_every=1", "train.eval_every=0", "train.progress=false", f"train.deterministic={mode}",
            "--run-dir", str(run_dir)]


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
            out[record["step"]] = record["loss"]
        except (ValueError, KeyError):
            pass  # a line cut short by the kill
    return out


def train(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`jaxlm train` exited {proc.returncode}: " + "\n".join(proc.stderr.splitlines()[-10:]))
    return proc.stderr


def train_and_kill(cmd: list[str], run_dir: Path, after: int, every: int) -> int:
    """Starts a run and SIGKILLs it as soon as its metrics show step `after` and the checkpoint
    before it is committed (orbax renames a finished save to its step number; an asynchronous save
    can lag on a busy CPU); returns the last logged step. Logging every step syncs the host, so
    the run is at most a step or two ahead of its metrics."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, saved = run_dir / "metrics.jsonl", run_dir / "checkpoints" / str(after // every * every)
    while proc.poll() is None:
        if metrics.exists() and max(losses(run_dir), default=0) >= after and saved.is_dir():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return max(losses(run_dir))
        time.sleep(0.002)
    raise RuntimeError(f"the run ended (exit {proc.returncode}) before step {after}: "
                       + "\n".join(proc.stderr.read().splitlines()[-5:]))


def compare(a: dict[int, float], b: dict[int, float], steps) -> dict:
    """Over `steps`: whether every loss is bit-identical, and the largest difference."""
    steps = [s for s in steps if s in a and s in b]
    diffs = [abs(a[s] - b[s]) for s in steps]
    return dict(steps=f"{steps[0]}-{steps[-1]}" if steps else "none", n=len(steps),
                identical=bool(steps) and all(a[s] == b[s] for s in steps), max_diff=max(diffs, default=None))


def runs(mode: str, data: Path, work: Path, steps: int, every: int, kill_after: int, shape: list[str]) -> dict:
    """Two clean runs and a killed-and-resumed one for train.deterministic=`mode`."""
    cmd = lambda name: train_command(work / f"{mode}-{name}", data, mode, steps, every, shape)  # noqa: E731
    for name in ("clean1", "clean2", "killed"):
        shutil.rmtree(work / f"{mode}-{name}", ignore_errors=True)
    t0 = time.perf_counter()
    train(cmd("clean1"))
    train(cmd("clean2"))
    killed_at = train_and_kill(cmd("killed"), work / f"{mode}-killed", kill_after, every)
    log = train(cmd("killed"))  # resumes from the newest valid checkpoint in its run dir
    found = re.search(r"resumed from step (\d+)", log)
    resumed_from = int(found.group(1)) if found else 0
    clean1, clean2, resumed = (losses(work / f"{mode}-{n}") for n in ("clean1", "clean2", "killed"))
    return dict(mode=mode, killed_at=killed_at, resumed_from=resumed_from, seconds=time.perf_counter() - t0,
                clean_vs_clean=compare(clean1, clean2, range(1, steps + 1)),
                resumed_vs_clean=compare(clean1, resumed, range(kill_after + 1, steps + 1)),
                resumed_steps_vs_clean=compare(clean1, resumed, range(resumed_from + 1, steps + 1)))


def show(result: dict) -> None:
    def cell(c):
        diff = "-" if c["max_diff"] is None else f"{c['max_diff']:.3g}"
        return f"{'identical' if c['identical'] else 'differ'} (steps {c['steps']}, max diff {diff})"

    resumed = f"resumed from step {result['resumed_from']}" if result["resumed_from"] else \
        "no valid checkpoint: the rerun started over"
    print(f"train.deterministic={result['mode']}: killed after step {result['killed_at']}, {resumed} "
          f"({result['seconds']:.0f}s)\n"
          f"  two clean runs:                 {cell(result['clean_vs_clean'])}\n"
          f"  resumed vs clean, after kill:   {cell(result['resumed_vs_clean'])}\n"
          f"  resumed vs clean, rerun steps:  {cell(result['resumed_steps_vs_clean'])}", flush=True)


def throughput(models: list[str], smoke: bool, rounds: int, iters: int) -> list[dict]:
    warmup = 1 if smoke else 3
    jobs = gpu_throughput.make_jobs(models, [], "both", torch=False, smoke=smoke, rounds=rounds, iters=iters,
                                    warmup=warmup)
    rows = gpu_throughput.run(jobs)
    ok = {(r["model"], r["deterministic"]): r for r in rows if "error" not in r}
    for model in models:
        if (model, True) in ok and (model, False) in ok:
            det, fast = ok[model, True], ok[model, False]
            print(f"  {model}: deterministic {det['tokens_per_s']:.0f} tok/s ({det['attention']}) vs "
                  f"{fast['tokens_per_s']:.0f} ({fast['attention']}): {det['tokens_per_s'] / fast['tokens_per_s']:.2f}x")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help="TinyShakespeare input.txt")
    ap.add_argument("--parts", nargs="+", choices=["runs", "throughput"], default=["runs", "throughput"])
    ap.add_argument("--modes", nargs="+", choices=["true", "false"], default=["true", "false"])
    ap.add_argument("--models", nargs="+", choices=["124m", "0.9b"], default=["124m", "0.9b"])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--every", type=int, default=20, help="checkpoint every this many steps")
    ap.add_argument("--kill-after", type=int, default=50)
    ap.add_argument("--work", type=Path, help="run directories go here (default: a temporary directory)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 24 steps: proves the script on a CPU")
    ap.add_argument("--out", type=Path, help="write the results as JSON to this file")
    args = ap.parse_args()

    if "runs" in args.parts and (args.data is None or not args.data.is_file()):
        sys.exit(f"gpu_determinism: {args.data} is not a file; pass the path of TinyShakespeare's input.txt")
    shape = SMOKE if args.smoke else WIDE
    if args.smoke:
        args.steps, args.every, args.kill_after = 24, 8, 12
    work = args.work or Path(tempfile.mkdtemp(prefix="jaxlm-determinism-"))
    print(machine_line())
    results = {"runs": [], "throughput": []}
    if "runs" in args.parts:
        for mode in args.modes:
            results["runs"].append(runs(mode, args.data.resolve(), work, args.steps, args.every, args.kill_after, shape))
            show(results["runs"][-1])
    if "throughput" in args.parts:
        print("\nthroughput, deterministic vs not (jaxlm, default config otherwise):")
        results["throughput"] = throughput(args.models, args.smoke, 2 if args.smoke else 5, 1 if args.smoke else 4)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
