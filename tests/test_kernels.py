"""Every attention and projection kernel that runs on CPU equals the plain reference (outputs and
gradients, f32), and kernel choice is checked against the platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import ConfigError, ModelConfig
from jaxlm.model import kernels
from jaxlm.model.kernels import AttentionMask, attention, reference_attention

CPU_ATTENTION = [name for name, platforms in kernels.ATTENTION_IMPLS.items() if "cpu" in platforms]


def qkv(B=2, T=16, K=2, G=2, d=8, S=None, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    S = S or T
    return (jax.random.normal(kq, (B, T, K, G, d)), jax.random.normal(kk, (B, S, K, d)),
            jax.random.normal(kv, (B, S, K, d)))


def segments(B, T):
    """Two or three packed documents per row, then padding (segment 0)."""
    seg = np.zeros((B, T), np.int32)
    seg[0, :5], seg[0, 5:12], seg[0, 12:] = 1, 2, 3
    seg[1, :9], seg[1, 9:14] = 1, 2
    return jnp.asarray(seg)


def naive(q, k, v, allowed):
    """Per-head loops with kv heads repeated: the definition, independent of the kernels."""
    B, T, K, G, d = q.shape
    out = np.zeros(q.shape, np.float32)
    for b in range(B):
        for h in range(K * G):
            kv_h = h // G
            s = np.asarray(q[b, :, kv_h, h % G]) @ np.asarray(k[b, :, kv_h]).T / np.sqrt(d)
            s = np.where(allowed[b if allowed.shape[0] > 1 else 0], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, kv_h, h % G] = (p / p.sum(-1, keepdims=True)) @ np.asarray(v[b, :, kv_h])
    return out


MASKS = {
    "causal": lambda B, T: AttentionMask(causal=True),
    "bidirectional": lambda B, T: AttentionMask(causal=False),
    "causal_segments": lambda B, T: AttentionMask(causal=True, segment_ids_BT=segments(B, T)),
    "bidirectional_segments": lambda B, T: AttentionMask(causal=False, segment_ids_BT=segments(B, T)),
}


@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("K,G", [(2, 2), (4, 1), (1, 4)])  # GQA, MHA, MQA
def test_reference_attention_equals_the_definition(mask_name, K, G):
    q, k, v = qkv(K=K, G=G)
    mask = MASKS[mask_name](2, 16)
    want = naive(q, k, v, np.asarray(mask.dense(16, 16)))
    np.testing.assert_allclose(reference_attention(q, k, v, mask), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", CPU_ATTENTION)
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("K,G", [(2, 2), (1, 4)])
def test_attention_kernel_outputs_and_gradients_equal_the_reference(impl, mask_name, K, G):
    q, k, v = qkv(K=K, G=G, seed=1)
    mask = MASKS[mask_name](2, 16)
    cotangent = jax.random.normal(jax.random.key(9), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, mask) * cotangent)

    got = attention(q, k, v, mask, impl)
    want = reference_attention(q, k, v, mask)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    g_got = jax.grad(loss(lambda *a: attention(*a, impl)), argnums=(0, 1, 2))(q, k, v)
    g_want = jax.grad(loss(reference_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_decode_mask_sees_the_cached_prefix_and_not_unwritten_slots():
    """T queries at the end of S cache slots: query t sees keys <= t + S - T that are written."""
    np.testing.assert_array_equal(AttentionMask(causal=True).dense(2, 5)[0],
                                  [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    valid = jnp.asarray([[True, True, True, False, False]])
    np.testing.assert_array_equal(AttentionMask(causal=True, kv_valid_BS=valid).dense(2, 5)[0],
                                  [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])


@pytest.mark.parametrize("impl", [n for n, p in kernels.PROJECTION_IMPLS.items() if "cpu" in p])
def test_projection_kernel_and_its_weight_gradient_equal_a_plain_einsum(impl):
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
    w = jax.random.normal(jax.random.key(1), (3, 4, 6))
    g = jax.random.normal(jax.random.key(2), (2, 5, 6))
    f = lambda x, w: jnp.sum(kernels.project(x, w, n_in=2, impl=impl) * g)
    ref = lambda x, w: jnp.sum(jnp.einsum("btij,ijo->bto", x, w) * g)
    np.testing.assert_allclose(kernels.project(x, w, 2, impl), jnp.einsum("btij,ijo->bto", x, w), atol=1e-5)
    for a, b in zip(jax.grad(f, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_auto_resolves_per_platform_and_a_kernel_the_platform_lacks_is_a_config_error():
    cpu = kernels.resolve(ModelConfig(), "cpu")
    assert (cpu.attention_impl, cpu.projection_impl, cpu.scan_layers) == ("cpu", "cpu", True)
    gpu, tpu = kernels.resolve(ModelConfig(), "gpu"), kernels.resolve(ModelConfig(), "tpu")
    assert (gpu.attention_impl, gpu.projection_impl, gpu.scan_layers) == ("cudnn", "xla", False)
    assert (tpu.attention_impl, tpu.projection_impl, tpu.scan_layers) == ("splash", "xla", True)
    assert (cpu.gmm_impl, gpu.gmm_impl, tpu.gmm_impl) == ("ragged_dot", "pallas_gpu", "megablox")
    assert kernels.resolve(ModelConfig(scan_layers=True), "gpu").scan_layers is True
    for impl, platforms in kernels.ATTENTION_IMPLS.items():
        for platform in ("cpu", "gpu", "tpu"):
            if platform in platforms:
                assert kernels.resolve(ModelConfig(attention_impl=impl), platform).attention_impl == impl
            else:
                with pytest.raises(ConfigError, match=f"model.attention_impl='{impl}' needs"):
                    kernels.resolve(ModelConfig(attention_impl=impl), platform)


# ------------------------------------------------- accelerator kernels, in the Pallas interpreter


def flash_kernels():
    from jaxlm.model.kernels import flash

    return {
        "pallas_gpu": lambda q, k, v, m: flash.pallas_gpu_attention(q, k, v, m.causal, m.segment_ids_BT,
                                                                    interpret=True),
        "splash": lambda q, k, v, m: flash.splash_attention(q, k, v, m.causal, m.segment_ids_BT, interpret=True),
    }


@pytest.mark.parametrize("name", ["pallas_gpu", "splash"])
@pytest.mark.parametrize("mask_name", MASKS)
def test_flash_kernel_in_the_pallas_interpreter_equals_the_reference(name, mask_name):
    """GPU and TPU kernels run here in Pallas' interpreter: same outputs and gradients (GQA, K=2 G=2).
    T=128: splash tiles in blocks of at least 128."""
    fn = flash_kernels()[name]
    B, T = 2, 128
    q, k, v = qkv(B=B, T=T, K=2, G=2, d=16, seed=3)
    seg = np.zeros((B, T), np.int32)
    seg[0, :50], seg[0, 50:] = 1, 2
    seg[1, :90], seg[1, 90:] = 1, 0
    mask = MASKS[mask_name](B, T)
    if mask.segment_ids_BT is not None:
        mask = AttentionMask(mask.causal, jnp.asarray(seg))
    cotangent = jax.random.normal(jax.random.key(9), q.shape)
    np.testing.assert_allclose(fn(q, k, v, mask), reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    got = jax.grad(lambda *a: jnp.sum(fn(*a, mask) * cotangent), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: jnp.sum(reference_attention(*a, mask) * cotangent), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_deterministic_runs_pick_an_atomics_free_attention_on_gpu_and_refuse_cudnn():
    assert kernels.resolve(ModelConfig(), "gpu").attention_impl == "cudnn"
    assert kernels.resolve(ModelConfig(), "gpu", deterministic=True).attention_impl == "pallas_gpu"
    assert kernels.resolve(ModelConfig(), "tpu", deterministic=True).attention_impl == "splash"
    with pytest.raises(ConfigError, match="not deterministic"):
        kernels.resolve(ModelConfig(attention_impl="cudnn"), "gpu", deterministic=True)


def test_a_kernel_that_cannot_express_the_mask_falls_back_with_one_warning(capsys, monkeypatch):
    from jaxlm.model.kernels import flash

    calls = []
    monkeypatch.setattr(flash, "pallas_gpu_attention", lambda q, k, v, causal, seg: calls.append(seg) or q)
    q, k, v = qkv(T=16)
    mask = AttentionMask(causal=True, segment_ids_BT=segments(2, 16))
    for _ in range(2):
        attention(q, k, v, mask, "cudnn")
    assert len(calls) == 2 and calls[0] is mask.segment_ids_BT  # cuDNN has no segment ids: Pallas runs
    err = capsys.readouterr().err
    assert err.count("attention kernel cudnn cannot express segment ids") == 1
    decode = AttentionMask(causal=True, kv_valid_BS=jnp.ones((2, 16), bool))
    q1, k1, v1 = qkv(T=4, S=16)
    np.testing.assert_allclose(attention(q1, k1, v1, decode, "splash"), reference_attention(q1, k1, v1, decode))
    assert "attention kernel splash cannot express a decode step's cache mask; using xla" in capsys.readouterr().err


def test_a_flash_kernel_that_cannot_tile_the_sequence_gives_way_to_xla_with_one_warning(capsys):
    """Splash tiles by 128 (the TPU's lanes), Triton's dot by 16, cuDNN needs head dims of 8k."""
    cases = [("splash", "tpu", 100, 32, "xla"), ("splash", "tpu", 384, 32, "splash"),
             ("pallas_gpu", "gpu", 24, 32, "xla"), ("pallas_gpu", "gpu", 48, 32, "pallas_gpu"),
             ("cudnn", "gpu", 64, 36, "xla"), ("cudnn", "gpu", 100, 64, "cudnn")]
    for impl, platform, seq_len, head_dim, want in cases:
        model = ModelConfig(d_model=4 * head_dim, n_heads=4, n_kv_heads=2, attention_impl=impl)
        assert kernels.resolve(model, platform, seq_len=seq_len).attention_impl == want, (impl, seq_len)
    err = capsys.readouterr().err
    assert "attention kernel splash cannot express sequence length 100 (it tiles by multiples of 128)" in err
    assert "attention kernel cudnn cannot express head dim 36" in err and len(err.splitlines()) == 3
    q, k, v = qkv(T=40)  # and where the kernel is called directly, e.g. outside a trainer
    causal = AttentionMask(causal=True)
    np.testing.assert_allclose(attention(q, k, v, causal, "pallas_gpu"), reference_attention(q, k, v, causal))
    assert "pallas_gpu cannot express sequence length 40 (it tiles by multiples of 16)" in capsys.readouterr().err


def test_cudnn_head_dims_above_128_give_way_to_xla_before_hopper(monkeypatch, capsys):
    """JAX's cuDNN path takes head dims up to 256 from compute capability 9.0, 128 before: an A100
    run of head dim 192 falls back with our warning instead of failing inside JAX's cuDNN check."""
    model = ModelConfig(d_model=4 * 192, n_heads=4, n_kv_heads=4, attention_impl="cudnn")
    for capability, want in [("8.0", "xla"), ("9.0", "cudnn"), ("10.0", "cudnn")]:
        device = type("Gpu", (), {"compute_capability": capability})()
        monkeypatch.setattr(jax, "devices", lambda *backend, d=device: [d])
        assert kernels.resolve(model, "gpu", seq_len=256).attention_impl == want, capability
    assert "cudnn cannot express head dim 192 (cuDNN flash needs a multiple of 8, at most 128 on this GPU)" \
        in capsys.readouterr().err


@pytest.mark.parametrize("packing", [True, False])
def test_the_gpu_train_step_lowers_for_cuda_with_triton_flash_attention_and_no_t_by_t_scores(packing):
    """The whole GPU step (deterministic: the Pallas kernel), lowered for CUDA on this CPU machine.
    Pallas emits its Triton kernels when lowering; only compiling them needs the GPU. The control,
    xla attention, shows that a T x T score tensor would be visible in the module text."""
    from jaxlm.config import load_config
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.train.step import make_trainer

    def lowered(impl):
        cfg = load_config("configs/tiny.yaml", ["data.seq_len=192", "model.max_seq_len=192", "mesh.data=1",
                                                "train.global_batch=2", "train.deterministic=true",
                                                f"data.packing={str(packing).lower()}",
                                                f"model.attention_impl={impl}"])
        trainer = make_trainer(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]), platform="gpu")
        return trainer.cfg.model.attention_impl, trainer.lower_train_step(platforms=("cuda",)).as_text()

    impl, text = lowered("auto")
    assert impl == "pallas_gpu" and "__gpu$xla.gpu.triton" in text and "192x192" not in text
    impl, text = lowered("xla")
    assert impl == "xla" and "triton" not in text and "192x192" in text


@pytest.mark.parametrize("impl", ["ragged_dot", "pallas_gpu", "megablox"])
def test_grouped_matmul_equals_per_group_matmuls_and_zero_past_the_groups(impl):
    """pallas_gpu (GPU) and megablox (TPU) run in the Pallas interpreter; rows past the groups are
    exactly 0, and so is their gradient (both kernels leave them unwritten). Groups 0 and 2 share
    the first 64-row tile of pallas_gpu, 2 and 3 the third."""
    M, K, N = 256, 128, 128
    x = jax.random.normal(jax.random.key(0), (M, K))
    w = jax.random.normal(jax.random.key(1), (4, K, N))
    sizes = jnp.asarray([40, 0, 100, 60], jnp.int32)  # 200 rows used of 256
    ends = np.cumsum(sizes)
    want = np.concatenate([x[e - s:e] @ w[g] for g, (s, e) in enumerate(zip(sizes, ends))] + [np.zeros((56, N))])
    gmm = lambda x, w: kernels.grouped_matmul(x, w, sizes, impl, interpret=True)
    np.testing.assert_allclose(gmm(x, w), want, atol=1e-4, rtol=1e-5)
    cot = jax.random.normal(jax.random.key(2), (M, N))
    got = jax.grad(lambda x, w: jnp.sum(gmm(x, w) * cot), (0, 1))(x, w)
    # by hand, per group: dx = cot @ w[g]^T on its rows, dw[g] = x^T @ cot over its rows
    xs, ws, cs = (np.asarray(a, np.float64) for a in (x, w, cot))
    dx, dw = np.zeros_like(xs), np.zeros_like(ws)
    for g, (s, e) in enumerate(zip(sizes, ends)):
        dx[e - s:e], dw[g] = cs[e - s:e] @ ws[g].T, xs[e - s:e].T @ cs[e - s:e]
    for a, b in zip(got, (dx, dw)):
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-5)
    assert np.all(np.asarray(got[0])[200:] == 0)


def test_gpu_grouped_matmul_pads_rows_picks_tiles_and_falls_back_on_sides_it_cannot_tile(capsys):
    """200 rows (not whole 64-row tiles), K=48 and N=80 (tiles of 16), a group of one row."""
    x = jax.random.normal(jax.random.key(0), (200, 48))
    w = jax.random.normal(jax.random.key(1), (5, 48, 80))
    sizes = jnp.asarray([40, 0, 70, 1, 60], jnp.int32)
    cot = jax.random.normal(jax.random.key(2), (200, 80))
    gmm = lambda x, w: kernels.grouped_matmul(x, w, sizes, "pallas_gpu", interpret=True)
    ref = lambda x, w: jax.lax.ragged_dot(x, w, sizes)
    np.testing.assert_allclose(gmm(x, w), ref(x, w), atol=1e-4, rtol=1e-5)
    got = jax.grad(lambda x, w: jnp.sum(gmm(x, w) * cot), (0, 1))(x, w)
    exp = jax.grad(lambda x, w: jnp.sum(ref(x, w) * cot), (0, 1))(x, w)
    for a, b in zip(got, exp):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(gmm(x[:, :40], w[:, :40]), ref(x[:, :40], w[:, :40]), atol=1e-4, rtol=1e-5)
    assert "grouped matmul kernel pallas_gpu cannot express expert matrices whose sides are not multiples of 16; " \
           "using ragged_dot" in capsys.readouterr().err


@pytest.mark.parametrize("gmm_impl", ["auto", "ragged_dot"])
def test_the_gpu_moe_step_lowers_for_cuda_with_triton_grouped_matmuls_instead_of_ragged_dot(gmm_impl):
    """XLA:GPU rewrites `ragged_dot` into a dense dot over every expert; auto must not leave it any."""
    from jaxlm.config import load_config
    from jaxlm.parallel.mesh import make_mesh
    from jaxlm.train.step import make_trainer

    cfg = load_config("configs/moe-tiny.yaml", ["mesh.data=1", "mesh.expert=1", "train.global_batch=2",
                                                "moe.impl=dropless", "moe.d_ff=176", "model.attention_impl=xla",
                                                f"model.gmm_impl={gmm_impl}"])
    trainer = make_trainer(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]), platform="gpu")
    text = trainer.lower_train_step(platforms=("cuda",)).as_text()
    if gmm_impl == "auto":
        assert trainer.cfg.model.gmm_impl == "pallas_gpu" and "ragged_dot" not in text
        assert text.count("__gpu$xla.gpu.triton") >= 3  # forward, dx and dw kernels
    else:
        assert "ragged_dot" in text
