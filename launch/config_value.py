"""Prints the value a `jaxlm train CONFIG [overrides]` command line gives one config key, for the
launchers' checks before they start anything (train.run_dir on shared storage, data.path set).
Reads only the YAML (no jaxlm import: it runs where the data and the accelerators may be
missing) and mirrors jaxlm.config: the config's value, then the last KEY=value override (values
parse as YAML); train.run_dir defaults to runs/<config file name>, takes --run-dir too, and is
printed normalised. An unset key prints nothing.
    python3 launch/config_value.py KEY CONFIG [section.key=value ...] [--run-dir DIR]
"""

import os
import sys
from pathlib import Path

import yaml


def config_value(key: str, config: str, args: list[str]) -> str:
    node = yaml.safe_load(Path(config).read_text()) or {}
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    value = node
    if key == "train.run_dir" and not value:
        value = f"runs/{Path(config).stem}"
    for i, arg in enumerate(args):
        if arg.startswith(f"{key}="):
            value = yaml.safe_load(arg.partition("=")[2])
        elif key == "train.run_dir" and arg.startswith("--run-dir="):
            value = arg.partition("=")[2]
        elif key == "train.run_dir" and arg == "--run-dir" and i + 1 < len(args):
            value = args[i + 1]
    if value is None or value == [] or value == "":
        return ""
    value = str(value)
    return os.path.normpath(value) if key == "train.run_dir" and "://" not in value else value


if __name__ == "__main__":
    print(config_value(sys.argv[1], sys.argv[2], sys.argv[3:]))
