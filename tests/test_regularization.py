"""Dropout, keep-best checkpoints and early stopping (small-data training)."""

import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import checkpoint as ckpt
from jaxlm.config import CheckpointConfig, load_config
from jaxlm.data.batch import Batch
from jaxlm.parallel.mesh import make_mesh
from jaxlm.train.loop import EarlyStopping, train
from jaxlm.train.step import make_trainer

from test_checkpoint import BASE, TINY, metrics
from test_checkpoint_signals import start_train, wait_for_step

SMALL = ["model.n_layers=2", "model.d_model=64", "model.d_ff=128", "data.seq_len=32", "train.global_batch=8",
         "mesh.data=1"]


def step_program(*overrides) -> str:
    cfg = load_config(TINY, SMALL + list(overrides))
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    return trainer.lower_train_step().as_text()


def test_dropout_zero_adds_nothing_to_the_step_and_dropout_draws_random_masks():
    """With dropout 0 the compiled step has no random-number op (a dense model has no other
    randomness), so it is the program of a model without dropout: bit-identical losses."""
    assert "rng_bit_generator" not in step_program() and "threefry" not in step_program()
    with_dropout = step_program("model.dropout=0.1")
    assert "threefry" in with_dropout or "rng_bit_generator" in with_dropout


def test_eval_is_deterministic_with_dropout_and_training_is_not_dropout_free():
    cfg = load_config(TINY, SMALL + ["model.dropout=0.3", "model.attention_dropout=0.1"])
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    params = trainer.init_state()["params"]
    tokens = np.random.default_rng(0).integers(0, 256, (8, 33)).astype(np.int32)
    batch = jax.device_put(Batch.from_tokens(tokens), trainer.batch_sharding)
    a, b = trainer.eval_step(params, batch), trainer.eval_step(params, batch)
    assert float(a["loss_sum"]) == float(b["loss_sum"])
    no_drop = load_config(TINY, SMALL)
    plain = make_trainer(no_drop, make_mesh(no_drop.mesh, devices=jax.devices()[:1]))
    assert float(plain.eval_step(params, batch)["loss_sum"]) == float(a["loss_sum"])  # eval: dropout off
    state = trainer.init_state()
    _, m1 = trainer.train_step(state, batch)
    _, m0 = plain.train_step(plain.init_state(), batch)
    assert float(m1["loss"]) != float(m0["loss"])  # training: dropout on


def test_sigkill_then_resume_with_dropout_is_bit_exact(tmp_path):
    """Masks come from (seed, step, layer): a resumed run draws the same ones."""
    import os

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # 40 steps: the kill (after step 7 and a complete checkpoint) lands long before the run could end
    run = ("train.steps=40", "checkpoint.every=5", "model.dropout=0.2", "model.attention_dropout=0.1")
    whole = tmp_path / "whole"
    train(load_config(TINY, BASE + list(run) + [f"train.run_dir={whole}"]))
    killed = tmp_path / "killed"
    proc = start_train(killed, env, *run)
    wait_for_step(killed, proc, 7)
    deadline = time.time() + 120
    while not any(ckpt.verify(p) is None for _, p in ckpt.step_dirs(killed / "checkpoints")):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    resumed = start_train(killed, env, *run)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "resumed from step" in err
    assert [(r["step"], r["loss"]) for r in metrics(killed)] == [(r["step"], r["loss"]) for r in metrics(whole)]


def test_keep_best_keeps_the_lowest_eval_losses_besides_the_newest(tmp_path):
    losses = {1: 5.0, 2: 3.0, 3: 4.0, 4: 1.0, 5: 2.0, 6: 6.0, 7: None}
    writer = ckpt.CheckpointWriter(tmp_path / "checkpoints", CheckpointConfig(keep=1, keep_best=2, async_save=False))
    state = {"w": jnp.arange(4.0)}
    for step, loss in losses.items():
        writer.save(step, state, {"step": step, "eval_loss": loss})
    writer.close()
    kept = sorted(s for s, _ in ckpt.step_dirs(tmp_path / "checkpoints"))
    assert kept == [4, 5, 7]  # the best two (1.0, 2.0) and the newest
    assert ckpt.best_step(tmp_path / "checkpoints") == 4


def test_early_stopping_counts_evaluations_without_a_new_best():
    stop = EarlyStopping(patience=2)
    assert [stop.update(s, loss) for s, loss in [(10, 3.0), (20, 2.5), (30, 2.6), (40, 2.4), (50, 2.5)]] == [None] * 5
    reason = stop.update(60, 2.45)
    assert reason.startswith("early stop after step 60: eval loss has not improved for 2 evaluations")
    assert "best 2.4000 at step 40" in reason
    assert all(EarlyStopping(0).update(s, 1.0 + s) is None for s in range(10))  # 0 = never


@pytest.mark.demo  # a demonstration of what dropout is for (36 s); its mechanics are tested below
def test_dropout_lowers_the_eval_loss_of_a_run_that_overfits(shakespeare_path, tmp_path):
    """12 KB of text, 240 steps: without dropout the model memorises it and eval loss climbs."""
    small = tmp_path / "small.txt"
    small.write_text(Path(shakespeare_path).read_text()[:12_000])
    common = SMALL + ["model.d_model=128", "model.d_ff=512", "model.n_layers=2", "data.seq_len=64",
                      "train.steps=240", "train.eval_every=40", "train.eval_batches=2", "data.val_fraction=0.2",
                      "optim.lr=3e-3", "optim.warmup_steps=20", "checkpoint.every=0", "train.progress=false",
                      f"data.path={small}", "train.peak_flops_per_device=1e12"]
    best = {}
    for rate in (0.0, 0.3):
        cfg = load_config(TINY, common + [f"model.dropout={rate}", f"train.run_dir={tmp_path / str(rate)}"])
        history = train(cfg, mesh=make_mesh(cfg.mesh, devices=jax.devices()[:1]))
        evals = [r["eval_loss"] for r in history if "eval_loss" in r]
        best[rate] = (min(evals), evals[-1])
    print(best)
    assert best[0.3][1] < best[0.0][1]  # at the end: dropout generalises better
    assert best[0.0][1] > best[0.0][0] + 0.05  # the run without dropout overfits (eval loss rises)


def test_resumed_run_stops_early_at_the_same_step_as_an_uninterrupted_one(tmp_path, monkeypatch, capfd):
    """Scripted eval losses (the n-th evaluation of a run gets losses[n], counted across its
    resume): best at step 20, then 3 evaluations without a new best stop at step 50. A run cut at
    step 30 resumes with the count (1) and the best (2.0) from its checkpoint and stops there too;
    run again, it says it stopped early instead of training on."""
    import jaxlm.train.loop as loop

    losses = [3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0, 3.1, 3.2]

    def scripted():
        calls = iter(losses)
        return lambda trainer, params, batches: {"eval_loss": next(calls)}

    common = SMALL + ["train.eval_every=10", "train.eval_batches=1", "train.log_every=1",
                      "train.early_stop_patience=3", "checkpoint.every=10", "train.progress=false",
                      "train.peak_flops_per_device=1e12", "optim.schedule=constant"]
    mesh = make_mesh(load_config(TINY, SMALL).mesh, devices=jax.devices()[:1])

    def run(run_dir, steps):
        return train(load_config(TINY, common + [f"train.steps={steps}", f"train.run_dir={run_dir}"]), mesh=mesh)

    monkeypatch.setattr(loop, "evaluate", scripted())
    whole = run(tmp_path / "whole", 100)
    assert whole[-1]["step"] == 50

    monkeypatch.setattr(loop, "evaluate", scripted())
    assert run(tmp_path / "cut", 30)[-1]["step"] == 30
    resumed = run(tmp_path / "cut", 100)
    assert resumed[-1]["step"] == 50
    assert ckpt.read_meta(tmp_path / "cut" / "checkpoints" / "30")["early_stop"] == \
        {"best": 2.0, "best_step": 20, "stale": 1}
    steps = lambda h: [(r["step"], r.get("eval_loss")) for r in h]  # noqa: E731
    assert steps(metrics(tmp_path / "cut")) == steps(whole)
    capfd.readouterr()
    assert run(tmp_path / "cut", 100) == []
    assert "stopped early at step 50 (best eval loss 2.0000 at step 20, then 3 evaluations without a new best" \
        in capfd.readouterr().err
