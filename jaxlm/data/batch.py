"""The batch schema: one definition of what a training batch holds.

The data pipeline builds it, the train and eval steps take it, `jaxlm compile` compiles against
`Batch.abstract` of the same config, so every one of them sees the same program inputs.
Rows are token-aligned: inputs[t] is read, targets[t] is scored where loss_mask[t] is 1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

CORE = ("inputs", "targets", "loss_mask")  # every batch
PACKED = ("positions", "segment_ids")  # batches of packed documents (data.packing)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Batch:
    inputs: Any  # [B, T] int32 token ids the model reads
    targets: Any  # [B, T] int32 token ids the loss scores (next-token: inputs shifted by one)
    loss_mask: Any  # [B, T] int32: 1 where the target counts
    positions: Any = None  # [B, T] int32, restarting at 0 in each document; None = 0..T-1
    segment_ids: Any = None  # [B, T] int32 document ids (0 = padding); None = one document per row
    extra: dict = field(default_factory=dict)  # an objective's own per-row fields, [B, ...]

    @staticmethod
    def field_names(packing: bool) -> tuple[str, ...]:
        return CORE + PACKED if packing else CORE

    @classmethod
    def from_arrays(cls, arrays: dict) -> "Batch":
        """From a dict of arrays: the schema's names become fields, the rest go to `extra`."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in arrays.items() if k in names},
                   extra={k: v for k, v in arrays.items() if k not in names})

    def map(self, fn: Callable) -> "Batch":
        return jax.tree.map(fn, self)

    def token_mask(self):
        """Bool [B, T], True where the row holds a real input token. A packed row's segment id 0 is
        padding; a row without segment ids is one piece of text whose inputs and targets are real
        at the same places, where the loss mask is 1 (windows: everywhere; filler rows: nowhere)."""
        return self.loss_mask > 0 if self.segment_ids is None else self.segment_ids > 0

    @property
    def rows(self) -> int:
        return self.inputs.shape[0]

    @classmethod
    def abstract(cls, global_batch: int, seq_len: int, packing: bool, sharding=None,
                 extra: dict[str, tuple[tuple[int, ...], Any]] | None = None) -> "Batch":
        """ShapeDtypeStructs of a global batch (never allocated); `extra` = {name: (row shape, dtype)}."""
        row = lambda shape, dtype: jax.ShapeDtypeStruct((global_batch, *shape), dtype, sharding=sharding)
        fields = {k: row((seq_len,), jnp.int32) for k in cls.field_names(packing)}
        return cls(**fields, extra={k: row(shape, dtype) for k, (shape, dtype) in (extra or {}).items()})

    @classmethod
    def from_tokens(cls, tokens) -> "Batch":
        """Next-token rows from [B, T + 1] token ids (every target counts): benches and tests."""
        return cls(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=np.ones_like(tokens[:, 1:], np.int32))

    @classmethod
    def stack(cls, rows: list[dict]) -> "Batch":
        """Host rows (dicts of numpy arrays, as the pipeline yields them) -> one numpy Batch."""
        return cls.from_arrays({k: np.stack([r[k] for r in rows]) for k in rows[0]})
