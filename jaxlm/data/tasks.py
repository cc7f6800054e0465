"""A built-in synthetic instruction task, generated with a seed: integer arithmetic.

`arithmetic(n_train, n_test, seed)` draws distinct problems "a + b" / "a - b" (a, b < 10**digits),
so the held-out problems are never seen in training; records are chat records (sft) and
preference records (dpo: the chosen reply is the right answer, the rejected one a near miss:
one digit changed). Offline and deterministic: demonstrations and tests need no download.
(Until the evaluation package ships its own task module, this one lives with the data.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

QUESTION = "What is {a} {op} {b}?"


def problems(n: int, seed: int, digits: int = 2, ops: str = "+-") -> list[tuple[int, str, int]]:
    """n distinct (a, op, b), in a seeded order."""
    rng = np.random.default_rng(seed)
    top = 10**digits
    if n > len(ops) * top * top:
        raise ValueError(f"only {len(ops) * top * top} distinct problems with {digits} digits and ops {ops!r}")
    seen, out = set(), []
    while len(out) < n:
        p = (int(rng.integers(top)), ops[int(rng.integers(len(ops)))], int(rng.integers(top)))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def answer(a: int, op: str, b: int) -> str:
    return str(a + b if op == "+" else a - b)


def near_miss(right: str, rng: np.random.Generator) -> str:
    """The right answer with one of its digits changed: never equal to it, no leading zero."""
    digits = [i for i, c in enumerate(right) if c.isdigit()]
    while True:
        i = digits[int(rng.integers(len(digits)))]
        wrong = right[:i] + str((int(right[i]) + int(rng.integers(1, 10))) % 10) + right[i + 1:]
        number = wrong.lstrip("-")
        if not (len(number) > 1 and number[0] == "0") and wrong != "-0":
            return wrong


def chat_record(p: tuple[int, str, int]) -> dict:
    a, op, b = p
    return {"messages": [{"role": "user", "content": QUESTION.format(a=a, op=op, b=b)},
                         {"role": "assistant", "content": answer(a, op, b)}]}


def preference_record(p: tuple[int, str, int], rng: np.random.Generator) -> dict:
    a, op, b = p
    right = answer(a, op, b)
    return {"prompt": QUESTION.format(a=a, op=op, b=b), "chosen": right, "rejected": near_miss(right, rng)}


def arithmetic(n_train: int, n_test: int, seed: int = 0, digits: int = 2, ops: str = "+-",
               kind: str = "chat") -> tuple[list[dict], list[dict]]:
    """(train, test) records over disjoint problems; kind "chat" (sft) or "preference" (dpo)."""
    ps = problems(n_train + n_test, seed, digits, ops)
    rng = np.random.default_rng(seed + 1)
    make = chat_record if kind == "chat" else (lambda p: preference_record(p, rng))
    records = [make(p) for p in ps]
    return records[:n_train], records[n_train:]


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
