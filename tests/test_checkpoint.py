"""Checkpointing and fault tolerance: exact resume, preemption, corruption, resharding, async."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from argparse import Namespace
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlm import checkpoint as ckpt
from jaxlm.checkpoint import resume
from jaxlm.config import CheckpointConfig, load_config
from jaxlm.data.pipeline import to_global
from jaxlm.data.sources import build_data
from jaxlm.parallel.mesh import make_mesh
from jaxlm.errors import UserError
from jaxlm.train.loop import train
from jaxlm.train.optim import make_schedule
from jaxlm.train.step import make_trainer

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
# A constant schedule (after warmup) makes the compiled step independent of train.steps, so
# subprocesses with different step counts share one entry of the compilation cache.
BASE = ["model.n_layers=2", "model.d_model=64", "model.d_ff=128", "data.seq_len=32", "train.global_batch=8",
        "train.eval_every=0", "train.log_every=1", "train.progress=false", "train.peak_flops_per_device=1e12",
        "mesh.data=1", "mesh.fsdp=8", "optim.schedule=constant", "optim.warmup_steps=10"] + \
    ([f"data.path={SHAKESPEARE}"] if SHAKESPEARE.is_file() else [])
STEPS, EVERY = 40, 6  # the base run: checkpoints 6, 12, ..., 36 and 40 (last); the newest 3 kept
RUN = (f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep=3")


def config(*overrides: str):
    return load_config(TINY, BASE + list(overrides))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """The uninterrupted reference: 40 steps on 8 devices (fsdp=8); tests work on copies."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    history = train(config(*RUN, f"train.run_dir={run_dir}"))
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))
    assert [s for s, _ in ckpt.step_dirs(run_dir / "checkpoints")] == [40, 36, 30]
    return run_dir


def copy_run(base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "run"))


def test_damaged_newest_checkpoints_fall_back_to_previous_with_one_warning_each(base_run, tmp_path, capfd):
    run_dir = copy_run(base_run, tmp_path)
    ck = run_dir / "checkpoints"
    shutil.copytree(ck / "40", ck / "42")
    (ck / "42" / ckpt.MANIFEST).unlink()  # a step without its manifest
    (ck / "48.orbax-checkpoint-tmp").mkdir()  # killed mid-save: never renamed
    data_file = max((ck / "40" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])  # truncated
    (ck / "36" / "meta" / "metadata").unlink()  # deleted

    cfg = config(*RUN, "train.steps=44", f"train.run_dir={run_dir}")
    trainer = make_trainer(cfg, make_mesh(cfg.mesh))
    state, meta = resume.restore_for_training(cfg, trainer, run_dir, None, ckpt.tokenizer_identity("bytes"))
    assert int(state["step"]) == meta["step"] == 30
    warnings = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 3
    assert "step 42" in warnings[0] and "no manifest.json" in warnings[0]
    assert "step 40" in warnings[1] and "bytes, expected" in warnings[1]
    assert "step 36" in warnings[2] and "meta/metadata missing" in warnings[2]
    assert sorted(p.name for p in (run_dir / ckpt.SET_ASIDE).iterdir()) == ["36", "40", "42"]

    # training goes on from 30 and saves 36, 42, 44 as new, valid checkpoints
    history = train(cfg)
    assert history[0]["step"] == 31
    assert [(r["step"], r["loss"]) for r in history[:10]] == [(r["step"], r["loss"]) for r in metrics(base_run)[30:]]
    assert [(s, ckpt.verify(p)) for s, p in ckpt.step_dirs(ck)] == [(44, None), (42, None), (36, None)]


def flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_in_a_data_file_fails_the_restore_and_resume_falls_back(base_run, tmp_path, capfd):
    """Same size, one bit: the sizes pass, the arrays' digests (checked on the restored arrays, no
    file read twice) do not; a full `verify(arrays=True)` names the array too."""
    run_dir = copy_run(base_run, tmp_path)
    step40 = run_dir / "checkpoints" / "40"
    flip_a_byte(max((step40 / "state").rglob("d/*"), key=lambda p: p.stat().st_size))
    assert ckpt.verify(step40) is None  # sizes and metadata crc32s only: the data is checked when read
    assert "differs from its digest" in ckpt.verify(step40, arrays=True)

    cfg = config(*RUN, "train.steps=44", f"train.run_dir={run_dir}")
    trainer = make_trainer(cfg, make_mesh(cfg.mesh))
    capfd.readouterr()
    state, meta = resume.restore_for_training(cfg, trainer, run_dir, None, ckpt.tokenizer_identity("bytes"))
    assert meta["step"] == 36
    (warning,) = [line for line in capfd.readouterr().err.splitlines() if "is invalid" in line]
    assert "step 40" in warning and "differs from the digest" in warning
    damaged = run_dir / ckpt.SET_ASIDE / "40"
    with pytest.raises(UserError, match="is damaged: array .* differs from the digest"):
        ckpt.restore_state(damaged, trainer)
    # a params-only restore (a teacher) checks the arrays it reads: here a params digest recorded wrong
    step36 = run_dir / "checkpoints" / "36"
    manifest = json.loads((step36 / ckpt.MANIFEST).read_text())
    manifest["arrays"]["params.embed.table_VD"] ^= 1
    (step36 / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="array params.embed.table_VD differs from the digest"):
        ckpt.restore_params(step36, trainer.abstract_state()["params"])


def test_a_changed_metadata_file_of_the_same_size_is_a_checksum_mismatch(base_run, tmp_path):
    step = Path(shutil.copytree(base_run / "checkpoints" / "40", tmp_path / "40"))
    flip_a_byte(step / "meta" / "metadata")
    assert ckpt.verify(step) == "file meta/metadata checksum mismatch"
    assert ckpt.verify(step, checksums=False) is None  # --quick: sizes only


def test_the_seal_reads_no_data_file_and_digests_do_not_depend_on_the_layout(base_run, tmp_path, monkeypatch):
    """Saving reads back only the metadata files; the digests of the same state saved from 8
    devices (fsdp=8) and from one device are equal, and equal numpy's on the host."""
    from jaxlm.checkpoint import digest, manifest

    read = []
    crc32 = manifest._crc32
    monkeypatch.setattr(manifest, "_crc32", lambda p: (read.append((p, p.stat().st_size)), crc32(p))[1])
    cfg = config(*RUN)
    one = make_trainer(cfg, make_mesh(config(*RUN, "mesh.fsdp=1").mesh, jax.devices()[:1]))
    state = ckpt.restore_state(base_run / "checkpoints" / "40", one)
    writer = ckpt.CheckpointWriter(tmp_path / "checkpoints", CheckpointConfig(every=1))
    writer.save(40, state, ckpt.read_meta(base_run / "checkpoints" / "40"))
    writer.close()
    assert read and not [p for p, _ in read if p.parent.name == "d"]
    assert sum(size for _, size in read) < 0.1 * ckpt.dir_size(tmp_path / "checkpoints" / "40")
    arrays = manifest.read_manifest(tmp_path / "checkpoints" / "40")["arrays"]
    assert arrays == manifest.read_manifest(base_run / "checkpoints" / "40")["arrays"]
    assert arrays == digest.digests(jax.device_get(state))
    assert len(arrays) == len(jax.tree.leaves(state))


def test_a_manifest_of_the_wrong_shape_marks_the_step_damaged(base_run, tmp_path):
    """Valid JSON that is not a manifest (a list, files not a mapping, no files at all) is a damaged
    step, as unreadable JSON is, not a TypeError in every verb that lists or restores it."""
    step = tmp_path / "40"
    shutil.copytree(base_run / "checkpoints" / "40", step)
    assert ckpt.verify(step) is None
    for manifest, reason in [("[]", "manifest.json unreadable (TypeError)"),
                             ('{"format": 1, "files": 3}', "manifest.json malformed"),
                             ('{"format": 1, "files": {}}', "manifest.json malformed"),
                             ('{"format": 1, "files": {"state/x": 5}}', "manifest.json malformed")]:
        (step / ckpt.MANIFEST).write_text(manifest)
        assert ckpt.verify(step).startswith(reason), manifest


def listing(run_dir: Path) -> dict:
    """Every file (its size and modification time) and directory under run_dir, but the run's lock."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in run_dir.rglob("*") if p.name != "run.lock"}


def test_no_valid_checkpoint_is_an_error_naming_every_step_tried_and_changes_nothing(base_run, tmp_path):
    run_dir = copy_run(base_run, tmp_path)
    for step in (30, 36, 40):
        (run_dir / "checkpoints" / str(step) / ckpt.MANIFEST).write_text("{not json")
    (run_dir / "checkpoints" / "46.orbax-checkpoint-tmp").mkdir()  # and a save killed before its rename
    before = listing(run_dir)
    with pytest.raises(UserError) as e:
        train(config(*RUN, "train.steps=50", f"train.run_dir={run_dir}"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{run_dir}: no checkpoint in {run_dir / 'checkpoints'} can be resumed "
                                              "from (step 46: an unfinished save, 46.orbax-checkpoint-tmp; step 40: "
                                              "manifest.json unreadable (JSONDecodeError); step 36: ")
    assert "step 30: manifest.json unreadable" in msg and "To start again from step 0, move " in msg
    assert listing(run_dir) == before  # nothing deleted, moved or appended to (no step 0 restart)


def test_a_run_killed_in_its_first_save_starts_again_from_step_0_setting_aside_what_it_left(tmp_path, capfd):
    """A run killed in its first save leaves orbax's temporary directory (nothing to restore) and
    the metrics of its steps: `jaxlm train` again starts over, equal to a fresh run, and moves both
    aside instead of deleting or appending to them."""
    cfg = lambda run_dir: config("train.steps=3", "checkpoint.every=0", f"train.run_dir={run_dir}")  # noqa: E731
    train(cfg(tmp_path / "fresh"))
    run_dir = tmp_path / "run"
    unfinished = run_dir / "checkpoints" / "1000.orbax-checkpoint-tmp"
    (unfinished / "state").mkdir(parents=True)
    (unfinished / "state" / "part").write_text("half-written")
    old = "".join(json.dumps({"step": s, "loss": 5.0}) + "\n" for s in range(1, 999))
    (run_dir / "metrics.jsonl").write_text(old)
    capfd.readouterr()
    train(cfg(run_dir))
    losses = lambda d: [(r["step"], r["loss"], r["grad_norm"]) for r in metrics(d)]  # noqa: E731
    assert losses(run_dir) == losses(tmp_path / "fresh") and len(losses(run_dir)) == 3
    assert (run_dir / "metrics.jsonl.1").read_text() == old
    assert not unfinished.exists()
    assert (run_dir / ckpt.SET_ASIDE / unfinished.name / "state" / "part").read_text() == "half-written"
    err = capfd.readouterr().err
    assert f"checkpoint step {unfinished.name} is an unfinished save" in err and "training starts at step 0" in err


@pytest.mark.parametrize("mesh_args,n_devices", [(("mesh.data=2", "mesh.fsdp=2"), 4), (("mesh.fsdp=1",), 1)])
def test_fsdp8_checkpoint_restores_exactly_on_fewer_devices_and_trains_on(base_run, tmp_path, mesh_args, n_devices,
                                                                          capfd):
    step_dir = base_run / "checkpoints" / "36"
    cfg8 = config(*RUN)
    reference = ckpt.restore_state(step_dir, make_trainer(cfg8, make_mesh(cfg8.mesh)))

    run_dir = copy_run(base_run, tmp_path)
    cfg = config(*RUN, *mesh_args, f"train.run_dir={run_dir}")
    mesh = make_mesh(cfg.mesh, jax.devices()[:n_devices])
    trainer = make_trainer(cfg, mesh)
    state = ckpt.restore_state(step_dir, trainer)
    assert ckpt.state_equal(state, reference)
    leaf = state["params"]["embed"]["table_VD"]
    assert leaf.sharding == trainer.state_shardings["params"]["embed"]["table_VD"]
    assert len(leaf.sharding.device_set) == n_devices

    capfd.readouterr()
    history = train(cfg, mesh=mesh, resume=str(run_dir / "checkpoints" / "36"))
    assert [r["step"] for r in history] == [37, 38, 39, 40]
    now = "data=2 fsdp=2" if n_devices == 4 else "one device"
    assert f"the checkpoint was written on mesh fsdp=8, this run's is {now}: the resumed run need not match" \
        in capfd.readouterr().err
    # same numbers as on 8 devices, up to the order of floating-point reductions
    np.testing.assert_allclose([r["loss"] for r in history], [r["loss"] for r in metrics(base_run)[36:]], rtol=1e-5)
    assert [s for s, _ in ckpt.step_dirs(run_dir / "checkpoints")] == [40, 36, 30]
    assert (run_dir / ckpt.SET_ASIDE / "40").is_dir()  # the old 40, superseded by --resume 36


def test_resume_with_changed_model_shape_is_refused_naming_the_keys(base_run, tmp_path):
    run_dir = copy_run(base_run, tmp_path)
    out = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", TINY, *BASE, "model.d_model=128",
                          "model.n_layers=3", *RUN, f"train.run_dir={run_dir}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    (line,) = [ln for ln in out.stderr.splitlines() if ln.startswith("jaxlm train: error:")]
    assert "model.d_model (64 -> 128)" in line and "model.n_layers (2 -> 3)" in line
    assert "train.steps" not in line


def test_compatible_changes_are_allowed_and_locked_ones_named():
    saved = json.loads(json.dumps(ckpt.make_meta(config(*RUN), 9, 0, {}, {})["config"]))
    ok = config("train.steps=99", "optim.lr=1e-3", "optim.warmup_steps=3", "train.eval_every=5",
                "train.log_every=2", "mesh.data=2", "mesh.fsdp=4", "model.remat=full", "checkpoint.every=7")
    assert resume.incompatible_keys(saved, ok, None, None) == []
    bad = config("data.seq_len=64", "train.global_batch=16", "moe.n_experts=4", "optim.clip_norm=0")
    names = " ".join(resume.incompatible_keys(saved, bad, {"hash": "a" * 64}, {"hash": "b" * 64}))
    for key in ("data.seq_len", "train.global_batch", "moe.n_experts", "optim.clip_norm", "tokenizer hash"):
        assert key in names
    moved = config("data.tokenizer=/elsewhere/same_tokenizer")  # another name, the same content
    assert resume.incompatible_keys(saved, moved, {"hash": "a" * 64}, {"hash": "a" * 64}) == []
    assert "data.tokenizer" in " ".join(resume.incompatible_keys(saved, moved, None, None))


def test_resume_with_longer_schedule_continues_without_duplicate_metric_steps(base_run, tmp_path):
    run_dir = copy_run(base_run, tmp_path)
    with open(run_dir / "metrics.jsonl", "a") as f:  # records of steps a killed run had not saved
        f.write(json.dumps({"step": 41, "loss": 0.0}) + "\n" + '{"step": 42, "lo')
    cfg = config(*RUN, "train.steps=45", "optim.schedule=cosine", f"train.run_dir={run_dir}")
    history = train(cfg)
    assert [r["step"] for r in history] == [41, 42, 43, 44, 45]
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 46))
    assert metrics(run_dir)[:40] == metrics(base_run)  # the records kept are untouched
    assert history[0]["lr"] == pytest.approx(float(make_schedule(cfg.optim, 45)(40)), rel=1e-6)
    assert ckpt.read_meta(run_dir / "checkpoints" / "45")["tokens_seen"] == 45 * 8 * 32


def test_a_fresh_start_keeps_the_earlier_starts_metrics_aside_instead_of_appending(tmp_path, capfd):
    cfg = config("train.steps=3", "checkpoint.every=0", f"train.run_dir={tmp_path / 'run'}")
    train(cfg)
    first = metrics(tmp_path / "run")
    train(cfg)  # no checkpoint to resume from: a second run from step 0
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3]
    kept = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl.1").read_text().splitlines()]
    assert kept == first
    assert "kept as metrics.jsonl.1" in capfd.readouterr().err


def test_async_save_returns_before_the_write_and_saves_the_state_at_save_time(tmp_path, monkeypatch):
    cfg = config(*RUN)
    trainer = make_trainer(cfg, make_mesh(cfg.mesh))
    batches, _ = build_data(cfg)
    step = lambda s: trainer.train_step(s, to_global(next(batches), trainer.batch_sharding))[0]  # noqa: E731
    state = step(trainer.init_state())
    expected = jax.device_get(state)

    # hold the write in the background (patched on the class: orbax keeps the bound method it is given)
    release, seal = threading.Event(), ckpt.CheckpointWriter._seal
    monkeypatch.setattr(ckpt.CheckpointWriter, "_seal", lambda self: (release.wait(60), seal(self)))
    writer = ckpt.CheckpointWriter(tmp_path / "checkpoints", CheckpointConfig(every=1))
    writer.save(1, state, ckpt.make_meta(cfg, 1, 256, batches.get_state(), {}))
    for _ in range(3):  # donated train steps run while the save is still being written
        state = step(state)
    jax.block_until_ready(state)
    assert writer.saving() and not (tmp_path / "checkpoints" / "1").exists()
    release.set()
    writer.close()
    assert ckpt.verify(tmp_path / "checkpoints" / "1") is None
    restored = ckpt.restore_state(tmp_path / "checkpoints" / "1", trainer)
    assert ckpt.state_equal(restored, expected) and not ckpt.state_equal(restored, state)


def test_checkpoint_ls_lists_steps_sizes_validity_and_config(base_run, tmp_path, capsys):
    from jaxlm.checkpoint.cli import main

    run_dir = copy_run(base_run, tmp_path)
    (run_dir / "checkpoints" / "40" / "meta" / "metadata").write_text("{}")  # damaged after the save
    assert main(Namespace(action="ls", run_dir=str(run_dir), quick=False)) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0].isdigit()}
    assert set(rows) == {"30", "36", "40"}
    assert rows["30"].endswith(" valid") and rows["36"].endswith(" valid") and "INVALID" in rows["40"]
    assert "KiB" in rows["30"] or "MiB" in rows["30"]
    assert "d_model=64" in out and "n_layers=2" in out

