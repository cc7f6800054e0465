"""Raw text for training: a user's files, or the embedded default corpus.

The default corpus is the Python standard library's own source, which every Python
installation ships, so `jaxlm train configs/tiny.yaml` needs no download and no data files.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path

from jaxlm.errors import UserError

DEFAULT_CORPUS_BYTES = 4_000_000


def default_corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py")
                   if not ({"site-packages", "test", "tests", "idlelib", "__pycache__"} & set(p.parts)))
    if not files:
        raise UserError(f"no Python standard library sources found under {stdlib}; set data.path to a text file")
    return files


def default_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES) -> list[str]:
    """Documents (one per stdlib module), up to max_bytes in a fixed order."""
    docs, total = [], 0
    for path in default_corpus_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return docs


def expand_inputs(spec: str) -> list[Path]:
    """A file, a directory (recursive), or a glob -> sorted file list."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    if not files:
        raise UserError(f"data.path={spec!r} matches no files; expected a text file, directory or glob")
    return files


def read_documents(spec: str) -> list[str]:
    docs = []
    for path in expand_inputs(spec):
        raw = path.read_bytes()
        try:
            docs.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text: undecodable byte at offset {e.start}")
    if not any(docs):
        raise UserError(f"data.path={spec!r} holds only empty files")
    return docs
