"""Bit-exact training per backend: `train.deterministic: auto | true | false`.

CPU and TPU programs are deterministic as XLA compiles them, so `auto` means true there and costs
nothing. On GPU, determinism needs XLA's deterministic ops (no atomics in reductions and scatters,
deterministic cuBLAS/cuDNN algorithms, and an autotuner that takes its first candidate instead of
the fastest measured one, so a resumed process compiles the same kernels) and an attention kernel
whose backward has no atomics (the Pallas kernel, not cuDNN's; see model/kernels.py). It costs
speed, so `auto` means false on GPU and the run says once that resume is not bit-exact.

XLA reads XLA_FLAGS once, when JAX starts its backend, and aborts on a flag it does not know, so
`configure()` runs before that and sets only flags this jaxlib's XLA was built with.
"""

from __future__ import annotations

import glob
import importlib.util
import mmap
import os
import sys
from pathlib import Path

from jaxlm.errors import ConfigError

GPU_FLAGS = ("--xla_gpu_deterministic_ops=true",)


def resolve(setting, platform: str) -> bool:
    """The train.deterministic setting for a platform: auto = deterministic where it is free."""
    return platform != "gpu" if setting == "auto" else bool(setting)


def gpu_plugin_installed() -> bool:
    """Whether JAX may start on a GPU (a CUDA or ROCm plugin is installed and not excluded)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and not any(p in platforms for p in ("cuda", "gpu", "rocm")):
        return False
    return any(importlib.util.find_spec(name) is not None for name in
               ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin"))


def _xla_libraries() -> list[Path]:
    """The shared objects that hold XLA's flag table: jaxlib's, and the GPU plugins'."""
    found = []
    for name in ("jaxlib", "jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin"):
        spec = importlib.util.find_spec(name)
        for root in (spec.submodule_search_locations or []) if spec else []:
            found += [Path(p) for p in glob.glob(os.path.join(root, "**", "*.so"), recursive=True)]
    return found


def known_xla_flags(flags, libraries: list[Path] | None = None) -> list[str]:
    """The flags whose names appear in XLA's libraries (XLA aborts on any other)."""
    names = {flag: flag.lstrip("-").split("=")[0].encode() for flag in flags}
    left, known = dict(names), []
    for lib in _xla_libraries() if libraries is None else libraries:
        if not left:
            break
        try:
            with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                for flag, name in list(left.items()):
                    if data.find(name) >= 0:
                        known.append(flag)
                        del left[flag]
        except (OSError, ValueError):  # unreadable or empty file
            continue
    return [flag for flag in flags if flag in known]


def configure(setting) -> list[str]:
    """Before JAX starts its backend: adds the GPU determinism flags to XLA_FLAGS when this run
    may start on a GPU and asks for determinism (true; auto is false on GPU). Returns what it added."""
    if setting is not True or not gpu_plugin_installed():
        return []
    current = os.environ.get("XLA_FLAGS", "")
    missing = [f for f in GPU_FLAGS if f.split("=")[0] not in current]
    added = known_xla_flags(missing)
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def check(setting, platform: str) -> bool:
    """After the backend started: the resolved choice for this run. Refuses determinism on a GPU
    whose XLA started without the flags; says once when resume will not be bit-exact."""
    deterministic = resolve(setting, platform)
    if platform == "gpu" and deterministic:
        flags = os.environ.get("XLA_FLAGS", "")
        if not all(f.split("=")[0] in flags for f in GPU_FLAGS):
            raise ConfigError("train.deterministic=true on GPU needs XLA_FLAGS=" + " ".join(GPU_FLAGS) + " before "
                              "JAX starts; `jaxlm train` sets it, or call jaxlm.parallel.determinism.configure(True) first")
    if platform == "gpu" and not deterministic:
        print(f"jaxlm: note: train.deterministic={setting} on {platform.upper()}: two runs, or a resumed run and an "
              "uninterrupted one, may differ in the last bits; set train.deterministic=true for bit-exact runs",
              file=sys.stderr)
    return deterministic


def resume_note(saved: dict | None, now: dict) -> str | None:
    """A line for a resume whose record ({"deterministic", "platform", "mesh"}) differs from the
    checkpoint's, or None (also for what checkpoints that predate a field did not record).

    A different mesh reduces in a different order (on every backend), so such a resume matches an
    uninterrupted run within float tolerance, not bit for bit."""
    if saved is None:
        return None
    describe = lambda r: f"deterministic={str(r['deterministic']).lower()} on {r['platform'].upper()}"
    mesh = lambda r: " ".join(f"{axis}={size}" for axis, size in r["mesh"].items() if size > 1) or "one device"
    changes = []
    if (saved["deterministic"], saved["platform"]) != (now["deterministic"], now["platform"]):
        changes.append(f"with {describe(saved)}, this run is {describe(now)}")
    if "mesh" in saved and saved["mesh"] != now["mesh"]:
        changes.append(f"on mesh {mesh(saved)}, this run's is {mesh(now)}")
    if not changes:
        return None
    return (f"the checkpoint was written {'; and '.join(changes)}: the resumed run need not match an uninterrupted one "
            "bit for bit")
