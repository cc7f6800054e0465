"""The manifest that makes damage visible: size and crc32 of every file of a checkpoint step.

It is written inside orbax's temporary directory just before orbax renames it into place, so a
committed step always has one. A step is valid only if its manifest exists and every file
matches it: orbax's rename catches a killed save, the manifest catches truncated, deleted or
damaged files afterwards.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1

def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


# orbax rewrites its step metadata (and marks the commit) after the rename: not covered
UNCOVERED = {MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt"}


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*")
                  if p.is_file() and not (p.parent == step_dir and p.name in UNCOVERED))


def write_manifest(step_dir: Path) -> None:
    files = {str(p.relative_to(step_dir)): {"size": p.stat().st_size, "crc32": _crc32(p)} for p in _files(step_dir)}
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "files": files}, indent=1))
    os.replace(tmp, step_dir / MANIFEST)


def verify(step_dir: Path, checksums: bool = True) -> str | None:
    """None if the step directory matches its manifest, else the reason (one short phrase)."""
    if not step_dir.is_dir():
        return "directory missing"
    try:
        files = json.loads((step_dir / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    if not (isinstance(files, dict) and files and all(isinstance(w, dict) and {"size", "crc32"} <= w.keys()
                                                      for w in files.values())):
        return f"{MANIFEST} malformed (expected a size and crc32 per file)"
    for rel, want in files.items():
        p = step_dir / rel
        if not p.is_file():
            return f"file {rel} missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"file {rel} has {size} bytes, expected {want['size']}"
        if checksums and _crc32(p) != want["crc32"]:
            return f"file {rel} checksum mismatch"
    return None


