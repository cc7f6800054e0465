"""Outputs that appear whole or not at all: written under a temporary name beside the target,
then renamed into place (an existing target, with --force, is swapped out and removed after)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from jaxlm.errors import RunFailed, UserError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(out: Path, force: bool, directory: bool):
    """Yields a temporary path (an empty directory if `directory`) that becomes `out` on success;
    on any exception, including KeyboardInterrupt, the temporary is removed and `out` is untouched."""
    if (out.exists() or out.is_symlink()) and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        _remove(tmp)
        # a failed write (a full disk; safetensors reports it as its own error type): one line, exit 1
        if isinstance(e, OSError) or type(e).__module__.startswith("safetensors"):
            raise RunFailed(f"writing {out} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                            f"{out} is left as it was") from e
        raise
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        _remove(old)
        os.replace(out, old)
        os.replace(tmp, out)
        _remove(old)
    else:
        os.replace(tmp, out)
