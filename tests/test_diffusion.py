"""Masked diffusion (train.objective=mdlm): the forward process, the ELBO and its weighting, packing,
the seeded evaluation, training on TinyShakespeare, and the three samplers."""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ConfigError, DiffusionConfig, load_config
from jaxlm.data.batch import Batch
from jaxlm.parallel.mesh import make_mesh
from jaxlm.inference.diffusion import block_plan, sample_block, sample_mdlm, sample_remask
from jaxlm.objectives import mdlm as diffusion
from jaxlm.train.loop import train
from jaxlm.objectives import make_objective
from jaxlm.model.build import build_model
from jaxlm.train.step import make_trainer

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64",
         "data.seq_len=32", "train.global_batch=8"]
V = 258
MASK = V - 1


def mdlm_config(*overrides):
    return load_config("configs/mdlm-tiny.yaml", SMALL + list(overrides))


@pytest.mark.parametrize("schedule", ["linear", "loglinear", "cosine"])
def test_masking_rate_matches_one_minus_alpha_t(schedule):
    t_B = jnp.array([0.1, 0.5, 0.9])
    x0 = jnp.zeros((3, 50_000), jnp.int32)
    x_t, masked = diffusion.mask_tokens(jax.random.key(0), x0, jnp.broadcast_to(t_B[:, None], x0.shape), schedule, MASK)
    rate = np.asarray(masked.mean(axis=1))
    t = np.array([0.1, 0.5, 0.9])
    # 1 - alpha_t by the formulas: linear alpha = 1 - t; MDLM's log-linear alpha = exp(-sigma) with
    # sigma = -log(1 - (1 - 1e-3) t), so 1 - alpha = (1 - 1e-3) t; cosine alpha = cos(pi t / 2)
    want = {"linear": t, "loglinear": (1 - 1e-3) * t, "cosine": 1 - np.cos(np.pi * t / 2)}
    np.testing.assert_allclose(rate, want[schedule], atol=0.01)  # 3 sigma of 50k draws is < 0.007
    assert np.array_equal(np.asarray(x_t == MASK), np.asarray(masked))


def test_t_is_stratified_across_rows_and_drawn_per_document():
    d = DiffusionConfig(t_min=0.0)
    t = np.asarray(diffusion.sample_t(jax.random.key(1), 16, None, d)[:, 0])
    assert sorted(np.floor(t * 16).astype(int)) == list(range(16))  # one t in each sixteenth
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]] * 4)
    t = np.asarray(diffusion.sample_t(jax.random.key(1), 4, seg, d))
    for row in t:
        assert row[0] == row[1] == row[2] and row[3] == row[4] and len({row[0], row[3], row[5]}) == 3


def test_elbo_weight_matches_hand_computed_values():
    t = jnp.array([0.25, 0.5])
    np.testing.assert_allclose(diffusion.elbo_weight("linear", t), [4.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(diffusion.elbo_weight("loglinear", t), [4.0, 2.0], rtol=1e-5)
    # cosine: alpha = cos(pi t / 2), -alpha' / (1 - alpha) = (pi/2) sin(pi t/2) / (1 - cos(pi t/2))
    hand = [(math.pi / 2) * math.sin(math.pi * s / 2) / (1 - math.cos(math.pi * s / 2)) for s in (0.25, 0.5)]
    np.testing.assert_allclose(diffusion.elbo_weight("cosine", t), hand, rtol=1e-5)


class FixedLogits(nnx.Module):
    """A stand-in model whose logits ignore the tokens: the same [V] logits at every position, or
    [T, V] logits per position (T = the canvas length). It has the `cfg` the samplers read."""

    def __init__(self, logits):
        self.logits = nnx.Param(jnp.asarray(logits, jnp.float32))
        self.cfg = SimpleNamespace(vocab_size=V, max_seq_len=256)

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, rng=None):
        return jnp.broadcast_to(self.logits[...], (*tokens_BT.shape, V)), {}


def test_nelbo_equals_a_hand_computed_case_with_subs():
    """At t = 1 every token is masked; cosine weight there is pi/2. SUBS drops the mask logit."""
    cfg = mdlm_config("diffusion.schedule=cosine")
    logits = np.linspace(-2.0, 2.0, V).astype(np.float32)
    logits[MASK] = 50.0  # would dominate without SUBS
    x0 = np.array([[3, 7, 250, 0], [1, 1, 2, 100]], np.int32)
    batch = Batch(inputs=x0, targets=x0, loss_mask=np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32))
    objective = diffusion.MDLM(cfg)
    total, sums, _ = objective.nelbo_sum(FixedLogits(logits), batch, jax.random.key(0), jnp.ones((2, 4)))
    kept = logits[:MASK].astype(np.float64)
    lse = np.log(np.exp(kept).sum())
    hand = (math.pi / 2) * sum(lse - kept[x0[b, i]] for b in range(2) for i in range(4) if batch.loss_mask[b, i])
    np.testing.assert_allclose(float(total), hand, rtol=1e-5)
    assert float(sums["mask_rate"]) == 7


def test_mdlm_loss_at_init_is_about_log_V():
    """E[weight * masked] = 1 per token, so at init the bound is the model's cross-entropy on a
    masked token (t = 1: all masked, weight 1), which is about log V."""
    cfg = mdlm_config("data.seq_len=128")
    model, objective = build_model(cfg, 0), diffusion.MDLM(cfg)
    x0 = np.random.default_rng(0).integers(0, 256, (16, 128)).astype(np.int32)
    batch = Batch(inputs=x0, targets=x0, loss_mask=np.ones_like(x0))
    loss = jax.jit(lambda key: objective.loss(model, batch, key, {})[0] / x0.size)
    mean = np.mean([float(loss(jax.random.key(i))) for i in range(8)])
    at_one = jax.jit(lambda: objective.nelbo_sum(model, batch, jax.random.key(0), jnp.ones(x0.shape))[0] / x0.size)
    all_masked = float(at_one())
    assert abs(mean - all_masked) < 0.05 * all_masked, (mean, all_masked)
    assert abs(mean - math.log(V)) < 0.1 * math.log(V), (mean, math.log(V))


def test_packed_documents_are_masked_and_attended_separately():
    """Changing the second document changes nothing of the first one's loss terms."""
    cfg = mdlm_config("data.packing=true")
    objective = diffusion.MDLM(cfg)
    model = build_model(cfg, 0)
    rng = np.random.default_rng(0)
    x0 = rng.integers(0, 256, (2, 32)).astype(np.int32)
    seg = np.array([[1] * 20 + [2] * 12, [1] * 32], np.int32)
    pos = np.array([list(range(20)) + list(range(12)), list(range(32))], np.int32)

    def per_token(tokens):
        batch = Batch(inputs=tokens, targets=tokens, loss_mask=np.ones_like(tokens), positions=pos, segment_ids=seg)
        t = diffusion.sample_t(jax.random.key(0), 2, jnp.asarray(seg), cfg.diffusion)
        return np.asarray(objective.nelbo_BT(model, batch, jax.random.key(1), t)[0])

    other = x0.copy()
    other[0, 20:] = rng.integers(0, 256, 12)
    a, b = per_token(x0), per_token(other)
    np.testing.assert_allclose(a[0, :20], b[0, :20], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a[0, 20:], b[0, 20:])


def test_the_elbo_evaluation_is_seeded_so_repeated_evals_agree():
    cfg = mdlm_config()
    trainer = make_trainer(cfg, make_mesh(cfg.mesh))
    params = trainer.init_state()["params"]
    x0 = np.random.default_rng(0).integers(0, 256, (8, 32)).astype(np.int32)
    batch = jax.device_put(Batch(inputs=x0, targets=x0, loss_mask=np.ones_like(x0)), trainer.batch_sharding)
    first, again = trainer.eval_step(params, batch), trainer.eval_step(params, batch)
    assert float(first["loss_sum"]) == float(again["loss_sum"])
    assert float(first["count"]) == cfg.diffusion.eval_t_samples * x0.size
    other = make_trainer(mdlm_config("train.seed=1"), make_mesh(cfg.mesh))
    assert float(other.eval_step(params, batch)["loss_sum"]) != float(first["loss_sum"])


def test_training_mdlm_on_shakespeare_lowers_the_bound(tmp_path, shakespeare_path):
    cfg = mdlm_config(f"data.path={shakespeare_path}", "train.steps=60", "train.eval_every=30",
                      "train.eval_batches=2", "optim.warmup_steps=10", "checkpoint.every=0", "train.progress=false",
                      f"train.run_dir={tmp_path}")
    evals = [r["eval_loss"] for r in train(cfg) if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0] < 0.85 * math.log(V), evals


def test_config_refuses_mdlm_without_bidirectional_attention_or_mask_room():
    with pytest.raises(ConfigError, match="model.causal=false"):
        load_config("configs/mdlm-tiny.yaml", ["model.causal=true"])
    with pytest.raises(ConfigError, match=r"reserves id model.vocab_size-1 .* set model.vocab_size >= 258"):
        make_objective(mdlm_config("model.vocab_size=257"))


# ----------------------------------------------------------------------------- samplers


@pytest.fixture(scope="module")
def mask_loving_model():
    """A tiny model whose raw logits favour <|mask|> everywhere: SUBS must still never emit it."""
    model = build_model(mdlm_config(), 0)
    model.lm_head_DV[...] = model.lm_head_DV[...].at[:, MASK].add(100.0)
    return model


PROMPT = list(b"To be")


@pytest.mark.parametrize("sampler", ["mdlm", "remask", "block"])
def test_each_sampler_fills_every_mask_and_never_emits_the_mask_token(mask_loving_model, sampler):
    run = {"mdlm": lambda: sample_mdlm(mask_loving_model, PROMPT, 24, 6, 0, history=True),
           "remask": lambda: sample_remask(mask_loving_model, PROMPT, 24, 6, 0, history=True),
           "block": lambda: sample_block(mask_loving_model, PROMPT, 24, 6, 8, 0, history=True)}[sampler]
    sample = run()
    assert sample.tokens.shape == (1, 5 + 24)
    assert list(sample.tokens[0, :5]) == PROMPT
    assert not (sample.tokens == MASK).any()
    masks = [int((h == MASK).sum()) for h in sample.history]
    assert masks == sorted(masks, reverse=True) and masks[-1] == 0  # revealed tokens stay revealed
    assert sample.tokens_per_s > 0


def test_remasking_reveals_the_scheduled_number_per_step(mask_loving_model):
    sample = sample_remask(mask_loving_model, PROMPT, 24, 5, 0, history=True)
    masks = [24] + [int((h == MASK).sum()) for h in sample.history]
    assert [a - b for a, b in zip(masks, masks[1:])] == [5, 5, 5, 5, 4]  # 24 over 5 steps, LLaDA-style


def per_position_logits(seed, scale_T):
    """[P + L, V] random logits (per-position scale `scale_T`), the mask logit the largest everywhere
    (SUBS must ignore it)."""
    logits = np.random.default_rng(seed).normal(size=(len(scale_T), V)) * np.asarray(scale_T)[:, None]
    logits[:, MASK] = 50.0
    return logits.astype(np.float32)


def remasking_by_hand(logits, plan):
    """The canvases that low-confidence remasking at temperature 0 must produce after each step:
    per block [lo, hi) of the generation (after PROMPT), step by step, the `k` still-masked
    positions whose SUBS argmax is most probable are set to that argmax. Fixed logits make the
    ranking the same at every step, so the block's positions are revealed in descending confidence."""
    kept = logits[:, :MASK].astype(np.float64)
    p = np.exp(kept - kept.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    x0, conf = p.argmax(-1), p.max(-1)
    P = len(PROMPT)
    assert np.diff(np.log(np.sort(conf[P:]))).min() > 1e-4  # the ranking cannot hinge on float32 rounding
    canvas, canvases = np.array(PROMPT + [MASK] * (len(logits) - P)), []
    for lo, hi, counts in plan:
        order = P + lo + np.argsort(-conf[P + lo:P + hi])
        for k in counts:
            canvas = canvas.copy()
            canvas[order[:k]] = x0[order[:k]]
            order = order[k:]
            canvases.append(canvas)
    return canvases


def test_remasking_at_temperature_zero_reveals_the_most_confident_masks_as_their_argmax():
    """LLaDA remasking with fixed per-position logits at temperature 0: each step reveals exactly the
    k masked positions of highest probability of their argmax (softmax of the SUBS logits, not the
    raw logit; prompt positions, though more confident, are never candidates) as that argmax, and
    leaves the rest masked; 11 masks over 3 steps go 4, 4, 3."""
    P, L = len(PROMPT), 11
    logits = per_position_logits(0, [8.0] * P + list(np.linspace(0.5, 3.0, L)))
    sample = sample_remask(FixedLogits(logits), PROMPT, L, 3, seed=0, temperature=0.0, history=True)
    want = remasking_by_hand(logits, [(0, L, [4, 4, 3])])
    np.testing.assert_array_equal(np.stack([h[0] for h in sample.history]), np.stack(want))
    # ranking by the largest raw logit would pick another first four: the test tells them apart
    gen = logits[P:, :MASK]
    assert set(np.argsort(-gen.max(-1))[:4]) != set(np.flatnonzero(want[0][P:] != MASK))


def test_block_diffusion_ranks_confidence_only_inside_the_current_block():
    """Block diffusion at temperature 0 (12 positions, blocks of 4, 2 steps each): each step reveals
    the most confident masks of the current block only, although the last block is the most
    confident of all (plain remasking, one block, would reveal it first)."""
    P, L = len(PROMPT), 12
    logits = per_position_logits(1, [1.0] * (P + 8) + [6.0] * 4)
    sample = sample_block(FixedLogits(logits), PROMPT, L, 6, 4, seed=0, temperature=0.0, history=True)
    want = remasking_by_hand(logits, [(0, 4, [2, 2]), (4, 8, [2, 2]), (8, 12, [2, 2])])
    np.testing.assert_array_equal(np.stack([h[0] for h in sample.history]), np.stack(want))
    plain = remasking_by_hand(logits, [(0, L, [2] * 6)])
    assert not np.array_equal(plain[0], want[0])
    np.testing.assert_array_equal(plain[-1], want[-1])  # the same tokens in the end, another order


def test_mdlm_ancestral_steps_at_temperature_zero_reveal_argmaxes_and_the_last_step_reveals_all():
    """MDLM ancestral sampling at temperature 0: every revealed token is its position's SUBS argmax
    and stays; the last step (s = 0, reveal probability (1 - alpha_t) / (1 - alpha_t) = 1) reveals
    all that remain, so one step alone fills the whole canvas with the argmaxes."""
    P, L = len(PROMPT), 10
    logits = per_position_logits(2, [1.0] * (P + L))
    argmax = np.concatenate([PROMPT, logits[P:, :MASK].argmax(-1)])
    one = sample_mdlm(FixedLogits(logits), PROMPT, L, 1, seed=0, temperature=0.0)
    np.testing.assert_array_equal(one.tokens[0], argmax)
    sample = sample_mdlm(FixedLogits(logits), PROMPT, L, 4, seed=0, temperature=0.0, history=True)
    canvases = [np.array(PROMPT + [MASK] * L)] + [h[0] for h in sample.history]
    for before, after in zip(canvases, canvases[1:]):
        revealed = after != MASK
        np.testing.assert_array_equal(after[revealed], argmax[revealed])
        assert np.all(revealed[before != MASK])  # revealed tokens stay revealed
    np.testing.assert_array_equal(sample.tokens[0], argmax)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_mdlm_ancestral_reveals_follow_the_schedule_over_many_seeds(schedule):
    """A position masked at t = 1 is still masked at s with probability 1 - alpha_s (the reveal
    probability (alpha_s - alpha_t) / (1 - alpha_t) per step compounds to that). Over 4 steps,
    64 rows x 32 positions x 8 seeds, the masked fraction after each step must be 1 - alpha at
    s = 3/4, 1/2, 1/4, 0 by the formula (linear: s; cosine: 1 - cos(pi s / 2)); revealing all at
    once, or in equal parts under cosine, is far off."""
    P, L, steps, rows = len(PROMPT), 32, 4, 64
    logits = per_position_logits(3, [1.0] * (P + L))
    s = np.array([0.75, 0.5, 0.25, 0.0])
    want = s if schedule == "linear" else 1 - np.cos(np.pi * s / 2)
    masked = np.zeros(steps)
    for seed in range(8):
        sample = sample_mdlm(FixedLogits(logits), PROMPT, L, steps, seed=seed, schedule=schedule, temperature=0.0,
                             rows=rows, history=True)
        masked += [np.mean(h[:, P:] == MASK) for h in sample.history]
    got = masked / 8
    np.testing.assert_allclose(got, want, atol=0.015)  # 16k positions: 3 sigma is about 0.011


def test_block_plan_spends_exactly_the_steps_asked_when_there_are_enough():
    assert block_plan(64, 30, 16) == [(0, 16, 8), (16, 32, 8), (32, 48, 7), (48, 64, 7)]  # 30 calls, not 28
    assert block_plan(24, 6, 8) == [(0, 8, 2), (8, 16, 2), (16, 24, 2)]
    assert block_plan(20, 2, 8) == [(0, 8, 1), (8, 16, 1), (16, 20, 1)]  # at least one step per block
    assert block_plan(10, 5, None) == [(0, 10, 5)]


def test_block_diffusion_finishes_each_block_before_the_next(mask_loving_model):
    sample = sample_block(mask_loving_model, PROMPT, 24, 6, 8, 0, history=True)
    for step, canvas in enumerate(sample.history):  # 2 steps per block
        block = step // 2
        gen = canvas[0, 5:]
        assert not (gen[: 8 * block] == MASK).any() and (gen[8 * (block + 1):] == MASK).all()


def test_the_generate_adapter_samples_the_continuation_and_says_its_speed(mask_loving_model):
    import argparse

    from jaxlm.tokenizer.tokenizer import load_tokenizer
    from jaxlm.inference.diffusion import add_arguments, completion, generate_mdlm, speed

    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=5)  # a generate CLI's own flag is kept
    add_arguments(parser)
    args = parser.parse_args(["--sampler", "mdlm", "--steps", "4", "--max-new-tokens", "12", "--block-size", "6"])
    sample = generate_mdlm(mask_loving_model, mdlm_config(), load_tokenizer("bytes"), "To be", args)
    assert sample.tokens.shape == (1, 17) and sample.steps == 4  # two blocks of 6, two steps each
    assert completion(sample, None) == (sample.tokens[0, 5:].tolist(), False)  # the prompt is not echoed
    new, eot = sample.tokens[0, 5:].tolist(), int(sample.tokens[0, 9])  # as if it were end-of-text
    ids, stopped = completion(sample, eot)  # the text stops before its first occurrence
    assert stopped and eot not in ids and new[: len(ids) + 1] == ids + [eot]
    assert speed("mdlm", sample).startswith("mdlm: 12 tokens in 4 steps") and speed("mdlm", sample).endswith("tokens/s")
