"""Known accelerators: dense bf16 peak FLOP/s and HBM bandwidth per chip, for MFU and rooflines.

Figures are the vendors' dense (no sparsity) numbers for the SXM / pod parts. A device not in the
table (a CPU, a PCIe or NVL card, anything newer) has no entry: MFU then measures a matmul.
Only bf16 is tabled: what an f32 matmul reaches depends on the backend's precision defaults
(TF32 on recent GPUs, bf16 passes on TPUs), so f32 peaks are measured, never looked up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jaxlm.errors import UserError


@dataclass(frozen=True)
class Device:
    name: str  # short name for `--device`
    bf16_flops: float  # dense bf16 FLOP/s per chip
    hbm_bytes_per_s: float  # HBM bandwidth per chip
    kind_pattern: str  # regex for jax's `device_kind`, matched in full, lower-case


DEVICES = (
    Device("h100", 989e12, 3350e9, r"nvidia h100(?!.*(pcie|nvl)).*"),  # SXM: "NVIDIA H100 80GB HBM3"
    Device("h200", 989e12, 4800e9, r"nvidia h200(?!.*nvl).*"),
    Device("a100", 312e12, 2039e9, r"nvidia a100\b.*"),  # bandwidth of the 80GB SXM part
    Device("v4", 275e12, 1200e9, r"tpu v4"),
    Device("v5e", 197e12, 819e9, r"tpu v5( lite|e)"),
    Device("v5p", 459e12, 2765e9, r"tpu v5p?"),
    Device("v6e", 918e12, 1640e9, r"tpu v6( lite|e)"),
)


def lookup(device_kind: str) -> Device | None:
    """The table entry for a `jax.Device.device_kind` string, or None when it is not known."""
    kind = " ".join(device_kind.lower().split())
    return next((d for d in DEVICES if re.fullmatch(d.kind_pattern, kind)), None)


def by_name(name: str) -> Device:
    """A device from its short name (`h100`) or a device_kind string; a UserError otherwise."""
    found = next((d for d in DEVICES if d.name == name.lower()), None) or lookup(name)
    if found is None:
        raise UserError(f"unknown device {name!r}; known: {', '.join(d.name for d in DEVICES)}")
    return found
