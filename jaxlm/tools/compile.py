"""`jaxlm compile CONFIG --topology v5p:2x2x2 [overrides]`: size a pod run before renting the pod.

Compiles the real train step ahead of time for a TPU topology on this (CPU) machine with
libtpu's compile-only devices, then reports per-chip memory from XLA's memory analysis
against the chip's HBM and the step's FLOPs from its cost analysis. No array is allocated:
state and batch are ShapeDtypeStructs carrying their shardings. Exit 0 = fits, 1 = does not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path

from jaxlm.config import Config, load_config
from jaxlm.errors import UserError

GIB = 2**30
# HBM per chip (GiB) and the dimensions of the topology name, per TPU generation
CHIPS = {
    "v4": {"hbm_gib": 32, "dims": 3},
    "v5e": {"hbm_gib": 16, "dims": 2},
    "v5p": {"hbm_gib": 95, "dims": 3},
    "v6e": {"hbm_gib": 32, "dims": 2},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (the one the pod run will use)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. mesh.fsdp=-1 mesh.data=1")
    parser.add_argument("--topology", required=True,
                        help="TPU generation:shape, e.g. v5p:2x4x4 (v5p-64), v5e:16x16 (v5e-256), v4:2x2x2, v6e:4x4")
    parser.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (mesh.dcn_* span them)")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON (for scripts and tests)")
    parser.parse_args = parser.parse_intermixed_args  # overrides may come after --topology


def parse_topology(text: str) -> tuple[str, tuple[int, ...]]:
    gen, sep, shape = text.strip().lower().partition(":")
    if not sep or gen not in CHIPS:
        raise UserError(f"--topology {text!r} is not of the form GEN:SHAPE with GEN one of "
                        f"{'|'.join(CHIPS)} (e.g. v5p:2x2x2, v5e:4x4)")
    try:
        dims = tuple(int(d) for d in shape.split("x"))
    except ValueError:
        dims = ()
    if len(dims) != CHIPS[gen]["dims"] or min(dims, default=0) < 1:
        want = "AxBxC" if CHIPS[gen]["dims"] == 3 else "AxB"
        raise UserError(f"--topology {text!r}: {gen} topologies are {want} chips (e.g. {gen}:{'x'.join(['2'] * CHIPS[gen]['dims'])})")
    return gen, dims


def libtpu_install_hint() -> str:
    """The libtpu requirement of the installed jax (its `tpu` extra), as a pip command."""
    from importlib import metadata

    for req in metadata.requires("jax") or []:
        if req.startswith("libtpu") and "tpu" in req.split(";")[-1]:
            spec = req.split(";")[0].replace(" ", "")
            return f"pip install '{spec}'"
    return "pip install libtpu"


def topology_devices(gen: str, dims: tuple[int, ...], num_slices: int) -> list:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise UserError(f"compiling for TPU needs libtpu, which is not installed; install it with: {libtpu_install_hint()}")
    # libtpu asks the (absent) TPU VM metadata for these; naming them keeps its start-up quiet
    n_chips = math.prod(dims)
    # no chips are used, so several compiles (parallel tests, two users) need not take turns
    # on libtpu's one-process-per-machine lock file
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{gen}-{n_chips * (2 if gen in ('v4', 'v5p') else 1)}")
    from jax.experimental import topologies

    kwargs = {"chip_config_name": "megacore"} if gen in ("v4", "v5p") else {}  # one device per chip
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    try:
        return list(topologies.get_topology_desc(topology_name=f"{gen}:{'x'.join(map(str, dims))}",
                                                 platform="tpu", **kwargs).devices)
    except Exception as e:  # libtpu rejects shapes it has no slice for
        raise UserError(f"libtpu cannot build topology {gen}:{'x'.join(map(str, dims))}: {_first_line(e)}")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def compile_step(cfg: Config, devices) -> dict:
    """Lowers and compiles the train step for `devices`; returns the report's numbers."""
    from jaxlm.tools.accounting import count_params, train_flops_per_step
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.train.loop import check_batch
    from jaxlm.train.step import make_trainer

    mesh = make_mesh(cfg.mesh, devices=devices)
    check_batch(cfg, mesh)
    trainer = make_trainer(cfg, mesh)
    state, batch = trainer.abstract_state(), trainer.abstract_batch()
    out = {"mesh": dict(mesh.shape), "params": count_params(cfg.model, cfg.moe).total,
           "state_bytes": per_device_bytes(state), "batch_bytes": per_device_bytes(batch),
           "frozen_bytes": per_device_bytes(trainer.abstract_frozen),
           "matmul_flops": train_flops_per_step(cfg), "n_devices": len(devices),
           "n_hosts": len({d.process_index for d in devices}),
           "attention_impl": trainer.cfg.model.attention_impl, "scan_layers": trainer.cfg.model.scan_layers}
    lowered = trainer.lower_train_step()
    try:
        compiled = lowered.compile()
    except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
            raise
        out["error"] = " ".join(str(e).split())
        return out
    m = compiled.memory_analysis()
    out.update(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
               aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
               code=m.generated_code_size_in_bytes, peak=m.peak_memory_in_bytes)  # XLA's own peak: a test's check
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["code"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["flops"] = float((cost or {}).get("flops", float("nan")))
    return out


def _xla_bytes(message: str, what: str) -> int | None:
    """A size XLA printed in an out-of-memory message, e.g. 'HLO temporaries (293.93G)'."""
    m = re.search(what + r"[^(]*\(([\d.]+)([KMGT]?)i?B?\)", message)
    if not m:
        return None
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def _size(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def report(r: dict, cfg: Config, topology: str, hbm: int) -> tuple[str, bool]:
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [f"topology {topology}: {r['n_devices']} chips on {r['n_hosts']} hosts, {_size(hbm)} HBM per chip; "
             f"mesh {mesh}",
             f"model {r['params'] / 1e6:,.1f} M parameters; global batch {cfg.train.global_batch} x "
             f"{cfg.data.seq_len} tokens" + (" (packed)" if cfg.data.packing else "")
             + f"; attention kernel {r['attention_impl']}",
             "memory per chip"]
    shards = "state + batch" + (" + teacher" if r["frozen_bytes"] else "") + " shards"
    if "error" in r:
        # XLA refuses to finish a program that cannot fit; what we know without its analysis:
        args = r["state_bytes"] + r["batch_bytes"] + r["frozen_bytes"]
        temps = _xla_bytes(r["error"], "temporaries")
        total = args + (temps or 0)
        lines += [f"  arguments     {_size(args):>14}  ({shards})",
                  f"  outputs       {_size(r['state_bytes']):>14}  (the new state, in the donated arguments)",
                  f"  temporaries   {_size(temps) if temps else 'unknown':>14}  (from XLA's error)",
                  f"  total         {'>= ' + _size(total):>14}  = {100 * total / hbm:.1f}% of {_size(hbm)}",
                  f"  XLA: {r['error'][:400]}",
                  f"fits: NO (at least {_size(total)} of {_size(hbm)} per chip, over by {_size(total - hbm)})"
                  if total > hbm else "fits: NO (XLA ran out of memory)"]
        return "\n".join(lines), False
    fits = r["total"] <= hbm
    lines += [f"  arguments     {_size(r['arguments']):>14}  ({shards})",
              f"  outputs       {_size(r['outputs']):>14}  ({_size(r['aliased'])} of it aliased to donated arguments)",
              f"  temporaries   {_size(r['temporaries']):>14}",
              f"  code          {_size(r['code']):>14}",
              f"  total         {_size(r['total']):>14}  = {100 * r['total'] / hbm:.1f}% of {_size(hbm)}",
              f"FLOPs per step  {r['flops']:.3e} per chip, {r['flops'] * r['n_devices']:.3e} all chips "
              "(XLA cost analysis" + ("; a scanned layer loop counts once: model.scan_layers=false for the full count)"
                                      if r["scan_layers"] and cfg.model.n_layers > 1 else ")"),
              f"                {r['matmul_flops']:.3e} all chips (matmuls by hand, jaxlm accounting)",
              f"fits: {'yes' if fits else 'NO'} ({_size(r['total'])} of {_size(hbm)} per chip"
              + ("" if fits else f", over by {_size(r['total'] - hbm)}") + ")"]
    return "\n".join(lines), fits


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    gen, dims = parse_topology(args.topology)
    if args.num_slices < 1:
        raise UserError(f"--num-slices={args.num_slices} must be >= 1")
    if args.json and (Path(args.json).is_dir() or not Path(args.json).absolute().parent.is_dir()):
        raise UserError(f"--json {args.json} cannot be written: give a file path in an existing directory")
    import jax

    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")  # compile only: never claim a local accelerator
    devices = topology_devices(gen, dims, args.num_slices)
    r = compile_step(cfg, devices)
    name = f"{gen}:{'x'.join(map(str, dims))}" + (f" x {args.num_slices} slices" if args.num_slices > 1 else "")
    text, fits = report(r, cfg, name, CHIPS[gen]["hbm_gib"] * GIB)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({**r, "topology": name, "hbm": CHIPS[gen]["hbm_gib"] * GIB,
                                               "fits": fits}, indent=1))
    return 0 if fits else 1
