"""`jaxlm prune RUN -o NEW_RUN`: a trained run pruned one-shot into a new step-0 run to retrain.

Unstructured methods (magnitude, nm) write the masked weights with their masks and a config whose
prune section keeps them applied (`jaxlm train NEW_RUN/config.yaml` retrains with pruned weights
held at zero). Structured ones (ffn, heads) write a smaller model: a new config with fewer
channels or heads and no masks. `--rewind STEP` (lottery tickets) chooses what to keep on the
trained weights but gives the survivors their values at STEP of the same run (0: the run's seeded
initialisation, rebuilt from its config when no checkpoint 0 exists).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from jaxlm import checkpoint as ckpt
from jaxlm.checkpoint import runs
from jaxlm.compress import structured
from jaxlm.compress.prune import sparsity_report
from jaxlm.config import Config, PruneConfig, to_dict
from jaxlm.config.load import config_from
from jaxlm.errors import UserError
from jaxlm.train.partition import flatten, unflatten

FLAGS = {"method": "method", "sparsity": "sparsity", "scope": "scope", "norm": "norm"}  # --flag: prune.key


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="the trained run to prune")
    parser.add_argument("-o", "--output", required=True, help="the new run directory (step 0, to train)")
    parser.add_argument("--step", help="the step to prune: N or 'best' (default: the newest valid)")
    parser.add_argument("--method", choices=["magnitude", "nm", "ffn", "heads"], help="prune.method")
    parser.add_argument("--sparsity", type=float, help="prune.sparsity: share of weights (ffn/heads: units) removed")
    parser.add_argument("--scope", choices=["layer", "global"], help="prune.scope (magnitude)")
    parser.add_argument("--nm", help="N:M, e.g. 2:4 or 4:8 (sets prune.method=nm, prune.n, prune.m)")
    parser.add_argument("--norm", choices=["l1", "l2"], help="prune.norm (ffn, heads)")
    parser.add_argument("--rewind", type=int, metavar="STEP",
                        help="lottery ticket: survivors take their values at this step of the run (0 = its init)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for the new run, e.g. train.steps=200")


def flag_overrides(args) -> list[str]:
    out = [f"prune.{key}={getattr(args, flag)}" for flag, key in FLAGS.items() if getattr(args, flag) is not None]
    if args.nm:
        n, _, m = args.nm.partition(":")
        if not (n.isdigit() and m.isdigit()):
            raise UserError(f"--nm {args.nm!r}: expected N:M, e.g. 2:4")
        out += ["prune.method=nm", f"prune.n={n}", f"prune.m={m}"]
    return out


def new_config(src: Config, output: Path, overrides: list[str]) -> Config:
    """The source run's config with the pruning settings, one-shot (the masks come with the run)."""
    cfg = config_from(to_dict(src), list(overrides) + [f"train.run_dir={output}", "prune.start_step=0",
                                                      "prune.end_step=0", "prune.every=0"])
    if cfg.prune.method == "none":
        raise UserError("no pruning method given: expected --method magnitude|nm|ffn|heads, --nm 2:4, or "
                        "prune.method=...")
    return cfg


def read_params(step_dir: Path, trainer) -> dict:
    """The whole parameter tree of a step directory, in the trainer's shardings."""
    return ckpt.restore_params(step_dir, trainer.abstract_params())


def rewound(run_dir: str, step: int | None, trainer, trained: dict) -> dict:
    """The parameters survivors take: `trained` itself, or those at `step` of the run (0: its init)."""
    if step is None:
        return trained
    if step == 0 and not any(s == 0 for s, _ in ckpt.step_dirs(Path(run_dir) / ckpt.CHECKPOINTS)):
        return trainer.jit_init_params()  # the seeded init: train.seed and the model make it again
    return read_params(ckpt.find_step(run_dir, step), trainer)


def prune_run(run_dir: str, output: Path, overrides: list[str] = (), step=None, rewind: int | None = None,
              force: bool = False) -> tuple[Config, dict]:
    """Writes the pruned step-0 run; returns (its config, {"sparsity", "effective_params", ...})."""
    from jaxlm.export.atomic import atomic_output
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.train.step import make_trainer

    if output.exists() and not force:  # before any work (atomic_output checks again when it writes)
        raise UserError(f"{output} already exists; pass --force to replace it")
    step_dir = ckpt.find_step(run_dir, step)
    src = runs.config_of(step_dir)
    cfg = new_config(src, output, overrides)
    if src.lora.rank:
        raise UserError(f"{run_dir} was trained with LoRA: export it with --merge and import it first")
    mesh = make_mesh(cfg.mesh)
    trainer = make_trainer(cfg, mesh)
    trained = read_params(step_dir, trainer)
    start = rewound(run_dir, rewind, trainer, trained)
    if cfg.prune.masked:
        cfg, params, masks = _unstructured(cfg, trainer, trained, start)
    else:
        cfg, params, masks = _structured(cfg, trained, start, mesh)
        trainer = make_trainer(cfg, mesh)
        params = jax.device_put(params, trainer.param_shardings)
    total = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    report = sparsity_report(flatten(jax.device_get(masks)) if masks else {}, total)
    with atomic_output(output, force, directory=True) as tmp:
        runs.write_step0(tmp, cfg, params, trainer, masks, report if masks else None)
    return cfg, {**report, "params": total, "step": int(step_dir.name)}


def _unstructured(cfg: Config, trainer, trained: dict, start: dict):
    """Masks chosen on `trained`, applied to `start` (the same tree unless rewound)."""
    from jaxlm.compress.prune import sparsity_at
    from jaxlm.train.pruning import masked

    pruned, masks = trainer.jit_prune(trained, sparsity_at(cfg.prune, 0))
    params = pruned if start is trained else jax.jit(masked, out_shardings=trainer.param_shardings)(start, masks)
    return cfg, params, masks


def _structured(cfg: Config, trained: dict, start: dict, mesh):
    """The smaller config (no masks) and `start` cut by the units chosen on `trained`."""
    cuts = structured.plan(cfg, flatten(jax.device_get(trained)))
    small, params = structured.shrink(cfg, flatten(jax.device_get(start)), cuts)
    small = config_from(to_dict(dataclasses.replace(small, prune=PruneConfig())))  # validated, masks off
    return small, unflatten(params), None


def main(args) -> int:
    output = Path(args.output)
    step = None if args.step is None else (args.step if args.step == "best" else int(args.step))
    cfg, r = prune_run(args.run_dir, output, flag_overrides(args) + list(args.overrides), step, args.rewind,
                       args.force)
    m = cfg.model
    what = (f"sparsity {r['sparsity']:.3f} of the pruned matrices, {r['effective_params']:,} of {r['params']:,} "
            "parameters effective") if cfg.prune.masked else \
        f"a smaller model: d_ff {m.d_ff}, {m.n_heads} heads ({m.n_kv_heads} kv), {r['params']:,} parameters"
    print(f"pruned {args.run_dir} step {r['step']} into {output}: {what}"
          + (f"; survivors rewound to step {args.rewind}" if args.rewind is not None else ""))
    print(f"retrain with: jaxlm train {output / 'config.yaml'}")
    return 0
