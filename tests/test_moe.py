"""MoE layer: dense equivalence, dropping == dropless, capacity priority, router losses,
expert parallelism == single device, training lowers the loss and the aux loss balances experts."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax (conftest too)

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from jaxlm.tools import accounting
from jaxlm.config import MeshConfig, ModelConfig, MoEConfig, load_config
from jaxlm.data.pipeline import to_global
from jaxlm.data.sources import build_data
from jaxlm.parallel.mesh import make_mesh
from jaxlm.model import moe as moe_mod
from jaxlm.model.layers import MLP
from jaxlm.model.moe import MoEBlock, route
from jaxlm.model.transformer import Transformer
from jaxlm.parallel.sharding import param_shardings, resolve_rules, spec_for, use_mesh_rules
from jaxlm.train.step import make_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32)


@nnx.jit
def apply(block: MoEBlock, x_BTD):
    return block(x_BTD)


def expert_ref(block: MoEBlock, e: int, x_ND):
    """Expert e of the block applied to every row, written out by hand (SwiGLU)."""
    up = x_ND @ block.w_up_EDF[...][e]
    gate = x_ND @ block.w_gate_EDF[...][e]
    return (jax.nn.silu(gate) * up) @ block.w_down_EFD[...][e]


# ------------------------------------------------------------------------------ single device


@pytest.mark.parametrize("impl", ["dropping", "dropless"])
@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_one_expert_top1_equals_dense_mlp_with_same_weights(impl, kind):
    cfg = ModelConfig(**{**CFG.__dict__, "mlp": kind})
    block = MoEBlock(cfg, MoEConfig(n_experts=1, top_k=1, d_ff=24, impl=impl, capacity_factor=1.0), nnx.Rngs(0))
    dense = MLP(cfg, 24, nnx.Rngs(1))
    dense.w_up_DF[...], dense.w_down_FD[...] = block.w_up_EDF[...][0], block.w_down_EFD[...][0]
    if kind == "swiglu":
        dense.w_gate_DF[...] = block.w_gate_EDF[...][0]
    x = jax.random.normal(jax.random.key(2), (2, 8, cfg.d_model))
    out, aux = apply(block, x)
    np.testing.assert_allclose(out, dense(x)[0], atol=1e-6, rtol=1e-6)
    assert float(aux["moe_dropped_frac"]) == 0.0


def block_fn(moe: MoEConfig):
    """(params, x, key) -> (loss, (out, aux)) for an 8-expert block, and its initial params."""
    block = MoEBlock(CFG, moe, nnx.Rngs(0))
    graphdef, state = nnx.split(block)
    probe = jax.random.normal(jax.random.key(9), (8, 16, CFG.d_model))

    def loss(params, x, key):
        out, aux = nnx.merge(graphdef, params)(x, rng=key)
        return jnp.sum(out * probe) + 0.1 * aux["moe_aux_loss"] + 0.01 * aux["moe_z_loss"], (out, aux)

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), nnx.to_pure_dict(state), state


X = jax.random.normal(jax.random.key(1), (8, 16, CFG.d_model))
KEY = jax.random.key(3)
# capacity_factor = E / K makes C = tokens: nothing can drop, however the router chooses
EP_MOE = dict(n_experts=8, top_k=2, d_ff=24, n_shared=1, noise_std=0.3, capacity_factor=4.0)


@pytest.fixture(scope="module")
def single_device():
    """Reference results per impl, on one device without a mesh."""
    out = {}
    for impl in ("dropping", "dropless"):
        fn, params, _ = block_fn(MoEConfig(**EP_MOE, impl=impl))
        out[impl] = jax.jit(fn)(params, X, KEY)
    return out


def assert_trees_close(a, b, atol):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=atol, rtol=atol), a, b)


def test_dropping_with_ample_capacity_equals_dropless_outputs_and_gradients(single_device):
    (loss_a, (out_a, aux_a)), grads_a = single_device["dropping"]
    (loss_b, (out_b, aux_b)), grads_b = single_device["dropless"]
    assert float(aux_a["moe_dropped_frac"]) == 0.0
    assert_trees_close((loss_a, out_a, grads_a), (loss_b, out_b, grads_b), 1e-5)
    assert float(jnp.abs(grads_a[0]["router_DE"]).max()) > 0  # the router does get gradients


def routed_block(top_k: int, logits_NE: np.ndarray, capacity_factor=1.0):
    """A block whose router logits are exactly logits_NE (router = identity on the first E dims)."""
    N, E = logits_NE.shape
    block = MoEBlock(CFG, MoEConfig(n_experts=E, top_k=top_k, d_ff=24, impl="dropping",
                                    capacity_factor=capacity_factor), nnx.Rngs(0))
    block.router_DE[...] = jnp.eye(CFG.d_model, E)
    x = np.array(jax.random.normal(jax.random.key(5), (1, N, CFG.d_model)))
    x[0, :, :E] = logits_NE
    return block, jnp.asarray(x)


def test_over_capacity_tokens_get_zero_output_later_tokens_dropped_first():
    # top-1, 4 experts, 8 tokens, capacity ceil(1.0 * 8 / 4) = 2; tokens 0-5 all pick expert 0
    logits = np.full((8, 4), -4.0)
    logits[:6, 0] = 3.0
    logits[6, 1] = logits[7, 2] = 3.0
    block, x = routed_block(1, logits)
    out, aux = apply(block, x)
    x_ND, out_ND = x[0], out[0]
    np.testing.assert_array_equal(out_ND[2:6], 0.0)  # over capacity: the block adds nothing
    for t, e in [(0, 0), (1, 0), (6, 1), (7, 2)]:
        np.testing.assert_allclose(out_ND[t], expert_ref(block, e, x_ND[t]), atol=1e-5)
    assert float(aux["moe_dropped_frac"]) == pytest.approx(4 / 8)


def test_first_choices_claim_capacity_before_second_choices():
    # top-2, capacity ceil(8 * 2 / 4) = 4. Tokens 0-3: expert 1 then 0; tokens 4-7: expert 0 then 2.
    # Expert 0 is wanted by 8 slots; the 4 first choices (tokens 4-7) win although they come later.
    logits = np.full((8, 4), -4.0)
    logits[:4, 1], logits[:4, 0] = 3.0, 2.0
    logits[4:, 0], logits[4:, 2] = 3.0, 2.0
    block, x = routed_block(2, logits)
    out, aux = apply(block, x)
    x_ND, out_ND = x[0], out[0]
    gate_hi = 1 / (1 + math.exp(-1.0))  # renormalised softmax weight of the logit-3 choice
    for t in range(4):  # second choice (expert 0) dropped: only expert 1's weighted share remains
        np.testing.assert_allclose(out_ND[t], gate_hi * expert_ref(block, 1, x_ND[t]), atol=1e-5)
    for t in range(4, 8):
        want = gate_hi * expert_ref(block, 0, x_ND[t]) + (1 - gate_hi) * expert_ref(block, 2, x_ND[t])
        np.testing.assert_allclose(out_ND[t], want, atol=1e-5)
    assert float(aux["moe_dropped_frac"]) == pytest.approx(4 / 16)


def test_aux_loss_is_switchs_definition_on_hand_picked_routings():
    """Switch Transformer's balancing loss, E * sum_e f_e P_e (f_e: the share of routed token-slots
    that go to e, P_e: e's mean router probability), with numbers worked out by hand:
    top-1, 2 experts, 4 tokens with probabilities (3/4, 1/4) x3 and (1/4, 3/4): f = (3/4, 1/4),
    P = (5/8, 3/8), loss = 2 (15/32 + 3/32) = 9/8. Top-2 of 4 experts, 2 tokens choosing {0, 1}
    and {2, 3} with probabilities (1/3, 1/3, 1/6, 1/6) and its mirror: f = P = 1/4 each, loss 1
    (perfect balance is 1 whatever top_k). Both tokens choosing {0, 1}: f = (1/2, 1/2, 0, 0),
    P_0 = P_1 = 1/3, loss = 4 (1/6 + 1/6) = 4/3."""
    ln3, ln2 = math.log(3), math.log(2)
    top1 = jnp.array([[[ln3, 0.0], [ln3, 0.0], [0.0, ln3], [ln3, 0.0]]])
    _, _, aux = route(top1, MoEConfig(n_experts=2, top_k=1), None)
    assert float(aux["moe_aux_loss"]) == pytest.approx(9 / 8, rel=1e-6)
    balanced = jnp.array([[[ln2, ln2, 0.0, 0.0], [0.0, 0.0, ln2, ln2]]])
    _, _, aux = route(balanced, MoEConfig(n_experts=4, top_k=2), None)
    assert float(aux["moe_aux_loss"]) == pytest.approx(1.0, rel=1e-6)
    skewed = jnp.array([[[ln2, ln2, 0.0, 0.0], [ln2, ln2, 0.0, 0.0]]])
    _, _, aux = route(skewed, MoEConfig(n_experts=4, top_k=2), None)
    assert float(aux["moe_aux_loss"]) == pytest.approx(4 / 3, rel=1e-6)


def test_router_aux_and_z_loss_equal_hand_computed_values():
    # all-zero logits, 4 experts, top-1: every token picks expert 0 (ties go to the lowest index),
    # f = (1, 0, 0, 0), P = 1/4 each -> aux = 4 * 1/4 = 1; z = log(4)^2
    _, _, aux = route(jnp.zeros((2, 3, 4)), MoEConfig(n_experts=4, top_k=1), None)
    assert float(aux["moe_aux_loss"]) == pytest.approx(1.0)
    assert float(aux["moe_z_loss"]) == pytest.approx(math.log(4) ** 2, rel=1e-6)
    assert (float(aux["moe_max_share"]), float(aux["moe_min_share"])) == (4.0, 0.0)

    logits = np.random.default_rng(0).normal(size=(2, 5, 6)).astype(np.float32) * 2
    for router in ("softmax", "sigmoid"):
        idx, gate, aux = route(jnp.asarray(logits), MoEConfig(n_experts=6, top_k=2, router=router), None)
        flat = logits.reshape(-1, 6).astype(np.float64)
        if router == "softmax":
            scores = np.exp(flat) / np.exp(flat).sum(-1, keepdims=True)
            probs = scores
        else:
            scores = 1 / (1 + np.exp(-flat))
            probs = scores / scores.sum(-1, keepdims=True)
        top = np.argsort(-scores, axis=-1)[:, :2]
        counts = np.zeros(6)
        for row in top:
            counts[row] += 1
        f = counts / (len(flat) * 2)
        np.testing.assert_array_equal(np.asarray(idx).reshape(-1, 2), top)
        w = np.take_along_axis(scores, top, -1)
        np.testing.assert_allclose(np.asarray(gate).reshape(-1, 2), w / w.sum(-1, keepdims=True), rtol=1e-5)
        assert float(aux["moe_aux_loss"]) == pytest.approx(6 * np.sum(f * probs.mean(0)), rel=1e-5)
        lse = np.log(np.exp(flat).sum(-1))
        assert float(aux["moe_z_loss"]) == pytest.approx(np.mean(lse**2), rel=1e-5)
        assert float(aux["moe_max_share"]) == pytest.approx(6 * f.max())
        assert float(aux["moe_min_share"]) == pytest.approx(6 * f.min())


# ------------------------------------------------------------------------------ expert parallelism

MESHES = {
    "expert2": MeshConfig(data=-1, expert=2),
    "expert4": MeshConfig(data=-1, expert=4),
    "expert8": MeshConfig(data=1, expert=8),
    "expert2-data2-tensor2": MeshConfig(data=2, expert=2, tensor=2),
}


def run_on_mesh(moe: MoEConfig, mesh_cfg: MeshConfig, x=X):
    fn, params, state = block_fn(moe)
    mesh, rules = make_mesh(mesh_cfg), resolve_rules({})
    p_shard = param_shardings(state, mesh, rules)
    x_shard = NamedSharding(mesh, spec_for(x.shape, ("batch", "length", "embed"), mesh, rules))

    def sharded(p, x, key):
        with use_mesh_rules(mesh, rules):
            return fn(p, x, key)

    params = jax.device_put(params, p_shard)
    assert params["w_up_EDF"].sharding.spec[0] in ("expert", None)
    return jax.jit(sharded, in_shardings=(p_shard, x_shard, None))(params, jax.device_put(x, x_shard), KEY)


@pytest.mark.parametrize("impl", ["dropping", "dropless"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_expert_parallel_outputs_loss_and_grads_equal_single_device(single_device, mesh_name, impl):
    got = run_on_mesh(MoEConfig(**EP_MOE, impl=impl), MESHES[mesh_name])
    (_, (_, aux)), _ = got
    assert float(aux["moe_dropped_frac"]) == 0.0
    assert_trees_close(got, single_device[impl], 1e-5)


def emulated_ragged_all_to_all(P):
    """`ragged_all_to_all` per its documented semantics, from all_gathers (XLA:CPU lacks it)."""

    def a2a(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
        me = jax.lax.axis_index(axis_name)
        ops, ins, sends, outs = (jax.lax.all_gather(a, axis_name) for a in
                                 (operand, input_offsets, send_sizes, output_offsets))
        r = jnp.arange(output.shape[0])
        for p in range(P):  # what source p sends to me lands at outs[p, me]
            start, n, src = outs[p, me], sends[p, me], ins[p, me]
            inside = (r >= start) & (r < start + n)
            rows = ops[p][jnp.clip(src + r - start, 0, operand.shape[0] - 1)]
            output = jnp.where(inside[:, None], rows, output)
        return output

    return a2a


def test_ragged_all_to_all_dropless_path_equals_single_device(single_device, monkeypatch):
    monkeypatch.setattr(moe_mod, "USE_RAGGED_A2A", True)
    monkeypatch.setattr(moe_mod, "RAGGED_A2A", emulated_ragged_all_to_all(4))
    got = run_on_mesh(MoEConfig(**EP_MOE, impl="dropless"), MESHES["expert4"])
    assert_trees_close(got, single_device["dropless"], 1e-5)


def test_expert_parallel_capacity_is_per_device_group():
    # expert=8: each device routes one sequence (16 tokens, 32 slots) with capacity ceil(32/8) = 4
    moe = MoEConfig(n_experts=8, top_k=2, d_ff=24, impl="dropping", capacity_factor=1.0)
    (_, (out, aux)), _ = run_on_mesh(moe, MESHES["expert8"])
    fn, params, _ = block_fn(moe)
    one = jax.jit(lambda x: fn(params, x, None)[0][1])
    per_group = [one(X[i:i + 1]) for i in range(8)]
    np.testing.assert_allclose(out, jnp.concatenate([o for o, _ in per_group]), atol=1e-5)
    dropped = np.mean([float(a["moe_dropped_frac"]) for _, a in per_group])
    assert 0 < float(aux["moe_dropped_frac"]) == pytest.approx(dropped)


# ------------------------------------------------------------------------------ config and training


def test_accounting_counts_every_expert_in_total_and_top_k_in_active():
    cfg = load_config(os.path.join(REPO, "configs/moe-tiny.yaml"))
    m, moe = cfg.model, cfg.moe
    counts = accounting.count_params(m, moe)
    model = nnx.eval_shape(lambda: Transformer(m, moe, nnx.Rngs(0)))
    assert counts.total == sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    expert = 3 * m.d_model * moe.d_ff
    assert counts.total - counts.active == m.n_layers * (moe.n_experts - moe.top_k) * expert
    # same active MLP as the dense tiny model (2 x 172 = 344), plus the routers
    dense = accounting.count_params(m, MoEConfig())
    assert counts.active == dense.total + m.n_layers * m.d_model * moe.n_experts


def train_moe_tiny(aux_loss_coef: float, mesh, steps: int = 40) -> dict:
    """moe-tiny (shorter sequences) for `steps` of a 40-step schedule; metrics per step."""
    cfg = load_config(os.path.join(REPO, "configs/moe-tiny.yaml"), [
        f"moe.aux_loss_coef={aux_loss_coef}", "train.steps=40", "train.global_batch=8", "data.seq_len=64",
        "optim.warmup_steps=5", "train.eval_every=0"])
    trainer = make_trainer(cfg, mesh)
    state, (batches, _) = trainer.init_state(), build_data(cfg)
    history = []
    for _ in range(steps):
        state, metrics = trainer.train_step(state, to_global(next(batches), trainer.batch_sharding))
        history.append(jax.device_get(metrics))
    return {k: np.array([h[k] for h in history]) for k in history[0]}


@pytest.fixture(scope="module")
def moe_tiny_runs():
    """40 single-device steps with the load-balancing loss off and on."""
    one_device = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    return {coef: train_moe_tiny(coef, one_device) for coef in (0.0, 0.1)}


@pytest.mark.slow
def test_train_step_on_expert_and_tensor_parallel_mesh_matches_single_device(moe_tiny_runs):
    # the whole train step (scanned layers, stacked expert weights, AdamW) on expert=4 x tensor=2
    got = train_moe_tiny(0.1, make_mesh(MeshConfig(data=1, expert=4, tensor=2)), steps=3)
    for key in ("loss", "grad_norm", "moe_aux_loss", "moe_z_loss", "moe_max_share"):
        np.testing.assert_allclose(got[key], moe_tiny_runs[0.1][key][:3], rtol=1e-5)


@pytest.mark.slow
def test_training_moe_tiny_lowers_the_loss(moe_tiny_runs):
    for run in moe_tiny_runs.values():
        assert run["loss"][-5:].mean() < run["loss"][:3].mean() - 1.5
        assert np.all(run["moe_dropped_frac"] == 0)  # dropless


@pytest.mark.slow
def test_aux_loss_brings_expert_token_shares_closer_to_balanced(moe_tiny_runs):
    off, on = moe_tiny_runs[0.0], moe_tiny_runs[0.1]
    spread = lambda run: run["moe_max_share"][-10:].mean() / run["moe_min_share"][-10:].mean()
    assert spread(on) < 0.5 * spread(off)
    assert on["moe_max_share"][-10:].mean() < off["moe_max_share"][-10:].mean() - 0.3
    assert on["moe_aux_loss"][-10:].mean() < off["moe_aux_loss"][-10:].mean()
