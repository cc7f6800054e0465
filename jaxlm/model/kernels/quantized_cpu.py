"""A CPU matmul that reads group-quantized weights as codes (quantized_cpu.cc), for decoding.

XLA:CPU has no fast dot over int8 or int4 weights: the int8 x int8 dot is a scalar loop, and a
dot cannot fuse the dequantization into its operand, so a quantized matrix is written out in f32
(four times the bytes of int8) before every matmul, and decoding, which reads each weight once
per token, gets slower rather than faster. This kernel is an XLA FFI custom call compiled from
C++ on first use with the machine's compiler (g++ or $CXX) into jaxlm's cache (x86-64; a few
seconds, once per machine). Where it cannot be built, `available()` is False after one warning
line and callers keep the XLA path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.cache_dir import cache_root

SOURCE = Path(__file__).with_name("quantized_cpu.cc")
TARGET = "jaxlm_quantized_matmul"
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC"]
MAX_ROWS = 64  # beyond this many rows (a long prompt) XLA's dequantize-then-dot is faster (measured)

_state: dict = {}


def _library_path() -> Path:
    """The compiled kernel, keyed by its source, the flags, jax's FFI headers and this CPU."""
    cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "") \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, jax.ffi.include_dir(), jax.__version__,
                                    platform.machine(), cpu]).encode()).hexdigest()[:16]
    root = cache_root() or tempfile.gettempdir()
    return Path(root) / "kernels" / f"quantized_cpu-{key}.so"


def _compile(out: Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    done = subprocess.run([compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(tmp)],
                          capture_output=True, text=True)
    if done.returncode:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{compiler} failed: {(done.stderr.strip().splitlines() or ['?'])[0]}")
    os.replace(tmp, out)  # whole or absent, also when several processes build it at once


def available() -> bool:
    """Whether the kernel is built and registered (built on the first call; a failure is said once)."""
    if "ok" not in _state:
        try:
            path = _library_path()
            if not path.exists():
                _compile(path)
            library = ctypes.cdll.LoadLibrary(str(path))
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.QuantizedMatmul), platform="cpu")
            _state.update(ok=True, library=library)
        except (OSError, RuntimeError) as e:
            print(f"jaxlm: warning: the CPU quantized-matmul kernel could not be built ({e}); "
                  "quantized weights are dequantized before each matmul instead", file=sys.stderr)
            _state["ok"] = False
    return _state["ok"]


def quantized_matmul(x_MK: jax.Array, codes_GRN: jax.Array, scale_G1N: jax.Array, offset_G1N: jax.Array | None,
                     bits: int, zero: float) -> jax.Array:
    """x [M, K] @ the dequantized [G * g, N] matrix (its rows past K are zero weights), f32."""
    (M, K), (G, R, N) = x_MK.shape, codes_GRN.shape
    g = R * (8 // bits)
    x = jnp.pad(x_MK.astype(jnp.float32), [(0, 0), (0, G * g - K)])
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((M, N), jnp.float32))
    return call(x, codes_GRN, scale_G1N, scale_G1N if offset_G1N is None else offset_G1N,
                bits=np.int64(bits), zero=np.float32(zero), has_offset=np.int64(offset_G1N is not None))
