"""Checkpoints: orbax CheckpointManager (async, sharded) + a manifest that makes damage visible.

Layout: run_dir/checkpoints/<step>/
  state/          orbax OCDBT: {"step", "params", "opt_state"}, each process writes its own shards
  meta/metadata   JSON: data iterator state, rng (seed, step), tokens seen, resolved config, tokenizer
  manifest.json   size and crc32 of every other file; written inside orbax's temporary directory
                  just before orbax renames it into place, so a committed step always has one

A step is valid only if its manifest exists and every file matches it: orbax's rename catches a
killed save, the manifest catches truncated, deleted or damaged files afterwards. Restore walks
the steps newest first and warns once per invalid step. Steps newer than the restored one
(invalid, or superseded by an explicit --resume of an older step) move to
run_dir/checkpoints.set_aside/, so orbax never counts them and the new run can save those steps.
Assumes a filesystem all processes share (as orbax does for multi-host saves).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import sys
import zlib
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from jaxlm.config import CheckpointConfig, Config, to_dict
from jaxlm.errors import RunFailed, UserError

CHECKPOINTS = "checkpoints"
SET_ASIDE = "checkpoints.set_aside"
MANIFEST = "manifest.json"
META_FILE = Path("meta") / "metadata"  # where orbax's JsonSave puts the item "meta"
TMP_SUFFIX = ".orbax-checkpoint-tmp"
FORMAT = 1

def warn(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"jaxlm: warning: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- manifest


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


# orbax rewrites its step metadata (and marks the commit) after the rename: not covered
UNCOVERED = {MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt"}


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*")
                  if p.is_file() and not (p.parent == step_dir and p.name in UNCOVERED))


def write_manifest(step_dir: Path) -> None:
    files = {str(p.relative_to(step_dir)): {"size": p.stat().st_size, "crc32": _crc32(p)} for p in _files(step_dir)}
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "files": files}, indent=1))
    os.replace(tmp, step_dir / MANIFEST)


def verify(step_dir: Path, checksums: bool = True) -> str | None:
    """None if the step directory matches its manifest, else the reason (one short phrase)."""
    if not step_dir.is_dir():
        return "directory missing"
    try:
        files = json.loads((step_dir / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    if not (isinstance(files, dict) and files and all(isinstance(w, dict) and {"size", "crc32"} <= w.keys()
                                                      for w in files.values())):
        return f"{MANIFEST} malformed (expected a size and crc32 per file)"
    for rel, want in files.items():
        p = step_dir / rel
        if not p.is_file():
            return f"file {rel} missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"file {rel} has {size} bytes, expected {want['size']}"
        if checksums and _crc32(p) != want["crc32"]:
            return f"file {rel} checksum mismatch"
    return None


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


# ----------------------------------------------------------------------------- saving


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


class CheckpointWriter:
    """Asynchronous saves into `directory`; keeps the newest `keep` plus every `keep_every`-th."""

    def __init__(self, directory: Path, c: CheckpointConfig):
        self.directory, self.async_save = Path(directory).absolute(), c.async_save
        self.pending: int | None = None
        self.unchecked: int | None = None  # a save whose outcome is not yet known
        _quiet_orbax_errors()
        keep: list = [ocm.LatestN(max(c.keep, 1))]
        if c.keep_every:
            keep.append(ocm.EveryNSteps(c.keep_every))
        if c.keep_best:  # lowest eval loss: sorted descending, the last n are kept
            keep.append(ocm.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=c.keep_best,
                                  keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            # sync saves also go through the async checkpointer (then wait) so the manifest
            # hook below runs in both modes
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal),
            preservation_policy=ocm.AnyPreservationPolicy(keep),
            cleanup_tmp_directories=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def _seal(self) -> None:
        """Runs on the primary process once every process has written, before orbax's rename."""
        step = self.pending
        tmp = self.directory / f"{step}{TMP_SUFFIX}"
        write_manifest(tmp if tmp.is_dir() else self.directory / str(step))

    def save(self, step: int, state, meta: dict) -> bool:
        """Starts saving; returns once the arrays are copied off the devices. False if it exists."""
        if step in self.manager.all_steps():
            return False
        self.wait()  # one save in flight: `pending` names it
        self.pending = self.unchecked = step
        try:
            metrics = None if meta.get("eval_loss") is None else {"eval_loss": meta["eval_loss"]}
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001 - the synchronous part can fail too (e.g. mkdir on a full disk)
            raise self._failed(e) from None
        if not self.async_save:
            self.wait()
        return True

    def saving(self) -> bool:
        return self.manager.is_saving_in_progress()

    def poll(self) -> None:
        """Raises RunFailed if the save in flight has failed; cheap enough for every step (no waiting)."""
        if self.unchecked is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Waits for the save in flight; RunFailed if it failed."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 - orbax wraps the cause in its own exceptions
            raise self._failed(e) from None
        self.unchecked = None

    def _failed(self, e: BaseException) -> RunFailed:
        """One line: which save failed and why, the free space there, and what was kept."""
        step, self.unchecked = self.unchecked, None
        cause = _root_cause(e)
        reason = (f"{cause.strerror or cause}" if isinstance(cause, OSError)
                  else f"{type(cause).__name__}: {str(cause).splitlines()[0][:200] if str(cause) else ''}")
        where = self.directory
        while not where.exists() and where != where.parent:
            where = where.parent
        free = human_bytes(shutil.disk_usage(where).free)
        return RunFailed(f"saving checkpoint step {step} to {self.directory} failed: {reason}; {free} free there; "
                         f"{newest_valid(self.directory)} (kept). Free some space or move train.run_dir, then "
                         "run the same command to resume")

    def close(self) -> None:
        self.manager.close()


def _root_cause(e: BaseException) -> BaseException:
    """The first OSError in the chain of causes (a full disk, say), else the innermost exception."""
    seen = []
    while e is not None and e not in seen:
        if isinstance(e, OSError):
            return e
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen[-1]


class _DropOrbaxErrors(logging.Filter):
    """orbax logs each failed save with hundreds of lines of traceback; the writer reports it in one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def _quiet_orbax_errors() -> None:
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropOrbaxErrors) for f in logger.filters):
        logger.addFilter(_DropOrbaxErrors())


# ----------------------------------------------------------------------------- reading back


def restore_state(step_dir: Path, trainer):
    """Reads the saved arrays straight into the trainer's shardings (any mesh, any device count)."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore((step_dir / "state").absolute(), trainer.abstract_state())


def newest_valid_step(run_dir: str | Path) -> Path:
    """The newest step directory under run_dir/checkpoints that matches its manifest."""
    found = step_dirs(Path(run_dir) / CHECKPOINTS)
    for _, path in found:
        if verify(path) is None:
            return path
    raise UserError(f"{run_dir}: no valid checkpoint in {Path(run_dir) / CHECKPOINTS} ({len(found)} step dirs)")


def restore_params(step_dir: Path, abstract_params):
    """Only the parameters of a saved state, read into `abstract_params`' shardings (a teacher)."""
    item = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore((step_dir / "state").absolute(), args=args)["params"]


def state_equal(a, b) -> bool:
    """Exact equality of two state pytrees (tests and tools)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
