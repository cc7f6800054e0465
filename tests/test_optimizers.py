"""`optim.name`: AdamW, Lion, Adafactor, Muon and SGD, each equal to optax called by hand (masks,
schedule, clipping) for two steps; Muon sees each layer's and each expert's matrix on its own; the
train step shards every optimizer's state; a resume may not change the optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from optax.contrib import MuonDimensionNumbers as Dims

from jaxlm.checkpoint import resume
from jaxlm.config import load_config, to_dict
from jaxlm.model.build import build_model
from jaxlm.parallel.mesh import make_mesh
from jaxlm.train.optim import make_optimizer, muon_dims
from jaxlm.train.step import make_trainer

MOE = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64",
       "moe.d_ff=16", "moe.n_experts=4", "data.seq_len=16", "train.global_batch=8"]
OPTIM = ["optim.warmup_steps=0", "optim.schedule=cosine", "optim.lr=0.01", "optim.min_lr=0.001",
         "optim.weight_decay=0.1", "optim.clip_norm=1.0", "train.steps=10"]
# Muon's (reduction, output) axes of each parameter, written out: axis 0 is the stacked layers, axis 1
# of the expert weights the experts, both batch axes; embeddings, the head and norm gains get AdamW.
MUON_AXES = {"wq_DHd": ((1,), (2, 3)), "wk_DKd": ((1,), (2, 3)), "wv_DKd": ((1,), (2, 3)),
             "wo_HdD": ((1, 2), (3,)), "router_DE": ((1,), (2,)), "w_gate_EDF": ((2,), (3,)),
             "w_up_EDF": ((2,), (3,)), "w_down_EFD": ((2,), (3,)),
             "w_gate_DF": ((1,), (2,)), "w_up_DF": ((1,), (2,)), "w_down_FD": ((1,), (2,))}


def name_of(path):
    return path[-1].key


def model_params(cfg):
    return nnx.to_pure_dict(nnx.state(build_model(cfg, 0)))


def by_hand(name, params):
    """The optimizer `name` as optax's own functions, configured by hand with OPTIM's values."""
    lr = optax.cosine_decay_schedule(0.01, 10, alpha=0.1)
    decay = jax.tree_util.tree_map_with_path(lambda p, _: name_of(p) not in ("scale", "table_VD"), params)
    if name == "adamw":
        core = optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=decay)
    elif name == "lion":
        core = optax.lion(lr, b1=0.9, b2=0.95, weight_decay=0.1, mask=decay)
    elif name == "adafactor":  # decoupled decay, lr x weight_decay x param, as AdamW's
        plain = optax.adafactor(lr, multiply_by_parameter_scale=False)
        decayed = optax.chain(optax.set_to_zero(), optax.add_decayed_weights(0.1, decay),
                              optax.scale_by_schedule(lambda s: -lr(s)))
        core = _sum(plain, decayed)
    elif name == "muon":
        dims = jax.tree_util.tree_map_with_path(
            lambda p, _: Dims(*MUON_AXES[name_of(p)]) if name_of(p) in MUON_AXES else None, params)
        core = optax.contrib.muon(lr, beta=0.95, eps=1e-8, weight_decay=0.1, adam_b1=0.9, adam_b2=0.95,
                                  adam_weight_decay=0.0, muon_weight_dimension_numbers=dims, consistent_rms=0.2)
    else:
        core = optax.chain(optax.add_decayed_weights(0.1, decay), optax.sgd(lr, momentum=0.9))
    return optax.chain(optax.clip_by_global_norm(1.0), core)


def _sum(a, b):
    """The sum of two transformations' updates of the same gradients (Adafactor + its decay)."""
    def update(g, state, params):
        ua, sa = a.update(g, state[0], params)
        ub, sb = b.update(g, state[1], params)
        return jax.tree.map(jnp.add, ua, ub), (sa, sb)
    return optax.GradientTransformation(lambda p: (a.init(p), b.init(p)), update)


def two_steps(tx, params, grads):
    state, update = tx.init(params), jax.jit(tx.update)
    out = []
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor", "muon", "sgd"])
def test_each_optimizer_equals_optax_by_hand_for_two_steps(name):
    cfg = load_config(None, MOE + OPTIM + [f"optim.name={name}"])
    params = jax.jit(lambda: model_params(cfg))()
    rng = np.random.default_rng(1)
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(2)]
    ours, _ = make_optimizer(cfg.optim, cfg.train.steps)
    for got, want in zip(two_steps(ours, params, grads), two_steps(by_hand(name, params), params, grads)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), got, params)
    assert min(jax.tree.leaves(moved)) > 0  # every parameter moved: nothing frozen by a wrong label


@pytest.mark.parametrize("experts", [4, 0])
def test_muon_axes_treat_layers_and_experts_as_batch(experts):
    cfg = load_config(None, MOE + [f"moe.n_experts={experts}"])
    shapes = jax.tree_util.tree_flatten_with_path(jax.eval_shape(lambda: model_params(cfg)))[0]
    seen = {name_of(p): muon_dims(name_of(p), x.ndim) for p, x in shapes}
    want = {k: Dims(*v) for k, v in MUON_AXES.items() if k in seen}
    assert seen == {**want, "table_VD": None, "lm_head_DV": None, "scale": None}
    assert len(want) == (8 if experts else 7)


def test_stacked_muon_update_equals_plain_2d_muon_of_each_layer_and_expert():
    """optax's Muon of each [D, F] matrix alone (its default 2-D rule) == ours of the stacked tensors."""
    L, E, D, F = 3, 2, 8, 12
    k1, k2 = jax.random.split(jax.random.key(0))
    stacked = {"w_up_EDF": jax.random.normal(k1, (L, E, D, F)), "w_down_FD": jax.random.normal(k2, (L, F, D))}
    grads = jax.tree.map(lambda x: jnp.cos(3 * x), stacked)
    o = load_config(None, ["optim.name=muon", "optim.clip_norm=0", "optim.schedule=constant",
                           "optim.warmup_steps=0"]).optim
    ours, _ = make_optimizer(o, 10)
    got, _ = jax.jit(ours.update)(grads, ours.init(stacked), stacked)
    slices = lambda t: {f"{k}{i}": v[i].reshape(-1, *v.shape[-2:]) for k, v in t.items() for i in range(L)}
    plain = optax.contrib.muon(o.lr, beta=0.95, weight_decay=o.weight_decay, adam_b1=o.beta1, adam_b2=o.beta2,
                               consistent_rms=0.2)
    flat = {f"{k}{e}": m for k, v in slices(stacked).items() for e, m in enumerate(v)}
    flat_g = {f"{k}{e}": m for k, v in slices(grads).items() for e, m in enumerate(v)}
    want, _ = jax.jit(plain.update)(flat_g, plain.init(flat), flat)
    for i in range(L):
        for e in range(E):
            np.testing.assert_allclose(got["w_up_EDF"][i, e], want[f"w_up_EDF{i}{e}"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got["w_down_FD"][i], want[f"w_down_FD{i}0"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["muon", "adafactor"])
def test_train_step_on_an_fsdp_mesh_applies_the_optimizer_by_hand(name):
    """The jitted step (fsdp over 8 devices, the state sharded by path) == gradients + optax by hand.
    Muon's partitioned state and Adafactor's factored one are those optax.tree_map_params cannot shard."""
    cfg = load_config(None, MOE + OPTIM + [f"optim.name={name}", "mesh.data=1", "mesh.fsdp=8", "moe.n_experts=0"])
    trainer = make_trainer(cfg, make_mesh(cfg.mesh))
    state = trainer.init_state()
    assert state["opt_state"] is not None
    params = jax.device_get(state["params"])
    tokens = np.random.default_rng(0).integers(0, 257, (8, 17), dtype=np.int32)
    from jaxlm.data.batch import Batch
    from jaxlm.data.pipeline import to_global

    batch = to_global(Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=np.ones((8, 16), np.int32)),
                      trainer.batch_sharding)
    _, grads = trainer.loss_and_grads(state["params"], batch)
    tx = by_hand(name, params)
    want, _ = tx.update(jax.device_get(grads), tx.init(params), params)
    new, _ = trainer.train_step(state, batch)
    jax.tree.map(lambda a, p, u: np.testing.assert_allclose(a, p + u, rtol=1e-5, atol=1e-6),
                 jax.device_get(new["params"]), params, want)


def test_resume_refuses_another_optimizer():
    saved = to_dict(load_config(None, ["optim.name=adamw"]))
    changed = resume.incompatible_keys(saved, load_config(None, ["optim.name=muon"]), None, None)
    assert changed == ["optim.name ('adamw' -> 'muon')"]
    assert resume.incompatible_keys(saved, load_config(None, ["optim.momentum=0.9"]), None, None) == []
