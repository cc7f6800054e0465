"""Integer arithmetic questions with exact answers, from a seed: `records(n, seed)`.

Each record is {"question": "37+5=", "answer": "42", "a": 37, "b": 5, "op": "+"}; differences
are never negative (the larger operand comes first). Questions within one call are distinct, and
`exclude` keeps another set's questions out (few-shot examples apart from the test set).
"""

from __future__ import annotations

import random

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
