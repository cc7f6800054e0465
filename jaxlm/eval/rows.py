"""How a loglikelihood request becomes a row of model input, and the shapes rows are padded to."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass
class Row:
    """One request laid out for the model: what it reads, what is scored, where."""

    inputs: list[int]
    targets: list[int]
    scored: int  # the last `scored` positions carry the continuation's targets


def next_token_row(context: list[int], continuation: list[int], max_len: int) -> Row:
    whole = (context + continuation)[-(max_len + 1):]
    return Row(whole[:-1], whole[1:], len(continuation))


def elbo_row(context: list[int], continuation: list[int], max_len: int) -> Row:
    """Masked diffusion reads the clean sequence and predicts its own (masked) tokens."""
    whole = (context + continuation)[-max_len:]
    return Row(whole, whole, len(continuation))


def length_bucket(n: int, cap: int) -> int:
    """16, 24, 32, 48, 64, 96, ...: at most a third of a row is padding, two shapes per octave."""
    size = 16
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return min(size, max(cap, n))


def digest(tokens: list[int]) -> int:
    """A row's own random stream (elbo): a function of its tokens alone, not of its batch."""
    return int.from_bytes(hashlib.blake2b(np.asarray(tokens, np.int64).tobytes(), digest_size=4).digest(), "little")
