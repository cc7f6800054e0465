"""Where a run's checkpoints live and how they are found: step directories, the metadata saved
beside each state, and the choice of a step (`--step N|best`, else the newest valid one).

Layout: run_dir/checkpoints/<step>/
  state/          orbax OCDBT: {"step", "params", "opt_state"}, each process writes its own shards
                  ({"step", "params"} where meta says weights_only: an import's step 0)
  meta/metadata   JSON: data iterator state, rng (seed, step), tokens seen, resolved config, tokenizer
  manifest.json   what makes damage visible (`manifest.py`)
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import jax

from jaxlm.checkpoint.manifest import verify
from jaxlm.config import Config, to_dict
from jaxlm.errors import UserError, warn

CHECKPOINTS = "checkpoints"
SET_ASIDE = "checkpoints.set_aside"
META_FILE = Path("meta") / "metadata"  # where orbax's JsonSave puts the item "meta"
FORMAT = 1
WEIGHTS_ONLY = "weights_only"  # meta key: the step holds no optimizer state (it starts from its init)
PRUNED = "pruned"  # meta key: the step holds pruning masks; {"sparsity", "effective_params"}


def step_dirs(directory: Path) -> list[tuple[int, Path]]:
    """Committed step directories (integer names), newest first; orbax's temporaries excluded."""
    if not directory.is_dir():
        return []
    steps = [(int(p.name), p) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(steps, reverse=True)


def best_step(directory: Path, checksums: bool = False) -> int | None:
    """The valid checkpoint with the lowest eval loss (saved at an evaluation step), or None."""
    scored = []
    for step, path in step_dirs(directory):
        try:
            loss = read_meta(path).get("eval_loss")
        except (OSError, ValueError):
            continue
        if loss is not None and verify(path, checksums=checksums) is None:
            scored.append((loss, step))
    return min(scored)[1] if scored else None


def read_meta(step_dir: Path) -> dict:
    return json.loads((step_dir / META_FILE).read_text())


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def newest_valid(directory: Path) -> str:
    """A phrase naming the newest checkpoint in `directory` that matches its manifest (sizes only)."""
    for step, path in step_dirs(directory):
        if verify(path, checksums=False) is None:
            return f"last good checkpoint: {path} (step {step})"
    return f"no checkpoint in {directory}"


def find_step(run_dir: str | Path, step: int | str | None = None) -> Path:
    """The step directory a verb reads: `step`, "best" (the lowest eval loss), or the newest valid
    one. RUN_DIR may also be its checkpoints/ directory or a step directory itself."""
    run_dir = Path(run_dir)
    if (run_dir / "state").is_dir() and run_dir.name.isdigit():
        found = [(int(run_dir.name), run_dir)]
    else:
        found = step_dirs(run_dir / CHECKPOINTS) or step_dirs(run_dir)
    if not found:
        raise UserError(f"{run_dir}: no checkpoints (expected a run directory with checkpoints/<step>/)")
    if step == "best":
        step = best_step(found[0][1].parent, checksums=True)
        if step is None:
            raise UserError(f"{run_dir}: no checkpoint has an eval loss (saved at an evaluation step); "
                            "give --step N or train with train.eval_every")
    if step is not None:
        found = [(s, p) for s, p in found if s == step]
        if not found:
            raise UserError(f"{run_dir}: no checkpoint for step {step}; `jaxlm checkpoint ls {run_dir}` lists them")
    for s, path in found:
        reason = verify(path)
        if reason is None:
            return path
        if step is not None:
            raise UserError(f"checkpoint {path} is invalid: {reason}")
        warn(f"checkpoint step {s} ({path}) is invalid: {reason}; trying the previous one")
    raise UserError(f"{run_dir}: no valid checkpoint")



def step_arg(text: str) -> int | str:
    """argparse type of --step: a step number or `best`."""
    if text == "best":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step number or 'best'") from None


def tokenizer_identity(spec: str) -> dict:
    """The tokenizer spec, plus its content hash where the tokenizer has one."""
    try:
        from jaxlm.tokenizer.tokenizer import load_tokenizer

        digest = getattr(load_tokenizer(spec), "hash", None)
    except Exception:  # noqa: BLE001 - identity is best effort; the spec still compares
        digest = None
    return {"spec": spec, "hash": digest if isinstance(digest, str) else None}


def make_meta(cfg: Config, step: int, tokens_seen: int, data_state: dict, tokenizer: dict,
              data_fingerprint: list | None = None) -> dict:
    return {
        "format": FORMAT, "step": step, "tokens_seen": tokens_seen, "data": data_state,
        "data_fingerprint": data_fingerprint,
        "rng": {"seed": cfg.train.seed, "step": step}, "config": to_dict(cfg), "tokenizer": tokenizer,
        "process_count": jax.process_count(), "device_count": jax.device_count(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def newest_valid_step(run_dir: str | Path) -> Path:
    """The newest step directory under run_dir/checkpoints that matches its manifest."""
    found = step_dirs(Path(run_dir) / CHECKPOINTS)
    for _, path in found:
        if verify(path) is None:
            return path
    raise UserError(f"{run_dir}: no valid checkpoint in {Path(run_dir) / CHECKPOINTS} ({len(found)} step dirs)")


