"""Multiple choice from a text: given some lines, which line comes next? `records(text, n, seed)`.

Each record is {"context": the lines before (about `context_chars` characters, starting at a
line start and ending with its newline), "choices": the true next line and `n_choices - 1`
other lines of the text of similar length (0.5x to 2x), shuffled, "label": the true one's index}.
Only lines of at least `min_chars` characters are asked for or offered (a speaker's name alone is
too easy). `region` picks where in the text the asked lines start, as fractions of its length:
the README keeps the last 5% for the test set (what training with data.val_fraction=0.05 holds
out of a single file) and draws few-shot examples from the rest.
"""

from __future__ import annotations

import bisect
import random

from jaxlm.errors import UserError


def lines_with_starts(text: str) -> list[tuple[int, str]]:
    out, start = [], 0
    for line in text.split("\n"):
        out.append((start, line))
        start += len(line) + 1
    return out


def records(text: str, n: int, seed: int = 0, *, region: tuple[float, float] = (0.0, 1.0), context_chars: int = 200,
            min_chars: int = 20, n_choices: int = 4) -> list[dict]:
    lines = lines_with_starts(text)
    pool = sorted({line for _, line in lines if len(line) >= min_chars}, key=lambda line: (len(line), line))
    lengths = [len(line) for line in pool]
    lo, hi = region[0] * len(text), region[1] * len(text)
    candidates = [i for i, (start, line) in enumerate(lines)
                  if i > 0 and lo <= start < hi and len(line) >= min_chars and start >= context_chars // 2]
    if len(candidates) < n or len(pool) < 4 * n_choices:
        raise UserError(f"the text has {len(candidates)} lines of >= {min_chars} characters in {region} of it; "
                        f"{n} were asked for (give a longer text or ask for fewer)")
    rng = random.Random(seed)
    out = []
    for i in sorted(rng.sample(candidates, n)):
        start, answer = lines[i]
        window = text[max(0, start - context_chars): start]
        context = (window[window.index("\n") + 1:] if "\n" in window[:-1] else window).lstrip("\n")
        near = pool[bisect.bisect_left(lengths, len(answer) / 2): bisect.bisect_right(lengths, 2 * len(answer))]
        similar = [line for line in near if line != answer]
        choices = rng.sample(similar, n_choices - 1) + [answer]
        rng.shuffle(choices)
        out.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return out
