"""Distillation (train.objective=distill): the teacher restored onto the student's mesh, the loss,
its pull toward the teacher, and one-line refusals of teachers that cannot teach."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm import checkpoint as ckpt
from jaxlm.config import ConfigError, load_config
from jaxlm.data.batch import Batch
from jaxlm.errors import UserError
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.sharding import param_shardings, resolve_rules
from jaxlm.objectives.distill import check_teacher
from jaxlm.train.loop import train
from jaxlm.objectives import make_objective
from jaxlm.model.build import build_model
from jaxlm.train.step import make_trainer

from conftest import run_cli

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64",
         "data.seq_len=32", "train.global_batch=8", "train.progress=false", "train.eval_every=0"]
TOKENS = np.random.default_rng(0).integers(0, 256, (8, 33)).astype(np.int32)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A next-token run of 6 steps with a checkpoint at the end."""
    run_dir = tmp_path_factory.mktemp("teacher")
    cfg = load_config("configs/tiny.yaml", SMALL + ["train.steps=6", "checkpoint.every=6",
                                                    "checkpoint.async_save=false", f"train.run_dir={run_dir}"])
    train(cfg)
    return str(run_dir)


def student(teacher: str, *overrides):
    return load_config("configs/tiny.yaml", SMALL + ["train.objective=distill", f"train.teacher={teacher}",
                                                     *overrides])


def test_distillation_loss_is_zero_when_the_student_is_the_teacher(teacher):
    cfg = student(teacher, "distill.weight=1.0")
    trainer = make_trainer(cfg, make_mesh(cfg.mesh))
    batch = jax.device_put(Batch.from_tokens(TOKENS), trainer.batch_sharding)
    loss, grads = trainer.loss_and_grads(trainer.frozen, batch)  # the student's params := the teacher's
    assert abs(float(loss)) < 1e-6
    assert float(optax.tree.norm(grads)) < 1e-5
    other, _ = trainer.loss_and_grads(trainer.init_state()["params"], batch)
    assert float(other) > 1e-3  # a student other than the teacher pays


class FixedLogits(nnx.Module):
    """A model whose logits over a 3-token vocabulary are the same at every position."""

    def __init__(self, logits):
        self.logits = nnx.Param(jnp.asarray(logits, jnp.float32))

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, rng=None):
        return jnp.broadcast_to(self.logits[...], (*tokens_BT.shape, 3)), {}


def test_the_distillation_loss_equals_a_hand_computed_value_on_a_3_token_vocabulary():
    """Teacher logits (2, 0, -1), student (0, 1, 0), tau = 2, weight 0.5, 4 tokens (targets 1 2 0 1):
    loss = 0.5 tau^2 sum KL(p_teacher || q_student) + 0.5 sum CE. Swapping the KL's direction or
    dropping tau^2 changes it."""
    from jaxlm.objectives.distill import Distill, soft_kl_sum

    p = np.exp([1.0, 0.0, -0.5]) / np.exp([1.0, 0.0, -0.5]).sum()  # softmax(teacher / 2)
    q = np.exp([0.0, 0.5, 0.0]) / np.exp([0.0, 0.5, 0.0]).sum()  # softmax(student / 2)
    kl = float(np.sum(p * np.log(p / q)))  # 0.2728 (the other direction: 0.2589)
    log_softmax_student = np.array([0.0, 1.0, 0.0]) - np.log(np.exp([0.0, 1.0, 0.0]).sum())
    ce = -sum(log_softmax_student[t] for t in (1, 2, 0, 1))
    teacher_logits, student_logits = jnp.array([[[2.0, 0.0, -1.0]] * 4]), jnp.array([[[0.0, 1.0, 0.0]] * 4])
    assert float(soft_kl_sum(teacher_logits, student_logits, jnp.ones((1, 4)), 2.0)) == pytest.approx(4 * kl, rel=1e-5)
    assert float(soft_kl_sum(teacher_logits, student_logits, jnp.array([[1, 0, 1, 0]]), 2.0)) == pytest.approx(
        2 * kl, rel=1e-5)

    objective = Distill.__new__(Distill)  # the loss alone: no teacher run to read
    objective.cfg = SimpleNamespace(distill=SimpleNamespace(weight=0.5, temperature=2.0))
    objective.teacher_graphdef, frozen = nnx.split(FixedLogits([2.0, 0.0, -1.0]))
    batch = Batch.from_tokens(np.array([[0, 1, 2, 0, 1]], np.int32))  # targets 1 2 0 1
    total, metrics, _ = objective.loss(FixedLogits([0.0, 1.0, 0.0]), batch, None, frozen)
    assert float(metrics["kl"]) == pytest.approx(4 * kl, rel=1e-5)
    assert float(metrics["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(total) == pytest.approx(0.5 * 2.0**2 * 4 * kl + 0.5 * ce, rel=1e-5)


def test_the_teacher_is_restored_params_only_with_its_own_shardings_on_the_student_mesh(teacher):
    cfg = student(teacher, "model.d_model=16", "model.d_ff=32", "mesh.fsdp=2")  # a smaller student
    trainer = make_trainer(cfg, make_mesh(cfg.mesh))
    step_dir = ckpt.newest_valid_step(teacher)
    teacher_cfg = load_config(None, SMALL)
    saved = ckpt.restore_state(step_dir, make_trainer(teacher_cfg, make_mesh(teacher_cfg.mesh)))["params"]
    abstract = nnx.state(nnx.eval_shape(lambda: build_model(teacher_cfg, 0)))
    want = param_shardings(abstract, trainer.mesh, resolve_rules(cfg.mesh.rules))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), trainer.frozen, saved)
    jax.tree.map(lambda a, s: assert_sharded(a, s), trainer.frozen, want)
    assert trainer.frozen["embed"]["table_VD"].shape == (257, 32)  # the teacher's width, not the student's


def assert_sharded(array, sharding):
    assert array.sharding.is_equivalent_to(sharding, array.ndim), (array.sharding, sharding)


def test_distillation_pulls_the_student_toward_the_teacher(teacher):
    cfg = student(teacher, "distill.weight=1.0", "train.steps=20", "train.seed=7", "optim.warmup_steps=2")
    trainer = make_trainer(cfg, make_mesh(cfg.mesh))
    state = trainer.init_state()
    kls = []
    for _ in range(20):
        batch = jax.device_put(Batch.from_tokens(TOKENS), trainer.batch_sharding)
        state, metrics = trainer.train_step(state, batch)
        kls.append(float(metrics["kl"]))
    assert kls[-1] < 0.75 * kls[0] and kls == sorted(kls, reverse=True), kls


def test_a_teacher_that_cannot_teach_is_refused_in_one_line(teacher, tmp_path):
    result = run_cli("train", "configs/tiny.yaml", *SMALL, "train.objective=distill", f"train.teacher={teacher}",
                     "model.vocab_size=300", f"train.run_dir={tmp_path / 'student'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "has model.vocab_size=257 but the student has 300; teacher and student must share the vocabulary")
    assert not (tmp_path / "student").exists()
    cfg, teacher_cfg = student(teacher), load_config(None, SMALL)
    with pytest.raises(ConfigError, match="trained with tokenizer 'bytes' .* but data.tokenizer='other'"):
        check_teacher(cfg, teacher_cfg, {"spec": "bytes", "hash": "a" * 64}, {"spec": "other", "hash": "b" * 64})
    check_teacher(cfg, teacher_cfg, {"spec": "bytes", "hash": "a" * 64}, {"spec": "elsewhere", "hash": "a" * 64})
    diffusion_teacher = load_config("configs/mdlm-tiny.yaml", SMALL)
    with pytest.raises(ConfigError, match="masked-diffusion"):
        check_teacher(cfg, diffusion_teacher, None, {"spec": "bytes", "hash": None})
    with pytest.raises(ConfigError, match="needs train.teacher=RUN_DIR"):
        load_config("configs/tiny.yaml", ["train.objective=distill"])
    with pytest.raises(UserError, match="no valid checkpoint"):
        make_objective(student(str(tmp_path)))
