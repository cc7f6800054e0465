"""Raw text is tokenized once: the train/val token streams, cached on disk by what made them.

An entry is a directory `<cache>/tokens/<key>/` (cache: $JAXLM_CACHE, else $XDG_CACHE_HOME/jaxlm,
else ~/.cache/jaxlm; JAXLM_CACHE=off turns the cache off) whose key hashes the source files
(path, size, mtime and the data fingerprint), the tokenizer's hash and the split settings. It
holds the four arrays as .npy files and meta.json with each file's size and crc32, and appears
at once: written under a temporary name, then renamed. An entry that fails its check is rebuilt,
with a warning. Every process of a run reads the entry; on a miss each tokenizes for itself and
process 0 alone writes it, so no process ever waits on another.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import uuid
import zlib
from collections.abc import Callable

import numpy as np

from jaxlm.cache_dir import cache_root
from jaxlm.data.pipeline import TokenStream

FORMAT = 1
ARRAYS = ("train", "train_starts", "val", "val_starts")


def cache_dir() -> str | None:
    """Where token streams are cached; None when JAXLM_CACHE=off."""
    root = cache_root()
    return None if root is None else os.path.join(root, "tokens")


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **parts}, sort_keys=True).encode()).hexdigest()[:32]


def _warn(msg: str) -> None:
    print(f"jaxlm: warning: {msg}", file=sys.stderr, flush=True)


def _read(entry: str) -> tuple[TokenStream, TokenStream]:
    """The entry's streams; ValueError (or OSError) naming what is wrong when it fails its check."""
    with open(os.path.join(entry, "meta.json")) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format')!r}, not {FORMAT}")
    arrays = {}
    for name in ARRAYS:
        with open(os.path.join(entry, f"{name}.npy"), "rb") as f:
            data = f.read()
        want = meta["files"][name]
        if len(data) != want["bytes"] or zlib.crc32(data) != want["crc32"]:
            raise ValueError(f"{name}.npy does not match its size and checksum in meta.json")
        arrays[name] = np.load(io.BytesIO(data), allow_pickle=False)
    return (TokenStream([arrays["train"]], arrays["train_starts"]),
            TokenStream([arrays["val"]], arrays["val_starts"]))


def _write(entry: str, train: TokenStream, val: TokenStream, about: dict) -> None:
    """Writes the entry under a temporary name and renames it into place (a racing writer's
    finished entry is kept; ours is dropped)."""
    parent = os.path.dirname(entry)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(entry)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    os.makedirs(tmp)
    try:
        arrays = {"train": np.concatenate(train.pieces), "train_starts": train.doc_starts,
                  "val": np.concatenate(val.pieces), "val_starts": val.doc_starts}
        files = {}
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
            data = buf.getvalue()
            with open(os.path.join(tmp, f"{name}.npy"), "wb") as f:
                f.write(data)
            files[name] = {"bytes": len(data), "crc32": zlib.crc32(data)}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"format": FORMAT, "files": files, **about}, f, indent=1)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not os.path.isdir(entry):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left where the rename happened


def cached_streams(parts: dict, build: Callable[[], tuple[TokenStream, TokenStream]], *, writer: bool,
                   about: dict | None = None) -> tuple[TokenStream, TokenStream]:
    """The streams of the entry keyed by `parts`, or `build()`'s (then stored, where `writer`)."""
    root = cache_dir()
    if root is None:
        return build()
    entry = os.path.join(root, cache_key(parts))
    if os.path.isdir(entry):
        try:
            return _read(entry)
        except (OSError, ValueError, KeyError, TypeError) as e:
            _warn(f"token cache entry {entry} is damaged ({type(e).__name__}: {e}); tokenizing again")
            if writer:
                shutil.rmtree(entry, ignore_errors=True)
    train, val = build()
    if writer and not os.path.isdir(entry):
        try:
            _write(entry, train, val, about or {})
        except OSError as e:  # a read-only or full cache is no reason to stop training
            _warn(f"cannot write the token cache {entry} ({e.strerror or e}); set JAXLM_CACHE to a writable "
                  "directory, or JAXLM_CACHE=off")
    return train, val
