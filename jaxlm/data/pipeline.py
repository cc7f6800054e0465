"""Token streams -> rows (windows or packed documents) -> global batches -> this process's slice.

Everything is a grain MapDataset with random access: a row is a pure function of its index,
shuffles are seeded permutations (a new one each epoch), a mixture interleaves its sources
deterministically by weight. So the iterator state is one integer (the next batch index) and a
restored iterator yields exactly the batches the uninterrupted one would have.

A global batch b holds rows [b*G, (b+1)*G); process p of P reads only rows [p*G/P, (p+1)*G/P).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import grain
import jax
import numpy as np

from jaxlm.data.batch import Batch
from jaxlm.errors import UserError


@dataclass
class TokenStream:
    """One split's tokens (arrays read as if concatenated, e.g. memory-mapped shards) and the
    offsets where documents start (each document ends with its <|endoftext|>)."""

    pieces: list[np.ndarray]
    doc_starts: np.ndarray  # int64, ascending, starts with 0

    def __post_init__(self):
        self.bounds = np.cumsum([0] + [len(p) for p in self.pieces])

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        out, end = [], start + length
        k = int(np.searchsorted(self.bounds, start, side="right")) - 1
        while start < end:
            lo = start - self.bounds[k]
            take = min(end - start, len(self.pieces[k]) - lo)
            out.append(self.pieces[k][lo: lo + take])
            start += take
            k += 1
        return np.concatenate(out).astype(np.int32)


class Windows:
    """Non-overlapping windows of seq_len+1 tokens (crossing document boundaries, GPT-style)."""

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        self.n = (len(stream) - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        w = self.stream.read(i * self.seq_len, self.seq_len + 1)
        return {"inputs": w[:-1], "targets": w[1:], "loss_mask": np.ones(self.seq_len, np.int32)}


class PackedRows:
    """Whole documents packed into rows of seq_len (next-fit, in corpus order) with segment ids
    (1, 2, ... per document; 0 = padding) and positions restarting at 0 in each document.
    The inputs are the documents' own tokens, each exactly once, <|endoftext|> included (so an
    objective that reads the sequence itself, like MDLM, sees where documents end); a token's
    target is the next token of its document, and a document's last token has none (loss_mask 0).
    A document longer than a row is cut into pieces of seq_len tokens, each its own segment.
    Padding has loss_mask 0."""

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        ends = np.append(stream.doc_starts[1:], len(stream))
        starts, lengths, last, rows, fill = [], [], [], [], seq_len  # fill = seq_len forces a new first row
        for doc_start, doc_end in zip(stream.doc_starts.tolist(), ends.tolist()):
            for piece in range(doc_start, doc_end, seq_len):
                n = min(seq_len, doc_end - piece)  # tokens in this piece
                if fill + n > seq_len:
                    rows.append(len(starts))
                    fill = 0
                starts.append(piece)
                lengths.append(n)
                last.append(piece + n == doc_end)
                fill += n
        self.starts, self.lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
        self.ends_document = np.asarray(last, bool)  # the piece holds its document's last token
        self.row_ptr = np.asarray(rows + [len(starts)], np.int64)

    def __len__(self) -> int:
        return len(self.row_ptr) - 1

    def __getitem__(self, i: int) -> dict:
        T = self.seq_len
        row = {k: np.zeros(T, np.int32) for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
        fill = 0
        for seg, j in enumerate(range(self.row_ptr[i], self.row_ptr[i + 1]), start=1):
            n = int(self.lengths[j])
            scored = n - 1 if self.ends_document[j] else n  # pairs whose target is in the document
            tokens = self.stream.read(int(self.starts[j]), scored + 1)
            row["inputs"][fill: fill + n] = tokens[:n]
            row["targets"][fill: fill + scored], row["loss_mask"][fill: fill + scored] = tokens[1:], 1
            row["segment_ids"][fill: fill + n], row["positions"][fill: fill + n] = seg, np.arange(n)
            fill += n
        return row

    def efficiency(self) -> float:
        """Fraction of row slots that hold tokens (the rest is padding)."""
        return float(self.lengths.sum()) / max(len(self) * self.seq_len, 1)


def row_dataset(stream: TokenStream, seq_len: int, packing: bool, seed: int | None, what: str) -> grain.MapDataset:
    """Rows of one source, shuffled with a new permutation each epoch (unless seed is None), endless."""
    source = PackedRows(stream, seq_len) if packing else Windows(stream, seq_len)
    if len(source) == 0:
        raise UserError(f"{what} has {len(stream)} tokens, not enough for one row of data.seq_len={seq_len}; "
                        "use more data or a smaller data.seq_len")
    ds = grain.MapDataset.source(source)
    if seed is not None:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(None)


class Mixture:
    """Rows of endless datasets interleaved in a fixed cycle whose counts are the weights' shares
    to 1e-3 (rounded to thousandths, then reduced: 0.7/0.3 is exactly 7:3), spread evenly over
    the cycle (each row goes to the source furthest behind its share). grain's own mix scales the
    smallest weight to 100 and truncates the rest (0.7/0.3 became 233:100)."""

    def __init__(self, datasets: list, weights: list[float]):
        total = sum(weights)
        counts = [max(1, round(1000 * w / total)) for w in weights]
        g = math.gcd(*counts)
        self.datasets, self.counts = datasets, [c // g for c in counts]
        n, taken, self.cycle = sum(self.counts), [0] * len(counts), []  # cycle: (source, its row in the cycle)
        for r in range(n):
            k = max(range(len(counts)), key=lambda i: (r + 1) * self.counts[i] / n - taken[i])
            self.cycle.append((k, taken[k]))
            taken[k] += 1

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, i: int):
        lap, r = divmod(i, len(self.cycle))
        k, j = self.cycle[r]
        return self.datasets[k][lap * self.counts[k] + j]


def mixture(datasets: list[grain.MapDataset], weights: list[float]) -> grain.MapDataset:
    """Interleaves endless datasets so that row proportions follow the weights."""
    return datasets[0] if len(datasets) == 1 else grain.MapDataset.source(Mixture(datasets, weights))


class BatchIterator:
    """Yields this process's slice of each global batch as numpy arrays; state = next batch index."""

    def __init__(self, dataset: grain.MapDataset, global_batch: int,
                 process_index: int | None = None, process_count: int | None = None, start: int = 0,
                 check=None):
        self.dataset, self.global_batch, self.check = dataset, global_batch, check  # check(batch): refuse bad ones
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

    def __next__(self) -> Batch:
        rows = [self.dataset[i] for i in self.local_rows(self.next_index)]
        self.next_index += 1
        batch = Batch.stack(rows)
        if self.check is not None:
            self.check(batch)
        return batch

    def get_state(self) -> dict:
        return {"next_index": self.next_index}

    def set_state(self, state: dict) -> None:
        self.next_index = int(state["next_index"])


def to_global(local: Batch, sharding) -> Batch:
    """Assemble the processes' slices into global jax.Arrays laid out by `sharding`."""
    return local.map(lambda v: jax.make_array_from_process_local_data(sharding, v))
