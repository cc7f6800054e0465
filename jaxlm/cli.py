"""`jaxlm <verb>`: each verb lives in its own module with `add_arguments(parser)` and `main(args)`.

Modules are imported only when their verb runs, so `jaxlm --help` stays fast. A `UserError`
anywhere below becomes one line on stderr and its exit code (2 for bad input, 1 for a failed run).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from jaxlm import __version__
from jaxlm.errors import UserError

VERBS = {
    "train": ("jaxlm.train.run", "train (or resume) a model from a YAML config"),
    "rl": ("jaxlm.rl.cli", "reinforcement learning with verifiable rewards (GRPO) from a YAML config"),
    "accounting": ("jaxlm.tools.accounting", "parameters, FLOPs and memory of a config"),
    "tokenizer": ("jaxlm.tokenizer.cli", "train, inspect or convert tokenizers"),
    "prepare": ("jaxlm.data.prepare", "tokenize a corpus into token shards"),
    "checkpoint": ("jaxlm.checkpoint.cli", "list and inspect checkpoints of a run"),
    "compile": ("jaxlm.tools.compile", "AOT-compile the train step for a TPU topology and size it"),
    "plot": ("jaxlm.tools.plot", "plot training curves of one or more runs into an image"),
    "config": ("jaxlm.config.cli", "list every config key with its type, default and description"),
    "export": ("jaxlm.export.cli", "export a checkpoint to Hugging Face (safetensors) or llama.cpp (GGUF)"),
    "prune": ("jaxlm.tools.prune", "prune a run (magnitude, N:M, FFN channels, heads) into a new run to retrain"),
    "import": ("jaxlm.export.importer", "import Hugging Face weights into a run directory to fine-tune"),
    "generate": ("jaxlm.inference.cli_generate", "generate text from a checkpoint (KV cache, sampling, speculative)"),
    "eval": ("jaxlm.eval.cli", "loss, perplexity and bits per byte on a text, or lm-eval task scores"),
    "tasks": ("jaxlm.eval.tasks.cli", "write jaxlm's own lm-eval task files (TinyShakespeare choice, arithmetic)"),
}


class OneLineParser(argparse.ArgumentParser):
    """Argument errors in one line (argparse prints its usage block first), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def os_error_line(e: OSError) -> str:
    """A file-system failure as one line: the path and the system's reason."""
    where = f"{e.filename} -> {e.filename2}" if e.filename2 else e.filename
    return f"{where}: {e.strerror}" if where and e.strerror else str(e).splitlines()[0]


def quiet_broken_pipe() -> int:
    """The reader of stdout closed it (`jaxlm checkpoint ls RUN | head -3`): it took what it wanted,
    so stop quietly with success, as `ls | head` does. stdout goes to /dev/null so Python's flush
    at exit does not raise again (the recipe in Python's `signal` documentation)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = OneLineParser(prog="jaxlm", description="Train transformer language models with JAX.")
    parser.add_argument("--version", action="version", version=f"jaxlm {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (_, help_text) in VERBS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help", "--version") or argv[0] not in VERBS:
        if argv and argv[0] == "--version":
            parser.parse_args(argv[:1])  # prints the version and exits 0
        if argv and argv[0] not in ("-h", "--help"):
            print(f"jaxlm: unknown command {argv[0]!r}; expected one of {', '.join(VERBS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0 if argv else 2  # `jaxlm` alone: the help, as a usage error
    verb = argv[0]
    module = importlib.import_module(VERBS[verb][0])
    verb_parser = OneLineParser(prog=f"jaxlm {verb}", description=VERBS[verb][1])
    module.add_arguments(verb_parser)
    try:  # flags may follow positional overrides (`train CONFIG a.b=1 --run-dir X`)
        args = verb_parser.parse_intermixed_args(argv[1:])
    except TypeError:  # verbs with sub-commands cannot be parsed intermixed
        args = verb_parser.parse_args(argv[1:])
    try:
        code = module.main(args) or 0
        sys.stdout.flush()  # inside the try: a reader that left (`| head`) is seen here, not at exit
        return code
    except BrokenPipeError:
        return quiet_broken_pipe()
    except UserError as e:
        print(f"jaxlm {verb}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a path the user gave that cannot be read or written (a file in the way, a full disk)
        print(f"jaxlm {verb}: error: {os_error_line(e)}", file=sys.stderr)
        return 1 if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO) else 2
    except KeyboardInterrupt:
        print(f"jaxlm {verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
