"""Budget forcing (s1: "simple test-time scaling"): control how long a model thinks.

`min_new`: the stop token (end-of-text, or a chat template's end-of-turn) is suppressed, its logit
set to -inf inside the jitted step, until a row has that many new tokens, so the model keeps going.
`think`: at that many new tokens the thinking ends: the `cue` tokens (e.g. "\\nFinal answer:") are
forced in as the next tokens, then decoding goes on for the answer. A row that stops before
`think` (unsuppressed) has ended and gets no cue.

Every row starts decoding at step 0, so step i makes new token i of every row: the controls of a
step depend on i alone and are made on the host without waiting for the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NO_FORCE = -1  # a force_B entry that lets the row sample


class StepControls(NamedTuple):
    """One decode step's per-row controls (a pytree, an argument of the jitted step)."""

    suppress_B: jax.Array  # bool [B]: the stop token may not be sampled
    force_B: jax.Array  # int32 [B]: the token this step emits instead of sampling, or NO_FORCE
    stop: jax.Array  # int32 []: the stop token's id (-1: none)


def mask_stop(logits_BV: jax.Array, c: StepControls) -> jax.Array:
    """The logits with the stop token at -inf in the rows that suppress it."""
    is_stop_V = jnp.arange(logits_BV.shape[-1]) == c.stop
    return jnp.where(c.suppress_B[:, None] & is_stop_V[None, :], -jnp.inf, logits_BV)


@dataclass(frozen=True)
class Budget:
    min_new: int = 0  # no stop token before this many new tokens
    think: int | None = None  # new tokens of thinking before the cue; None: no thinking phase
    cue: tuple[int, ...] = ()  # the answer cue's tokens, forced in after `think` tokens

    def total(self, max_new: int) -> int:
        """Steps in all: with a thinking phase, the thinking, the cue, then up to `max_new` answer tokens."""
        return max_new if self.think is None else self.think + len(self.cue) + max_new

    def forced(self, i: int) -> int:
        """The token new position i is forced to, or NO_FORCE."""
        if self.think is not None and 0 <= i - self.think < len(self.cue):
            return self.cue[i - self.think]
        return NO_FORCE

    def controls(self, i: int, rows: int, stop_id: int | None) -> StepControls:
        """The controls of step i (which makes new token i of every row)."""
        return StepControls(np.full(rows, i < self.min_new), np.full(rows, self.forced(i), np.int32),
                            np.int32(-1 if stop_id is None else stop_id))
