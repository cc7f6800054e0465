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
    assert (cpu.attention_impl, cpu.projection_impl) == ("cpu", "cpu")
    for impl, platforms in kernels.ATTENTION_IMPLS.items():
        for platform in ("cpu", "gpu", "tpu"):
            if platform in platforms:
                assert kernels.resolve(ModelConfig(attention_impl=impl), platform).attention_impl == impl
            else:
                with pytest.raises(ConfigError, match=f"model.attention_impl='{impl}' needs"):
                    kernels.resolve(ModelConfig(attention_impl=impl), platform)
