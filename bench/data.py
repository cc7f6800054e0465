"""Where the benchmarks read their text: a folder named by the environment variable JAXLM_BENCH_DATA
(or a script's own argument), laid out as

    tinyshakespeare/input.txt          https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
    cs336_fixtures/gpt2_vocab.json     GPT-2's vocab.json
    cs336_fixtures/gpt2_merges.txt     GPT-2's merges.txt
    cs336_fixtures/corpus.en           any English text (BPE training benchmark)

e.g. `JAXLM_BENCH_DATA=~/data python bench/time_to_loss.py ...`.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "JAXLM_BENCH_DATA"


def bench_data(relative: str, required: bool = True) -> Path | None:
    """JAXLM_BENCH_DATA/relative; a one-line exit naming the variable when it is needed and missing."""
    root = os.environ.get(ENV)
    path = Path(root).expanduser() / relative if root else None
    if path is not None and path.is_file():
        return path
    if required:
        where = f"{ENV}={root} has no {relative}" if root else f"set {ENV} to a folder holding {relative}"
        raise SystemExit(f"{Path(__import__('sys').argv[0]).name}: {where} (see bench/data.py)")
    return None
