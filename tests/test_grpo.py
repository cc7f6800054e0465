"""GRPO: the gradient is REINFORCE with the group-mean baseline (mu = 1, no clipping), equal rewards
give no gradient, the KL is zero at the reference, advantages stay within their group, reward
errors are one line, a 2x2 mesh equals one device, and a killed run resumes bit-exact."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ConfigError, load_config
from jaxlm.data.batch import Batch
from jaxlm.errors import UserError
from jaxlm.eval.tasks.arithmetic import arithmetic, write_jsonl
from jaxlm.objectives.grpo import group_advantages
from jaxlm.parallel.mesh import make_mesh
from jaxlm.rl.rewards import Rewards
from jaxlm.rl.rollout import to_rows
from jaxlm.train.step import make_trainer

SMALL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=2", "model.d_ff=64",
         "data.seq_len=16", "model.max_seq_len=16", "train.objective=grpo", "data.path=unused.jsonl",
         "grpo.prompts_per_step=2", "grpo.group_size=3", "train.global_batch=6", "grpo.beta=0"]
REWARDS = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 2.0]])  # 2 prompts x 3 completions


def trainer_of(*overrides, devices=1):
    cfg = load_config("configs/tiny.yaml", SMALL + list(overrides))
    return make_trainer(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:devices]))


def rollouts(rewards_JO, advantage="std", seed=0) -> tuple[Batch, np.ndarray]:
    """Rows of 2 prompts x O completions of different lengths, and their advantages [B]."""
    rng = np.random.default_rng(seed)
    O = rewards_JO.shape[1]
    prompts = [rng.integers(0, 256, 4).tolist(), rng.integers(0, 256, 6).tolist()]
    completions = [rng.integers(0, 256, 3 + b % 5).tolist() for b in range(len(prompts) * O)]
    rows = to_rows(prompts, completions, O, 16)
    adv_B = group_advantages(rewards_JO, advantage).reshape(-1)
    rows["advantage"] = np.broadcast_to(adv_B[:, None], rows["inputs"].shape).astype(np.float32)
    return Batch.from_arrays(rows), adv_B


def with_rollout_logps(trainer, params, batch: Batch) -> Batch:
    """The batch with the sampling policy's (= `params`') and the reference's log-probs filled in."""
    from jaxlm.train.step import model_of

    model = model_of(params, trainer.frozen, trainer.spec)
    logps = trainer.spec.objective.rollout_logps(model, batch, trainer.frozen["objective"])
    return Batch(batch.inputs, batch.targets, batch.loss_mask, extra={**batch.extra, **logps})


def reinforce_by_hand(trainer, params, batch: Batch, adv_B) -> dict:
    """grad of -(1/N) sum_b A_b sum_t log pi(y_bt): REINFORCE with the group-mean baseline, N tokens."""
    def objective(p):
        logits = nnx.merge(trainer.graphdef, p)(batch.inputs)[0]
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch.targets[..., None], -1)[..., 0]
        mask = batch.loss_mask.astype(jnp.float32)
        return -jnp.sum(jnp.asarray(adv_B)[:, None] * logp * mask) / jnp.sum(mask)
    return jax.grad(objective)(params)


@pytest.mark.parametrize("advantage", ["std", "none"])
def test_with_mu_1_and_no_clipping_the_gradient_is_reinforce_with_the_group_mean_baseline(advantage):
    trainer = trainer_of(f"grpo.advantage={advantage}")
    params = trainer.init_state()["params"]
    batch, adv_B = rollouts(REWARDS, advantage)
    r = REWARDS
    by_hand = (r - r.mean(1, keepdims=True)) / ((r.std(1, ddof=1, keepdims=True) + 1e-4) if advantage == "std" else 1)
    np.testing.assert_allclose(adv_B, by_hand.reshape(-1), rtol=1e-6)  # each row against its own group
    batch = with_rollout_logps(trainer, params, batch)
    _, grads = trainer.loss_and_grads(params, batch)
    expected = reinforce_by_hand(trainer, params, batch, adv_B)
    assert optax_norm(expected) > 1e-3  # a real gradient
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, expected)


def optax_norm(tree) -> float:
    return float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree))))


def test_a_group_with_equal_rewards_has_zero_advantage_and_contributes_no_policy_gradient():
    rewards = np.array([[0.7, 0.7, 0.7], [1.0, 0.0, 1.0]])
    adv = group_advantages(rewards)
    np.testing.assert_array_equal(adv[0], 0.0)
    assert np.abs(adv[1]).min() > 0.5
    trainer = trainer_of()
    params = trainer.init_state()["params"]
    batch, _ = rollouts(rewards)
    batch = with_rollout_logps(trainer, params, batch)
    only_first = np.asarray(batch.loss_mask).copy()
    only_first[3:] = 0  # the equal-reward group's rows alone
    _, grads = trainer.loss_and_grads(params, Batch(batch.inputs, batch.targets, only_first, extra=batch.extra))
    assert optax_norm(grads) == 0.0
    _, grads = trainer.loss_and_grads(params, batch)
    assert optax_norm(grads) > 1e-3  # the other group does move the policy


def test_advantages_are_per_group_never_across_the_batch():
    low, high = np.array([[1.0, 2.0, 3.0]]), np.array([[101.0, 102.0, 103.0]])
    both = group_advantages(np.concatenate([low, high]))
    np.testing.assert_allclose(both[0], both[1], rtol=1e-6)  # a batch-wide mean would make them differ
    np.testing.assert_allclose(both[0], group_advantages(low)[0], rtol=1e-6)
    np.testing.assert_allclose(group_advantages(np.concatenate([low, high]), "none"), [[-1, 0, 1], [-1, 0, 1]])
    rows = to_rows([[5, 6], [7, 8, 9]], [[1], [2], [3], [4, 4]], 2, 8)  # rows are prompt-major: b // O
    np.testing.assert_array_equal(rows["inputs"][:, 0], [5, 5, 7, 7])
    np.testing.assert_array_equal(rows["loss_mask"][3], [0, 0, 1, 1, 0, 0, 0, 0])  # the completion's targets


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["copy", "lora"])
def test_the_kl_term_is_zero_when_the_policy_is_the_reference_and_grows_when_it_moves(lora_rank):
    """The reference's log-probs are taken when the rollouts are (from the policy of that time):
    under LoRA the base without adapters, else the starting copy."""
    from jaxlm.train.step import model_of

    trainer = trainer_of("grpo.beta=0.5", f"lora.rank={lora_rank}")
    start = trainer.init_state()["params"]
    rows, _ = rollouts(REWARDS)
    objective = trainer.spec.objective

    def kl_and_grad(p):
        batch = with_rollout_logps(trainer, p, rows)
        kl = lambda q: objective.terms(model_of(q, trainer.frozen, trainer.spec), batch, None,
                                       trainer.frozen["objective"])[0]["kl"]
        return kl(p), jax.grad(kl)(p)

    kl, grad = kl_and_grad(start)
    assert float(kl) == 0.0 and optax_norm(grad) == 0.0
    moved = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), start)  # under LoRA: the adapters move
    assert float(kl_and_grad(moved)[0]) > 1e-4


def test_a_reward_function_that_raises_or_returns_the_wrong_length_is_one_line_naming_it(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def boom(prompts, completions, **columns):\n    raise ValueError('no answer\\nsecond line')\n"
        "def short(prompts, completions, **columns):\n    return [1.0]\n"
        "def good(prompts, completions, answer, **columns):\n    return [float(c == a) for c, a in zip(completions, answer)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    def score(fn):
        cfg = load_config("configs/tiny.yaml", SMALL + [f"grpo.rewards=[{{fn: '{fn}'}}]"])
        return Rewards(cfg.grpo).score(["q1", "q2"], ["4", "5"], {"answer": ["4", "6"]})

    np.testing.assert_array_equal(score("my_rewards:good")["reward"], [1.0, 0.0])
    np.testing.assert_array_equal(score("answer")["reward"], [1.0, 0.0])
    for fn, says in [("my_rewards:boom", "raised ValueError: no answer"),
                     ("my_rewards:short", "returned 1 rewards for 2"), ("my_rewards:absent", "cannot load")]:
        with pytest.raises(UserError) as e:
            score(fn)
        assert fn in str(e.value) and says in str(e.value) and "\n" not in str(e.value)


def test_the_batch_must_be_prompts_times_group_size():
    with pytest.raises(ConfigError, match=r"must equal grpo.prompts_per_step \* grpo.group_size = 6"):
        load_config("configs/tiny.yaml", SMALL + ["train.global_batch=8"])


def test_a_2x2_mesh_gives_the_one_device_loss_and_gradients_on_the_same_rollouts():
    overrides = ["grpo.beta=0.1", "grpo.group_size=4", "train.global_batch=8", "grpo.mu=2"]  # mu > 1: old log-probs read
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 2.0, 0.0]])
    one = trainer_of(*overrides)
    params = one.init_state()["params"]
    batch, _ = rollouts(rewards)
    moved = jax.tree.map(lambda x: x + 0.01 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), params)
    batch = with_rollout_logps(one, params, batch)  # old = start, policy moved: ratios != 1, KL > 0
    loss1, grads1 = one.loss_and_grads(moved, batch)
    mesh = trainer_of(*overrides, "mesh.data=2", "mesh.tensor=2", devices=4)
    mesh.init_state()
    placed = jax.device_put(batch, mesh.batch_sharding)
    loss4, grads4 = mesh.loss_and_grads(jax.device_put(moved, mesh.state_shardings["params"]), placed)
    assert float(loss4) == pytest.approx(float(loss1), abs=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads4, grads1)


def grpo_run(tmp_path, name, steps, *overrides):
    from jaxlm.rl.loop import train_grpo

    train_records, _ = arithmetic(32, 0, kind="prompt")
    data = write_jsonl(train_records, tmp_path / "prompts.jsonl")
    cfg = load_config("configs/tiny.yaml", [
        "model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64",
        "model.max_seq_len=96", "data.seq_len=96", f"data.path={data}", "train.objective=grpo",
        "grpo.group_size=4", "grpo.prompts_per_step=2", "train.global_batch=8", "grpo.max_new_tokens=6",
        "grpo.mu=2", "grpo.beta=0.1", "grpo.rewards=[{fn: answer}, {fn: length, weight: 0.5}]",
        f"train.steps={steps}", "checkpoint.every=2", "train.log_every=1", "train.eval_every=0",
        "optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=3e-3", "train.progress=false",
        f"train.run_dir={tmp_path / name}", *overrides])
    return train_grpo(cfg, mesh=make_mesh(cfg.mesh, devices=jax.devices()[:1]))


def test_a_run_killed_after_its_step_2_checkpoint_resumes_to_the_same_rewards_and_parameters(tmp_path):
    from jaxlm.checkpoint.runs import load_params

    whole = grpo_run(tmp_path, "whole", 6)
    assert len({h["reward_mean"] for h in whole}) > 1  # rollouts really differ between batches
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "whole", killed)  # as a SIGKILL after the step-2 save leaves it
    for step in (4, 6):
        shutil.rmtree(killed / "checkpoints" / str(step))
    resumed = grpo_run(tmp_path, "killed", 6)
    assert [h["step"] for h in resumed] == [3, 4, 5, 6]
    for a, b in zip(whole[2:], resumed):
        assert a["reward_mean"] == b["reward_mean"] and a["loss"] == b["loss"], (a, b)
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    p_whole, p_resumed = (load_params(d / "checkpoints" / "6")[1] for d in (tmp_path / "whole", killed))
    jax.tree.map(np.testing.assert_array_equal, p_whole, p_resumed)


def test_jaxlm_train_refuses_grpo_and_jaxlm_rl_every_other_objective(tmp_path):
    import argparse

    from jaxlm.train.loop import train
    from jaxlm.train.run import run_verb

    args = lambda *o: argparse.Namespace(config="configs/tiny.yaml", overrides=SMALL + list(o), run_dir=None,
                                         resume=None, print_config=True)
    with pytest.raises(UserError, match=r"runs with `jaxlm rl configs/tiny.yaml`"):
        run_verb(args(), "train", train)
    with pytest.raises(UserError, match=r"runs with `jaxlm train configs/tiny.yaml`"):
        run_verb(args("train.objective=sft", "train.global_batch=4"), "rl", train)


def test_a_lora_run_keeps_its_base_frozen_and_trains_its_adapters(tmp_path):
    from jaxlm.checkpoint.runs import load_params
    from jaxlm.model import lora

    history = grpo_run(tmp_path, "lora", 4, "lora.rank=4", "optim.lr=1e-2")
    assert all(np.isfinite(h["loss"]) for h in history) and history[-1]["step"] == 4
    (base2, ad2), (base4, ad4) = (lora.split_adapters(load_params(tmp_path / "lora" / "checkpoints" / s)[1])
                                  for s in ("2", "4"))
    jax.tree.map(np.testing.assert_array_equal, base2, base4)  # the base is frozen
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), ad2, ad4)
    assert max(jax.tree.leaves(moved)) > 0  # the adapters are trained


def test_rollouts_sample_from_the_policy_being_trained_lora_adapters_included():
    from jaxlm.inference.decode import Decoder
    from jaxlm.rl.loop import decoding_params
    from jaxlm.train.step import model_of

    trainer = trainer_of("lora.rank=4")
    state = trainer.init_state()
    state["params"] = jax.tree.map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), state["params"])
    dec = Decoder(trainer.cfg, decoding_params(trainer.saved_state(state)["params"], trainer.cfg), trainer.mesh)
    tokens = np.random.default_rng(0).integers(0, 256, (2, 8)).astype(np.int32)
    positions = np.broadcast_to(np.arange(8, dtype=np.int32), tokens.shape)
    decoded, _ = dec.forward(dec.params, tokens, positions, dec.new_caches(2, 16))
    trained = model_of(state["params"], trainer.frozen, trainer.spec)(jnp.asarray(tokens))[0]
    base = model_of(jax.tree.map(jnp.zeros_like, state["params"]), trainer.frozen, trainer.spec)(jnp.asarray(tokens))[0]
    assert float(jnp.abs(trained - base).max()) > 1e-3  # the adapters change the policy
    np.testing.assert_allclose(decoded, trained, atol=1e-4)
