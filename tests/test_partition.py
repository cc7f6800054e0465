"""The trainable/frozen seam: frozen parameters stay bit-identical, the optimizer state holds only
what is trained, and the losses equal a run that stops gradients to the frozen parts by hand."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import ConfigError, load_config
from jaxlm.data.batch import Batch
from jaxlm.parallel.mesh import make_mesh
from jaxlm.train import step as step_mod
from jaxlm.train.optim import make_optimizer
from jaxlm.train.step import make_trainer

STEPS, N_LAYERS = 20, 4
# every layer but the last frozen, and the embeddings: the last layer, final norm and head train
FREEZE = ["model.n_layers=4", "train.freeze_layers=3", "train.freeze=[embed/]", f"train.steps={STEPS}",
          "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64", "data.seq_len=32",
          "train.global_batch=4", "optim.warmup_steps=2", "optim.weight_decay=0.1"]


def batches(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (4, 33)).astype(np.int32) for _ in range(n)]


def one_device(cfg):
    return make_trainer(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))


def is_frozen_rows(path) -> bool:
    return path[0].key == "segments"


def by_hand(cfg, tokens: list[np.ndarray]) -> tuple[list[float], dict]:
    """The reference: the whole tree is differentiated, with stop_gradient on the frozen parts, and
    AdamW (optax, as configured) updates only the trained slices."""
    plain = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, freeze=[], freeze_layers=0))
    trainer = one_device(plain)
    params = jax.device_get(trainer.jit_init_params())

    def trained(tree):  # the last layer's rows, the final norm and the head
        return jax.tree_util.tree_map_with_path(
            lambda p, x: x[N_LAYERS - 1:] if is_frozen_rows(p) else x, {k: v for k, v in tree.items() if k != "embed"})

    def join(tree, new):
        out = dict(tree, **{k: v for k, v in new.items()})
        out["segments"] = jax.tree.map(lambda old, n: jnp.concatenate([old[: N_LAYERS - 1], n]),
                                       tree["segments"], new["segments"])
        return out

    def loss(new, full, batch, step):
        stopped = jax.lax.stop_gradient(full)
        tree = join(stopped, new)
        n = jnp.maximum(jnp.sum(batch.loss_mask), 1.0)
        return step_mod.loss_fn(tree, batch, {"params": {}, "objective": {}}, step_mod.step_key(cfg.train, step), n, 1,
                                trainer.spec)[0]

    optimizer, _ = make_optimizer(cfg.optim, cfg.train.steps)
    new = trained(params)
    opt_state = optimizer.init(new)
    losses = []
    for i, t in enumerate(tokens):
        batch = Batch.from_tokens(t)
        value, grads = jax.value_and_grad(loss)(new, params, batch, i)
        updates, opt_state = optimizer.update(grads, opt_state, new)
        new = jax.tree.map(lambda p, u: p + u, new, updates)
        losses.append(float(value))
    return losses, join(params, new)


def test_frozen_layers_stay_identical_and_losses_equal_stopping_gradients_by_hand():
    cfg = load_config("configs/tiny.yaml", FREEZE)
    trainer = one_device(cfg)
    state = trainer.init_state()
    initial = jax.device_get(trainer.saved_state(state)["params"])
    tokens = batches(STEPS)
    losses = []
    for t in tokens:
        state, metrics = trainer.train_step(state, jax.device_put(Batch.from_tokens(t), trainer.batch_sharding))
        losses.append(float(metrics["loss"]))
    final = jax.device_get(trainer.saved_state(state)["params"])

    # the frozen arrays are bit-identical after the steps; the trained ones moved
    np.testing.assert_array_equal(final["embed"]["table_VD"], initial["embed"]["table_VD"])
    for a, b in zip(jax.tree.leaves(final["segments"]), jax.tree.leaves(initial["segments"])):
        np.testing.assert_array_equal(a[: N_LAYERS - 1], b[: N_LAYERS - 1])
        assert not np.array_equal(a[N_LAYERS - 1:], b[N_LAYERS - 1:])
    assert not np.array_equal(final["lm_head_DV"], initial["lm_head_DV"])

    # the optimizer state holds only the last layer, the final norm and the head (AdamW: mu and nu)
    def count(tree):
        return sum(x.size for x in jax.tree.leaves(tree) if x.ndim)
    trained_size = count(initial["lm_head_DV"]) + count(initial["final_norm"]) + count(
        jax.tree.map(lambda x: x[N_LAYERS - 1:], initial["segments"]))
    assert count(state["params"]) == trained_size
    assert count(state["opt_state"]) == 2 * trained_size
    assert "embed" not in state["params"]

    reference, ref_params = by_hand(cfg, tokens)
    np.testing.assert_allclose(losses, reference, rtol=2e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), final, ref_params)


def test_a_freeze_that_matches_nothing_or_everything_is_one_line():
    with pytest.raises(ConfigError, match=r"train.freeze: 'nope' matches no parameter"):
        one_device(load_config("configs/tiny.yaml", ["train.freeze=[nope]"]))
    with pytest.raises(ConfigError, match="freeze every parameter"):
        one_device(load_config("configs/tiny.yaml", ["train.freeze=[.]"]))
    with pytest.raises(ConfigError, match="train.freeze_layers=9 exceeds model.n_layers=4"):
        load_config("configs/tiny.yaml", ["train.freeze_layers=9"])


def test_nothing_frozen_moves_nothing():
    cfg = load_config("configs/tiny.yaml", ["model.n_layers=2"])
    trainer = one_device(cfg)
    assert trainer.partition.trivial
    state = trainer.init_state()
    assert trainer.frozen["params"] == {} and trainer.saved_state(state)["params"] is state["params"]
