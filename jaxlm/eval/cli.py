"""`jaxlm eval RUN_DIR --data PATH | --tasks NAMES`: a checkpoint's loss on a text, or its scores
on lm-evaluation-harness tasks.

--data: loss, perplexity and bits per byte as JSON (jaxlm/inference/cli_eval.py).
--tasks: lm-eval's tasks (its registry, and task YAML files under --include-path) run through
JaxlmLM (harness.py); lm-eval's result JSON goes to --output (else stdout), its table to stderr.
Needs the `eval` extra (pip install 'jaxlm[eval]').
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxlm import checkpoint as ckpt
from jaxlm.compress.schemes import SCHEMES
from jaxlm.errors import UserError
from jaxlm.inference import cli_eval

# flags only one mode reads (dest -> mode): given to the other, they are refused, not ignored
ONLY = {"split": "--data", "max_tokens": "--data", "include_path": "--tasks", "limit": "--tasks",
        "num_fewshot": "--tasks", "output": "--tasks", "batch_size": "--tasks",
        "elbo_samples": "--tasks", "log_samples": "--tasks"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (with checkpoints/) written by `jaxlm train`")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="a text file, directory or glob, or a prepared corpus: loss, perplexity, "
                                     "bits per byte")
    what.add_argument("--tasks", help="comma-separated lm-eval task names (or task YAML files)")
    parser.add_argument("--step", type=ckpt.step_arg,
                        help="the checkpoint step to load, or 'best' (lowest eval loss); default: the newest valid one")
    parser.add_argument("--quantize", choices=list(SCHEMES), metavar="SCHEME",
                        help=f"score with weight-only quantized weights: {', '.join(SCHEMES)}")
    data = parser.add_argument_group("--data")
    data.add_argument("--split", choices=cli_eval.SPLITS,
                      help="val: what training held out (data.val_fraction of the run's text, or a prepared corpus's "
                           "validation split); train; all. Default: val for the run's own data or a prepared "
                           "corpus, else all")
    data.add_argument("--max-tokens", type=int, default=0, help="score about this many tokens at most (0 = all)")
    tasks = parser.add_argument_group("--tasks")
    tasks.add_argument("--include-path", help="a directory of lm-eval task YAML files (e.g. from `jaxlm tasks`)")
    tasks.add_argument("--limit", type=float, help="at most this many documents per task (below 1: a fraction)")
    tasks.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    tasks.add_argument("--output", help="write lm-eval's result JSON here (default: stdout)")
    tasks.add_argument("--batch-size", type=int, default=32, help="rows per batch (default 32)")
    tasks.add_argument("--elbo-samples", type=int, default=16,
                       help="mdlm runs: times t per request in the ELBO estimate (default 16)")
    tasks.add_argument("--log-samples", action="store_true", help="keep every document's requests and answers "
                                                                   "in the JSON (\"samples\")")


def refuse_other_modes_flags(args: argparse.Namespace) -> None:
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    mode = "--data" if args.data is not None else "--tasks"
    wrong = [dest for dest, owner in ONLY.items()
             if owner != mode and getattr(args, dest) != defaults.get_default(dest)]
    if wrong:
        flags = ", ".join("--" + d.replace("_", "-") for d in wrong)
        raise UserError(f"{flags}: only used with {ONLY[wrong[0]]}, not with {mode}")


def check_task_arguments(args: argparse.Namespace) -> None:
    for flag, value, low in (("--limit", args.limit, 0), ("--num-fewshot", args.num_fewshot, 0)):
        if value is not None and value < low:
            raise UserError(f"{flag} {value:g} must be >= {low}")
    if args.limit is not None and args.limit >= 1 and args.limit != int(args.limit):
        raise UserError(f"--limit {args.limit:g}: expected a whole number of documents, or a fraction below 1")
    if args.output and os.path.isdir(args.output):
        raise UserError(f"--output {args.output} is a directory; expected a file name for the result JSON")


def run_tasks(args: argparse.Namespace) -> dict:
    """lm-eval's results for the tasks, through the run's JaxlmLM."""
    check_task_arguments(args)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("--tasks needs EleutherAI's lm-evaluation-harness: pip install 'jaxlm[eval]'") from None
    from lm_eval.evaluator import simple_evaluate

    from jaxlm.checkpoint.runs import load_run
    from jaxlm.eval import registry
    from jaxlm.eval.harness import JaxlmLM

    names = registry.split_names(args.tasks)
    registry.check_include_path(args.include_path)
    manager = registry.task_manager(names, args.include_path)
    built = registry.load_tasks(manager, names)
    lm = JaxlmLM(load_run(args.run_dir, args.step), args.batch_size, args.quantize, args.elbo_samples)
    if lm.scorer.method == "elbo":
        print(f"jaxlm: {args.run_dir} is a masked diffusion run: loglikelihood is {lm.scorer.describe()} "
              f"({args.elbo_samples} samples per request)", file=sys.stderr, flush=True)
    limit = None if args.limit is None else (args.limit if args.limit < 1 else int(args.limit))
    return simple_evaluate(model=lm, tasks=built, num_fewshot=args.num_fewshot, limit=limit, task_manager=manager,
                           log_samples=args.log_samples)


def write_results(results: dict, output: str | None) -> None:
    """lm-eval's JSON (as its CLI writes it) to `output`, whole or not at all, else to stdout."""
    from lm_eval.utils import handle_non_serializable, make_table

    if not results.get("samples"):
        results.pop("samples", None)
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"
    print(make_table(results), file=sys.stderr)
    if output is None:
        sys.stdout.write(text)
        return
    tmp = f"{output}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(args: argparse.Namespace) -> int:
    refuse_other_modes_flags(args)
    if args.data is not None:
        print(json.dumps(cli_eval.evaluate(args.run_dir, args.data, args.split, args.step, args.max_tokens,
                                                  args.quantize)))
        return 0
    write_results(run_tasks(args), args.output)
    return 0
