"""Padding counts nowhere: a packed batch's padded tail changes no MoE routing, capacity, router
loss, training loss or gradient of its real tokens, nor the throughput figures; packed MDLM rows
hold each document whole, so the model is trained to predict <|endoftext|>."""

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import checkpoint as ckpt
from jaxlm.config import ModelConfig, MoEConfig, load_config
from jaxlm.data.batch import Batch
from jaxlm.data.pipeline import PackedRows, TokenStream
from jaxlm.data.sources import build_data
from jaxlm.model.build import build_model
from jaxlm.model.moe import MoEBlock
from jaxlm.objectives import mdlm
from jaxlm.parallel.mesh import make_mesh
from jaxlm.tools.accounting import train_flops_per_step
from jaxlm.train.loop import train
from jaxlm.train.step import make_trainer

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32)
T, PAD = 12, 4  # real tokens per row, padded tail


def padded(x_BT, fill):
    """x with a tail of PAD positions per row holding `fill` [B, PAD, ...]."""
    return jnp.concatenate([x_BT, fill], axis=1)


@pytest.mark.parametrize("impl", ["dropping", "dropless"])
def test_moe_block_gives_real_tokens_the_same_experts_capacity_and_losses_with_a_padded_tail(impl):
    # capacity ceil(1.0 * 24 tokens * 2 / 4) = 12 slots per expert: routing is skewed so some drop
    block = MoEBlock(CFG, MoEConfig(n_experts=4, top_k=2, d_ff=24, impl=impl, capacity_factor=1.0), nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, T, CFG.d_model)) + 0.5 * jax.random.normal(jax.random.key(2),
                                                                                            (CFG.d_model,))
    # row 0's padding (which comes before row 1 in slot order) copies row 1's first tokens: unmasked,
    # it would take the very expert slots row 1 asks for
    x_pad = padded(x, jnp.stack([x[1, :PAD], x[0, :PAD]]))
    valid = jnp.asarray(np.arange(T + PAD) < T)[None].repeat(2, 0)
    run = nnx.jit(lambda b, x, v: b(x, valid_BT=v))
    want_out, want_aux = run(block, x, None)
    got_out, got_aux = run(block, x_pad, valid)
    np.testing.assert_allclose(got_out[:, :T], want_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got_out[:, T:], 0.0)  # padding is not served
    for k in want_aux:
        assert float(got_aux[k]) == pytest.approx(float(want_aux[k]), rel=1e-5, abs=1e-6), k
    blind_out, blind_aux = run(block, x_pad, None)  # what counting the padding did
    assert float(blind_aux["moe_aux_loss"]) != pytest.approx(float(want_aux["moe_aux_loss"]), rel=1e-4)
    if impl == "dropping":
        assert float(want_aux["moe_dropped_frac"]) > 0  # capacity binds
        assert not np.allclose(blind_out[:, :T], want_out, atol=1e-4)


def packed_batch(tokens_BT, tail: int) -> Batch:
    """Rows of two documents (7 + 5 tokens), then `tail` positions of padding."""
    B = tokens_BT.shape[0]
    seg = np.array([1] * 7 + [2] * 5 + [0] * tail, np.int32)
    pos = np.array(list(range(7)) + list(range(5)) + [0] * tail, np.int32)
    inputs = np.concatenate([tokens_BT[:, :-1], np.zeros((B, tail), np.int32)], axis=1)
    targets = np.concatenate([tokens_BT[:, 1:], np.zeros((B, tail), np.int32)], axis=1)
    mask = (seg > 0).astype(np.int32)
    mask[[6, 11]] = 0  # each document's last token has no target
    rep = lambda a: np.repeat(a[None], B, 0)
    return Batch(inputs=inputs, targets=targets, loss_mask=rep(mask), positions=rep(pos),
                 segment_ids=rep(seg))


@pytest.mark.parametrize("impl", ["dropping", "dropless"])
def test_packed_train_loss_and_gradients_ignore_a_padded_tail(impl):
    cfg = load_config("configs/moe-tiny.yaml", [
        "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64",
        "moe.d_ff=16", "moe.n_experts=4", f"moe.impl={impl}", "moe.capacity_factor=1.0", "moe.aux_loss_coef=1.0",
        "moe.z_loss_coef=0.1", f"data.seq_len={T}", "data.packing=true", "train.global_batch=4"])
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, 0)))
    tokens = np.random.default_rng(0).integers(0, 256, (4, T + 1)).astype(np.int32)
    loss, grads = trainer.loss_and_grads(params, packed_batch(tokens, 0))
    loss_pad, grads_pad = trainer.loss_and_grads(params, packed_batch(tokens, PAD))
    assert float(loss_pad) == pytest.approx(float(loss), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), grads_pad, grads)


def test_train_step_counts_only_real_tokens_and_the_loop_reports_them(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):  # short documents: rows of 16 end in padding often
        (docs / f"{i:02d}.txt").write_text("ab" * int(rng.integers(2, 12)))
    cfg = load_config("configs/tiny.yaml", [
        "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=2", "model.d_ff=64",
        "data.seq_len=16", "data.packing=true", f"data.path={docs}", "train.global_batch=8", "train.steps=4",
        "train.eval_every=0", "train.log_every=1", "train.progress=false", "train.peak_flops_per_device=1e12",
        f"train.run_dir={tmp_path / 'run'}", "checkpoint.every=4"])
    batches, _ = build_data(cfg)
    real = [int(np.sum(next(batches).segment_ids > 0)) for _ in range(4)]
    per_step = 8 * 16
    assert all(r < per_step for r in real)  # the rows really have padding
    records = train(cfg, make_mesh(cfg.mesh))
    meta = ckpt.read_meta(ckpt.find_step(str(tmp_path / "run"), 4))
    assert meta["tokens_seen"] == sum(real)
    peak = 1e12 * jax.device_count()
    for r, n in zip(records[1:], real[1:]):  # the first step (compilation) is not timed
        assert "tokens" not in r
        assert r["tokens_per_s"] * r["step_time"] == pytest.approx(n, rel=1e-6)
        assert r["mfu"] == pytest.approx(train_flops_per_step(cfg) / per_step * r["tokens_per_s"] / peak, rel=1e-6)


# ------------------------------------------------------------------------------ packed MDLM


def test_packed_rows_hold_each_document_whole_and_mdlm_masks_and_scores_its_end():
    EOT = 256  # bytes: 256 byte ids, <|endoftext|>; mdlm-tiny's 258th id is <|mask|>
    docs = [[1, 2, 3, EOT], [4, 5, EOT], [6, 7, 8, 9, 1, 2, EOT], [3, EOT]]  # the third is cut at 5 tokens
    stream = TokenStream([np.concatenate(docs).astype(np.uint16)], np.cumsum([0] + [len(d) for d in docs[:-1]]))
    packed = PackedRows(stream, 5)
    rows = [packed[i] for i in range(len(packed))]
    inputs = [r["inputs"][r["segment_ids"] == s].tolist() for r in rows for s in sorted(set(r["segment_ids"]) - {0})]
    assert inputs == [[1, 2, 3, EOT], [4, 5, EOT], [6, 7, 8, 9, 1], [2, EOT], [3, EOT]]  # every token once, ends too
    targets = [t for r in rows for t in r["targets"][r["loss_mask"] > 0].tolist()]
    assert Counter(targets) == Counter(t for d in docs for t in d[1:])  # next-token pairs inside documents only

    cfg = load_config("configs/mdlm-tiny.yaml", ["model.d_model=16", "model.n_layers=1", "model.n_heads=2",
                                                 "model.n_kv_heads=1", "model.d_ff=32", "data.seq_len=5",
                                                 "data.packing=true"])
    objective, model, batch = mdlm.MDLM(cfg), build_model(cfg, 0), Batch.stack(rows)
    t_one = jnp.ones(batch.inputs.shape) * (1 - 1e-6)  # (nearly) everything masked
    weighted, scored, _ = nnx.jit(lambda m, b, t: objective.nelbo_BT(m, b, jax.random.key(0), t))(model, batch, t_one)
    real = batch.segment_ids > 0
    np.testing.assert_array_equal(np.asarray(scored), real)  # masks are drawn over the sequence's own tokens
    assert np.all(np.asarray(weighted)[batch.inputs == EOT] > 0)  # every document end is predicted and scored
    assert float(objective.count(batch)) == sum(len(d) for d in docs)
