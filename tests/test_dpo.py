"""DPO: the loss against hand-computed values, the start where policy = reference (log 2, and a
gradient that raises the chosen reply over the rejected one), and where the reference lives."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import load_config
from jaxlm.data.batch import Batch
from jaxlm.model import lora
from jaxlm.model.build import build_model
from jaxlm.objectives.dpo import dpo_terms
from jaxlm.parallel.mesh import make_mesh
from jaxlm.train.step import make_trainer

SMALL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64",
         "data.seq_len=16", "model.max_seq_len=16", "train.global_batch=2", "train.objective=dpo",
         "data.path=unused.jsonl", "dpo.beta=0.5"]


def trainer_of(*overrides):
    cfg = load_config("configs/tiny.yaml", SMALL + list(overrides))
    return make_trainer(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))


def pairs() -> Batch:
    """Two pairs; each reply is scored on its last tokens only (the prompt is masked)."""
    rng = np.random.default_rng(0)
    rows = {}
    for prefix in ("", "rejected_"):
        tokens = rng.integers(0, 256, (2, 17)).astype(np.int32)
        mask = np.zeros((2, 16), np.int32)
        mask[0, 9:], mask[1, 5:12] = 1, 1
        rows[prefix + "inputs"], rows[prefix + "targets"] = tokens[:, :-1], tokens[:, 1:]
        rows["loss_mask" if not prefix else "rejected_mask"] = mask
    return Batch.from_arrays(rows)


def logps_by_hand(model, batch: Batch, prefix: str) -> np.ndarray:
    inputs = batch.extra.get(prefix + "inputs", batch.inputs) if prefix else batch.inputs
    targets = batch.extra[prefix + "targets"] if prefix else batch.targets
    mask = batch.extra["rejected_mask"] if prefix else batch.loss_mask
    logits = np.asarray(model(jnp.asarray(inputs))[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    return (np.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask).sum(-1)


def test_dpo_terms_equal_hand_computed_values_on_two_pairs():
    t = dpo_terms(jnp.array([-1.0, -3.0]), jnp.array([-2.0, -1.0]), jnp.array([-1.5, -2.5]),
                  jnp.array([-1.5, -1.5]), beta=0.5)
    # margins: 0.5 * ((-1 + 1.5) - (-2 + 1.5)) = 0.5 and 0.5 * ((-3 + 2.5) - (-1 + 1.5)) = -0.5
    np.testing.assert_allclose(t["reward_margin"], [0.5, -0.5], rtol=1e-6)
    np.testing.assert_allclose(t["loss"], [math.log1p(math.exp(-0.5)), math.log1p(math.exp(0.5))], rtol=1e-6)
    np.testing.assert_array_equal(t["pref_accuracy"], [1.0, 0.0])
    np.testing.assert_allclose(t["reward_chosen"], [0.25, -0.25], rtol=1e-6)


def test_the_objectives_loss_equals_the_formula_on_the_models_log_probabilities():
    """Without LoRA the reference is a frozen copy of the start; the policy has moved away from it."""
    trainer = trainer_of()
    trainer.init_state()
    reference = jax.device_get(trainer.frozen["objective"])
    moved = jax.tree.map(lambda x: x + 0.05 * np.random.default_rng(x.size).standard_normal(x.shape), reference)
    batch = pairs()
    loss, _ = trainer.loss_and_grads(moved, jax.device_put(batch, trainer.batch_sharding))
    graph = trainer.graphdef
    pol = [logps_by_hand(nnx.merge(graph, moved), batch, p) for p in ("", "rejected_")]
    ref = [logps_by_hand(nnx.merge(graph, reference), batch, p) for p in ("", "rejected_")]
    margin = 0.5 * ((pol[0] - ref[0]) - (pol[1] - ref[1]))
    assert abs(margin).min() > 0.05  # the policy really differs from the reference
    assert float(loss) == pytest.approx(np.mean(np.log1p(np.exp(-margin))), rel=1e-5)


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["copy", "lora"])
def test_with_policy_equal_to_reference_the_loss_is_log2_and_the_gradient_raises_chosen_over_rejected(lora_rank):
    trainer = trainer_of(f"lora.rank={lora_rank}")
    state = trainer.init_state()
    params = state["params"]
    if lora_rank:  # B = 0: the policy is the base, which is the reference: no second copy of the weights
        assert trainer.frozen["objective"] == {}
    else:
        assert sum(x.size for x in jax.tree.leaves(trainer.frozen["objective"])) == \
            sum(x.size for x in jax.tree.leaves(params))
    batch = jax.device_put(pairs(), trainer.batch_sharding)
    loss, grads = trainer.loss_and_grads(params, batch)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)

    # the gradient by hand: -beta / 2 * mean over pairs of grad(log pi(chosen) - log pi(rejected))
    @jax.jit
    def margin(p):
        model = nnx.merge(trainer.graphdef, trainer.partition.merge(p, trainer.frozen_params))
        host = pairs()
        both = [jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(model(jnp.asarray(i))[0]), t[..., None], -1)[..., 0]
                        * m, -1) for i, t, m in ((host.inputs, host.targets, host.loss_mask),
                                                 (host.extra["rejected_inputs"], host.extra["rejected_targets"],
                                                  host.extra["rejected_mask"]))]
        return jnp.mean(both[0] - both[1])

    expected = jax.tree.map(lambda g: -0.5 / 2 * g, jax.grad(margin)(params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), grads, expected)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 0
    # a small step against the gradient raises the chosen replies over the rejected ones
    stepped = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    assert float(margin(stepped)) > float(margin(params))
    assert float(trainer.loss_and_grads(stepped, batch)[0]) < math.log(2)


@pytest.mark.parametrize("tokens", [False, True], ids=["adapters", "with_token_rows"])
def test_under_lora_the_reference_is_the_base_with_its_adapters_off(tokens):
    """With the adapters away from zero, DPO's loss uses the LoRA model as the policy and the plain
    starting base model (no adapters) as the reference; with lora.trainable_tokens the trained rows
    move inside the base's weights, and the reference keeps the rows it started with."""
    batch = pairs()
    ids = sorted({int(t) for t in batch.inputs[:, :4].ravel()})  # tokens the pairs read
    trainer = trainer_of("lora.rank=4", *([f"lora.trainable_tokens={ids}".replace(" ", "")] if tokens else []))
    start = trainer.init_state()["params"]
    initial = jax.device_get(trainer.partition.merge(start, trainer.frozen_params))
    params = jax.tree.map(lambda x: x + 0.1, start)  # B != 0 (and rows moved): policy != base
    full = jax.device_get(trainer.partition.merge(params, trainer.frozen_params))
    loss, _ = trainer.loss_and_grads(params, jax.device_put(batch, trainer.batch_sharding))
    plain = nnx.merge(nnx.graphdef(build_model(load_config("configs/tiny.yaml", SMALL), 0)),
                      lora.split_adapters(initial)[0])
    pol = [logps_by_hand(nnx.merge(trainer.graphdef, full), batch, p) for p in ("", "rejected_")]
    ref = [logps_by_hand(plain, batch, p) for p in ("", "rejected_")]
    margin = 0.5 * ((pol[0] - ref[0]) - (pol[1] - ref[1]))
    assert abs(margin).min() > 1e-3
    assert float(loss) == pytest.approx(np.mean(np.log1p(np.exp(-margin))), rel=1e-5)
