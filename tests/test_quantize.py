"""Weight-only quantization (jaxlm/compress): each scheme's error bound, bit-identity with llama.cpp's
Q4_0 / Q4_1 blocks, quantized paths against their dequantized reference, and the KV-cache decode."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.compress.quantize import QuantizedWeight, dequantize_params, quantize, quantize_params, weight_bytes
from jaxlm.compress.schemes import SCHEMES
from jaxlm.config import Config, MeshConfig, ModelConfig
from jaxlm.inference.decode import Decoder
from jaxlm.model.build import build_model
from jaxlm.parallel.mesh import make_mesh

# d_ff = 48 is no multiple of 32, d_model = 64 none of 128: those groups are zero-padded
MODEL = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)
TOKENS = np.random.default_rng(0).integers(0, 97, (2, 24)).astype(np.int32)


def outlier_weights(shape, seed=0) -> np.ndarray:
    """Gaussian weights [K, N] whose input channels 3 and 40 (rows) and output channel 5 are 20x larger."""
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05
    w[[3, 40]] *= 20
    w[:, 5] *= 20
    return w


@functools.cache
def model(tie: bool = False):
    """(config, f32 params, jitted logits(params, tokens)) of a random model."""
    cfg = Config(model=dataclasses.replace(MODEL, tie_embeddings=tie), mesh=MeshConfig(data=1))
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build_model(cfg, 0))))()
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg, 0)))
    logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])
    return cfg, params, logits


def relative(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


# ----------------------------------------------------------------------------- the schemes' bounds


@pytest.mark.parametrize("name,qtype", [("int4-g32", "Q4_0"), ("int4-g32-asym", "Q4_1")])
def test_int4_g32_dequantizes_bit_for_bit_as_gguf_q4_0_and_asym_as_q4_1(name, qtype):
    gguf = pytest.importorskip("gguf")
    w = outlier_weights((128, 96))
    q = jax.jit(quantize, static_argnums=(1, 2, 3))(jnp.asarray(w), SCHEMES[name], 0, 1)
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    want = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(w.T), kind), kind).T  # rows = outputs
    np.testing.assert_array_equal(np.asarray(q.dequantize()), want)


@pytest.mark.parametrize("name", [n for n in SCHEMES if n.startswith("int")])
def test_uniform_error_is_at_most_half_a_step_of_its_group(name):
    """Symmetric: step d = |peak| / 2^(b-1), levels -2^(b-1) .. 2^(b-1) - 1 with the peak at the
    negative end, so a weight of the other sign beyond the last level is clipped to it (error
    |w| - (2^(b-1) - 1) d <= d); asymmetric: d = (max - min) / (2^b - 1). Every other error <= d / 2,
    plus the rounding of the f16 scale (and offset) it is dequantized with."""
    scheme = SCHEMES[name]
    w = outlier_weights((128, 96))
    got = np.asarray(quantize(jnp.asarray(w), scheme, 0, 1).dequantize())
    g = scheme.group or 128
    groups = w.reshape(128 // g, g, 96)
    if name.endswith("asym"):
        d = (groups.max(1, keepdims=True) - groups.min(1, keepdims=True)) / (2 ** scheme.bits - 1)
        bound = d / 2
    else:
        d = np.abs(groups).max(1, keepdims=True) / 2 ** (scheme.bits - 1)
        bound = np.maximum(d / 2, np.abs(groups) - (2 ** (scheme.bits - 1) - 1) * d)
        assert bound.max() <= d.max() * (1 + 1e-5)
    f16 = 2.0 ** -11 * np.abs(groups).max(1, keepdims=True) * (2 if name.endswith("asym") else 1)
    err = np.abs(got.reshape(groups.shape) - groups)
    assert np.all(err <= bound * (1 + 1e-6) + (f16 if scheme.group else 0))
    assert err.max() > 0.3 * d.max()  # the bound is not vacuous: errors come near it


@pytest.mark.parametrize("name", [n for n in SCHEMES if n.startswith("log")])
def test_logarithmic_levels_are_signed_powers_of_two_and_the_error_obeys_its_bound_per_magnitude(name):
    """Weights spread over 12 octaves: each dequantizes to 0 or +-s * 2^-e (s its group's f16 scale,
    e in 0..6); |error| <= |w| / 3 where |w| >= s * 2^-6, else <= s * 2^-7 (s rounded to f16 adds
    at most 2^-11 relative)."""
    scheme = SCHEMES[name]
    rng = np.random.default_rng(1)
    w = (rng.choice([-1, 1], (256, 64)) * 2.0 ** rng.uniform(-12, 0, (256, 64))).astype(np.float32)
    q = quantize(jnp.asarray(w), scheme, 0, 1)
    got = np.asarray(q.dequantize()).reshape(-1, scheme.group, 64)
    w = w.reshape(got.shape)
    s = np.asarray(q.scale, np.float32)  # [G, 1, N], f16 values
    ratio = np.abs(got) / s
    exponent = -np.log2(np.where(ratio > 0, ratio, 1))
    assert np.all((ratio == 0) | ((exponent == np.round(exponent)) & (exponent >= 0) & (exponent <= 6)))
    assert np.all((got == 0) | (np.sign(got) == np.sign(w)))
    err, big = np.abs(got - w), np.abs(w) >= s * 2.0 ** -6
    slack = 1 + 2.0 ** -10
    assert np.all(err[big] <= (np.abs(w) / 3 * slack + 4 / 3 * np.abs(w) * 2.0 ** -11)[big])
    assert np.all(err[~big] <= (s * 2.0 ** -7 * slack + np.abs(w) * 2.0 ** -11)[~big])
    rel = (err / np.abs(w))[big]
    assert 0.3 < rel.max() <= 0.334 and rel.mean() < 0.2  # near its bound at worst, half of it on average


def test_int4_g32_logits_obey_their_group_bound_on_an_output_head_with_outlier_channels():
    """Logits h @ W of a head [D=256, V=96] whose input channels 3 and 40 and output channel 5 are
    20x larger: every weight is at most one step off (step = |peak of its group| / 8, see above),
    so |logit error_n| <= sum_g step_gn ||h_g||_1 for any h. With groups of 32 an outlier row only
    coarsens the steps of its own group: the bound, and the error measured, are under half those
    of one int4 scale per output channel (the relative L2 error of the logits is 0.17 against 0.33)."""
    from jaxlm.compress.schemes import Symmetric

    w = outlier_weights((256, 96))
    h = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)
    want = h @ w

    def error_and_bound(scheme):
        q = quantize(jnp.asarray(w), scheme, 0, 1)
        got = np.asarray(q.project(jnp.asarray(h), 1))
        g = scheme.group or 256
        step = np.abs(w.reshape(-1, g, 96)).max(1) / 8 * (1 + 2.0 ** -10)  # [G, V]; f16 scale rounding
        bound = np.abs(h.reshape(64, -1, g)).sum(-1) @ step  # [64, V]
        return np.abs(got - want), bound, relative(got, want)

    err, bound, rel = error_and_bound(SCHEMES["int4-g32"])
    assert np.all(err <= bound) and rel < 0.25  # 0.17 measured: relative L2 error of the logits
    channel_err, channel_bound, channel_rel = error_and_bound(Symmetric("int4-channel", 4, 0))
    assert np.all(channel_err <= channel_bound)  # 0.33 measured
    assert bound.mean() < 0.5 * channel_bound.mean() and err.mean() < 0.5 * channel_err.mean()


# ----------------------------------------------------------------------------- quantized paths


@pytest.mark.parametrize("name,tie", [("int8", False), ("int4-g32", True), ("log4-g64", False)])
def test_each_quantized_forward_equals_the_forward_of_its_dequantized_weights(name, tie):
    """Projections, the padded groups of d_ff = 48 and the gathered (and, tied, projected) embedding:
    the quantized model computes the f32 model on the dequantized weights (float tolerance)."""
    cfg, params, logits = model(tie=tie)
    q = quantize_params(params, cfg, name)
    assert isinstance(q["embed"]["table_VD"], QuantizedWeight)
    reference = dequantize_params(q)
    assert jax.tree.structure(reference) == jax.tree.structure(params)
    got, want = logits(q, TOKENS), logits(reference, TOKENS)
    np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()), rtol=0)
    assert relative(want, logits(params, TOKENS)) > 1e-4  # the weights really changed


@pytest.mark.parametrize("name", ["int4-g32", "int8", "int4-g32-asym", "log4-g32"])
def test_quantized_decode_with_a_kv_cache_equals_the_quantized_full_forward_within_1e5(name):
    """A 9-token prefill, then one token per step; every position's logits equal the full forward's
    over the whole row. The decoder reads linear schemes' codes with the CPU kernel (unrolled, per
    layer); log4's levels are not linear in the code: dequantized, scanned."""
    cfg, params, logits = model()
    q = quantize_params(params, cfg, name)
    dec = Decoder(cfg, q, make_mesh(cfg.mesh, jax.devices()[:1]))
    assert dec.reads_codes == (name != "log4-g32") and dec.cfg.model.scan_layers == (name == "log4-g32")
    row = TOKENS[:1]
    positions = np.arange(row.shape[1], dtype=np.int32)[None]
    forward = jax.jit(dec.forward)
    got, caches = forward(dec.params, row[:, :9], positions[:, :9], dec.new_caches(1, 64))
    steps = [np.asarray(got)[0]]
    for t in range(9, row.shape[1]):
        out, caches = forward(dec.params, row[:, t:t + 1], positions[:, t:t + 1], caches)
        steps.append(np.asarray(out)[0])
    np.testing.assert_allclose(np.concatenate(steps), np.asarray(logits(q, row))[0], atol=1e-5, rtol=0)


def test_weight_bytes_of_int4_g32_are_under_0_16_of_f32_and_int8_under_0_28():
    cfg, params, _ = model()
    f32 = weight_bytes(params)
    assert weight_bytes(quantize_params(params, cfg, "int4-g32")) <= 0.16 * f32
    assert weight_bytes(quantize_params(params, cfg, "int8")) <= 0.28 * f32  # f32 scales per channel
