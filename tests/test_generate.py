"""Decoding: the KV cache reproduces the full forward, sampling, speculative decoding, int8."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import Config, MeshConfig, ModelConfig, MoEConfig
from jaxlm.distributed import make_mesh
from jaxlm.inference.decode import Decoder, generate
from jaxlm.inference.sampling import Sampling
from jaxlm.train.step import build_model

TINY = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=48, max_seq_len=64,
                   compute_dtype="float32", param_dtype="float32")
VARIANTS = {
    "dense": (TINY, MoEConfig()),
    "gqa": (dataclasses.replace(TINY, n_kv_heads=2, n_layers=3), MoEConfig()),
    "moe": (dataclasses.replace(TINY, n_kv_heads=2), MoEConfig(n_experts=4, top_k=2, d_ff=24, first_dense=1)),
}


def make(variant: str, seed: int = 0, mesh: MeshConfig = MeshConfig(data=1), **model_changes):
    model, moe = VARIANTS[variant]
    cfg = Config(model=dataclasses.replace(model, **model_changes), moe=moe, mesh=mesh)
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, seed)))
    devices = jax.devices()[: np.prod([s for s in (mesh.data, mesh.tensor) if s > 0])]
    return cfg, params, Decoder(cfg, params, make_mesh(mesh, devices))


def full_logits(cfg, params, rows: list[list[int]]) -> list[np.ndarray]:
    """The training forward's logits of each row (right-padded into one causal batch)."""
    model = nnx.merge(nnx.graphdef(build_model(cfg, 0)), params)
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    logits = np.asarray(jax.jit(lambda t: model(t)[0])(tokens))
    return [logits[b, : len(r)] for b, r in enumerate(rows)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decoding_gives_the_full_forward_logits_at_every_position_in_a_ragged_batch(variant):
    """Rows of lengths 12, 7 and 3 share a batch: each prefills its own prompt (2, 5 and 1 tokens,
    right-padded), then decodes one token per step at its own position; every position's logits
    equal the full forward's on that row alone (f32, 1e-5)."""
    cfg, params, dec = make(variant)
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, cfg.model.vocab_size, n).tolist() for n in (12, 7, 3)]
    prompt_lens = [2, 5, 1]
    B, S = len(rows), 32
    forward = jax.jit(dec.forward)
    caches = dec.new_caches(B, S)
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
    for b, want in enumerate(full_logits(cfg, params, rows)):
        np.testing.assert_allclose(np.stack(got[b]), want, atol=1e-5, rtol=1e-5)


PROMPTS = [[5, 9, 2, 33, 7, 1, 1, 40], [3], [11, 12, 13, 14]]


@pytest.mark.parametrize("draft_seed", [0, 1])
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
