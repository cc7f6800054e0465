"""`jaxlm rl CONFIG [section.key=value ...]`: GRPO (train.objective: grpo), or its resume."""

from __future__ import annotations

import argparse

from jaxlm.train.run import add_arguments as add_train_arguments
from jaxlm.train.run import run_verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from jaxlm.rl.loop import train_grpo

    return run_verb(args, "rl", train_grpo)
