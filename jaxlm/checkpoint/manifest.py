"""The manifest that makes damage visible: every file's size, the metadata files' crc32, and a
digest of every saved array's values (`digest.py`).

It is written inside orbax's temporary directory just before orbax renames it into place, so a
committed step always has one. A save reads no data file back: process 0 stats every file and
crc32s the small metadata files; the arrays' digests were computed on the devices from the state
being saved, each device summing its own shards.

What sees which damage (a data file is one in an OCDBT `d/` directory: chunks and b-tree nodes):
  verify(step)               a missing, truncated or extended file; a changed metadata file
                             (its crc32). Cheap: stats and a few KiB read. Resume and the verbs do this.
  the restore itself         a changed OCDBT b-tree node or manifest (tensorstore's own crc32c:
                             DATA_LOSS) and a changed array value: restore_state and restore_params
                             check the restored arrays against the digests, in device memory
  verify(step, arrays=True)  reads every array to the host and checks its digest: the full check,
                             on request (`jaxlm checkpoint ls` without --quick)
So a flipped bit inside a data file, same size, passes a plain verify and fails the restore that
would use it (resume then falls back to the previous step). Manifests of format 1 carry a crc32
for every file; verify checks each crc32 a manifest has.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

from jaxlm.checkpoint.digest import mismatches, read_digests

MANIFEST = "manifest.json"
FORMAT = 2


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


def is_data_file(rel: str) -> bool:
    """OCDBT's data files (array chunks, b-tree nodes): guarded by digests and crc32c, not a crc32."""
    return Path(rel).parent.name == "d"


def read_manifest(step_dir: Path) -> dict:
    return json.loads((step_dir / MANIFEST).read_text())


def write_manifest(step_dir: Path, arrays: dict[str, int] | None = None) -> None:
    """Seals step_dir. `arrays` ({orbax name: digest}); None keeps those of the manifest there (a
    step whose metadata was edited and is sealed again)."""
    if arrays is None:
        try:
            arrays = read_manifest(step_dir).get("arrays")
        except (OSError, ValueError, AttributeError):
            arrays = None
    files = {}
    for p in _files(step_dir):
        rel = str(p.relative_to(step_dir))
        files[rel] = {"size": p.stat().st_size} if is_data_file(rel) else {"size": p.stat().st_size,
                                                                          "crc32": _crc32(p)}
    manifest = {"format": FORMAT, "files": files, **({"arrays": arrays} if arrays else {})}
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, step_dir / MANIFEST)


def _well_formed(m: dict) -> bool:
    files, arrays = m["files"], m.get("arrays", {})
    return (isinstance(files, dict) and bool(files)
            and all(isinstance(w, dict) and isinstance(w.get("size"), int) for w in files.values())
            and isinstance(arrays, dict) and all(isinstance(d, int) for d in arrays.values()))


def verify(step_dir: Path, checksums: bool = True, arrays: bool = False) -> str | None:
    """None if the step directory matches its manifest, else the reason (one short phrase).

    Sizes always; `checksums`: the crc32s the manifest has (metadata files); `arrays`: also read
    every array and check its digest (the whole checkpoint is read)."""
    if not step_dir.is_dir():
        return "directory missing"
    try:
        manifest = read_manifest(step_dir)
        ok = _well_formed(manifest)
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    if not ok:
        return f"{MANIFEST} malformed (expected a size per file and integer array digests)"
    for rel, want in manifest["files"].items():
        p = step_dir / rel
        if not p.is_file():
            return f"file {rel} missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"file {rel} has {size} bytes, expected {want['size']}"
        if checksums and "crc32" in want and _crc32(p) != want["crc32"]:
            return f"file {rel} checksum mismatch"
    if arrays and manifest.get("arrays"):
        return array_damage(step_dir, manifest["arrays"])
    return None


def array_damage(step_dir: Path, want: dict[str, int]) -> str | None:
    """Reads the saved arrays to the host: the reason if one differs from its digest, else None."""
    try:
        got = read_digests((step_dir / "state").absolute())
    except Exception as e:  # noqa: BLE001 - tensorstore reports damage in many exception types
        return f"state unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    bad = mismatches(want, got) + sorted(set(want) - set(got))
    return f"array {bad[0]} differs from its digest ({len(bad)} array(s) in all)" if bad else None
