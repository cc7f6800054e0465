"""Next-token log-likelihoods with each distinct context run once: multiple choice asks about
several continuations of one context, and its context is most of the tokens.

A request's row is lm-eval's (context + continuation, left-truncated to max_seq_len + 1 tokens,
the last dropped). It splits into a prefix (the row up to the position that predicts the
continuation's first token) and a block (the context's last token and the continuation but its
last), whose logits predict the continuation. Requests with the same prefix share one KV-cache
row: chunks of `rows` distinct prefixes, longest first, are prefilled into a cache, and their
requests' blocks run over it in batches of `rows`, each block reading its prefix's row at its own
positions (the cache of inference/decode.py: slot s holds position s, and a query sees only the
slots up to its position, so padding and the leftovers of longer prefixes stay unseen). For
4-way choices after contexts five times their length that is about a third of the work of
running every request whole.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.eval.rows import Row, length_bucket
from jaxlm.inference.cache import bucket
from jaxlm.inference.per_layer import cache_length


def block_scores(dec, params, caches, owner_B, tokens_BT, targets_BT, scored_BT, start_B):
    """(sum of the scored targets' log-probabilities [B], every scored target the argmax [B]) of
    blocks at positions start_B.., each over cache row owner_B of `caches`."""
    caches_B = jax.tree.map(lambda a: jnp.take(a, owner_B, axis=0), caches)  # per layer [B, S, K, d]
    positions_BT = start_B[:, None] + jnp.arange(tokens_BT.shape[1], dtype=jnp.int32)[None, :]
    logits_BTV, _ = dec.forward(params, tokens_BT, positions_BT, caches_B)
    logp_BT = jnp.take_along_axis(jax.nn.log_softmax(logits_BTV, axis=-1), targets_BT[..., None], axis=-1)[..., 0]
    greedy_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
    return jnp.sum(jnp.where(scored_BT, logp_BT, 0.0), axis=1), jnp.all(greedy_BT | ~scored_BT, axis=1)


def split(row: Row) -> tuple[tuple[int, ...], int]:
    """(the prefix a cache holds, where the block starts)."""
    start = len(row.inputs) - row.scored
    return tuple(row.inputs[:start]), start


def score(scorer, rows: list[Row]) -> list:
    """Queued (request indices, device results) per block batch; see the module docstring."""
    B = scorer.batch_rows
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(split(row)[0], []).append(i)
    prefixes = sorted(groups, key=len, reverse=True)
    queued = []
    for first in range(0, len(prefixes), B):
        chunk = prefixes[first: first + B]
        members = sorted(((j, i) for j, p in enumerate(chunk) for i in groups[p]), key=lambda m: -rows[m[1]].scored)
        caches = prefill(scorer, chunk, length_bucket(rows[members[0][1]].scored, scorer.max_len))
        for m in range(0, len(members), B):
            batch = members[m: m + B]
            queued.append(([i for _, i in batch], scorer.block_fn(scorer.params, caches, *blocks(scorer, rows, batch))))
    return queued


def prefill(scorer, chunk: list[tuple[int, ...]], longest_block: int):
    """A cache of B rows holding the chunk's prefixes (written all at once; padding lands in slots
    no query of its row will see)."""
    B, longest = scorer.batch_rows, len(chunk[0])
    caches = scorer.dec.new_caches(B, bucket(longest + longest_block))
    if longest == 0:
        return caches
    S = cache_length(caches)
    tokens = np.zeros((B, min(length_bucket(longest, scorer.max_len), S)), np.int32)
    for j, prefix in enumerate(chunk):
        tokens[j, : len(prefix)] = prefix
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    return scorer.dec.prefill_fn(scorer.params, scorer.put(tokens), scorer.put(positions), caches)


def blocks(scorer, rows: list[Row], batch: list[tuple[int, int]]) -> tuple:
    """owner [B], tokens, targets and scored mask [B, T], start [B], placed; padding rows score nothing."""
    B, T = scorer.batch_rows, length_bucket(max(rows[i].scored for _, i in batch), scorer.max_len)
    owner, start = np.zeros(B, np.int32), np.zeros(B, np.int32)
    tokens, targets, scored = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32), np.zeros((B, T), bool)
    for b, (j, i) in enumerate(batch):
        row, n = rows[i], rows[i].scored
        owner[b], start[b] = j, split(row)[1]
        tokens[b, :n], targets[b, :n], scored[b, :n] = row.inputs[start[b]:], row.targets[start[b]:], True
    return tuple(map(scorer.put, (owner, tokens, targets, scored, start)))
