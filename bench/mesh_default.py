"""The default mesh question: replicate the state (`data: -1`) or shard it (`data: 1, fsdp: -1`)?

For each config, on the devices present (8 simulated CPU devices by default), per device: the
bytes of parameters and optimizer state each device holds, XLA's own memory figures of the
compiled train step (arguments, temporaries), and the step time of both meshes timed interleaved
on one fixed batch. Simulated CPU devices share the host's cores and their collectives are memory
copies, so the time column says little about GPUs or TPUs; the memory columns are exact.

    python bench/mesh_default.py [--rounds 10] [--configs configs/tiny.yaml configs/bench.yaml]
    python bench/mesh_default.py --configs configs/gpu-124m.yaml --no-time    # memory only
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_line, summary, table, time_interleaved  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MESHES = {"data=-1 (replicated)": ["mesh.data=-1", "mesh.fsdp=1"], "fsdp=-1 (sharded)": ["mesh.data=1", "mesh.fsdp=-1"]}


def per_device_state_bytes(trainer) -> int:
    """Bytes of parameters + optimizer state on device 0 (its shards of every array)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(trainer.abstract_state()):
        total += int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    return total


def runner(trainer):
    """(step, sync) on one fixed random batch, the state donated from step to step."""
    import jax
    import numpy as np

    from jaxlm.data.batch import Batch

    c = trainer.cfg
    tokens = np.random.default_rng(0).integers(0, c.model.vocab_size, (c.train.global_batch, c.data.seq_len + 1))
    batch = jax.device_put(Batch.from_tokens(tokens.astype(np.int32)), trainer.batch_sharding)
    state = [trainer.init_state()]

    def step():
        state[0], metrics = trainer.train_step(state[0], batch)
        return metrics

    return step, jax.block_until_ready


def measure(config: str, overrides: list[str], rounds: int, timed: bool) -> list[dict]:
    from jaxlm.config import load_config
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.train.step import make_trainer

    rows, runners = [], {}
    for name, mesh_overrides in MESHES.items():
        cfg = load_config(config, overrides + mesh_overrides)
        trainer = make_trainer(cfg, make_mesh(cfg.mesh))
        memory = trainer.lower_train_step().compile().memory_analysis()
        rows.append({"name": f"{Path(config).stem} {name}", "mesh": name,
                     "state_mb": per_device_state_bytes(trainer) / 2**20,
                     "args_mb": memory.argument_size_in_bytes / 2**20, "temp_mb": memory.temp_size_in_bytes / 2**20})
        if timed:
            runners[rows[-1]["name"]] = runner(trainer)
    if timed:
        times = time_interleaved(runners, rounds, iters=3, warmup=2)
        for row in rows:
            r = summary(times[row["name"]])
            row.update(step_ms=1e3 * r["step_time_s"], cpu_ms=1e3 * r["cpu_step_time_s"])
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=[str(REPO / "configs" / "tiny.yaml"),
                                                     str(REPO / "configs" / "bench.yaml")])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--no-time", action="store_true", help="memory only (compile, never run)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    import jax

    print(machine_line(), f"devices {jax.device_count()}", flush=True)
    rows = []
    for config in args.configs:
        rows += measure(config, list(args.overrides), args.rounds, not args.no_time)
    print(machine_line())
    print(table(rows, [("config / mesh", "name", "<36"), ("state MB/device", "state_mb", "16.2f"),
                       ("XLA args MB", "args_mb", "12.2f"), ("XLA temp MB", "temp_mb", "12.2f"),
                       ("ms/step", "step_ms", "8.1f"), ("cpu ms/step", "cpu_ms", "12.1f")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
