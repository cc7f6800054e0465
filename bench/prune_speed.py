"""Structured pruning's speed-up on CPU: a dense model against the same model with 50% of its FFN
channels removed by `jaxlm prune --method ffn` (a genuinely smaller config), measured in the same
run, taking turns: the train step's time and greedy decode tokens/s (compilation excluded, medians).

The dense model is configs/tiny.yaml (overrides after the flags change it) at its seeded init,
on one device; the pruned one is cut from it (which weights are kept does not change the timings).

    python bench/prune_speed.py [--sparsity 0.5] [--repeats 5] [--tokens 128] [overrides ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's jaxlm, not an installed one


def runs(workdir: Path, sparsity: float, overrides: list[str]) -> dict:
    """{"dense": run dir, "pruned": run dir}: a step-0 dense run and its FFN-pruned copy."""
    from jaxlm.checkpoint.runs import write_step0
    from jaxlm.config import load_config
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.tools.prune import prune_run
    from jaxlm.train.step import make_trainer

    cfg = load_config(REPO / "configs" / "tiny.yaml", ["mesh.data=1", f"train.run_dir={workdir / 'dense'}",
                                                       *overrides])
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    write_step0(workdir / "dense", cfg, trainer.jit_init_params(), trainer)
    prune_run(str(workdir / "dense"), workdir / "pruned", ["prune.method=ffn", f"prune.sparsity={sparsity}"])
    return {"dense": workdir / "dense", "pruned": workdir / "pruned"}


def step_fn(run_dir: Path):
    """A () -> None that takes one train step of the run on a fixed batch (its state carried on)."""
    from jaxlm.checkpoint.runs import load_run
    from jaxlm.config import MeshConfig
    from jaxlm.data.batch import Batch
    from jaxlm.data.pipeline import to_global
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.train.step import make_trainer

    run = load_run(str(run_dir), mesh=make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
    trainer = make_trainer(run.cfg, run.mesh)
    state = {"s": trainer.state_from_params(run.params)}
    c = run.cfg
    tokens = np.random.default_rng(0).integers(0, c.model.vocab_size, (c.train.global_batch, c.data.seq_len + 1))
    rows = tokens[:, :-1].astype(np.int32)
    batch = to_global(Batch(inputs=rows, targets=tokens[:, 1:].astype(np.int32), loss_mask=np.ones_like(rows)),
                      trainer.batch_sharding)

    def step():
        state["s"], metrics = trainer.train_step(state["s"], batch)
        jax.block_until_ready(metrics)

    return step, run


def decode_fn(run, n: int):
    from jaxlm.inference.decode import Decoder, generate
    from jaxlm.inference.sampling import Sampling

    dec = Decoder(run.cfg, run.params, run.mesh)
    prompt = list(range(32, 64))
    return lambda: generate(dec, [prompt], n, Sampling(temperature=0.0))


def timed(fns: dict, repeats: int) -> dict:
    """{name: median seconds}: a warm-up call each, then the functions take turns (load hits all alike)."""
    for fn in fns.values():
        fn()
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="train steps per timed call")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = runs(Path(tmp), args.sparsity, args.overrides)
        steps, decodes = {}, {}
        for name, d in dirs.items():
            step, run = step_fn(d)
            steps[name] = lambda s=step: [s() for _ in range(args.steps)]
            decodes[name] = decode_fn(run, args.tokens)
            print(f"{name}: d_ff {run.cfg.model.d_ff}", flush=True)
        t_step = {k: v / args.steps for k, v in timed(steps, args.repeats).items()}
        t_dec = timed(decodes, args.repeats)
    print(f"train step (s): dense {t_step['dense']:.4f}, pruned {t_step['pruned']:.4f}, "
          f"speed-up {t_step['dense'] / t_step['pruned']:.2f}x")
    tps = {k: args.tokens / v for k, v in t_dec.items()}
    print(f"decode tokens/s: dense {tps['dense']:.1f}, pruned {tps['pruned']:.1f}, "
          f"speed-up {tps['pruned'] / tps['dense']:.2f}x")


if __name__ == "__main__":
    main()
