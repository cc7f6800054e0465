"""Integer arithmetic questions with exact answers, from a seed: `records(n, seed)`.

Each record is {"question": "37+5=", "answer": "42", "a": 37, "b": 5, "op": "+"}; differences
are never negative (the larger operand comes first). Questions within one call are distinct, and
`exclude` keeps another set's questions out (few-shot examples apart from the test set).
`arithmetic(n_train, n_test)` gives the same problems as chat records (sft), preference records
(dpo) or prompt records with their answer (grpo), and `write_jsonl` writes them for `data.path`. Offline and deterministic.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from jaxlm.errors import UserError

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def records(n: int, seed: int = 0, *, max_operand: int = 99, ops: str = "+-",
            exclude: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """`n` distinct questions with operands in 0..max_operand and operators from `ops`."""
    if n < 0 or max_operand < 1 or not ops or set(ops) - set(OPS):
        raise UserError(f"arithmetic records: n={n} must be >= 0, max_operand={max_operand} >= 1, and ops={ops!r} "
                        f"drawn from {''.join(OPS)!r}")
    rng, seen, out = random.Random(seed), set(exclude), []
    for _ in range(100 * n + 100):
        if len(out) == n:
            return out
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
        if op == "-" and a < b:
            a, b = b, a
        question = f"{a}{op}{b}="
        if question not in seen:
            seen.add(question)
            out.append({"question": question, "answer": str(OPS[op](a, b)), "a": a, "b": b, "op": op})
    raise UserError(f"arithmetic records: could not draw {n} distinct questions with operands up to {max_operand} "
                    f"and ops {ops!r}; ask for fewer or raise max_operand")


# The same problems as instruction records (sft, dpo): asked as a question, answered alone.
QUESTION = "What is {a} {op} {b}?"


def near_miss(right: str, rng: random.Random) -> str:
    """The right answer with one of its digits changed: never equal to it, no leading zero."""
    digits = [i for i, c in enumerate(right) if c.isdigit()]
    while True:
        i = rng.choice(digits)
        wrong = right[:i] + str((int(right[i]) + rng.randint(1, 9)) % 10) + right[i + 1:]
        number = wrong.lstrip("-")
        if not (len(number) > 1 and number[0] == "0") and wrong != "-0":
            return wrong


def chat_record(r: dict) -> dict:
    return {"messages": [{"role": "user", "content": QUESTION.format(**r)},
                         {"role": "assistant", "content": r["answer"]}]}


def preference_record(r: dict, rng: random.Random) -> dict:
    """dpo: the chosen reply is the right answer, the rejected one a near miss."""
    return {"prompt": QUESTION.format(**r), "chosen": r["answer"], "rejected": near_miss(r["answer"], rng)}


def prompt_record(r: dict) -> dict:
    """grpo: the question as the prompt, the answer as the column the answer reward checks."""
    return {"prompt": QUESTION.format(**r), "answer": r["answer"]}


def arithmetic(n_train: int, n_test: int, seed: int = 0, max_operand: int = 99, ops: str = "+-",
               kind: str = "chat") -> tuple[list[dict], list[dict]]:
    """(train, test) instruction records over distinct problems (the test problems are never
    trained on); kind "chat" (sft), "preference" (dpo) or "prompt" (grpo)."""
    rng = random.Random(seed + 1)
    make = {"chat": chat_record, "prompt": prompt_record}.get(kind) or (lambda r: preference_record(r, rng))
    out = [make(r) for r in records(n_train + n_test, seed, max_operand=max_operand, ops=ops)]
    return out[:n_train], out[n_train:]


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
