"""Loading a config: a YAML file (merged over its `base:` chain) plus dotted CLI overrides, then the
cross-key checks."""

from __future__ import annotations

from pathlib import Path

import yaml

from jaxlm.config.checks import validate
from jaxlm.config.convert import from_dict
from jaxlm.config.schema import Config
from jaxlm.errors import ConfigError


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (YAML would keep the
    last silently, so an edit near the top of a config could be undone by an old line below)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Reads YAML (or defaults when path is None) with its `base:` chain, applies `a.b=value`
    overrides, validates."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        raw = read_yaml(path)
    cfg = config_from(raw, overrides)
    if path is not None and "run_dir" not in (raw.get("train") or {}):
        cfg.train.run_dir = f"runs/{path.stem}"
    return cfg


def config_from(raw: dict, overrides: list[str] = ()) -> Config:
    """The validated config of plain data (a saved config's dict) with `a.b=value` overrides applied."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        *parents, leaf = key.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = _parse_override_value(item, value)
    cfg = from_dict(Config, raw, prefix="")
    validate(cfg)
    return cfg


def read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The mapping in `path` merged over its `base:` file (relative to `path`), recursively.

    Sections merge key by key (nested mappings too); any other value replaces the base's. A base's
    `train.run_dir` is not inherited: a config derived from another writes its own run
    (runs/<its name>), never into the run of the file it starts from.
    """
    raw = _read_mapping(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {str(path)!r}: base={base!r} must be the path of a YAML file, relative to "
                          "this file")
    base_path = path.parent / base
    here = path.resolve()
    if base_path.resolve() in chain + (here,):
        cycle = " -> ".join(str(p) for p in chain + (here, base_path.resolve()))
        raise ConfigError(f"config file {str(path)!r}: base {base!r} makes a cycle ({cycle}); a base may not "
                          "include a file that includes it")
    if not base_path.is_file():
        raise ConfigError(f"config file {str(path)!r}: base {base!r} ({base_path}) does not exist; expected a YAML "
                          "file, relative to the file that names it")
    inherited = read_yaml(base_path, chain + (here,))
    if isinstance(inherited.get("train"), dict):
        inherited["train"] = {k: v for k, v in inherited["train"].items() if k != "run_dir"}
    return merge(inherited, raw)


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: mappings merge key by key, other values (lists too) replace."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_mapping(path: Path) -> dict:
    """One YAML file's mapping; every problem is one line naming the file (and line and column)."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {str(path)!r} {what}; expected a YAML file")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except yaml.MarkedYAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(e)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {e.start}); expected a YAML file")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def _yaml_problem(e: yaml.MarkedYAMLError) -> str:
    """'line L, column C: problem (context at line l, column c)', 1-based as editors count."""
    at = lambda mark: f"line {mark.line + 1}, column {mark.column + 1}"
    if e.problem_mark is None:
        return f"{at(e.context_mark)}: {e.context}" if e.context_mark else str(e).splitlines()[0]
    context = f" ({e.context} at {at(e.context_mark)})" if e.context and e.context_mark else ""
    return f"{at(e.problem_mark)}: {e.problem}{context}"


def _parse_override_value(item: str, value: str):
    if value == "":
        return None
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = str(e).splitlines()[0]
        raise ConfigError(f"override {item!r}: the value does not parse as YAML ({problem}); quote the whole "
                          "override so the shell passes it as one argument, e.g. 'mesh.rules={embed: null}'") from None
