"""Loading a config: a YAML file plus dotted CLI overrides, then the cross-key checks."""

from __future__ import annotations

from pathlib import Path

import yaml

from jaxlm.config.checks import validate
from jaxlm.config.schema import Config, from_dict
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
    """Reads YAML (or defaults when path is None), applies `a.b=value` overrides, validates."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ConfigError(f"config file {str(path)!r} {what}; expected a YAML file")
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {e.start}); expected a YAML file")
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
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
    if path is not None and "run_dir" not in (raw.get("train") or {}):
        cfg.train.run_dir = f"runs/{path.stem}"
    validate(cfg)
    return cfg


def _parse_override_value(item: str, value: str):
    if value == "":
        return None
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = str(e).splitlines()[0]
        raise ConfigError(f"override {item!r}: the value does not parse as YAML ({problem}); quote the whole "
                          "override so the shell passes it as one argument, e.g. 'mesh.rules={embed: null}'") from None
