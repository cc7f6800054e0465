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

# Config keys that may not change on resume: they define the parameters (shapes, tree), the
# function they compute, or the data order that the saved iterator index points into.
# Everything else (train.steps, optim schedule/values, eval and log cadence, mesh, checkpoint,
# microbatches, remat, compute dtype, run_dir) may change.
LOCKED_SECTIONS = {"model", "moe", "data"}
UNLOCKED = {
    "model.max_seq_len", "model.compute_dtype", "model.remat",  # RoPE has no learned positions
    "model.attention_impl", "model.projection_impl", "model.gmm_impl", "model.scan_layers",  # how, not what
    "model.dropout", "model.attention_dropout",
    "moe.noise_std", "moe.aux_loss_coef", "moe.z_loss_coef", "moe.impl", "moe.capacity_factor",
}
LOCKED_TRAIN = {"train.seed", "train.global_batch"}  # rng stream; iterator state is a batch index


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
    except (OSError, ValueError, KeyError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
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


# ----------------------------------------------------------------------------- resume


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "rules":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def incompatible_keys(saved: dict, cfg: Config, saved_tok: dict | None, tok: dict | None) -> list[str]:
    """'key (old -> new)' for every change that makes the checkpoint unusable for `cfg`."""
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    out = []
    for key, value in new.items():
        locked = (key.split(".")[0] in LOCKED_SECTIONS and key not in UNLOCKED) or key in LOCKED_TRAIN
        if locked and key in old and old[key] != value:
            out.append(f"{key} ({old[key]!r} -> {value!r})")
    # clipping on/off adds or removes a node of the optimizer state
    clip_old, clip_new = old.get("optim.clip_norm", 0) > 0, cfg.optim.clip_norm > 0
    if clip_old != clip_new:
        out.append(f"optim.clip_norm ({old['optim.clip_norm']!r} -> {cfg.optim.clip_norm!r}, clipping on/off)")
    hashes = (saved_tok or {}).get("hash"), (tok or {}).get("hash")
    if all(hashes):  # the content decides: the same tokenizer may be named by another path
        out = [k for k in out if not k.startswith("data.tokenizer ")]
        if hashes[0] != hashes[1]:
            out.append(f"tokenizer hash ({hashes[0][:12]} -> {hashes[1][:12]})")
    return out


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


def _candidates(run_dir: Path, resume: str | None) -> tuple[list[tuple[int, Path]], bool]:
    """(steps to try newest first, explicit): --resume names a step dir, a checkpoints dir or a run dir."""
    if resume is None:
        return step_dirs(run_dir / CHECKPOINTS), False
    path = Path(resume)
    if not path.exists():
        raise UserError(f"--resume {resume}: no such file or directory")
    if (path / MANIFEST).exists() or (path / "state").is_dir() or path.name.isdigit():
        if not path.name.isdigit():
            raise UserError(f"--resume {resume}: a step directory is named by its step number")
        return [(int(path.name), path)], True
    found = step_dirs(path / CHECKPOINTS) or step_dirs(path)
    if not found:
        raise UserError(f"--resume {resume}: no checkpoint step directories in {path} or {path / CHECKPOINTS}")
    return found, False


def all_processes_agree(ok: bool) -> bool:
    """True if `ok` on every process: all processes must take the same step (or none)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def changed_sources(saved: list | None, now: list | None) -> list[str]:
    """The data sources whose fingerprint differs from the checkpoint's (none known: none)."""
    if not saved or not now:
        return []
    return [n["source"] for s, n in zip(saved, now) if s.get("sha256") != n.get("sha256")]


def restore_for_training(cfg: Config, trainer, run_dir: Path, resume: str | None, tok: dict,
                         data_fingerprint: list | None = None):
    """(state, meta) from the newest valid checkpoint, or None to start fresh.

    Invalid steps are skipped with one warning each; an incompatible config is an error (falling
    back to an older step would not help); no valid step at all is an error naming what was tried.
    """
    candidates, explicit = _candidates(run_dir, resume)
    if not candidates:
        return None
    tried = []
    for step, path in candidates:
        # process 0 reads every byte once; the others take its word
        reason = verify(path) if jax.process_index() == 0 else None
        if not all_processes_agree(reason is None):
            reason = reason or "invalid (see process 0)"
        if reason is None:
            bad, changed = [], []
            try:
                meta = read_meta(path)
                bad = incompatible_keys(meta.get("config", {}), cfg, meta.get("tokenizer"), tok)
                if not cfg.train.allow_data_change:
                    changed = changed_sources(meta.get("data_fingerprint"), data_fingerprint)
                if not bad and not changed:
                    state = restore_state(path, trainer)
            except Exception as e:  # noqa: BLE001 - any read failure means: try the previous step
                reason = f"restore failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if not all_processes_agree(reason is None):
                reason = reason or "restore failed on another process"
            if reason is None and bad:
                raise UserError(f"cannot resume from {path}: the config changed in keys that must stay the same: "
                                f"{', '.join(bad)}; use a new train.run_dir or restore those values")
            if reason is None and changed:
                raise UserError(f"cannot resume from {path}: the data changed since it was saved "
                                f"({', '.join(changed)}: files differ in size or content), so the saved data "
                                "position would point into other data; restore the data, use a new train.run_dir, "
                                "or set train.allow_data_change=true to resume anyway")
        if reason is None:
            _set_aside(run_dir, step)
            return state, meta
        tried.append((step, path, reason))
        if explicit:
            raise UserError(f"--resume {resume} is not a valid checkpoint: {reason}")
        warn(f"checkpoint step {step} ({path}) is invalid: {reason}; trying the previous one")
    listing = "; ".join(f"{p} ({r})" for _, p, r in tried)
    raise UserError(f"no valid checkpoint to resume from; tried {listing}. Move them away to start afresh")


def _set_aside(run_dir: Path, restored: int) -> None:
    """Moves this run's steps newer than the restored one out of orbax's directory (process 0)."""
    paths = [p for s, p in step_dirs(run_dir / CHECKPOINTS) if s > restored]
    if paths and jax.process_index() == 0:
        dest = run_dir / SET_ASIDE
        dest.mkdir(parents=True, exist_ok=True)
        for p in paths:
            if verify(p, checksums=False) is None:
                warn(f"checkpoint step {p.name} is newer than the resumed step {restored}; moved to {dest}")
            target, n = dest / p.name, 1
            while target.exists():
                target, n = dest / f"{p.name}.{n}", n + 1
            shutil.move(str(p), str(target))
    if paths and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxlm_checkpoint_set_aside")


def state_equal(a, b) -> bool:
    """Exact equality of two state pytrees (tests and tools)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
