"""Decoding: the KV cache reproduces the full forward, sampling, speculative decoding, int8."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import Config, MeshConfig, ModelConfig, MoEConfig
from jaxlm.parallel.mesh import make_mesh
from jaxlm.inference.decode import Decoder, generate
from jaxlm.inference.sampling import Sampling
from jaxlm.model.build import build_model

TINY = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=48, max_seq_len=64,
                   compute_dtype="float32", param_dtype="float32")
VARIANTS = {
    "dense": (TINY, MoEConfig()),
    "gqa": (dataclasses.replace(TINY, n_kv_heads=2, n_layers=3), MoEConfig()),
    "moe": (dataclasses.replace(TINY, n_kv_heads=2), MoEConfig(n_experts=4, top_k=2, d_ff=24, first_dense=1)),
}


@functools.lru_cache(maxsize=None)
def make(variant: str, seed: int = 0, data: int = 1, tensor: int = 1, **model_changes):
    """(config, parameters, Decoder on data x tensor devices) of a tiny model; tests that ask for
    the same share it (and its compiled programs)."""
    model, moe = VARIANTS[variant]
    cfg = Config(model=dataclasses.replace(model, **model_changes), moe=moe, mesh=MeshConfig(data=data, tensor=tensor))
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build_model(cfg, seed))))()
    return cfg, params, Decoder(cfg, params, make_mesh(cfg.mesh, jax.devices()[: data * tensor]))


def full_logits(cfg, params, rows: list[list[int]]) -> list[np.ndarray]:
    """The training forward's logits of each row (right-padded into one causal batch)."""
    model = nnx.merge(nnx.graphdef(build_model(cfg, 0)), params)
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    logits = np.asarray(jax.jit(lambda t: model(t)[0])(tokens))
    return [logits[b, : len(r)] for b, r in enumerate(rows)]


# dense on demand: gqa and moe run the same cache with grouped heads and experts
@pytest.mark.parametrize("variant,data,tensor", [pytest.param(v, 1, 1, marks=[pytest.mark.demo] if v == "dense" else [])
                                                 for v in VARIANTS] + [("moe", 2, 2)])
def test_cached_decoding_gives_the_full_forward_logits_at_every_position_in_a_ragged_batch(variant, data, tensor):
    """Rows of lengths 12, 7, 3 and 9 share a batch: each prefills its own prompt (2, 5, 1 and 9
    tokens, right-padded), then decodes one token per step at its own position; every position's
    logits equal the full forward's on that row alone (f32, 1e-5). Also on a 2 x 2 mesh, with
    the cache's batch over data and kv heads over tensor."""
    cfg, params, dec = make(variant, data=data, tensor=tensor)
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, cfg.model.vocab_size, n).tolist() for n in (12, 7, 3, 9)]
    prompt_lens = [2, 5, 1, 9]
    B, S = len(rows), 32
    forward = jax.jit(dec.forward)
    caches = dec.new_caches(B, S)
    if data > 1:
        assert tuple(caches[0][0][0].k_BSKd.sharding.spec)[:3] == ("data", None, "tensor")
    P = max(prompt_lens)
    tokens = np.zeros((B, P), np.int32)
    for b, (r, p) in enumerate(zip(rows, prompt_lens)):
        tokens[b, :p] = r[:p]
    logits, caches = forward(dec.params, tokens, np.broadcast_to(np.arange(P, dtype=np.int32), (B, P)), caches)
    got = [list(np.asarray(logits[b, :p])) for b, p in enumerate(prompt_lens)]
    pos = np.array(prompt_lens, np.int32)
    for _ in range(max(len(r) for r in rows) - min(prompt_lens)):
        step_tokens = np.array([[r[p] if p < len(r) else 0] for r, p in zip(rows, pos)], np.int32)
        logits, caches = forward(dec.params, step_tokens, pos[:, None], caches)
        for b in range(B):
            if pos[b] < len(rows[b]):
                got[b].append(np.asarray(logits[b, 0]))
        pos = pos + 1
    if data > 1:
        assert tuple(caches[0][0][0].k_BSKd.sharding.spec)[:3] == ("data", None, "tensor")
    for b, want in enumerate(full_logits(cfg, params, rows)):
        np.testing.assert_allclose(np.stack(got[b]), want, atol=1e-5, rtol=1e-5)


PROMPTS = [[5, 9, 2, 33, 7, 1, 1, 40], [3], [11, 12, 13, 14]]


@pytest.mark.parametrize("variant,data,tensor", [("gqa", 1, 1), ("moe", 2, 2)])
def test_a_repeated_prompt_is_prefilled_once_and_each_of_its_rows_continues_as_it_alone_would(variant, data, tensor):
    """GRPO's groups: rows sharing a prompt get copies of one prefill (Decoder.prefill); greedy,
    every row gives exactly what its prompt gives alone, also with the batch over a 2 x 2 mesh."""
    _, _, dec = make(variant, data=data, tensor=tensor)
    rows = [PROMPTS[i] for i in (0, 1, 0, 2, 1, 0)]
    greedy = Sampling(temperature=0.0)
    alone = [generate(dec, [p], 12, greedy)[0] for p in PROMPTS]
    assert generate(dec, rows, 12, greedy) == [alone[i] for i in (0, 1, 0, 2, 1, 0)]


def test_a_decode_step_copies_no_layer_of_weights_and_updates_the_cache_in_place():
    """The decoder holds weights and caches per layer (inference/per_layer.py): the compiled step
    needs less scratch memory than one layer's weights (a scanned stack copies each layer's out
    before its matmuls) and its output caches are the donated input's buffers."""
    from jaxlm.inference.budget import Budget

    cfg, params, dec = make("dense", n_layers=4, d_model=64, d_ff=256)
    caches = dec.new_caches(1, 32)
    tok = jnp.zeros((1,), jnp.int32)
    step = dec.step_fn.lower(dec.params, caches, tok, tok, 0, jax.random.key(0), Budget().controls(0, 1, None),
                             sampling=Sampling(temperature=0.0)).compile()
    layer = params["segments"][0]["units"]
    layer_bytes = sum(a[0].size * a.dtype.itemsize for a in jax.tree.leaves(layer))
    stats = step.memory_analysis()
    assert stats.temp_size_in_bytes < layer_bytes / 4, (stats.temp_size_in_bytes, layer_bytes)
    assert stats.alias_size_in_bytes == sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(caches))


# the draft = the target (every proposal accepted) on demand; another model (rejections too) always
@pytest.mark.parametrize("draft_seed", [pytest.param(0, marks=pytest.mark.demo), 1])
def test_greedy_speculative_decoding_gives_exactly_the_targets_greedy_output(draft_seed):
    """A ragged batch; draft = the target itself (every proposal accepted) or another model."""
    from jaxlm.inference.speculative import speculative_generate

    cfg, params, target = make("gqa")
    _, _, draft = make("dense", seed=draft_seed, n_layers=1) if draft_seed else (None, None, target)
    greedy = Sampling(temperature=0.0)
    want = generate(target, PROMPTS, 20, greedy)
    got, stats = speculative_generate(target, draft, PROMPTS, 20, 3, greedy)
    assert got == want and all(len(row) == 20 for row in got)
    if draft is target:
        assert stats.acceptance_rate == 1.0
    else:
        assert stats.acceptance_rate < 0.5


def test_speculative_decoding_keeps_no_model_alive_and_reuses_the_round_of_equal_programs():
    """The compiled round is cached by what it compiles (graphs, mesh, lookahead, sampling): a
    second pair of decoders of the same configs reuses it, and no decoder (with its device
    weights) outlives its last reference."""
    import gc
    import weakref

    from jaxlm.inference.speculative import make_round, speculative_generate

    greedy = Sampling(temperature=0.0)
    cfg, params, _ = make("dense", seed=0, n_layers=1)
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    refs, outputs = [], []
    for _ in range(2):
        target, draft = Decoder(cfg, params, mesh), Decoder(cfg, params, mesh)
        outputs.append(speculative_generate(target, draft, PROMPTS, 4, 2, greedy)[0])
        refs += [weakref.ref(target), weakref.ref(draft), weakref.ref(target.params["embed"]["table_VD"])]
        del target, draft
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
    assert outputs[0] == outputs[1] and make_round.cache_info().hits >= 1


def test_speculative_sampling_draws_the_first_two_tokens_from_the_targets_distribution():
    """Vocabulary of 8, 6000 rows of one prompt, temperature 0.8 and top-p 0.95: the joint
    distribution of the first two tokens of a round (the second only when the first draft was
    accepted) matches the target's exact p(t1) p(t2 | t1) by a chi-square test, and clearly not
    the draft's."""
    from scipy import stats as sps

    from jaxlm.inference.speculative import speculative_generate

    V, N, prompt = 8, 6000, [1, 2, 3]
    s = Sampling(temperature=0.8, top_p=0.95)
    cfg, params, target = make("dense", seed=0, vocab_size=V)
    dcfg, dparams, draft = make("dense", seed=3, vocab_size=V, n_layers=1)
    got, _ = speculative_generate(target, draft, [prompt] * N, 2, 2, s, seed=0)
    counts = np.zeros((V, V))
    for t1, t2 in got:
        counts[t1, t2] += 1

    def joint(cfg, params):
        from jaxlm.inference.sampling import probabilities

        rows = [prompt + [t] for t in range(V)]
        last = np.stack([l[-1] for l in full_logits(cfg, params, rows)])  # p(t2 | prompt, t1)
        first = full_logits(cfg, params, [prompt])[0][-1:]  # p(t1 | prompt)
        return np.asarray(probabilities(first, s))[0][:, None] * np.asarray(probabilities(last, s))

    want = joint(cfg, params).astype(np.float64).ravel()
    keep = want > 0
    want = want / want[keep].sum() * N
    assert counts.ravel()[~keep].sum() == 0  # nothing outside top-p's support
    assert sps.chisquare(counts.ravel()[keep], want[keep]).pvalue > 1e-3  # 0.06 here; 1e-257 if accepting 2x
    draft_want = np.maximum(joint(dcfg, dparams).astype(np.float64).ravel()[keep], 1e-6)
    assert sps.chisquare(counts.ravel()[keep], draft_want * N / draft_want.sum()).pvalue < 1e-6


def test_int8_scales_are_per_output_channel():
    """Output channels whose ranges differ 10^4-fold each keep half an int8 step of their own
    range (a per-tensor scale would round the smallest channels to zero); also for a stacked
    weight with two input dimensions (attention's wo [layers, H, d, D])."""
    from jaxlm.compress.quantize import SCHEMES, quantize

    rng = np.random.default_rng(0)
    for shape, first_in, n_in in (((64, 5), 0, 1), ((2, 4, 8, 5), 1, 2)):
        w = rng.normal(size=shape) * 10.0 ** np.linspace(-3, 1, 5)  # the last axis: output channels
        q = quantize(jnp.asarray(w, jnp.float32), SCHEMES["int8"], first_in, n_in)
        err = np.abs(np.asarray(q.dequantize(), np.float64).reshape(w.shape) - w)
        in_axes = tuple(range(first_in, first_in + n_in))
        channel_max = np.max(np.abs(w), axis=in_axes, keepdims=True)
        assert np.all(err <= channel_max / 254 * (1 + 1e-5)), (err / channel_max).max()


def channels_spread(cfg, params, seed=0):
    """The parameters with every quantized weight's output channels scaled by 10^U(-2, 0)."""
    from jaxlm.compress.quantize import quantized_weights

    rng, out = np.random.default_rng(seed), jax.tree.map(lambda x: x, params)
    for path, (first_in, n_in, transposed, _) in quantized_weights(cfg).items():
        if transposed:  # the embedding table: its output channels are not its last axis
            continue
        node = out
        for key in path[:-1]:
            node = node[key]
        w = node[path[-1]]
        factors = 10.0 ** rng.uniform(-2, 0, size=w.shape[first_in + n_in:])
        node[path[-1]] = w * jnp.asarray(factors.reshape((1,) * (first_in + n_in) + factors.shape), w.dtype)
    return out


def test_int8_weights_keep_logits_within_3_percent_and_take_a_third_of_the_memory():
    """Per-output-channel int8 on the GQA model whose projections' output channels span 100x in
    range: relative L2 error of the logits < 3% at every position of a prompt (a per-tensor scale
    gives far more); quantized projections take about 1/4 of their bytes."""
    from jaxlm.compress.quantize import QuantizedWeight, quantize_params, weight_bytes

    cfg, params, dec = make("gqa")
    params = channels_spread(cfg, params)
    dec = Decoder(cfg, params, dec.mesh)
    q = quantize_params(params, cfg, "int8")
    assert isinstance(q["segments"][0]["units"]["blocks"][0]["attn"]["wo_HdD"], QuantizedWeight)
    qdec = Decoder(cfg, q, dec.mesh)
    tokens = np.array([PROMPTS[0]], np.int32)
    positions = np.arange(tokens.shape[1], dtype=np.int32)[None]
    want, _ = jax.jit(dec.forward)(dec.params, tokens, positions, dec.new_caches(1, 16))
    got, _ = jax.jit(qdec.forward)(qdec.params, tokens, positions, qdec.new_caches(1, 16))
    want, got = np.asarray(want), np.asarray(got)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.03
    assert weight_bytes(q) < weight_bytes(params) / 3.5  # norms and per-channel scales stay f32


def test_top_k_top_p_and_temperature_give_the_hand_computed_distribution():
    from jaxlm.inference.sampling import probabilities

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    np.testing.assert_allclose(probabilities(logits, Sampling(top_p=0.8))[0], [0.625, 0.375, 0, 0], atol=1e-6)
    np.testing.assert_allclose(probabilities(logits, Sampling(top_k=3))[0], [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0],
                               atol=1e-6)
    hot = np.sqrt([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(probabilities(logits, Sampling(temperature=2.0))[0], hot / hot.sum(), atol=1e-6)
    np.testing.assert_array_equal(probabilities(logits, Sampling(temperature=0.0))[0], [1, 0, 0, 0])


def test_seeded_sampling_is_reproducible_and_the_seed_matters():
    _, _, dec = make("dense")
    s = Sampling(temperature=1.0, top_k=20, top_p=0.9)
    first = generate(dec, PROMPTS, 12, s, seed=7)
    assert generate(dec, PROMPTS, 12, s, seed=7) == first
    assert generate(dec, PROMPTS, 12, s, seed=8) != first


def test_decode_mask_puts_each_rows_queries_at_its_own_positions():
    from jaxlm.model.kernels import AttentionMask

    mask = AttentionMask(causal=True, q_positions_BT=jnp.asarray([[1, 2], [3, 4]])).dense(2, 5)
    np.testing.assert_array_equal(mask, [[[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]])


def test_max_new_capped_by_max_seq_len_says_so_once_on_stderr(capsys):
    """A 60-token prompt in a model of max_seq_len=64 leaves room for 4 of the 10 tokens asked."""
    _, _, dec = make("dense")
    prompts = [list(range(1, 61)), [3, 4, 5]]
    greedy = Sampling(temperature=0.0)
    capsys.readouterr()
    out = generate(dec, prompts, 10, greedy)
    assert [len(row) for row in out] == [4, 4]
    assert capsys.readouterr().err.splitlines() == [
        "jaxlm: asked for 10 new tokens but only 4 fit after the longest prompt (60 tokens) because of "
        "max_seq_len=64; generating 4"]
    assert generate(dec, prompts, 4, greedy) == out  # what fits: nothing said
    assert capsys.readouterr().err == ""
