"""`jaxlm config [PREFIX]`: every config key with its type, default and description.

Generated from the dataclasses in `jaxlm.config` (each key's `Doc[type, "description"]`), so the
listing cannot drift from what the loader accepts.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Literal

import yaml

from jaxlm.config import Config
from jaxlm.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prefix", nargs="?", default="",
                        help="show only keys starting with this, e.g. 'optim' or 'train.eval'")


def type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return "|".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is list:
        (item,) = args
        if dataclasses.is_dataclass(item):
            return "list of {" + ", ".join(f.name for f in dataclasses.fields(item)) + "}"
        return f"list of {type_name(item)}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def keys(cls=Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default as YAML, description) for every leaf key, in declaration order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    instance = cls()
    rows = []
    for f in dataclasses.fields(cls):
        hint, name = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            rows += keys(hint, f"{name}.")
            continue
        doc = hint.__metadata__[0] if typing.get_origin(hint) is typing.Annotated else ""
        tp = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        value = getattr(instance, f.name)
        if isinstance(value, list):  # a list of sections (grpo.rewards) is shown as mappings
            value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
        default = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
        default = default.removesuffix("\n...").removesuffix("...").strip()
        rows.append((name, type_name(tp), default, doc))
    return rows


def main(args: argparse.Namespace) -> int:
    rows = [r for r in keys() if r[0].startswith(args.prefix)]
    if not rows:
        sections = ", ".join(f.name for f in dataclasses.fields(Config))
        raise UserError(f"no config key starts with {args.prefix!r}; sections: {sections}")
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r[:3], widths)) + "  " + r[3])
    return 0
