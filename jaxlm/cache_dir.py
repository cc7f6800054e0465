"""jaxlm's cache directory: token streams, measured MFU peaks, compiled CPU kernels."""

from __future__ import annotations

import os

OFF = ("off", "0", "false", "none", "")


def cache_root() -> str | None:
    """$JAXLM_CACHE, else $XDG_CACHE_HOME/jaxlm, else ~/.cache/jaxlm; None when JAXLM_CACHE=off."""
    root = os.environ.get("JAXLM_CACHE")
    if root is not None and root.strip().lower() in OFF:
        return None
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "jaxlm")
    return root
