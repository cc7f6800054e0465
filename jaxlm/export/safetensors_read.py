"""Reading tensors from model.safetensors (or its shards + index) one at a time, into memory the
caller owns: the header says where each tensor's bytes are, and they are read with one pread.

Why not the `safetensors` package: its numpy reader has no bfloat16 (every Llama 3 and Qwen
checkpoint is bf16), and it maps whole files, whose pages then count in the importer's resident
memory until the file is closed. Here each tensor is mapped on its own (`get`), so its pages
leave when it has been copied into its parameter, or read straight into the parameter
(`read_into`).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxlm.errors import UserError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFiles:
    """The tensors of an HF model directory: names, shapes and dtypes from the headers, data on demand."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise UserError(f"{path}: no model.safetensors (or index); only safetensors checkpoints are imported")
        self.path = path
        self.where: dict[str, tuple[Path, int, dict]] = {}  # name -> (file, start of data, header entry)
        for name in files:
            f = path / name
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for tensor, entry in header.items():
                if tensor != "__metadata__":
                    self.where[tensor] = (f, 8 + n, entry)

    def entry(self, name: str, shape: tuple) -> tuple[Path, int, dict]:
        found = self.where.get(name)
        if found is None:
            raise UserError(f"{self.path}: tensor {name} is missing")
        entry = found[2]
        if tuple(entry["shape"]) != tuple(shape):
            raise UserError(f"{self.path}: tensor {name} has shape {tuple(entry['shape'])}, expected {tuple(shape)}")
        if entry["dtype"] not in DTYPES:
            raise UserError(f"{self.path}: tensor {name} has dtype {entry['dtype']}; expected a float type")
        return found

    def dtype(self, name: str, shape: tuple):
        return np.dtype(DTYPES[self.entry(name, shape)[2]["dtype"]])

    def read_into(self, name: str, shape: tuple, out: np.ndarray) -> np.ndarray:
        """The tensor's bytes straight into `out` (C-contiguous, of the tensor's shape and dtype)."""
        f, start, entry = self.entry(name, shape)
        begin, end = entry["data_offsets"]
        view = memoryview(out.reshape(-1).view(np.uint8))
        if view.nbytes != end - begin:
            raise UserError(f"{self.path}: tensor {name} holds {end - begin} bytes, expected {view.nbytes}")
        with open(f, "rb", buffering=0) as fh:
            done = 0
            while done < view.nbytes:  # pread may return less than asked for large reads
                got = os.preadv(fh.fileno(), [view[done:]], start + begin + done)
                if got <= 0:
                    raise UserError(f"{self.path}: {f.name} ends inside tensor {name}")
                done += got
        return out

    def get(self, name: str, shape: tuple) -> np.ndarray:
        """The tensor as a read-only view of a memory map of its own bytes only: no copy is made,
        and the pages leave the process's memory when the view is dropped."""
        f, start, entry = self.entry(name, shape)
        begin, end = entry["data_offsets"]
        dtype = np.dtype(DTYPES[entry["dtype"]])
        if end == begin:
            return np.empty(shape, dtype)
        offset = start + begin
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        with open(f, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), offset + (end - begin) - base, offset=base, access=mmap.ACCESS_READ)
        return np.frombuffer(mapped, dtype, count=(end - begin) // dtype.itemsize, offset=offset - base).reshape(shape)


def aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """np.empty at a 64-byte boundary: JAX's CPU client then takes the buffer as it is (no copy)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    offset = (-raw.ctypes.data) % 64
    return raw[offset: offset + nbytes].view(dtype).reshape(shape)
