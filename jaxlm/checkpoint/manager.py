"""Saving checkpoints: orbax's CheckpointManager (async, sharded), each step sealed with a manifest
(file sizes, metadata crc32s and the arrays' digests computed on the devices at save: `manifest.py`).

Restore walks the steps newest first and warns once per invalid step (`resume.py`). Steps newer
than the restored one (invalid, or superseded by an explicit --resume of an older step) move to
run_dir/checkpoints.set_aside/, so orbax never counts them and the new run can save those steps.
Assumes a filesystem all processes share (as orbax does for multi-host saves).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from jaxlm.checkpoint import digest
from jaxlm.checkpoint.layout import PRUNED, WEIGHTS_ONLY, human_bytes, newest_valid, read_meta
from jaxlm.checkpoint.manifest import read_manifest, write_manifest
from jaxlm.config import CheckpointConfig
from jaxlm.errors import RunFailed, UserError

TMP_SUFFIX = ".orbax-checkpoint-tmp"

class CheckpointWriter:
    """Asynchronous saves into `directory`; keeps the newest `keep` plus every `keep_every`-th, the
    `keep_best` lowest in eval loss, and `keep_steps` (a WSD run's last step before its decay)."""

    def __init__(self, directory: Path, c: CheckpointConfig, keep_steps: list[int] = ()):
        self.directory, self.async_save = Path(directory).absolute(), c.async_save
        self.pending: int | None = None
        self.digests: dict = {}  # of the save in flight, dispatched on the devices by save()
        self.unchecked: int | None = None  # a save whose outcome is not yet known
        _quiet_orbax_errors()
        keep: list = [ocm.LatestN(max(c.keep, 1))]
        if c.keep_every:
            keep.append(ocm.EveryNSteps(c.keep_every))
        if keep_steps:
            keep.append(ocm.CustomSteps(list(keep_steps)))
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
        write_manifest(tmp if tmp.is_dir() else self.directory / str(step), digest.finish(self.digests))

    def save(self, step: int, state, meta: dict) -> bool:
        """Starts saving; returns once the arrays are copied off the devices. False if it exists."""
        if step in self.manager.all_steps():
            return False
        self.wait()  # one save in flight: `pending` names it
        self.pending = self.unchecked = step
        try:
            self.digests = digest.start(state)  # before the next step donates the state's buffers
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
        reason = _reason(_root_cause(e))
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


def _reason(cause: BaseException) -> str:
    """The system's words for a failed write where there are some (an OSError, or the
    os_error_code tensorstore puts in its message), else the error's first line."""
    if isinstance(cause, OSError):
        return f"{cause.strerror or cause}"
    code = re.search(r"os_error_code='(\d+)'", str(cause))
    if code:
        return os.strerror(int(code[1]))
    return f"{type(cause).__name__}: {str(cause).splitlines()[0][:200] if str(cause) else ''}"


class _DropOrbaxErrors(logging.Filter):
    """A failed save is reported by the writer in one line; what else would print it is dropped:
    orbax's own log of it (hundreds of lines of traceback), and asyncio's "exception was never
    retrieved" for each of its write tasks that failed after the first (they name the step's
    temporary directory)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio":
            exc = record.exc_info[1] if record.exc_info else None
            return TMP_SUFFIX not in record.getMessage() + str(exc)
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def _drop_closed_loop_callbacks(hook):
    """sys.unraisablehook without tensorstore's "Event loop is closed": once a write of a save
    fails, orbax closes its event loop and the other writes' completion callbacks, still pending
    in tensorstore, each print that traceback (the save's failure is reported in one line)."""

    def unraisable(u) -> None:
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            hook(u)

    unraisable.drops_closed_loop_callbacks = True
    return unraisable


def _quiet_orbax_errors() -> None:
    for logger in (logging.getLogger("absl"), logging.getLogger("asyncio")):
        if not any(isinstance(f, _DropOrbaxErrors) for f in logger.filters):
            logger.addFilter(_DropOrbaxErrors())
    if not getattr(sys.unraisablehook, "drops_closed_loop_callbacks", False):
        sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)


# ----------------------------------------------------------------------------- reading back


def check_restored(step_dir: Path, tree) -> None:
    """UserError unless every array of `tree` (restored from step_dir, jax or numpy arrays, the whole
    state or a part such as {"params": ...}) matches the digest saved with it. All processes call it."""
    try:
        want = read_manifest(step_dir).get("arrays") or {}
    except (OSError, ValueError, AttributeError):
        want = {}
    bad = digest.mismatches(want, digest.digests(tree)) if want else []
    if bad:
        raise UserError(f"checkpoint {step_dir} is damaged: array {bad[0]} differs from the digest saved with it "
                        f"({len(bad)} array(s) in all)")


def restore_state(step_dir: Path, trainer):
    """Reads the saved arrays straight into the trainer's shardings (any mesh, any device count):
    the state as saved, with the whole parameter tree (`trainer.adopt` splits off the frozen part).
    A weights-only step (an import's step 0, runs.write_step0) gets the optimizer's initial state,
    which is what a full save at step 0 would have held."""
    meta = read_meta(step_dir)
    target = trainer.abstract_saved_state()
    weights_only = meta.get(WEIGHTS_ONLY, False)
    if weights_only:  # pruning masks only where `jaxlm prune` wrote them (an import has none: all kept)
        target = {k: v for k, v in target.items() if k != "opt_state" and (k != "masks" or PRUNED in meta)}
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore((step_dir / "state").absolute(), target)
    check_restored(step_dir, state)
    if weights_only:
        trainer.masks = state.get("masks", trainer.masks)
        state = trainer.saved_state(trainer.state_from_params(state["params"]))
    return state


def restore_params(step_dir: Path, abstract_params):
    """Only the parameters of a saved state, read into `abstract_params`' shardings (a teacher)."""
    item = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    with ocp.PyTreeCheckpointer() as ckptr:
        params = ckptr.restore((step_dir / "state").absolute(), args=args)["params"]
    check_restored(step_dir, {"params": params})
    return params


def state_equal(a, b) -> bool:
    """Exact equality of two state pytrees (tests and tools)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
