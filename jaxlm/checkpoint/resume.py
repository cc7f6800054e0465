"""Resuming a run: which checkpoint, whether the config still fits it, and what to say when not.

A run resumes from the newest valid checkpoint in its run directory (or the one `--resume`
names); an invalid one is set aside with one warning and the previous one is tried. Every process
must agree on the step it restores. Step directories with none restorable are an error that
changes nothing: starting over from step 0 would overwrite the run. A run killed in its first save
left only orbax's temporary directory, which holds nothing to restore: it is set aside, and the run
starts again from step 0 (its earlier metrics are set aside too, as for any fresh start).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax

from jaxlm.checkpoint.layout import CHECKPOINTS, SET_ASIDE, read_meta, step_dirs
from jaxlm.checkpoint.manager import TMP_SUFFIX, restore_state
from jaxlm.checkpoint.manifest import MANIFEST, verify
from jaxlm.config import Config, to_dict
from jaxlm.errors import UserError, warn
from jaxlm.parallel.mesh import all_processes_agree

# Config keys that may not change on resume: they define the parameters (shapes, tree), the
# function they compute, or the data order that the saved iterator index points into.
# Everything else (train.steps, optim schedule/values but not optim.name, eval and log cadence, mesh,
# checkpoint, microbatches, remat, compute dtype, run_dir) may change.
LOCKED_SECTIONS = {"model", "moe", "data", "lora"}  # lora: the adapters' shapes, the base's precision
UNLOCKED = {
    "model.max_seq_len", "model.compute_dtype", "model.remat",  # RoPE has no learned positions
    "model.attention_impl", "model.projection_impl", "model.gmm_impl", "model.scan_layers",  # how, not what
    "model.dropout", "model.attention_dropout",
    "moe.noise_std", "moe.aux_loss_coef", "moe.z_loss_coef", "moe.impl", "moe.capacity_factor",
    "lora.dropout",
}
# rng stream; iterator state is a batch index; what is trained sizes the optimizer state
LOCKED_TRAIN = {"train.seed", "train.global_batch", "train.freeze", "train.freeze_layers"}
LOCKED_OPTIM = {"optim.name"}  # each optimizer has its own state tree



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
        locked = (key.split(".")[0] in LOCKED_SECTIONS and key not in UNLOCKED) or key in LOCKED_TRAIN | LOCKED_OPTIM
        if locked and key in old and old[key] != value:
            out.append(f"{key} ({old[key]!r} -> {value!r})")
    # clipping on/off adds or removes a node of the optimizer state
    clip_old, clip_new = old.get("optim.clip_norm", 0) > 0, cfg.optim.clip_norm > 0
    if clip_old != clip_new:
        out.append(f"optim.clip_norm ({old['optim.clip_norm']!r} -> {cfg.optim.clip_norm!r}, clipping on/off)")
    masks_old = old.get("prune.method", "none") in ("magnitude", "nm")
    if masks_old != cfg.prune.masked:  # the checkpoint holds masks or not
        out.append(f"prune.method ({old.get('prune.method', 'none')!r} -> {cfg.prune.method!r}, masks on/off; to "
                   "prune a trained run: jaxlm prune RUN -o NEW_RUN)")
    hashes = (saved_tok or {}).get("hash"), (tok or {}).get("hash")
    if all(hashes):  # the content decides: the same tokenizer may be named by another path
        out = [k for k in out if not k.startswith("data.tokenizer ")]
        if hashes[0] != hashes[1]:
            out.append(f"tokenizer hash ({hashes[0][:12]} -> {hashes[1][:12]})")
    return out


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


def unfinished_saves(directory: Path) -> list[Path]:
    """orbax's temporary step directories (`<step>.orbax-checkpoint-tmp[-<time>]`): saves killed
    before their rename."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if p.is_dir() and TMP_SUFFIX in p.name and p.name.split(".")[0].isdigit())


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
    where = candidates[0][1].parent if candidates else run_dir / CHECKPOINTS
    if not explicit:
        candidates = wsd_branch(candidates, cfg)
    # a save killed before orbax's rename leaves only its temporary directory: nothing to restore
    unfinished = unfinished_saves(where)
    if not candidates:  # nothing was ever saved whole: a start from step 0 loses nothing
        _move_aside(run_dir, unfinished, "is an unfinished save (killed while it was written), with nothing to "
                                         "restore; training starts at step 0")
        return None
    tried = [(int(p.name.split(".")[0]), f"an unfinished save, {p.name}") for p in unfinished]
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
                    state = trainer.adopt(restore_state(path, trainer))
            except UserError as e:  # ours: one line already (a damaged array names itself)
                reason = f"restore failed: {e}"
            except Exception as e:  # noqa: BLE001 - any read failure means: try the previous step
                reason = f"restore failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if not all_processes_agree(reason is None):
                reason = reason or "restore failed on another process"
            if reason is None and bad:
                raise UserError(f"cannot resume from {path}: the config changed in keys that must stay the same: "
                                f"{', '.join(bad)}; {_new_start(run_dir, path, 'restore those values')}")
            if reason is None and changed:
                raise UserError(f"cannot resume from {path}: the data changed since it was saved "
                                f"({', '.join(changed)}: files differ in size or content), so the saved data "
                                "position would point into other data; restore the data, "
                                f"{_new_start(run_dir, path, 'set train.allow_data_change=true to resume anyway')}")
        if reason is None:
            _set_aside(run_dir, step)
            return state, meta
        tried.append((step, reason))
        if explicit:
            raise UserError(f"--resume {resume} is not a valid checkpoint: {reason}")
        warn(f"checkpoint step {step} ({path}) is invalid: {reason}; trying the previous one")
    listing = "; ".join(f"step {s}: {r}" for s, r in sorted(tried, reverse=True))
    raise UserError(f"{run_dir}: no checkpoint in {where} can be resumed from ({listing}); nothing was changed. "
                    f"To start again from step 0, move {where} away (or delete it), or use a new train.run_dir")


def _new_start(run_dir: Path, step_dir: Path, otherwise: str) -> str:
    """The way out of a refused resume: a new run (from this checkpoint's weights when it belongs
    to another run directory, where a new run_dir is what the user already has)."""
    source = step_dir.parent.parent if step_dir.parent.name == CHECKPOINTS else step_dir.parent
    if source.resolve() != run_dir.resolve():
        return (f"to start a new run from its weights instead, drop --resume and set train.init_from={source} "
                f"train.init_from_step={step_dir.name}; or {otherwise}")
    return f"use a new train.run_dir, or {otherwise}"


def extension_branch(saved: dict, cfg: Config) -> int | None:
    """The step where a WSD run extended to `cfg` (train.steps raised, the schedule otherwise the
    same) branches off: the old schedule's last step before its decay. None when not such a run."""
    from jaxlm.config.checks import wsd_decay_steps

    o, old_o, old_steps = cfg.optim, saved.get("optim") or {}, (saved.get("train") or {}).get("steps")
    same = all(old_o.get(k) == getattr(o, k) for k in ("schedule", "lr", "min_lr", "warmup_steps", "decay_fraction"))
    if o.schedule != "wsd" or not same or not isinstance(old_steps, int) or old_steps >= cfg.train.steps:
        return None
    return old_steps - wsd_decay_steps(o.decay_fraction, old_steps)


def wsd_branch(candidates: list[tuple[int, Path]], cfg: Config) -> list[tuple[int, Path]]:
    """The candidates an extended WSD run resumes from: the checkpoint where the old decay began
    (kept for this), so the run equals one that had the longer schedule from the start."""
    if not candidates:
        return candidates
    newest = candidates[0][0]
    try:
        saved = read_meta(candidates[0][1]).get("config") or {}
    except (OSError, ValueError):
        return candidates  # damaged: the usual checks say why
    branch = extension_branch(saved, cfg)
    if branch is None or newest <= branch:
        return candidates
    old_steps = saved["train"]["steps"]
    if branch not in [s for s, _ in candidates]:
        warn(f"train.steps grew from {old_steps} to {cfg.train.steps} (schedule wsd), but there is no checkpoint at "
             f"step {branch}, where the old decay began: resuming at step {newest}, so the learning rate jumps back "
             "up to the stable phase")
        return candidates
    warn(f"train.steps grew from {old_steps} to {cfg.train.steps} (schedule wsd): resuming from step {branch}, where the "
         "old schedule's decay began, so this run equals one with the longer schedule from the start; the decayed "
         "steps after it are set aside")
    return [(s, p) for s, p in candidates if s <= branch]


def _set_aside(run_dir: Path, restored: int) -> None:
    """Moves this run's steps newer than the restored one out of orbax's directory."""
    newer = [p for s, p in step_dirs(run_dir / CHECKPOINTS) if s > restored]
    _move_aside(run_dir, newer, f"is newer than the resumed step {restored}",
                say=lambda p: verify(p, checksums=False) is None)  # the invalid ones were named already


def _move_aside(run_dir: Path, paths: list[Path], why: str, say=lambda p: True) -> None:
    """Moves `paths` into run_dir/SET_ASIDE (process 0; nothing is deleted), each named in a warning."""
    if paths and jax.process_index() == 0:
        dest = run_dir / SET_ASIDE
        dest.mkdir(parents=True, exist_ok=True)
        for p in paths:
            if say(p):
                warn(f"checkpoint step {p.name} {why}; moved to {dest}")
            target, n = dest / p.name, 1
            while target.exists():
                target, n = dest / f"{p.name}.{n}", n + 1
            shutil.move(str(p), str(target))
    if paths and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxlm_checkpoint_set_aside")
