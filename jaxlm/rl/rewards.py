"""Reward functions (`grpo.rewards`): built-ins and user functions, summed with weights.

Every function has one signature, fn(prompts, completions, **columns) -> list[float], where
`columns` are the prompt records' other columns, one value per completion (a record's values
repeated for each of its completions). A user function is named 'module:function' (imported from
the working directory or the Python path). A function that raises, or returns something other
than one number per completion, stops the run with one line naming it.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from typing import Callable

import numpy as np

from jaxlm.config.schema import GRPOConfig
from jaxlm.errors import UserError

RewardFn = Callable[..., list]


def extract_answer(text: str, pattern: str) -> str | None:
    """The last match of `pattern` in `text` (its first group if it has one), or None."""
    found = list(re.finditer(pattern, text))
    if not found:
        return None
    last = found[-1]
    return (last.group(1) if last.re.groups else last.group(0)).strip()


def answer_reward(pattern: str, column: str) -> RewardFn:
    def answer(prompts, completions, **columns):
        if column not in columns:
            raise KeyError(f"the records have no '{column}' column (grpo.answer_column)")
        return [float(extract_answer(c, pattern) == str(a).strip()) for c, a in zip(completions, columns[column])]
    return answer


def format_reward(pattern: str) -> RewardFn:
    def format(prompts, completions, **columns):
        return [float(re.fullmatch(pattern, c, flags=re.DOTALL) is not None) for c in completions]
    return format


def length_reward(max_new_tokens: int) -> RewardFn:
    """Minus the completion's length as a share of the limit (characters per token taken as 1:
    the rewards see text); -1 at the limit."""
    def length(prompts, completions, **columns):
        return [-min(len(c) / max_new_tokens, 1.0) for c in completions]
    return length


def builtins(g: GRPOConfig) -> dict[str, RewardFn]:
    return {"answer": answer_reward(g.answer_pattern, g.answer_column), "format": format_reward(g.format_pattern),
            "length": length_reward(g.max_new_tokens)}


def load_function(name: str) -> RewardFn:
    """'module:function' imported; the working directory is searched first, as `python -m` does."""
    module, _, attr = name.partition(":")
    if not module or not attr:
        raise UserError(f"grpo.rewards: {name!r} is neither a built-in (answer, format, length) nor 'module:function'")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"grpo.rewards: cannot load {name!r} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise UserError(f"grpo.rewards: {name!r} is not a function")
    return fn


class Rewards:
    """The configured reward functions: `score` gives each one's rewards and their weighted sum."""

    def __init__(self, g: GRPOConfig):
        known = builtins(g)
        self.functions = [(r.fn, known.get(r.fn) or load_function(r.fn), r.weight) for r in g.rewards]

    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> dict[str, np.ndarray]:
        """{"reward": the weighted sum, "reward/<name>": each function's} per completion [N]."""
        out, total = {}, np.zeros(len(completions))
        for name, fn, weight in self.functions:
            values = call(name, fn, prompts, completions, columns)
            out[f"reward/{name}"] = values
            total += weight * values
        out["reward"] = total
        return out


def call(name: str, fn: RewardFn, prompts, completions, columns) -> np.ndarray:
    """One function's rewards, checked: one finite number per completion."""
    try:
        values = fn(prompts, completions, **columns)
    except Exception as e:  # a user's function: any failure becomes one line naming it
        first_line = (str(e).splitlines() or [""])[0]
        raise UserError(f"reward function {name!r} raised {type(e).__name__}: {first_line}") from None
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise UserError(f"reward function {name!r} returned {type(values).__name__}, not a list of numbers") from None
    if len(values) != len(completions):
        raise UserError(f"reward function {name!r} returned {len(values)} rewards for {len(completions)} completions; "
                        "return one per completion")
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"reward function {name!r} returned a non-finite reward")
    return np.asarray(values, np.float64)
