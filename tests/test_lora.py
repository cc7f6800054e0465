"""LoRA and QLoRA: which parameters train, what the base does, the merge, the link to full
fine-tuning, sharded runs and exact resumes."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ConfigError, load_config
from jaxlm.data.batch import Batch
from jaxlm.eval.tasks.arithmetic import arithmetic, write_jsonl
from jaxlm.model import lora
from jaxlm.model.build import build_model
from jaxlm.compress.quantize import QuantizedWeight
from jaxlm.parallel.mesh import make_mesh
from jaxlm.train.loop import train
from jaxlm.train.partition import flatten
from jaxlm.train.step import make_trainer

SMALL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64",
         "data.seq_len=32", "model.max_seq_len=32", "train.global_batch=4", "optim.warmup_steps=0"]
MOE = ["moe.n_experts=4", "moe.top_k=2", "moe.n_shared=1", "moe.d_ff=16", "moe.every=2", "moe.impl=dropless"]


def cfg_of(*overrides):
    return load_config("configs/tiny.yaml", SMALL + list(overrides))


def one_device(cfg):
    return make_trainer(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))


def batch_of(seed=0, n=4):
    tokens = np.random.default_rng(seed).integers(0, 256, (n, 33)).astype(np.int32)
    return Batch.from_tokens(tokens)


def count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree) if x.ndim)  # arrays, not the optimizer's step counts


def test_trainable_parameters_are_the_adapters_and_their_count_is_the_formula():
    R = 4
    cfg = cfg_of(f"lora.rank={R}", "lora.experts=true", *MOE)
    state = one_device(cfg).abstract_state()  # shapes only: nothing is compiled
    D, H, K, d, F, L = 32, 2, 1, 16, 64, 2
    E, Fe, S = 4, 16, 16  # experts, expert hidden, shared hidden (1 shared expert)
    attention = R * ((D + H * d) + 2 * (D + K * d) + (H * d + D))
    dense_mlp = R * 3 * (D + F)
    moe_layer = R * 3 * (D + S) + E * R * 3 * (D + Fe)  # the shared MLP, then every routed expert
    assert count(state["params"]) == L * attention + dense_mlp + moe_layer  # layer 0 dense, layer 1 MoE
    assert count(state["opt_state"]) == 2 * count(state["params"])  # AdamW's mu and nu
    assert all(lora.is_adapter(p) for p in flatten(state["params"]))
    # without experts the routed ones have none, and a target list that adapts nothing is refused
    no_experts = one_device(cfg_of(f"lora.rank={R}", *MOE))
    assert count(no_experts.abstract_state()["params"]) == L * attention + dense_mlp + R * 3 * (D + S)
    with pytest.raises(ConfigError, match="adapt no projection"):
        one_device(cfg_of("lora.rank=2", "lora.targets=[gate]", "model.mlp=gelu"))


def test_trainable_tokens_train_those_rows_alone_with_full_fine_tunings_gradient():
    """lora.trainable_tokens (peft's trainable_token_indices): the listed rows of the embedding and
    the head join the adapters in the train state, their gradient is full fine-tuning's (at the start
    the adapters add exactly 0), and after training every other row is bit-identical."""
    ids, R, D = [3, 7, 256], 4, 32
    cfg = cfg_of(f"lora.rank={R}", "lora.trainable_tokens=[3,7,256]", "optim.lr=0.05")
    adapted, full = one_device(cfg), one_device(cfg_of("optim.lr=0.05"))
    plain = count(one_device(cfg_of(f"lora.rank={R}")).abstract_state()["params"])
    assert count(adapted.abstract_state()["params"]) == plain + 2 * len(ids) * D  # embed rows, head columns
    state, params = adapted.init_state(), full.jit_init_params()
    batches = [Batch.from_tokens(np.concatenate([np.full((4, 1), i), np.tile(ids, (4, 1)), batch_of(i).inputs[:, :29]],
                                                1).astype(np.int32)) for i in range(3)]  # the tokens appear
    batch = jax.device_put(batches[0], full.batch_sharding)
    grads, want = adapted.loss_and_grads(state["params"], batch)[1], full.loss_and_grads(params, batch)[1]
    np.testing.assert_allclose(grads["embed"]["table_VD"], want["embed"]["table_VD"][np.array(ids)], atol=1e-7)
    np.testing.assert_allclose(grads["lm_head_DV"], want["lm_head_DV"][:, np.array(ids)], atol=1e-7)
    assert float(jnp.abs(grads["lm_head_DV"]).max()) > 0
    before = jax.device_get(adapted.saved_state(state)["params"])
    for i in range(3):
        state, _ = adapted.train_step(state, jax.device_put(batches[i], adapted.batch_sharding))
    after = jax.device_get(adapted.saved_state(state)["params"])
    rest, ids = np.setdiff1d(np.arange(257), ids), np.array(ids)
    for w0, w1 in ((before["embed"]["table_VD"], after["embed"]["table_VD"]),  # rows: tokens
                   (before["lm_head_DV"].T, after["lm_head_DV"].T)):  # the head's columns, as rows
        np.testing.assert_array_equal(w1[rest], w0[rest])
        assert np.abs(w1[ids] - w0[ids]).min() > 0


@pytest.fixture(scope="module")
def trained():
    """Five LoRA steps at a high learning rate: the base must not move, the adapters must."""
    cfg = cfg_of("lora.rank=4", "optim.lr=0.05", "train.steps=5")
    trainer = one_device(cfg)
    state = trainer.init_state()
    initial = jax.device_get(trainer.saved_state(state)["params"])
    for i in range(5):
        state, _ = trainer.train_step(state, jax.device_put(batch_of(i), trainer.batch_sharding))
    return cfg, initial, jax.device_get(trainer.saved_state(state)["params"])


def test_the_base_is_bit_identical_after_training_and_the_adapters_moved(trained):
    _, initial, final = trained
    flat0, flat1 = flatten(initial), flatten(final)
    moved = [p for p in flat0 if lora.is_adapter(p) and not np.array_equal(flat0[p], flat1[p])]
    assert len(moved) == len([p for p in flat0 if lora.is_adapter(p) and p[-1] == "b"]) * 2  # every A and B
    for p in flat0:
        if not lora.is_adapter(p):
            np.testing.assert_array_equal(flat1[p], flat0[p], err_msg=str(p))


def test_merged_weights_give_the_unmerged_logits(trained):
    cfg, initial, final = trained
    tokens = batch_of(9).inputs
    graph = nnx.graphdef(build_model(cfg, 0))
    unmerged = nnx.merge(graph, final)(tokens)[0]
    base_cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=0))
    plain = nnx.graphdef(build_model(base_cfg, 0))
    merged = nnx.merge(plain, lora.merge(final, cfg.lora.scale))(tokens)[0]
    base = nnx.merge(plain, lora.split_adapters(final)[0])(tokens)[0]
    np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=0)
    assert float(jnp.max(jnp.abs(unmerged - base))) > 1e-2  # the adapters do change the function


def test_full_rank_adapters_with_identity_A_reproduce_full_fine_tunings_first_update():
    """With R = D, alpha = R (scale 1) and A = I, the adapted weight is W + B and B's gradient is
    W's, so AdamW's first step on B is full fine-tuning's first step on W."""
    plain = ["optim.weight_decay=0", "optim.clip_norm=0", "optim.lr=0.01"]
    targets = "lora.targets=[q,k,v,o,gate,up]"  # every projection whose input is D wide (down's is F)
    full, adapted = one_device(cfg_of(*plain)), one_device(cfg_of(*plain, "lora.rank=32", "lora.alpha=32", targets))
    params = full.jit_init_params()
    batch = jax.device_put(batch_of(3), full.batch_sharding)
    after_full = jax.device_get(full.saved_state(full.train_step(full.state_from_params(params), batch)[0])["params"])

    def eye(a):  # A [layers, *in, R] := I, its input dims flattened
        return np.broadcast_to(np.eye(32, dtype=a.dtype).reshape(a.shape[1:]), a.shape)

    def identity(tree):
        return {k: {"a": eye(v["a"]), "b": v["b"]} if lora.is_adapter((k,)) else identity(v)
                for k, v in tree.items()}

    adapters = identity(lora.split_adapters(jax.device_get(adapted.jit_init_params()))[1])
    start = lora.join_adapters(jax.device_get(params), adapters)
    state = adapted.train_step(adapted.state_from_params(jax.device_put(start, adapted.param_shardings)), batch)[0]
    after = jax.device_get(adapted.saved_state(state)["params"])
    merged, before = flatten(lora.merge(after, 1.0)), flatten(jax.device_get(params))
    checked = 0
    for path, w in flatten(after_full).items():
        if path[-1] in ("wq_DHd", "wk_DKd", "wv_DKd", "wo_HdD", "w_gate_DF", "w_up_DF"):
            np.testing.assert_allclose(merged[path] - before[path], w - before[path], atol=2e-6, rtol=1e-4)
            assert np.abs(w - before[path]).max() > 1e-3
            checked += 1
    assert checked == 6


# "none" on demand: int4-g32 runs the same adapters on the same mesh, over a 4-bit base
@pytest.mark.parametrize("quantize", [pytest.param("none", marks=pytest.mark.demo), "int4-g32"])
def test_lora_on_an_fsdp_expert_tensor_mesh_equals_one_device(quantize):
    mesh = ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"]
    overrides = ["lora.rank=4", "lora.experts=true", *MOE, "train.global_batch=8", "model.n_kv_heads=2",
                 f"lora.quantize={quantize}"]
    one = one_device(cfg_of(*overrides, "mesh.data=1"))
    params = jax.device_get(one.init_state()["params"])
    params = jax.tree.map(lambda x: x + 0.01 * np.random.default_rng(x.size).standard_normal(x.shape), params)
    batch = batch_of(5, 8)
    loss1, grads1 = one.loss_and_grads(params, jax.device_put(batch, one.batch_sharding))
    sharded = make_trainer(cfg_of(*overrides, *mesh), make_mesh(cfg_of(*overrides, *mesh).mesh))
    frozen_shardings = jax.tree.map(lambda s: s.sharding, sharded.abstract_frozen["params"])
    sharded.frozen_params = jax.device_put(jax.device_get(one.frozen_params), frozen_shardings)
    loss, grads = sharded.loss_and_grads(jax.device_put(params, sharded.state_shardings["params"]),
                                         jax.device_put(batch, sharded.batch_sharding))
    assert float(loss) == pytest.approx(float(loss1), abs=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), jax.device_get(grads),
                 jax.device_get(grads1))
    specs = [s.spec for s in jax.tree.leaves(sharded.state_shardings["params"])]
    assert any(any(e is not None for e in spec) for spec in specs)  # adapters are split like their weights
    held = [leaf for leaf in flatten(sharded.frozen_params).values() if isinstance(leaf, QuantizedWeight)]
    assert bool(held) == (quantize != "none")  # QLoRA: the base sharded, held in 4 bits


@pytest.mark.parametrize("scheme, rel", [("int8", 1e-3), ("int4-g32", 2e-2)])
def test_qlora_holds_the_frozen_matrices_quantized_and_stays_close_to_lora(scheme, rel):
    batch = batch_of(1)
    losses = {}
    for quantize in ("none", scheme):
        trainer = one_device(cfg_of("lora.rank=4", f"lora.quantize={quantize}"))
        state = trainer.init_state()
        loss, _ = trainer.loss_and_grads(state["params"], jax.device_put(batch, trainer.batch_sharding))
        losses[quantize] = float(loss)
    held = [leaf for leaf in flatten(trainer.frozen_params).values() if isinstance(leaf, QuantizedWeight)]
    # q, k, v, o, gate, up, down (stacked over the layers), the output head and the embedding table
    assert len(held) == 7 + 2
    assert all(h.scheme.name == scheme and h.codes.dtype == jnp.uint8 for h in held)
    assert losses[scheme] != losses["none"] and losses[scheme] == pytest.approx(losses["none"], rel=rel)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    train_records, _ = arithmetic(64, 0, seed=0)
    return write_jsonl(train_records, tmp_path_factory.mktemp("records") / "train.jsonl")


def test_a_resumed_qlora_sft_run_is_bit_identical_to_an_uninterrupted_one(records, tmp_path):
    """The adapters, their optimizer state and the 4-bit base all come back exactly (the saved
    float base re-quantizes to the same bytes)."""
    def run(name, steps):
        cfg = cfg_of("lora.rank=4", "lora.quantize=int4-g32", "lora.dropout=0.1", "train.objective=sft",
                     f"data.path={records}", "data.packing=true", "data.seq_len=96", "model.max_seq_len=96",
                     "optim.lr=0.01", "optim.schedule=constant", f"train.steps={steps}", "checkpoint.every=3", "train.eval_every=0",
                     "train.log_every=1", "train.progress=false", "mesh.data=1", f"train.run_dir={tmp_path / name}")
        return train(cfg, mesh=make_mesh(cfg.mesh, devices=jax.devices()[:1]))

    whole = run("whole", 6)
    run("split", 3)
    resumed = run("split", 6)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole[3:]]
    saved = [ckpt_params(tmp_path / name / "checkpoints" / "6") for name in ("whole", "split")]
    jax.tree.map(np.testing.assert_array_equal, *saved)
    meta = json.loads((tmp_path / "split" / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["config"]["lora"]["quantize"] == "int4-g32"


def ckpt_params(step_dir):
    from jaxlm.checkpoint import runs

    return runs.load_params(step_dir)[1]


def test_fine_tuning_config_mistakes_are_one_line(tmp_path):
    mistakes = {
        "lora.rank=-1": "lora.rank=-1 must be >= 0",
        "lora.targets=[q,x]": "lora.targets=['q', 'x'] names no projection or unknown ones (x)",
        "lora.experts=true": "lora.experts=true but the model has no experts",
        "lora.quantize=int8": "lora.quantize=int8 holds the frozen base of LoRA: set lora.rank > 0",
        "lora.trainable_tokens=[3]": "lora.trainable_tokens=[3] trains rows of LoRA's frozen base: set lora.rank > 0",
        "lora.trainable_tokens=[5,257]": "lora.trainable_tokens=[5, 257] must be distinct token ids in [0, model.",
        "train.objective=sft": "train.objective=sft reads records (JSONL or Parquet): set data.path",
        f"train.init_from={tmp_path}": "is neither a Hugging Face model directory (no config.json) nor a jaxlm run",
        "train.init_from_step=best": "train.init_from_step selects a checkpoint of a jaxlm run",
    }
    for override, message in mistakes.items():
        with pytest.raises(ConfigError) as e:
            cfg_of(override, *(["lora.rank=2"] if "targets" in override or "experts" in override or "257" in override
                               else []))
        assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="train.objective=dpo holds one preference pair per row"):
        cfg_of("train.objective=dpo", "data.path=x.jsonl", "data.packing=true")


@pytest.mark.parametrize("n_in", [1, 2])
def test_the_merged_projection_and_its_gradient_equal_the_unmerged_formulas(n_in):
    """merged_project (the f32 step's x @ (w + s A @ B) with LoRA's factored gradient) against
    autodiff of x @ w + s (x @ A) @ B, on a projection with one and with two input axes (wo_HdD)."""
    keys = iter(jax.random.split(jax.random.key(0), 5))
    in_shape, out_shape, R, s = ((12,), (2, 5), 3, 1.7) if n_in == 1 else ((2, 6), (12,), 3, 1.7)
    x = jax.random.normal(next(keys), (2, 7, *in_shape))
    w, a, b = (jax.random.normal(next(keys), shape) for shape in
               ((*in_shape, *out_shape), (*in_shape, R), (R, *out_shape)))
    k = int(np.prod(in_shape))

    def unmerged(x, w, a, b):
        h = x.reshape(14, k) @ a.reshape(k, R)
        return (x.reshape(14, k) @ w.reshape(k, -1) + s * h @ b.reshape(R, -1)).reshape(2, 7, *out_shape)

    cot = jax.random.normal(next(keys), (2, 7, *out_shape))
    got, want = (jax.vjp(f, x, w, a, b) for f in (lambda *p: lora.merged_project(*p, s, n_in), unmerged))
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=1e-5)
    for g, r in zip(got[1](cot), want[1](cot)):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-5)
