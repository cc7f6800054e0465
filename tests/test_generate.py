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
