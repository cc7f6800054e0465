"""`jaxlm prepare`: text files, JSONL, parquet, saved Hugging Face datasets (data/formats.py),
directories and globs of them -> token shards + metadata.json.

The on-disk format (shards, sidecars, metadata.json) is owned by data/shards.py.

A document is one text file or one record (JSONL line, parquet or Arrow row); document i (in
input order, counting every record) goes to val when i >= 1 and ceil(i*f) > ceil((i-1)*f), so
about a fraction f of the documents, spread evenly, at least one when there are two; a single
document is split by tokens instead (its last fraction f goes to val). Workers read plain text
and JSONL files themselves, by byte ranges; compressed JSONL and parquet/Arrow rows are read here,
a task at a time, and sent to them. Files are written under a temporary name and renamed; a
re-run skips shards that are finished; an error removes what this run wrote.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shlex
import signal
import sys
import time

import numpy as np

from jaxlm.data.corpus import expand_inputs
from jaxlm.data.formats import (compression, decode_utf8, file_kind, iter_line_blocks, iter_rows, jsonl_texts,
                                open_binary, read_bytes, read_errors)
from jaxlm.data.shards import (COMMAND_FILE, SPLITS, ShardWriter, check_token_ids, check_tokenizer,
                                corpus_metadata, open_prepared, unfinished_prepare, write_json)
from jaxlm.tokenizer.tokenizer import Tokenizer, load_tokenizer
from jaxlm.errors import UserError

_TASK_BYTES = 4 << 20
_STREAM_ABOVE = 64 << 20  # larger text files are encoded with encode_chunks (bounded text memory)
_STREAM_BLOCK = 1 << 20


def add_arguments(p) -> None:
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="text, .jsonl, .parquet (.gz/.zst compressed text and JSONL too), saved Hugging Face datasets, "
                        "directories and globs of them")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                   help="directory for the shards and metadata.json (created; an interrupted run there resumes); "
                        "use it as data.path")
    p.add_argument("--tokenizer", help="'bytes', a tokenizer directory, a Hugging Face tokenizer.json or model "
                                       "directory, or a tiktoken name (gpt2, cl100k_base, ...)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents for validation")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    p.add_argument("--text-field", default="text", help="the JSONL field (parquet/dataset column) holding the text")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes (default: all cores)")
    p.add_argument("--allow-special", action="store_true",
                   help="encode special-token text in documents as special tokens (default: as plain text)")
    p.add_argument("--check", action="store_true",
                   help="verify OUTDIR instead: shard sizes, token ids < vocabulary, --tokenizer hash")


def main(args) -> int:
    if args.check:
        if args.inputs:
            raise UserError("--check takes no INPUT, only -o OUTDIR (and optionally --tokenizer)")
        corpus = open_prepared(args.output)
        if args.tokenizer:
            check_tokenizer(corpus, load_tokenizer(args.tokenizer))
        check_token_ids(corpus)
        print(f"{args.output}: OK, " + ", ".join(f"{s} {corpus.split(s).n_tokens:,} tokens" for s in SPLITS))
        return 0
    if not args.inputs or not args.tokenizer:
        raise UserError("give INPUT... and --tokenizer SPEC (or --check)")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers} must be >= 1")
    t0 = time.perf_counter()
    try:
        meta = prepare(args.inputs, args.tokenizer, args.output, val_fraction=args.val_fraction,
                       shard_tokens=args.shard_tokens, text_field=args.text_field, workers=args.workers,
                       allow_special=args.allow_special)
    except KeyboardInterrupt:
        print(f"jaxlm prepare: interrupted; the finished shards in {args.output} are kept: run the same command "
              "again to resume", file=sys.stderr)
        return 130
    dt = time.perf_counter() - t0
    mb = sum(i[1] for i in meta["settings"]["inputs"]) / 1e6
    print(f"{args.output}: {mb:.1f} MB in {dt:.1f} s ({mb / dt:.1f} MB/s); " + "; ".join(
        f"{s}: {m['n_documents']:,} documents, {m['n_tokens']:,} tokens, {len(m['shards'])} shards"
        for s, m in meta["splits"].items()))
    return 0


# ---------------------------------------------------------------- inputs and tasks


def _jsonl_ranges(path: str, doc: int):
    """(item, bytes) of an uncompressed JSONL file in byte ranges of about _TASK_BYTES, cut at line
    ends; the workers read them."""
    size, line = os.path.getsize(path), 1
    with open(path, "rb") as f:
        start = 0
        while start < size:
            f.seek(start)
            block = f.read(_TASK_BYTES)
            end = start + len(block)
            if end < size:  # extend to the end of the line
                rest = f.readline()
                block += rest
                end += len(rest)
            n = block.count(b"\n") + (not block.endswith(b"\n"))
            yield (path, "jsonl", (start, end), doc, line, n), end - start
            doc, line, start = doc + n, line + n, end


def _items(files: list[str], text_field: str):
    """(item, bytes) in input order; an item is (path, kind, where, first_doc, first_line, n_docs):
    kind text (one document, the whole file), jsonl (a byte range), lines (JSONL bytes read
    here from a compressed file) or rows (parquet/Arrow texts read here)."""
    doc = 0
    for path in files:
        kind = file_kind(path)
        if kind == "text":
            size = os.path.getsize(path)
            yield (path, "text", (0, size), doc, 1, 1), size
            doc += 1
        elif kind == "jsonl" and compression(path) is None:
            for item, nbytes in _jsonl_ranges(path, doc):
                yield item, nbytes
                doc += item[-1]
        elif kind == "jsonl":
            for line, block in iter_line_blocks(path, _TASK_BYTES):
                n = block.count(b"\n") + (not block.endswith(b"\n"))
                yield (path, "lines", block, doc, line, n), len(block)
                doc += n
        else:
            row = 0
            for texts in iter_rows(path, text_field):
                yield (path, "rows", texts, doc, row, len(texts)), sum(len(t) for t in texts if t)
                doc, row = doc + len(texts), row + len(texts)


def _make_tasks(files: list[str], text_field: str = "text"):
    """Tasks of about _TASK_BYTES (lists of items), made as they are consumed: only the tasks in
    flight hold text."""
    cur, cur_bytes = [], 0
    for item, nbytes in _items(files, text_field):
        if cur and cur_bytes + nbytes > _TASK_BYTES:
            yield cur
            cur, cur_bytes = [], 0
        cur.append(item)
        cur_bytes += nbytes
    if cur:
        yield cur


def in_val(i: int, f: float) -> bool:
    return i >= 1 and f > 0 and math.ceil(i * f - 1e-9) > math.ceil((i - 1) * f - 1e-9)


# ---------------------------------------------------------------- workers

_worker_state: dict = {}


def _init_worker(tok: Tokenizer, dtype: str, text_field: str, allow_special: bool) -> None:
    if multiprocessing.parent_process() is not None:  # Ctrl-C is the parent's to handle (no worker tracebacks)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_state.update(tok=tok, dtype=np.dtype(dtype), field=text_field, allow=allow_special)


def _encode(text: str) -> np.ndarray:
    tok, allow = _worker_state["tok"], _worker_state["allow"]
    if allow and isinstance(tok, Tokenizer) and tok._prefix_specials:
        return np.asarray(tok.encode(text, allowed_special="all"), np.uint32)
    kw = {"allowed_special": "all"} if allow else {"disallowed_special": ()}
    try:
        return tok.encode_to_numpy(text, **kw)
    except UnicodeEncodeError:  # lone surrogates, e.g. from JSON escapes; as tiktoken's encode does
        return tok.encode_to_numpy(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"), **kw)


def _read_range(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def _text_ids(path: str, size: int) -> np.ndarray:
    """The tokens of a whole text file: encoded at once, or streamed where it is large (a
    compressed file counts as 8 times its size)."""
    if size * (8 if compression(path) else 1) > _STREAM_ABOVE:
        return np.concatenate([np.asarray(c, np.uint32) for c in _stream_file(path)] or [np.zeros(0, np.uint32)])
    return _encode(decode_utf8(read_bytes(path), path))


def _texts_ids(texts: list[str | None], dtype) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of the texts concatenated, per-text lengths; -1 marks a skipped one)."""
    pieces, lengths = [], []
    for text in texts:
        ids = _encode(text).astype(dtype) if text else np.zeros(0, dtype)
        pieces.append(ids)
        lengths.append(len(ids) if text else -1)
    return (np.concatenate(pieces) if pieces else np.zeros(0, dtype)), np.array(lengths)


def _run_task(task: list[tuple]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """-> per item: (first_doc, tokens of its documents concatenated, per-document lengths;
    -1 marks an empty record, which is skipped)."""
    dtype, field = _worker_state["dtype"], _worker_state["field"]
    out = []
    for path, kind, where, doc, line, _ in task:
        if kind == "text":
            ids = _text_ids(path, where[1])
            out.append((doc, ids.astype(dtype), np.array([len(ids)])))
            continue
        if kind == "rows":
            texts = where
        elif kind == "jsonl":
            texts = jsonl_texts(_read_range(path, *where), path, line, field, offset=where[0])
        else:  # lines of a compressed JSONL file
            texts = jsonl_texts(where, path, line, field)
        out.append((doc, *_texts_ids(texts, dtype)))
    return out


def _stream_file(path: str):
    import codecs

    tok, allow = _worker_state["tok"], _worker_state["allow"]
    decoder = codecs.getincrementaldecoder("utf-8")()

    def blocks():
        try:
            with open_binary(path) as f:
                while block := f.read(_STREAM_BLOCK):
                    yield block
        except read_errors() as e:
            raise UserError(f"{path}: cannot read it: {e}") from None

    def texts():
        offset = 0
        for block in blocks():
            pending = len(decoder.getstate()[0])
            try:
                yield decoder.decode(block)
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: invalid UTF-8 at byte offset {offset - pending + e.start}") from None
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(f"{path}: invalid UTF-8 at byte offset {offset - len(decoder.getstate()[0])}") from None

    kw = {"allowed_special": "all"} if allow else {"disallowed_special": ()}
    return tok.encode_chunks(texts(), flush_chars=1 << 20, **kw)


def _pool_context():
    if "jax" in sys.modules or "fork" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    return multiprocessing.get_context("fork")


def _results(tasks, init_args, workers: int):
    """Task results in task order, at most 2 * workers tasks in flight."""
    tasks = iter(tasks)
    head = list(itertools.islice(tasks, workers + 1))  # to know whether there is more than one
    if workers <= 1 or len(head) <= 1:
        _init_worker(*init_args)
        yield from map(_run_task, itertools.chain(head, tasks))
        return
    with _pool_context().Pool(min(workers, len(head)), _init_worker, init_args) as pool:
        pending: collections.deque = collections.deque()
        for task in itertools.chain(head, tasks):
            pending.append(pool.apply_async(_run_task, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def prepare(inputs: list[str], tokenizer: str, out: str, *, val_fraction: float = 0.05,
            shard_tokens: int = 100_000_000, text_field: str = "text", workers: int = 1,
            allow_special: bool = False) -> dict:
    """Tokenize `inputs` into shards under `out`; returns the metadata (also in metadata.json)."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens {shard_tokens} must be positive")
    tok = load_tokenizer(tokenizer)
    if tok.eot_id is None:
        raise UserError(f"tokenizer {tokenizer!r} has no end-of-text token to put between documents")
    files = expand_inputs(inputs, exclude=out)
    dtype = "uint16" if tok.n_vocab <= 1 << 16 else "uint32"
    settings = {"inputs": [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files],
                "val_fraction": val_fraction, "shard_tokens": shard_tokens, "text_field": text_field,
                "allow_special": allow_special, "tokenizer_hash": tok.hash, "split_single_document": True}
    settings_hash = hashlib.sha256(json.dumps(settings).encode()).hexdigest()
    meta_path = os.path.join(out, "metadata.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old.get("settings_hash") == settings_hash:
            return old  # already complete
        if old.get("tokenizer", {}).get("hash") != tok.hash:
            raise UserError(f"{out} was prepared with tokenizer {old.get('tokenizer', {}).get('name')!r} "
                            f"(hash {old.get('tokenizer', {}).get('hash', '?')[:12]}), not {tokenizer!r} "
                            f"(hash {tok.hash[:12]}); remove it or choose another -o")
        raise UserError(f"{out} holds a corpus prepared from other inputs or settings; remove it or choose another -o")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"-o {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not unfinished_prepare(out):
        raise UserError(f"-o {out} is a non-empty directory that `jaxlm prepare` did not make; "
                        "give a new or empty directory")
    made_dir = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    for stale in glob.glob(os.path.join(out, "*.tmp")):
        os.remove(stale)  # from a killed run
    created: list[str] = []
    writers: dict[str, ShardWriter] = {}
    try:
        write_json(os.path.join(out, COMMAND_FILE), {"command": _command(
            inputs, tokenizer, out, val_fraction, shard_tokens, text_field, allow_special)},
            created)
        writers = {s: ShardWriter(out, s, dtype, shard_tokens, tok.eot_id, settings_hash, created) for s in SPLITS}
        resume = min(w.next_doc for w in writers.values())
        all_tasks = _make_tasks(files, text_field)
        head = list(itertools.islice(all_tasks, 2))  # the first tasks say whether there is one document
        # one document cannot be split by document: its last val_fraction of tokens is validation
        split_one = val_fraction > 0 and len(head) == 1 and _task_end(head[0]) == 1
        tasks = (t for t in itertools.chain(head, all_tasks) if _task_end(t) > resume)
        for result in _results(tasks, (tok, dtype, text_field, allow_special), workers):
            for doc, ids, lengths in result:
                pos = 0
                for i, n in enumerate(lengths.tolist()):
                    if n >= 0 and split_one:
                        cut = n - int(n * val_fraction)
                        writers["train"].add(doc + i, ids[pos: pos + cut])
                        writers["val"].add(doc + i, ids[pos + cut: pos + n])
                    elif n >= 0:
                        writers["val" if in_val(doc + i, val_fraction) else "train"].add(doc + i, ids[pos: pos + n])
                    pos += max(n, 0)
        for w in writers.values():
            w.finish()
        meta = corpus_metadata(out, tok, tokenizer, dtype, settings, settings_hash)
        write_json(meta_path, meta, created)
        return meta
    except BaseException as e:
        for w in writers.values():
            if w.file is not None:
                w.file.close()
        keep_finished = not isinstance(e, Exception)  # interrupted: keep finished shards to resume
        for path in reversed(created):
            if (not keep_finished or path.endswith(".tmp")) and os.path.exists(path):
                os.remove(path)
        if made_dir and not os.listdir(out):
            os.rmdir(out)
        if isinstance(e, OSError):  # unreadable input, full disk, ...: one line, not a traceback
            raise UserError(f"{e.filename or out}: {e.strerror or e}") from None
        raise


def _command(inputs, tokenizer, out, val_fraction, shard_tokens, text_field, allow_special) -> str:
    """The `jaxlm prepare` command line that makes `out`, with absolute paths (any directory can run it)."""
    args = ["jaxlm", "prepare", *map(os.path.abspath, inputs), "--tokenizer",
            os.path.abspath(tokenizer) if os.path.exists(tokenizer) else tokenizer, "-o", os.path.abspath(out)]
    optional = (("--val-fraction", val_fraction, 0.05), ("--shard-tokens", shard_tokens, 100_000_000),
                ("--text-field", text_field, "text"))
    for flag, value, default in optional:
        if value != default:
            args += [flag, str(value)]
    return shlex.join(args + (["--allow-special"] if allow_special else []))


def _task_end(task: list[tuple]) -> int:
    *_, doc, _, n_docs = task[-1]
    return doc + n_docs
