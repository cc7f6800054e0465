"""Keeping JAX from starting a TPU runtime on a machine that has no TPU.

With libtpu installed (the `tpu` extra, which `jaxlm compile` uses to compile for TPUs anywhere)
JAX starts the TPU runtime on every machine, and on one without a TPU it prints five lines of
errors about TPU hosts before falling back to the CPU. When the machine has no Google PCI device
(TPU chips are; JAX probes the same way) and no other accelerator plugin (CUDA, ROCm) is
installed, the CPU is the only backend JAX can end up with, so choosing it up front changes
nothing but the noise. Compiling for a TPU topology still works: it loads libtpu by itself.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from importlib import metadata
from pathlib import Path

GOOGLE_PCI_VENDOR = "0x1ae0"


def skip_absent_tpu() -> bool:
    """Sets JAX_PLATFORMS=cpu where nothing else could run; True if it did. `import jaxlm` calls
    it; it acts only if JAX is imported after. An explicit JAX_PLATFORMS or JAX_FORCE_TPU_INIT is
    left alone."""
    if os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_FORCE_TPU_INIT"):
        return False
    if importlib.util.find_spec("libtpu") is None:
        return False  # no TPU runtime to start: nothing to quiet
    if list(metadata.entry_points(group="jax_plugins")) or importlib.util.find_spec("jax_plugins"):
        return False  # a GPU plugin: let JAX pick
    if any(Path(v).read_text().strip() == GOOGLE_PCI_VENDOR for v in glob.glob("/sys/bus/pci/devices/*/vendor")):
        return False  # maybe a TPU (or a Google NIC): let JAX probe
    os.environ["JAX_PLATFORMS"] = "cpu"
    return True
