"""Train-step time: P processes x D simulated CPU devices vs 1 process x P*D devices.

    python bench/multihost_step.py [--config configs/bench.yaml] [--layouts 1x8,2x4,4x2] [--steps 20]

The same global batch and mesh (data = all devices) in every layout; only the number of
processes changes, so the ratio is the cost of cross-process (gloo over TCP) collectives
against in-process ones. Each layout runs in fresh processes on 127.0.0.1; process 0 reports
the median of the timed steps after 3 warm-up steps (compilation excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(config: str, overrides: list[str], steps: int) -> None:
    from jaxlm.parallel.launch import initialize

    initialize()  # JAXLM_* env from the parent
    import jax
    import numpy as np

    from jaxlm.config import load_config
    from jaxlm.data.batch import Batch
    from jaxlm.data.pipeline import to_global
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.train.step import make_trainer

    cfg = load_config(config, overrides)
    trainer = make_trainer(cfg, make_mesh(cfg.mesh))
    state = trainer.init_state()
    B, T, P = cfg.train.global_batch, cfg.data.seq_len, jax.process_count()
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (B, T + 1), dtype=np.int32)
    rows = slice(jax.process_index() * B // P, (jax.process_index() + 1) * B // P)  # this process's share
    local = Batch.from_tokens(tokens[rows])
    batch = to_global(local, trainer.batch_sharding)
    times = []
    for i in range(3 + steps):
        t = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        if i >= 3:
            times.append(time.perf_counter() - t)
    if jax.process_index() == 0:
        print("RESULT " + json.dumps({"median_s": float(np.median(times)), "min_s": min(times),
                                      "loss": float(metrics["loss"]), "devices": jax.device_count()}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(n_proc: int, n_dev: int, config: str, overrides: list[str], steps: int, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--config", config, "--steps", str(steps), *overrides]
    port = free_port()
    procs = []
    for i in range(n_proc):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n_dev}", "JAX_PLATFORMS": "cpu"}
        if n_proc > 1:
            env.update(JAXLM_COORDINATOR=f"127.0.0.1:{port}", JAXLM_NUM_PROCESSES=str(n_proc), JAXLM_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        if p.returncode:
            raise SystemExit(f"{n_proc}x{n_dev}: process {i} exited {p.returncode}:\n{err[-2000:]}")
    line = next(l for l in outs[0][0].splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "bench.yaml"))
    ap.add_argument("--layouts", default="1x8,2x4", help="PROCESSESxDEVICES, comma-separated; the first is the baseline")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. mesh.fsdp=-1 mesh.data=1")
    args = ap.parse_args()
    if args.worker:
        return worker(args.config, args.overrides, args.steps)
    overrides = ["train.progress=false", *args.overrides]
    base = None
    print(f"{args.config} {' '.join(args.overrides)}: median train-step time over {args.steps} steps, CPU "
          f"({os.cpu_count()} cores)")
    for layout in args.layouts.split(","):
        n_proc, n_dev = map(int, layout.split("x"))
        r = run_layout(n_proc, n_dev, args.config, overrides, args.steps, args.timeout)
        base = base or r["median_s"]
        print(f"  {n_proc} process(es) x {n_dev} devices: {r['median_s'] * 1e3:8.1f} ms/step "
              f"(min {r['min_s'] * 1e3:.1f}), ratio {r['median_s'] / base:.2f}, loss {r['loss']:.4f}", flush=True)


if __name__ == "__main__":
    main()
