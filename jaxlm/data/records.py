"""Chat and preference records (JSONL, Parquet) -> rows of the Batch schema, for sft and dpo.

Records:
  sft:  {"messages": [{"role", "content"}, ...]}, or {"prompt", "completion"} (strings, or lists of
        messages; a string prompt is a user turn, a string completion an assistant turn)
  dpo:  {"prompt", "chosen", "rejected"} (the same forms as prompt and completion)
Files: .jsonl/.json (one record per line) and .parquet (pyarrow; columns as the keys above), or a
directory or glob of them. A record goes to validation by a hash of its content (data.val_fraction).

Rows: each record is rendered by the chat template (`chat.py`) into tokens and an assistant-only
mask; sft rows are next-token rows (target t+1, masked where the target is an assistant token).
With data.packing, whole conversations are packed into rows (next-fit, in record order) with
segment ids and positions restarting in each, so attention never crosses conversations; without
it, one conversation per row, padded. A record longer than a row is cut to data.seq_len + 1 tokens
(counted in a warning). dpo rows hold one pair: the chosen sequence in the core fields and the
rejected one in `extra`, never packed. A record with no trained token is refused in one line
naming it and why; so is any batch whose mask is all zero.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxlm.data.chat import ChatFormat, chat_format, render
from jaxlm.data.corpus import expand_inputs, in_val_split
from jaxlm.data.pipeline import BatchIterator
from jaxlm.errors import UserError, warn

RECORD_OBJECTIVES = ("sft", "dpo")


def read_records(path: str) -> list[dict]:
    """Records of every .jsonl/.json/.parquet file under `path` (a file, directory or glob)."""
    records = []
    for f in expand_inputs([path]):
        if f.endswith(".parquet"):
            records += _parquet(f)
        elif f.endswith((".jsonl", ".json")):
            for n, line in enumerate(Path(f).read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError as e:
                        raise UserError(f"{f}:{n}: not a JSON record ({e})") from None
        else:
            raise UserError(f"{f}: records are read from .jsonl, .json (one record per line) or .parquet files")
    return records


def _parquet(f: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{f}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    return pq.read_table(f).to_pylist()


def _turns(value, role: str, where: str) -> list[dict]:
    """A string as one `role` turn, or a list of {"role", "content"} messages, checked."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise UserError(f"{where} must be a string or a non-empty list of messages")
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: every message must be {{\"role\": str, \"content\": str}}, got {m!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def conversation(record: dict, where: str) -> tuple[list[dict], set[int]]:
    """(messages, indices of the assistant turns to train on) of an sft record."""
    if isinstance(record, dict) and "messages" in record:
        messages = _turns(record["messages"], "user", f"{where}: messages")
        return messages, {i for i, m in enumerate(messages) if m["role"] == "assistant"}
    if isinstance(record, dict) and "prompt" in record and "completion" in record:
        prompt = _turns(record["prompt"], "user", f"{where}: prompt")
        reply = _turns(record["completion"], "assistant", f"{where}: completion")
        return prompt + reply, {len(prompt) + i for i, m in enumerate(reply) if m["role"] == "assistant"}
    raise UserError(f"{where} is not a chat record: expected {{\"messages\": [...]}} or {{\"prompt\", \"completion\"}}")


def preference(record: dict, where: str) -> tuple[tuple[list[dict], set[int]], tuple[list[dict], set[int]]]:
    """The (chosen, rejected) conversations of a dpo record, each with the reply turns to score."""
    if not isinstance(record, dict) or not {"prompt", "chosen", "rejected"} <= set(record):
        raise UserError(f"{where} is not a preference record: expected {{\"prompt\", \"chosen\", \"rejected\"}}")
    prompt = _turns(record["prompt"], "user", f"{where}: prompt")
    out = []
    for key in ("chosen", "rejected"):
        reply = _turns(record[key], "assistant", f"{where}: {key}")
        out.append((prompt + reply, {len(prompt) + i for i, m in enumerate(reply) if m["role"] == "assistant"}))
    return out[0], out[1]


def encoded(messages, train_on, fmt: ChatFormat, seq_len: int, where: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """(tokens [<= seq_len + 1], mask, cut) of one conversation; refuses one with no trained token."""
    if not train_on:
        raise UserError(f"{where} has no assistant turn to train on (roles: "
                        f"{', '.join(m['role'] for m in messages)})")
    r = render(messages, fmt, train_on)
    if not r.mask.any():
        raise UserError(f"{where}: the chat template renders none of its assistant turns, so its loss mask is all "
                        "zero; the template must render assistant messages' content (or mark them with "
                        "{% generation %})")
    cut = len(r.tokens) > seq_len + 1
    return r.tokens[: seq_len + 1], r.mask[: seq_len + 1], cut


# ----------------------------------------------------------------------------- rows


class ChatRows:
    """sft rows: conversations, packed (segment ids, positions) or one per row, padded."""

    def __init__(self, convs: list[tuple[np.ndarray, np.ndarray]], seq_len: int, packing: bool):
        self.convs, self.seq_len, self.packing = convs, seq_len, packing
        rows, fill = [], seq_len  # next-fit: conversation k starts row r when it no longer fits
        for k, (tokens, _) in enumerate(convs):
            n = len(tokens) - 1
            if not packing or fill + n > seq_len:
                rows.append(k)
                fill = 0
            fill += n
        self.row_ptr = np.asarray(rows + [len(convs)], np.int64)

    def __len__(self) -> int:
        return len(self.row_ptr) - 1

    def __getitem__(self, i: int) -> dict:
        T = self.seq_len
        names = ("inputs", "targets", "loss_mask") + (("segment_ids", "positions") if self.packing else ())
        row = {k: np.zeros(T, np.int32) for k in names}
        fill = 0
        for seg, k in enumerate(range(self.row_ptr[i], self.row_ptr[i + 1]), start=1):
            tokens, mask = self.convs[k]
            n = len(tokens) - 1
            sl = slice(fill, fill + n)
            row["inputs"][sl], row["targets"][sl], row["loss_mask"][sl] = tokens[:-1], tokens[1:], mask[1:]
            if self.packing:
                row["segment_ids"][sl], row["positions"][sl] = seg, np.arange(n)
            fill += n
        return row


class PairRows:
    """dpo rows: one (chosen, rejected) pair per row; the rejected sequence in the extra fields."""

    def __init__(self, pairs: list, seq_len: int):
        self.pairs, self.seq_len = pairs, seq_len

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        row = {}
        names = (("inputs", "targets", "loss_mask"), ("rejected_inputs", "rejected_targets", "rejected_mask"))
        for keys, (tokens, mask) in zip(names, self.pairs[i]):
            for key, values in zip(keys, (tokens[:-1], tokens[1:], mask[1:])):
                row[key] = np.zeros(self.seq_len, np.int32)
                row[key][: len(values)] = values
        return row


def record_rows(cfg, fmt: ChatFormat, records: list[dict], what: str):
    """ChatRows (sft) or PairRows (dpo) of `records`; warns once about conversations cut to a row."""
    seq_len, objective = cfg.data.seq_len, cfg.train.objective
    items, cut, dropped = [], 0, 0
    for n, record in enumerate(records):
        where = f"{what} record {n}"
        convs = [conversation(record, where)] if objective == "sft" else list(preference(record, where))
        enc = [encoded(m, t, fmt, seq_len, where) for m, t in convs]
        cut += any(c for _, _, c in enc)
        if any(not mask[1:].any() for _, mask, _ in enc):  # cutting removed every trained token
            dropped += 1
            continue
        items.append(tuple((tokens, mask) for tokens, mask, _ in enc))
    if cut:
        warn(f"{cut} of {len(records)} {what} records are longer than data.seq_len+1={seq_len + 1} tokens and were "
             f"cut{f'; {dropped} kept no assistant token and were left out' if dropped else ''}")
    if not items:
        raise UserError(f"{what}: no record keeps an assistant token within data.seq_len={seq_len}; raise "
                        "data.seq_len")
    if objective == "sft":
        return ChatRows([i[0] for i in items], seq_len, cfg.data.packing)
    return PairRows(items, seq_len)


def split_records(records: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, validation) by a hash of each record's JSON (stable as records come and go)."""
    keys = [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in records]
    val = [in_val_split(k, val_fraction) for k in keys]
    return [r for r, v in zip(records, val) if not v], [r for r, v in zip(records, val) if v]


def check_batch_mask(batch) -> None:
    """A batch with no trained token would train on nothing: refused in one line."""
    if not np.any(batch.loss_mask):
        raise UserError("a batch's loss mask is all zero (no assistant token in any of its rows); check the chat "
                        "template renders the assistant turns")


def build_record_data(cfg, tokenizer) -> tuple[BatchIterator, list]:
    """The training batches and the fixed evaluation batches of sft/dpo records."""
    import grain

    d, t = cfg.data, cfg.train
    fmt = chat_format(tokenizer, d.chat_template)
    records = read_records(d.path)
    if not records:
        raise UserError(f"data.path={d.path!r} holds no records")
    train, val = split_records(records, d.val_fraction)
    if not train:
        train, val = records, []
    rows = record_rows(cfg, fmt, train, "training")
    ds = grain.MapDataset.source(rows).shuffle(seed=d.seed).repeat(None)
    batches = BatchIterator(ds, t.global_batch, check=check_batch_mask)
    eval_batches = []
    if t.eval_every and val:
        val_iter = BatchIterator(grain.MapDataset.source(record_rows(cfg, fmt, val, "validation")).repeat(None),
                                 t.global_batch)
        eval_batches = [next(val_iter) for _ in range(t.eval_batches)]
    elif t.eval_every:
        warn(f"no validation records (data.val_fraction={d.val_fraction} of {len(records)}); training goes on "
             "without evaluation")
    return batches, eval_batches
