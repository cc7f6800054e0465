"""Speculative decoding: a small draft model proposes K tokens, the target scores them all in one
forward, and the modified rejection sampling keeps the output distribution exactly the target's
(Leviathan et al. 2023, Chen et al. 2023):

  accept draft token x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection
  draw from norm(max(0, p_i - q_i)) instead; if all K are accepted draw one more from p_{K+1}.

p and q are the distributions `sampling` draws from (temperature, top-k and top-p applied to
each model's logits; one-hot argmaxes when greedy, where this reduces to "keep the draft's
tokens while they equal the target's argmax"). Every round emits 1 to K+1 tokens per row.

Caches: each model's cache holds every position before the row's pending token (decode.py).
The draft writes its first K-1 proposals, so when all K are accepted it lacks the K-th; its
first step of the next round therefore runs two tokens (the one before the pending token, and
the pending one), rewriting a slot that may already hold the same keys. One round is one jitted
program: K draft steps, one target step, the acceptance rule.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import UserError
from jaxlm.inference.cache import bucket
from jaxlm.inference.decode import Decoder, Outputs, Program, check_room
from jaxlm.inference.sampling import Sampling, probabilities, sample


@dataclass
class SpeculativeStats:
    rounds: int = 0
    proposed: int = 0  # draft tokens proposed to rows still generating
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)


def check_pair(target: Decoder, draft: Decoder, target_tok, draft_tok) -> None:
    """One-line refusals: another tokenizer, or another vocabulary size."""
    if target_tok.hash != draft_tok.hash:
        raise UserError(f"the draft's tokenizer {draft_tok.name!r} ({draft_tok.hash[:12]}) differs from the "
                        f"target's {target_tok.name!r} ({target_tok.hash[:12]}); speculative decoding needs the same")
    v_t, v_d = target.cfg.model.vocab_size, draft.cfg.model.vocab_size
    if v_t != v_d:
        raise UserError(f"the draft's model.vocab_size={v_d} differs from the target's {v_t}; "
                        "speculative decoding needs the same vocabulary")


def accept(p_BJV, q_BKV, x_BK, key, sampling: Sampling):
    """The modified rejection sampling. p_BJV: the target's distributions at the K+1 positions
    after the pending token; q_BKV: the draft's at the first K, from which x_BK were drawn.
    Returns (n accepted [B], the token after them [B])."""
    K = x_BK.shape[1]
    k_accept, k_resample = jax.random.split(key)
    p_x = jnp.take_along_axis(p_BJV[:, :K], x_BK[..., None], axis=-1)[..., 0]
    q_x = jnp.take_along_axis(q_BKV, x_BK[..., None], axis=-1)[..., 0]
    u_BK = jax.random.uniform(k_accept, x_BK.shape)
    accepted_BK = u_BK * q_x < p_x  # u < p/q; q_x > 0 since x was drawn from q
    n_B = jnp.sum(jnp.cumprod(accepted_BK, axis=1), axis=1)
    # row n of [max(0, p - q) for the K drafts; p for the bonus position]
    residual_BJV = jnp.concatenate([jnp.maximum(p_BJV[:, :K] - q_BKV, 0.0), p_BJV[:, K:]], axis=1)
    r_BV = jnp.take_along_axis(residual_BJV, n_B[:, None, None], axis=1)[:, 0]
    total_B1 = jnp.sum(r_BV, axis=-1, keepdims=True)
    p_n_BV = jnp.take_along_axis(p_BJV, n_B[:, None, None], axis=1)[:, 0]
    r_BV = jnp.where(total_B1 > 0, r_BV / jnp.where(total_B1 > 0, total_B1, 1.0), p_n_BV)  # p == q: never rejected
    if sampling.greedy:
        z_B = jnp.argmax(r_BV, axis=-1)
    else:
        z_B = jax.random.categorical(k_resample, jnp.log(r_BV), axis=-1)
    return n_B.astype(jnp.int32), z_B.astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def make_round(target: Program, draft: Program, K: int, sampling: Sampling) -> Callable:
    """The jitted round, one per pair of programs (graphs and meshes, not weights: a cached round
    keeps no model alive), lookahead and sampling, so later calls reuse its compilation:
    (target params, draft params, target caches, draft caches, prev, pending, positions, round,
    key) -> (emitted [B, K+1] (-1 past the row's count), n accepted, pending, prev, positions,
    target caches, draft caches)."""

    def draft_probs_and_token(logits_BV, key):
        return probabilities(logits_BV, sampling), sample(logits_BV, key, sampling)

    def round_fn(tparams, dparams, tcaches, dcaches, prev_B, pending_B, pos_B, r, key):
        key = jax.random.fold_in(key, r)
        k_draft, k_accept = jax.random.split(key)
        draft_keys = jax.random.split(k_draft, K)
        # draft step 1 runs (prev, pending); at position 0 there is no prev: the same token twice
        first = pos_B == 0
        two_tokens = jnp.stack([jnp.where(first, pending_B, prev_B), pending_B], axis=1)
        two_positions = jnp.stack([jnp.where(first, pos_B, pos_B - 1), pos_B], axis=1)
        logits, dcaches = draft.forward(dparams, two_tokens, two_positions, dcaches)
        q_BV, x_B = draft_probs_and_token(logits[:, 1], draft_keys[0])

        def draft_step(carry, xs):
            x_B, dcaches = carry
            i, k = xs
            logits, dcaches = draft.forward(dparams, x_B[:, None], (pos_B + i)[:, None], dcaches)
            q_BV, x_next = draft_probs_and_token(logits[:, 0], k)
            return (x_next, dcaches), (q_BV, x_next)

        (_, dcaches), (qs, xs) = jax.lax.scan(draft_step, (x_B, dcaches), (jnp.arange(1, K), draft_keys[1:]))
        q_BKV = jnp.concatenate([q_BV[:, None], jnp.swapaxes(qs, 0, 1)], axis=1)
        x_BK = jnp.concatenate([x_B[:, None], xs.T], axis=1)
        # the target scores the pending token and the K proposals in one forward
        tokens = jnp.concatenate([pending_B[:, None], x_BK], axis=1)
        logits, tcaches = target.forward(tparams, tokens, pos_B[:, None] + jnp.arange(K + 1), tcaches)
        B, J, V = logits.shape
        p_BJV = probabilities(logits.reshape(B * J, V), sampling).reshape(B, J, V)
        n_B, z_B = accept(p_BJV, q_BKV, x_BK, k_accept, sampling)
        j = jnp.arange(K + 1)
        emitted = jnp.where(j < n_B[:, None], jnp.pad(x_BK, ((0, 0), (0, 1))), jnp.where(j == n_B[:, None], z_B[:, None], -1))
        prev = jnp.where(n_B > 0, jnp.take_along_axis(x_BK, jnp.maximum(n_B - 1, 0)[:, None], axis=1)[:, 0], pending_B)
        return emitted, n_B, z_B, prev, pos_B + n_B + 1, tcaches, dcaches

    return jax.jit(round_fn, donate_argnums=(2, 3))


def speculative_generate(target: Decoder, draft: Decoder, prompts: list[list[int]], max_new: int, lookahead: int,
                         sampling: Sampling, seed: int = 0, stop_id: int | None = None,
                         on_tokens: Callable[[int, list[int]], None] | None = None,
                         ) -> tuple[list[list[int]], SpeculativeStats]:
    """`generate` with a draft model proposing `lookahead` tokens per round; same output
    distribution as the target alone (identical output when greedy)."""
    if lookahead < 1:
        raise UserError(f"--lookahead {lookahead} must be >= 1")
    max_new = check_room(target, prompts, max_new)
    out, stats = Outputs(len(prompts), max_new, stop_id), SpeculativeStats()
    if max_new == 0:
        return out.tokens, stats
    length = bucket(max(len(p) for p in prompts) + max_new + lookahead + 1)
    tcaches, pending, pos = target.prefill(target.new_caches(len(prompts), length), prompts)
    dcaches, _, _ = draft.prefill(draft.new_caches(len(prompts), length), prompts)
    prev = jnp.asarray([p[-2] if len(p) > 1 else p[-1] for p in prompts], jnp.int32)
    round_fn = make_round(target.program, draft.program, lookahead, sampling)
    key = jax.random.key(seed)

    def read(emitted, n_accepted) -> bool:
        emitted, n_accepted = np.asarray(emitted), np.asarray(n_accepted)
        stats.rounds += 1
        for row in range(len(prompts)):
            if out.done[row]:
                continue
            stats.proposed += lookahead
            stats.accepted += int(n_accepted[row])
            kept = out.add(row, emitted[row, : n_accepted[row] + 1].tolist())
            if kept and on_tokens is not None:
                on_tokens(row, kept)
        return bool(out.done.all())

    queued = None
    for r in range(max_new):  # a round emits at least one token per row
        emitted, n, pending, prev, pos, tcaches, dcaches = round_fn(
            target.params, draft.params, tcaches, dcaches, prev, pending, pos, r, key)
        if queued is not None and read(*queued):
            return out.tokens, stats
        queued = (emitted, n)
    read(*queued)
    return out.tokens, stats
