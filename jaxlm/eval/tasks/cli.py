"""`jaxlm tasks OUT_DIR [--text FILE]`: jaxlm's own lm-eval tasks as files, made offline.

  integer_arithmetic  generate_until, exact match: `37+5=` -> `42` (3 few-shot examples by default;
                      not `arithmetic`, which is a tag of lm-eval's own tasks)
  next_line           multiple choice (acc, acc_norm): which line of --text comes next; asked about
                      the last --holdout of the text (what a run trained on that one file with
                      data.val_fraction=0.05 never saw), few-shot examples from the rest

Then: jaxlm eval RUN --tasks integer_arithmetic,next_line --include-path OUT_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxlm.errors import UserError
from jaxlm.eval.tasks import arithmetic, next_line
from jaxlm.eval.tasks.files import ARITHMETIC, NEXT_LINE, write_task

FEWSHOT_POOL = 50  # records in each task's train split, where few-shot examples come from


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="directory to write the task directories into (pass it as --include-path)")
    parser.add_argument("--text", help="a UTF-8 text file for the next_line task (e.g. TinyShakespeare's input.txt)")
    parser.add_argument("--n", type=int, default=200, help="test documents per task (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout", type=float, default=0.05,
                        help="next_line asks about lines in this last fraction of the text (default 0.05)")


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"--text {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--text {path} is not UTF-8 text (byte {e.start})") from None


def main(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise UserError(f"--n {args.n} must be >= 1")
    if not 0 < args.holdout < 1:
        raise UserError(f"--holdout {args.holdout} must be in (0, 1)")
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    text = read_text(args.text) if args.text else None
    test = next_line.records(text, args.n, args.seed, region=(1 - args.holdout, 1.0)) if text else None
    fewshot = next_line.records(text, FEWSHOT_POOL, args.seed, region=(0.0, 1 - args.holdout)) if text else None
    arith_test = arithmetic.records(args.n, args.seed)
    arith_train = arithmetic.records(FEWSHOT_POOL, args.seed + 1, exclude={r["question"] for r in arith_test})
    written = [write_task(out, "integer_arithmetic", ARITHMETIC, {"train": arith_train, "test": arith_test})]
    if text is not None:
        written.append(write_task(out, "next_line", NEXT_LINE, {"train": fewshot, "validation": test}))
    for path in written:
        print(f"jaxlm: wrote {path}")
    return 0
