"""Prints the train.run_dir a `jaxlm train CONFIG [overrides]` command line will use, for the
launchers' shared-storage checks. Reads only the YAML (no jaxlm import: it runs where the
data and the accelerators may be missing); mirrors jaxlm.config: the config's train.run_dir,
else runs/<config file name>, then the last train.run_dir= override or --run-dir.
    python3 launch/run_dir.py CONFIG [section.key=value ...] [--run-dir DIR]
"""

import os
import sys
from pathlib import Path

import yaml


def run_dir(config: str, args: list[str]) -> str:
    train = (yaml.safe_load(Path(config).read_text()) or {}).get("train") or {}
    result = str(train.get("run_dir") or f"runs/{Path(config).stem}")
    for i, arg in enumerate(args):
        if arg.startswith("train.run_dir="):
            result = str(yaml.safe_load(arg.partition("=")[2]))
        elif arg.startswith("--run-dir="):
            result = arg.partition("=")[2]
        elif arg == "--run-dir" and i + 1 < len(args):
            result = args[i + 1]
    return result if "://" in result else os.path.normpath(result)


if __name__ == "__main__":
    print(run_dir(sys.argv[1], sys.argv[2:]))
