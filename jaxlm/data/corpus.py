"""Raw text for training: a user's files, or the embedded default corpus.

The default corpus is the Python standard library's own source, which every Python
installation ships, so `jaxlm train configs/tiny.yaml` needs no download and no data files.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from pathlib import Path

from jaxlm.data.formats import iter_documents, saved_dataset_files
from jaxlm.errors import UserError

DEFAULT_CORPUS_BYTES = 4_000_000
_GLOB_CHARS = set("*?[")


def default_corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py")
                   if not ({"site-packages", "test", "tests", "idlelib", "__pycache__"} & set(p.parts)))
    if not files:
        raise UserError(f"no Python standard library sources found under {stdlib}; set data.path to a text file")
    return files


def default_corpus_paths(max_bytes: int = DEFAULT_CORPUS_BYTES) -> list[Path]:
    """The standard library files of the default corpus: the first ones (sorted) up to max_bytes."""
    paths, total = [], 0
    for path in default_corpus_files():
        paths.append(path)
        total += path.stat().st_size
        if total >= max_bytes:
            break
    return paths


def default_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES) -> list[str]:
    """Documents (one per stdlib module), up to max_bytes in a fixed order."""
    return [path.read_text(encoding="utf-8", errors="replace") for path in default_corpus_paths(max_bytes)]


def _walk(directory: str) -> list[str]:
    """The files under `directory` (hidden entries skipped) in path order; a saved Hugging Face
    dataset inside stands for its Arrow files, in its own (row) order."""
    groups: list[tuple[str, list[str]]] = []
    for d, subdirs, names in os.walk(directory):
        if (arrow := saved_dataset_files(d)) is not None:
            subdirs[:] = []
            groups.append((os.path.join(d, ""), arrow))
            continue
        subdirs[:] = [s for s in subdirs if not s.startswith(".")]
        groups += [(os.path.join(d, n), [os.path.join(d, n)]) for n in names if not n.startswith(".")]
    return [f for _, files in sorted(groups) for f in files]


def expand_inputs(inputs: list[str], exclude: str | None = None) -> list[str]:
    """Files, recursive directories (hidden entries skipped; a saved Hugging Face dataset is its
    Arrow files) and globs -> ordered file list."""
    files: list[str] = []
    for spec in inputs:
        if os.path.isdir(spec):
            found = _walk(spec)
        elif os.path.isfile(spec):
            found = [spec]
        elif _GLOB_CHARS & set(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        else:
            raise UserError(f"input {spec} does not exist")
        if exclude:
            found = [f for f in found if not os.path.abspath(f).startswith(os.path.abspath(exclude) + os.sep)]
        if not found:
            raise UserError(f"input {spec} matches no files")
        files += found
    files = list(dict.fromkeys(os.path.abspath(f) for f in files))
    for f in files:
        if os.path.getsize(f) == 0:
            raise UserError(f"input {f} is empty")
    return files


def read_documents(spec: str, text_field: str = "text") -> list[str]:
    """Every document of the files `spec` names (data/formats.py: text, JSONL, parquet, saved
    datasets, compressed), in order; empty ones are left out."""
    docs = [doc for path in expand_inputs([spec]) for doc in iter_documents(path, text_field)]
    if not docs:
        raise UserError(f"{spec} holds no text (every document is empty)")
    return docs


def in_val_split(doc: str, val_fraction: float) -> bool:
    """A document's split is a function of its text alone: spread over the corpus, stable when
    other documents come or go, and identical documents never straddle train and validation."""
    digest = hashlib.blake2b(doc.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64
