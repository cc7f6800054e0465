"""Token windows -> shuffled global batches -> this process's slice, as grain datasets.

A global batch b holds the dataset elements [b*G, (b+1)*G); process p of P reads only the
rows [p*G/P, (p+1)*G/P) of it. Element access is random (grain MapDataset), so the iterator
state is one integer, the next batch index, and a restored iterator yields exactly the
batches the uninterrupted one would have.
"""

from __future__ import annotations

import grain
import jax
import numpy as np

from jaxlm.errors import UserError


class Windows:
    """Non-overlapping windows of seq_len+1 tokens over a 1-D token array (a grain source)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        w = np.asarray(self.tokens[i * self.seq_len: (i + 1) * self.seq_len + 1], dtype=np.int32)
        return {"inputs": w[:-1], "targets": w[1:], "loss_mask": np.ones(self.seq_len, np.int32)}


def window_dataset(tokens: np.ndarray, seq_len: int, seed: int | None, what: str) -> grain.MapDataset:
    source = Windows(tokens, seq_len)
    if len(source) == 0:
        raise UserError(f"the {what} split has {len(tokens)} tokens, fewer than one window of data.seq_len+1="
                        f"{seq_len + 1}; use more data or a smaller data.seq_len")
    ds = grain.MapDataset.source(source)
    if seed is not None:
        ds = ds.shuffle(seed=seed)  # a new permutation every epoch
    return ds.repeat(None)


class BatchIterator:
    """Yields this process's slice of each global batch as numpy arrays; state = next batch index."""

    def __init__(self, dataset: grain.MapDataset, global_batch: int,
                 process_index: int | None = None, process_count: int | None = None, start: int = 0):
        self.dataset, self.global_batch = dataset, global_batch
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch % self.process_count:
            raise UserError(f"train.global_batch={global_batch} must be divisible by the {self.process_count} processes")
        self.local_batch = global_batch // self.process_count
        self.next_index = start

    def local_rows(self, batch_index: int) -> range:
        first = batch_index * self.global_batch + self.process_index * self.local_batch
        return range(first, first + self.local_batch)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = [self.dataset[i] for i in self.local_rows(self.next_index)]
        self.next_index += 1
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def get_state(self) -> dict:
        return {"next_index": self.next_index}

    def set_state(self, state: dict) -> None:
        self.next_index = int(state["next_index"])


def to_global(local: dict, sharding) -> dict:
    """Assemble the processes' slices into global jax.Arrays laid out by `sharding`."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
