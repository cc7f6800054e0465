"""The train step's structure: one batch schema shared by data, step and `jaxlm compile`, a
pluggable objective, and the fsdp sharding check."""

import jax
import numpy as np
import pytest

from jaxlm.config import load_config
from jaxlm.data.batch import Batch
from jaxlm.data.pipeline import to_global
from jaxlm.data.sources import build_data
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.sharding import resolve_rules, underused_fsdp
from jaxlm import objectives
from jaxlm.model.build import build_model
from jaxlm.train.step import make_trainer

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64",
         "data.seq_len=32", "train.global_batch=8"]


@pytest.mark.parametrize("packing", [True, False])
def test_compile_lowers_the_same_program_as_a_training_step_on_real_data(packing):
    cfg = load_config("configs/tiny.yaml", SMALL + [f"data.packing={str(packing).lower()}", "mesh.fsdp=2"])
    trainer = make_trainer(cfg, make_mesh(cfg.mesh))
    batches, _ = build_data(cfg)
    real = to_global(next(batches), trainer.batch_sharding)
    assert (real.segment_ids is not None) == packing
    from_data = trainer.jit_train_step.lower(trainer.init_state(), real, trainer.frozen).as_text()
    assert trainer.lower_train_step().as_text() == from_data


class DoubledNextToken(objectives.NextToken):
    def loss(self, model, batch, key, frozen):
        total, sums, aux = super().loss(model, batch, key, frozen)
        return 2 * total, sums, aux


def test_the_step_minimises_the_configured_objective(monkeypatch):
    cfg = load_config("configs/tiny.yaml", SMALL + ["mesh.data=1"])
    tokens = np.random.default_rng(0).integers(0, 256, (8, 33)).astype(np.int32)

    def loss_and_grads():
        trainer = make_trainer(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))
        batch = jax.device_put(Batch.from_tokens(tokens), trainer.batch_sharding)
        return trainer.loss_and_grads(trainer.init_state()["params"], batch)

    loss, grads = loss_and_grads()
    monkeypatch.setitem(objectives.OBJECTIVES, "next_token", DoubledNextToken)
    loss2, grads2 = loss_and_grads()
    np.testing.assert_allclose(loss2, 2 * loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, 2 * a, rtol=1e-5, atol=1e-7), grads, grads2)


def test_large_parameters_that_fsdp_cannot_split_are_named_once(capsys):
    from flax import nnx

    cfg = load_config("configs/tiny.yaml", ["model.d_model=132", "model.n_heads=6", "model.n_kv_heads=6",
                                            "model.d_ff=256", "mesh.fsdp=8", "mesh.data=1"])
    mesh, rules = make_mesh(cfg.mesh), resolve_rules(cfg.mesh.rules)
    abstract = nnx.state(nnx.eval_shape(lambda: build_model(cfg, 0)))
    lines = underused_fsdp(abstract, mesh, rules)
    # embed=132 is not divisible by 8: every weight with an 'embed' dimension stays whole
    assert any("w_up_DF" in line and "'embed' dimension (132)" in line for line in lines)
    assert not any("scale" in line for line in lines)  # norm scales are small
    underused_fsdp(abstract, mesh, rules)
    assert capsys.readouterr().err.count("w_up_DF") == 1  # warned once
    ok = load_config("configs/tiny.yaml", ["mesh.fsdp=8", "mesh.data=1"])  # d_model=128 divides
    assert underused_fsdp(nnx.state(nnx.eval_shape(lambda: build_model(ok, 0))), make_mesh(ok.mesh),
                          resolve_rules(ok.mesh.rules)) == []
