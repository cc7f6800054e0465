"""Model properties: causality, GQA vs a reference MHA, RoPE relativity, init scale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ModelConfig, MoEConfig
from jaxlm.model.attention import Attention
from jaxlm.model.kernels import AttentionMask
from jaxlm.model.layers import rope
from jaxlm.model.transformer import Transformer

SMALL = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=40, max_seq_len=64)


def forward(cfg, tokens, **kw):
    model = Transformer(cfg, MoEConfig(), nnx.Rngs(0))
    return model(tokens, **kw)[0]


@pytest.mark.parametrize("norm,mlp,position", [("pre", "swiglu", "rope"), ("post", "gelu", "none"),
                                                ("none", "silu", "rope")])
def test_changing_future_tokens_leaves_past_logits_unchanged(norm, mlp, position):
    cfg = ModelConfig(**SMALL, norm=norm, mlp=mlp, position=position)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 50)
    t = 9
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % 50)
    a, b = forward(cfg, tokens), forward(cfg, changed)
    np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])
    assert not np.allclose(a[:, t + 1:], b[:, t + 1:])


def test_bidirectional_model_sees_future_tokens():
    cfg = ModelConfig(**SMALL, causal=False)
    tokens = jax.random.randint(jax.random.key(0), (1, 8), 0, 50)
    a, b = forward(cfg, tokens), forward(cfg, tokens.at[:, -1].set((tokens[:, -1] + 1) % 50))
    assert not np.allclose(a[:, 0], b[:, 0])


def reference_mha(x, wq, wk, wv, wo, positions, theta):
    """Plain multi-head attention with per-head loops; kv heads repeated for grouped queries."""
    H, K = wq.shape[1], wk.shape[1]
    q = rope(jnp.einsum("btd,dhk->bthk", x, wq), positions, theta)
    k = rope(jnp.einsum("btd,dhk->bthk", x, wk), positions, theta)
    v = jnp.einsum("btd,dhk->bthk", x, wv)
    T = x.shape[1]
    heads = []
    for h in range(H):
        kv = h // (H // K)
        s = q[:, :, h] @ jnp.swapaxes(k[:, :, kv], 1, 2) / np.sqrt(q.shape[-1])
        s = jnp.where(np.tril(np.ones((T, T), bool)), s, -jnp.inf)
        heads.append(jax.nn.softmax(s, axis=-1) @ v[:, :, kv])
    return jnp.einsum("bthk,hkd->btd", jnp.stack(heads, axis=2), wo)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_grouped_query_attention_equals_reference_multi_head(n_kv_heads):
    cfg = ModelConfig(**{**SMALL, "n_kv_heads": n_kv_heads})
    attn = Attention(cfg, nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (2, 12, 32))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    got = attn(x, pos, AttentionMask(causal=True))
    want = reference_mha(x, attn.wq_DHd[...], attn.wk_DKd[...], attn.wv_DKd[...], attn.wo_HdD[...], pos,
                         cfg.rope_theta)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_rope_dot_product_depends_only_on_relative_position():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 64))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 64))

    def score(m, n):
        return float(jnp.sum(rope(q, jnp.array([[m]]), 10000.0) * rope(k, jnp.array([[n]]), 10000.0)))

    for m, n in [(3, 1), (10, 0), (0, 7)]:
        for shift in (5, 100, 977):
            assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-4, abs=1e-4)
    assert score(3, 1) != pytest.approx(score(5, 1), rel=1e-3)


def test_rope_preserves_norm_and_is_identity_at_position_zero():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16))
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    np.testing.assert_allclose(jnp.linalg.norm(rope(x, pos, 1e4), axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(rope(x, jnp.zeros((2, 5), jnp.int32), 1e4), x, rtol=1e-6)


def test_segment_ids_block_attention_across_documents():
    cfg = ModelConfig(**SMALL)
    tokens = jax.random.randint(jax.random.key(0), (1, 12), 0, 50)
    seg = jnp.array([[0] * 5 + [1] * 7])
    pos = jnp.array([list(range(5)) + list(range(7))])
    packed = forward(cfg, tokens, positions_BT=pos, segment_ids_BT=seg)
    alone = forward(cfg, tokens[:, 5:])  # the second document on its own, positions from 0
    np.testing.assert_allclose(packed[:, 5:], alone, atol=1e-5)


def test_initial_loss_is_near_uniform_and_weights_have_fan_in_scale():
    cfg = ModelConfig(**{**SMALL, "d_model": 256, "n_heads": 4, "n_kv_heads": 4, "d_ff": 512})
    model = Transformer(cfg, MoEConfig(), nnx.Rngs(0))
    w = model.segments[0].units.blocks[0].ffn.w_up_DF[...]
    # a normal truncated at +-3 sigma keeps std 0.9866 sigma
    assert float(jnp.std(w)) == pytest.approx(0.9866 / np.sqrt(256), rel=0.03)
    tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 50)
    logits = model(tokens)[0]
    loss = jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])
    # logits ~ N(0, s^2) at each position give E[logsumexp] ~ ln V + s^2/2, and the target's logit
    # is an average one: the loss of an untrained model is uniform's ln V plus half the logit variance
    s2 = float(jnp.mean(jnp.var(logits, -1)))
    assert 0.5 < s2 < 2  # fan-in initialisation: unit-scale logits
    assert abs(float(loss) - (np.log(50) + s2 / 2)) < 0.15


def loss_and_grads(cfg, tokens):
    graphdef, params = nnx.split(Transformer(cfg, MoEConfig(), nnx.Rngs(0)))
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens)[0] ** 2) / tokens.size  # noqa: E731
    return loss, params, jax.value_and_grad(loss)(params)


def saved_residuals(cfg, tokens) -> list[tuple[int, ...]]:
    """Shapes of the residuals the layer scan saves for the backward pass (jax's own listing)."""
    import contextlib
    import io
    import re

    from jax.ad_checkpoint import print_saved_residuals

    loss, params, _ = loss_and_grads(cfg, tokens)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(loss, params)
    return [tuple(int(n) for n in m.group(1).split(",")) for line in out.getvalue().splitlines()
            if "output of scan" in line and (m := re.match(r"\w+\[([\d,]+)\]", line))]


def test_scan_unrolled_and_remat_agree_in_outputs_and_gradients():
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 50)
    base = forward(ModelConfig(**SMALL), tokens)
    _, _, (loss, grads) = loss_and_grads(ModelConfig(**SMALL), tokens)
    for kw in ({"scan_layers": False}, {"remat": "full"}, {"remat": "dots_saveable"}):
        cfg = ModelConfig(**SMALL, **kw)
        np.testing.assert_allclose(forward(cfg, tokens), base, atol=1e-5)
        _, _, (other_loss, other_grads) = loss_and_grads(cfg, tokens)  # remat changes only the backward pass
        assert float(other_loss) == pytest.approx(float(loss), rel=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), other_grads, grads)


def test_remat_policies_save_what_they_name():
    """B=2, T=16, D=32, d_ff=40, 2 layers. No remat: the scan keeps the MLP's elementwise hidden
    units [L, B, T, F]; `full` keeps only each layer's input [L, B, T, D] (everything else is
    recomputed); `dots_saveable` keeps the matmul outputs (the gate and up projections,
    [L, B*T, F]) but no elementwise intermediate."""
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 50)
    none, full, dots = (saved_residuals(ModelConfig(**SMALL, remat=r), tokens)
                        for r in ("none", "full", "dots_saveable"))
    assert (2, 2, 16, 40) in none
    assert set(full) == {(2, 16, 32), (2, 2, 16, 32)}  # the carry and the stacked layer inputs
    assert sorted(s for s in dots if 40 in s) == [(2, 32, 40), (2, 32, 40)]
    assert (2, 2, 16, 32) in dots and len(full) < len(dots) < len(none)


        np.testing.assert_allclose(forward(ModelConfig(**SMALL, **kw), tokens), base, atol=1e-5)


# (shared model's MoE section, the unshared 4-layer model's, which of its blocks each unshared segment repeats)
SHARING = {
    "dense": (MoEConfig(), MoEConfig(), [(0, 0)]),  # blocks A, B (a unit of one block, scanned): A A B B
    # a unit of two blocks (dense D, MoE M) applied once: D D M M = 2 dense layers, then 2 MoE layers
    "moe_unit_of_two": (MoEConfig(n_experts=4, top_k=2, d_ff=24, every=2),
                        MoEConfig(n_experts=4, top_k=2, d_ff=24, first_dense=2), [(0, 0), (0, 1)]),
}


@pytest.mark.parametrize("case", list(SHARING))
def test_shared_blocks_equal_an_unshared_model_whose_repeated_layers_hold_the_same_weights(case):
    """share_blocks=2 applies each block twice in a row (A B -> A A B B): the logits (and MoE aux
    losses) of a 4-layer model holding those weights; decoding over a KV cache (one per application)
    gives them too."""
    from jaxlm.config import Config, MeshConfig
    from jaxlm.inference.decode import Decoder
    from jaxlm.parallel.mesh import make_mesh

    moe, deep_moe, sources = SHARING[case]
    shared_cfg = ModelConfig(**SMALL, share_blocks=2)
    deep_cfg = ModelConfig(**{**SMALL, "n_layers": 4})
    shared_def, params = nnx.split(Transformer(shared_cfg, moe, nnx.Rngs(0)))
    deep_def, other = nnx.split(Transformer(deep_cfg, deep_moe, nnx.Rngs(1)))
    params, other = nnx.to_pure_dict(params), nnx.to_pure_dict(other)
    block = lambda segment, j: params["segments"][segment]["units"]["blocks"][j]
    repeated = {**params, "segments": {i: {"units": {"blocks": {0: jax.tree.map(lambda x: jnp.repeat(x, 2, axis=0),
                                                                                 block(*source))}}}
                                       for i, source in enumerate(sources)}}
    run_shared = jax.jit(lambda p, t: nnx.merge(shared_def, p)(t))
    run_deep = jax.jit(lambda p, t: nnx.merge(deep_def, p)(t))
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 50)
    (got, got_aux), (want, want_aux) = run_shared(params, tokens), run_deep(repeated, tokens)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    for k in want_aux:
        np.testing.assert_allclose(float(jnp.sum(got_aux[k])), float(jnp.sum(want_aux[k])), rtol=1e-6)
    assert not np.allclose(got, run_deep(other, tokens)[0], atol=1e-3)  # other weights: other logits

    if moe.n_experts:  # the decode path below does not depend on the kind of feed-forward
        return
    cfg = Config(model=shared_cfg, moe=moe, mesh=MeshConfig(data=1))
    dec = Decoder(cfg, params, make_mesh(cfg.mesh, jax.devices()[:1]))
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    forward = jax.jit(dec.forward)
    logits, caches = forward(dec.params, tokens[:, :7], positions[:, :7], dec.new_caches(2, 16))
    steps = [logits]
    for t in range(7, 12):
        logits, caches = forward(dec.params, tokens[:, t:t + 1], positions[:, t:t + 1], caches)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), got, atol=2e-5, rtol=0)
