"""Rollouts: a batch of prompts, O completions each from the current policy, scored into rows.

Which prompts and which random numbers a rollout batch gets depend only on (seed, rollout index),
so a resumed run samples exactly what an uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxlm.config import Config
from jaxlm.data.chat import chat_format, prompt_tokens
from jaxlm.data.records import read_records
from jaxlm.errors import UserError
from jaxlm.inference.decode import Decoder, generate
from jaxlm.inference.sampling import Sampling
from jaxlm.objectives.grpo import group_advantages
from jaxlm.rl.rewards import Rewards


def prompt_messages(record: dict, where: str) -> list[dict]:
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt):
        return prompt
    raise UserError(f"{where}: a grpo record needs 'prompt': a string or a list of messages, got {prompt!r:.60}")


class Prompts:
    """The prompt records, rendered by the chat template, drawn per rollout batch in an order of
    epochs each shuffled by (data.seed, epoch)."""

    def __init__(self, cfg: Config, tokenizer):
        d = cfg.data
        self.records = read_records(d.path)
        if not self.records:
            raise UserError(f"data.path={d.path!r} holds no records")
        fmt = chat_format(tokenizer, d.chat_template)
        self.tokens = [prompt_tokens(prompt_messages(r, f"{d.path} record {i}"), fmt).tolist()
                       for i, r in enumerate(self.records)]
        longest = max(len(t) for t in self.tokens)
        if longest + cfg.grpo.max_new_tokens > d.seq_len:
            raise UserError(f"the longest prompt ({longest} tokens) + grpo.max_new_tokens={cfg.grpo.max_new_tokens} "
                            f"exceeds data.seq_len={d.seq_len}; raise data.seq_len or shorten them")
        self.per_batch, self.seed = cfg.grpo.prompts_per_step, d.seed
        # rows as long as the longest rollout can be, not data.seq_len: the update's compute scales
        # with it, and one length per run compiles the step once
        self.row_len = longest + cfg.grpo.max_new_tokens - 1

    def indices(self, rollout: int) -> list[int]:
        n = len(self.records)
        spots = [divmod(k, n) for k in range(rollout * self.per_batch, (rollout + 1) * self.per_batch)]
        orders = {e: np.random.default_rng([self.seed, e]).permutation(n) for e in {e for e, _ in spots}}
        return [int(orders[e][i]) for e, i in spots]


def rollout_seed(seed: int, rollout: int) -> int:
    return int(np.random.SeedSequence([seed, rollout]).generate_state(1)[0] % 2**31)


@dataclass
class Rollouts:
    """One rollout batch on the host: rows (without the log-probs, which need the devices) and
    what was sampled and scored."""

    rows: dict  # inputs, targets, loss_mask [B, T] int32; advantage [B, T] float32 (the row's on each token)
    completions: list[str]
    scores: dict  # "reward" and "reward/<fn>" [B]
    lengths: np.ndarray  # completion tokens per row (the end-of-text counted)


def sample_completions(dec: Decoder, prompts: list[list[int]], cfg: Config, seed: int, stop_id) -> list[list[int]]:
    """O completions per prompt (rows prompt-major), each with its end-of-text where it stopped."""
    g = cfg.grpo
    rows = [p for p in prompts for _ in range(g.group_size)]
    sampling = Sampling(temperature=g.temperature, top_p=g.top_p)
    out = generate(dec, rows, g.max_new_tokens, sampling, seed=seed, stop_id=stop_id)
    return [c + [stop_id] if stop_id is not None and len(c) < g.max_new_tokens else c for c in out]


def to_rows(prompts: list[list[int]], completions: list[list[int]], group_size: int, seq_len: int) -> dict:
    """Next-token rows of prompt + completion, right-padded; the loss counts completion targets."""
    B = len(completions)
    rows = {k: np.zeros((B, seq_len), np.int32) for k in ("inputs", "targets", "loss_mask")}
    for b, completion in enumerate(completions):
        prompt = prompts[b // group_size]
        seq = np.asarray(prompt + completion, np.int32)
        n = len(seq) - 1
        rows["inputs"][b, :n], rows["targets"][b, :n] = seq[:-1], seq[1:]
        rows["loss_mask"][b, len(prompt) - 1: n] = 1
    return rows


def completion_text(tokenizer, tokens: list[int]) -> str:
    """The text rewards see: without end-of-text, and without ids a padded vocabulary has beyond the
    tokenizer's (an untrained model samples them; they are no text)."""
    return tokenizer.decode([t for t in tokens if t != tokenizer.eot_id and t < tokenizer.n_vocab])


def roll_out(dec: Decoder, prompts: Prompts, rewards: Rewards, tokenizer, cfg: Config, rollout: int) -> Rollouts:
    """Rollout batch number `rollout`: sample, decode, score, and the group advantages."""
    g = cfg.grpo
    chosen = prompts.indices(rollout)
    tokens = [prompts.tokens[i] for i in chosen]
    sampled = sample_completions(dec, tokens, cfg, rollout_seed(cfg.train.seed, rollout), tokenizer.eot_id)
    texts = [completion_text(tokenizer, c) for c in sampled]
    records = [prompts.records[i] for i in chosen for _ in range(g.group_size)]
    columns = {k: [r.get(k) for r in records] for k in records[0] if k != "prompt"}
    scores = rewards.score([r["prompt"] for r in records], texts, columns)
    rows = to_rows(tokens, sampled, g.group_size, prompts.row_len)
    advantage = group_advantages(scores["reward"].reshape(-1, g.group_size), g.advantage).reshape(-1, 1)
    rows["advantage"] = np.broadcast_to(advantage, rows["inputs"].shape).astype(np.float32)
    return Rollouts(rows, texts, scores, np.array([len(c) for c in sampled]))


def rollout_metrics(r: Rollouts, group_size: int) -> dict:
    """Reward mean and std (over completions), the within-group std, the answer accuracy, lengths."""
    reward = r.scores["reward"]
    out = {"reward_mean": float(reward.mean()), "reward_std": float(reward.std()),
           "reward_group_std": float(reward.reshape(-1, group_size).std(axis=1).mean()),
           "completion_len": float(r.lengths.mean())}
    if "reward/answer" in r.scores:
        out["accuracy"] = float(r.scores["reward/answer"].mean())
    return out
