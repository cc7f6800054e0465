"""`jaxlm checkpoint ls RUN_DIR`: the checkpoints of a run, their sizes, validity and config.

Reads only files (manifests, JSON metadata), never the arrays, so it needs no devices.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxlm import checkpoint as ckpt
from jaxlm.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("ls", help="list the checkpoints of a run: step, size, validity, config summary",
                        description="List the checkpoints of a run, newest first: step, size on disk, time saved, "
                                    "tokens seen and whether every file matches its manifest (valid), then a "
                                    "summary of the newest valid checkpoint's config. Reads only files; needs no "
                                    "devices.")
    ls.add_argument("run_dir", help="a run directory (with checkpoints/) or a checkpoints directory")
    ls.add_argument("--quick", action="store_true",
                    help="check file sizes only: no checksums, no reading of the saved arrays")


def config_summary(meta: dict) -> str:
    c = meta.get("config", {})
    m, e, d, t = (c.get(k, {}) for k in ("model", "moe", "data", "train"))
    model = " ".join(f"{k}={m.get(k)}" for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"))
    moe = f"moe n_experts={e.get('n_experts')} top_k={e.get('top_k')}" if e.get("n_experts") else "dense"
    tok = meta.get("tokenizer") or {}
    tok_hash = f" ({tok['hash'][:12]})" if tok.get("hash") else ""
    pruned = meta.get(ckpt.PRUNED)
    if pruned:  # the masks' share of zeros, and the parameters that are not pruned
        moe += (f"; pruned {c.get('prune', {}).get('method')}: sparsity {pruned['sparsity']:.4f}, "
                f"{pruned['effective_params']:,} effective parameters")
    return (f"{model} {moe}; tokenizer={d.get('tokenizer')}{tok_hash} seq_len={d.get('seq_len')} "
            f"global_batch={t.get('global_batch')} steps={t.get('steps')} seed={t.get('seed')}; "
            f"saved by {meta.get('process_count')} process(es) on {meta.get('device_count')} device(s)")


def ls(run_dir: Path, quick: bool) -> int:
    directory = run_dir / ckpt.CHECKPOINTS if (run_dir / ckpt.CHECKPOINTS).is_dir() else run_dir
    if not directory.is_dir():
        raise UserError(f"{run_dir} is not a directory; expected a run directory or its checkpoints/")
    steps = ckpt.step_dirs(directory)
    temps = sorted(p.name for p in directory.iterdir() if ckpt.TMP_SUFFIX in p.name)
    if not steps and not temps:
        if directory.name != ckpt.CHECKPOINTS and not (run_dir / "config.yaml").is_file():
            raise UserError(f"{run_dir} is not a run directory (no checkpoints/, config.yaml or step directories); "
                            "expected a run directory written by `jaxlm train` or its checkpoints/")
        print(f"{directory}: no checkpoints")
        return 0
    rows, newest_meta, n_valid = [], None, 0
    best = ckpt.best_step(directory, checksums=not quick)
    for step, path in steps:
        reason = ckpt.verify(path, checksums=not quick, arrays=not quick)
        meta = {}
        try:
            meta = ckpt.read_meta(path)
        except (OSError, ValueError):
            pass
        if reason is None:
            n_valid += 1
            newest_meta = newest_meta or meta
        status = ("valid" + (", best" if step == best else "")) if reason is None else f"INVALID: {reason}"
        loss = meta.get("eval_loss")
        rows.append((str(step), ckpt.human_bytes(ckpt.dir_size(path)), meta.get("time", "?"),
                     str(meta.get("tokens_seen", "?")), "-" if loss is None else f"{loss:.4f}", status))
    print(f"{directory}: {len(steps)} checkpoint(s), {n_valid} valid"
          f"{' (sizes only checked)' if quick else ''}")
    header = ("step", "size", "saved (UTC)", "tokens", "eval loss", "status")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for r in [header, *rows]:
        print("  ".join(v.rjust(w) if i in (0, 1, 3, 4) else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))),
              r[5])
    for name in temps:
        print(f"{name}: incomplete save (in progress, or killed); removed by the next run")
    set_aside = directory.parent / ckpt.SET_ASIDE
    if set_aside.is_dir() and any(set_aside.iterdir()):
        print(f"set aside (invalid or superseded): {', '.join(sorted(p.name for p in set_aside.iterdir()))}"
              f" in {set_aside}")
    if newest_meta:
        print(f"config (step {newest_meta.get('step')}): {config_summary(newest_meta)}")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.action == "ls":
        return ls(Path(args.run_dir), args.quick)
    raise UserError(f"unknown action {args.action!r}; expected ls")
