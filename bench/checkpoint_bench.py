"""Checkpoint cost on this machine: save and restore time and size, the step-time overhead of
asynchronous (and, for comparison, synchronous) saves, and the most steps a SIGKILL can lose.

For configs/bench.yaml (7.4M params) and configs/ckpt-100m.yaml (97.5M params), on one device
with random-token batches (the 100M model at global_batch 1 so a CPU step stays short):
  save        blocking part of an async save (the stall the loop sees: device -> host copy, the
              arrays' digests dispatched, orbax bookkeeping) and the time until committed
              (written, manifest: sizes + metadata crc32s + digests, renamed)
  resume      manifest check (sizes + crc32 of the metadata files) and orbax restore into the
              shardings, with the restored arrays checked against their digests; and the full
              check on request (`verify(arrays=True)`: every array read to the host and digested)
  overhead    wall time of N steps with no saves, with an async save every E steps, and with a
              sync save every E steps, interleaved in rounds so a load change hits them alike
  lost        on SIGKILL, the steps since the newest committed checkpoint: at most
              E + floor(commit time / step time) (killed just before a save commits). With the
              library default checkpoint.every=0 nothing is saved, so every step is lost.
  --kill-trials N  also SIGKILLs a real `jaxlm train` of the bench config N times at random
              points and resumes it, reporting the steps lost (last logged - restored).

    python bench/checkpoint_bench.py [--steps 8] [--every 4] [--rounds 2] [--kill-trials 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import checkpoint as ckpt
from jaxlm.checkpoint import digest, manifest
from jaxlm.config import CheckpointConfig, load_config
from jaxlm.data.batch import Batch
from jaxlm.parallel.mesh import make_mesh
from jaxlm.train.step import make_trainer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"bench (7.4M)": (REPO / "configs" / "bench.yaml", []),
           "ckpt-100m (97.5M)": (REPO / "configs" / "ckpt-100m.yaml", ["train.global_batch=1"])}


def setup(path: Path, overrides: list[str]):
    cfg = load_config(path, overrides + ["mesh.data=1"])
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    B, T, V = cfg.train.global_batch, cfg.data.seq_len, cfg.model.vocab_size
    tokens = np.random.default_rng(0).integers(0, V, (B, T + 1)).astype(np.int32)
    batch = jax.device_put(Batch.from_tokens(tokens), trainer.batch_sharding)
    state = trainer.init_state()
    for _ in range(2):  # compile and warm up
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    return cfg, trainer, batch, state


def save_restore(cfg, trainer, state, directory: Path, repeats: int) -> dict:
    out = {k: [] for k in ("blocking", "commit", "verify", "restore", "full", "crc_all", "digest")}
    for i in range(repeats):
        shutil.rmtree(directory, ignore_errors=True)
        writer = ckpt.CheckpointWriter(directory, CheckpointConfig(every=1, keep=1))
        meta = ckpt.make_meta(cfg, i + 1, 0, {"next_index": 0}, {})
        # fresh arrays: a jax.Array caches its host copy, which would make repeats look free
        state = jax.block_until_ready(jax.tree.map(jnp.copy, state))
        t0 = time.perf_counter()
        writer.save(i + 1, state, meta)
        t1 = time.perf_counter()
        writer.wait()
        t2 = time.perf_counter()
        writer.close()
        step_dir = directory / str(i + 1)
        assert ckpt.verify(step_dir) is None
        t3 = time.perf_counter()
        restored = jax.block_until_ready(ckpt.restore_state(step_dir, trainer))
        t4 = time.perf_counter()
        assert ckpt.verify(step_dir, arrays=True) is None
        t5 = time.perf_counter()
        # the peers, same run: the old design's seal (crc32 of every file on process 0, paid again
        # by every resume) against the new one's digest pass over the state on the device
        for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
            manifest._crc32(path)
        t6 = time.perf_counter()
        digest.digests(restored)
        t7 = time.perf_counter()
        out["crc_all"].append(t6 - t5)
        out["digest"].append(t7 - t6)
        out["blocking"].append(t1 - t0)
        out["commit"].append(t2 - t0)
        out["verify"].append(t3 - t2)
        out["restore"].append(t4 - t3)
        out["full"].append(t5 - t4)
        size = ckpt.dir_size(step_dir)
        del restored
    res = {k: statistics.median(v) for k, v in out.items()}
    res["size"] = size
    return res


def run_steps(trainer, batch, state, steps: int, writer, every: int):
    """`steps` steps, syncing on the loss each step as a logging loop does; saves every `every`."""
    stalls = []
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        state, metrics = trainer.train_step(state, batch)
        if writer is not None and s % every == 0:
            float(metrics["loss"])  # the step itself is not part of the stall
            t = time.perf_counter()
            writer.save(s, state, {"step": s})
            stalls.append(time.perf_counter() - t)
        float(metrics["loss"])
    if writer is not None:
        writer.wait()  # the last save's write counts too
    return state, (time.perf_counter() - t0) / steps, stalls


def overhead(trainer, batch, state, directory: Path, steps: int, every: int, rounds: int) -> dict:
    times = {"none": [], "async": [], "sync": []}
    stalls = {"async": [], "sync": []}
    modes = list(times)
    for r in range(rounds):
        for mode in modes[r % 3:] + modes[:r % 3]:  # rotate the order: load drifts hit all alike
            shutil.rmtree(directory, ignore_errors=True)
            writer = None if mode == "none" else ckpt.CheckpointWriter(
                directory, CheckpointConfig(every=every, keep=1, async_save=mode == "async"))
            state, dt, stall = run_steps(trainer, batch, state, steps, writer, every)
            if writer is not None:
                writer.close()
                stalls[mode] += stall
            times[mode].append(dt)
    out = {k: statistics.median(v) for k, v in times.items()}
    # per-round paired differences are steadier than differences of medians on a shared machine
    out.update({f"extra_{k}": statistics.median(a - b for a, b in zip(times[k], times["none"]))
                for k in ("async", "sync")})
    out.update({f"stall_{k}": statistics.median(v) for k, v in stalls.items()})
    return out


def kill_trials(n: int, every: int, workdir: Path) -> list[tuple[int, int, int]]:
    """(killed after step, restored step, steps lost) for SIGKILLs of a real bench-config run."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(workdir / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONUNBUFFERED": "1"}
    results = []
    for trial in range(n):
        run_dir = workdir / f"kill{trial}"
        cmd = [sys.executable, "-m", "jaxlm.cli", "train", str(REPO / "configs" / "bench.yaml"), "train.steps=100000",
               f"checkpoint.every={every}", "train.log_every=1", "train.eval_every=0", "train.progress=false",
               "train.peak_flops_per_device=1e12", f"train.run_dir={run_dir}"]
        target = random.Random(trial).randint(2 * every + 1, 3 * every)  # a random point of an interval
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        last = 0
        while last < target:
            time.sleep(0.05)
            try:
                last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
            except (FileNotFoundError, IndexError, ValueError):
                pass
            assert proc.poll() is None, "training exited early"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
        valid = [s for s, p in ckpt.step_dirs(run_dir / ckpt.CHECKPOINTS) if ckpt.verify(p) is None]
        restored = valid[0] if valid else 0
        results.append((last, restored, last - restored))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="steps per overhead measurement")
    ap.add_argument("--every", type=int, default=4, help="save every this many steps in the overhead runs")
    ap.add_argument("--rounds", type=int, default=3, help="overhead rounds (0: save and resume only)")
    ap.add_argument("--repeats", type=int, default=3, help="save/restore repetitions (median)")
    ap.add_argument("--kill-trials", type=int, default=0)
    ap.add_argument("--kill-every", type=int, default=10, help="checkpoint.every for the SIGKILL trials")
    ap.add_argument("--only", choices=["bench", "100m"], help="one config only")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a new temporary one)")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x1; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}; scratch {work}")
    for name, (path, overrides) in CONFIGS.items():
        if args.only and args.only not in name:
            continue
        cfg, trainer, batch, state = setup(path, overrides)
        n = sum(x.size for x in jax.tree.leaves(state["params"]))
        sr = save_restore(cfg, trainer, state, work / "sr", args.repeats)
        print(f"\n== {name}: {n / 1e6:.1f}M params, B={cfg.train.global_batch} T={cfg.data.seq_len}")
        print(f"checkpoint size        {sr['size'] / 2**20:9.1f} MiB (params + AdamW mu, nu)")
        print(f"save, blocking         {sr['blocking']:9.3f} s  (training resumes after this)")
        print(f"save, until committed  {sr['commit']:9.3f} s  ({sr['size'] / 2**20 / sr['commit']:.0f} MiB/s)")
        print(f"resume: verify         {sr['verify']:9.3f} s  (sizes + crc32 of the metadata files)")
        print(f"resume: read           {sr['restore']:9.3f} s  (into the target shardings, digests checked)")
        print(f"resume, total          {sr['verify'] + sr['restore']:9.3f} s")
        print(f"full check on request  {sr['full']:9.3f} s  (every array read to the host and digested)")
        print(f"peers, same run: crc32 of every file {sr['crc_all']:.3f} s (the old seal on process 0, and again "
              f"on every resume); digest of the state on the device {sr['digest']:.3f} s (the new seal, and "
              "the check after a restore)")
        if not args.rounds:
            continue
        oh = overhead(trainer, batch, state, work / "oh", args.steps, args.every, args.rounds)
        E = cfg.checkpoint.every or 100
        m = int(sr["commit"] // oh["none"])
        per_save = lambda mode: oh[f"extra_{mode}"] * args.steps / (args.steps // args.every)  # noqa: E731
        saves = f"{args.steps // args.every} saves in {args.steps} steps"
        print(f"loop stall per save    {oh['stall_async']:9.3f} s async, {oh['stall_sync']:.3f} s sync "
              f"(time inside save(), median)")
        print(f"step time, no saves    {oh['none']:9.3f} s")
        print(f"step time, async saves {oh['async']:9.3f} s  ({saves}: {per_save('async'):+.3f} s per save)")
        print(f"step time, sync saves  {oh['sync']:9.3f} s  ({saves}: {per_save('sync'):+.3f} s per save)")
        print(f"max steps lost on SIGKILL, checkpoint.every={E}: {E + m} (E + {m} steps run while a save "
              f"commits); library default checkpoint.every=0: all")
        del state
    if args.kill_trials:
        res = kill_trials(args.kill_trials, args.kill_every, work)
        print(f"\nSIGKILL trials (bench config, checkpoint.every={args.kill_every}): "
              + ", ".join(f"killed after {k}, restored {r}, lost {lost}" for k, r, lost in res)
              + f"; max lost {max(lost for *_, lost in res)}")
    shutil.rmtree(work / "sr", ignore_errors=True)
    shutil.rmtree(work / "oh", ignore_errors=True)


if __name__ == "__main__":
    main()
