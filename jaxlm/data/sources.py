"""From the `data` config to token streams and batch iterators.

A source is raw text (files of data/formats.py, a directory or glob of them, tokenized here
with `data.tokenizer` once and then read from the token cache, data/token_cache.py), a corpus
prepared by `jaxlm prepare` (a directory with metadata.json, memory-mapped), or, with neither,
the embedded default corpus. `data.mixture` lists several sources with weights.
"""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np

from jaxlm.config import Config, DataConfig
from jaxlm.data.corpus import default_corpus, default_corpus_paths, expand_inputs, in_val_split, read_documents
from jaxlm.data.pipeline import BatchIterator, TokenStream, mixture, row_dataset
from jaxlm.data.records import RECORD_OBJECTIVES, build_record_data
from jaxlm.data.shards import unfinished_prepare
from jaxlm.data.token_cache import cached_streams
from jaxlm.tokenizer.tokenizer import load_tokenizer
from jaxlm.errors import UserError, warn


def is_prepared(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "metadata.json"))


def _stream(encoded: list[np.ndarray], dtype) -> TokenStream:
    starts = np.cumsum([0] + [len(e) for e in encoded[:-1]]).astype(np.int64)
    return TokenStream([np.concatenate(encoded).astype(dtype)], starts)


def text_streams(docs: list[str], tokenizer, val_fraction: float) -> tuple[TokenStream, TokenStream]:
    """Tokenizes documents with the tokenizer's end-of-text token after each and splits them by a
    hash of each document (`in_val_split`). With too few documents for that (fewer than 2 would go
    to validation, or none to training) the last val_fraction of the tokens is validation instead."""
    eot = tokenizer.eot_id
    if eot is None:
        raise UserError(f"tokenizer {tokenizer.name!r} has no end-of-text token to put between documents")
    encoded = [np.asarray(ids + [eot]) for ids in tokenizer.encode_ordinary_batch(docs, num_threads=2)]
    dtype = np.uint16 if tokenizer.n_vocab <= 1 << 16 else np.uint32
    val = [in_val_split(d, val_fraction) for d in docs]
    if 2 <= sum(val) < len(docs):
        return (_stream([e for e, v in zip(encoded, val) if not v], dtype),
                _stream([e for e, v in zip(encoded, val) if v], dtype))
    stream = _stream(encoded, dtype)
    tokens, starts = stream.pieces[0], stream.doc_starts
    cut = len(tokens) - int(len(tokens) * val_fraction)
    train = TokenStream([tokens[:cut]], starts[starts < cut])
    val_starts = starts[starts >= cut] - cut
    return train, TokenStream([tokens[cut:]], np.unique(np.concatenate([[0], val_starts])).astype(np.int64))


def prepared_streams(path: str, tokenizer) -> tuple[TokenStream, TokenStream]:
    from jaxlm.data.shards import check_max_ids, check_tokenizer, open_prepared

    corpus = open_prepared(path)
    check_tokenizer(corpus, tokenizer)
    check_max_ids(corpus, tokenizer.n_vocab)  # <= model.vocab_size, checked by build_data

    def stream(name: str) -> TokenStream:
        split = corpus.split(name)
        bases = np.cumsum([0] + [len(s) for s in split.shards[:-1]])
        starts = np.concatenate([np.zeros(1, np.int64)] + [o.astype(np.int64) + b
                                                           for o, b in zip(split.doc_offsets, bases)])
        return TokenStream(list(split.shards), np.unique(starts))

    return stream("train"), stream("val")


def load_streams(path: str | None, data: DataConfig, tokenizer) -> tuple[TokenStream, TokenStream]:
    if path is not None and (is_prepared(path) or unfinished_prepare(path)):
        return prepared_streams(path, tokenizer)  # an unfinished one raises, saying how to finish it

    def build() -> tuple[TokenStream, TokenStream]:
        docs = default_corpus() if path is None else read_documents(path, data.text_field)
        return text_streams(docs, tokenizer, data.val_fraction)

    files = _source_files(path)
    parts = {"files": [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files],
             "fingerprint": _files_hash(files), "tokenizer": tokenizer.hash, "val_fraction": data.val_fraction,
             "text_field": data.text_field}
    about = {"source": path or "the default corpus", "tokenizer": tokenizer.name}
    return cached_streams(parts, build, writer=jax.process_index() == 0, about=about)


def build_data(cfg: Config) -> tuple[BatchIterator, list[dict]]:
    """The training batch iterator (this process's slices) and the fixed evaluation batches."""
    data, t = cfg.data, cfg.train
    tokenizer = load_tokenizer(data.tokenizer)
    if tokenizer.n_vocab > cfg.model.vocab_size:
        raise UserError(f"data.tokenizer={data.tokenizer!r} has {tokenizer.n_vocab} tokens but "
                        f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size >= {tokenizer.n_vocab}")
    if t.objective in RECORD_OBJECTIVES:  # chat or preference records, rendered by a chat template
        return build_record_data(cfg, tokenizer)
    sources = [(s.path, s.weight) for s in data.mixture] or [(data.path, 1.0)]
    train_sets, val_sets, no_val = [], [], []
    for i, (path, weight) in enumerate(sources):
        train, val = load_streams(path, data, tokenizer)
        name = path or "the default corpus"
        train_sets.append(row_dataset(train, data.seq_len, data.packing, data.seed + i, f"{name} (train)"))
        if len(val) > data.seq_len:  # a source too small for a validation row is left out of evaluation
            val_sets.append((row_dataset(val, data.seq_len, data.packing, None, f"{name} (validation)"), weight))
        else:
            no_val.append(name)
    batches = BatchIterator(mixture(train_sets, [w for _, w in sources]), t.global_batch)
    if t.eval_every and no_val:
        what = "training goes on without evaluation" if not val_sets else "evaluation uses the other sources"
        warn(f"no validation data in {', '.join(no_val)} (fewer than data.seq_len+1={data.seq_len + 1} held-out "
             f"tokens; data.val_fraction={data.val_fraction}); {what}")
    eval_batches = []
    if t.eval_every and val_sets:
        val_iter = BatchIterator(mixture(*map(list, zip(*val_sets))), t.global_batch)
        eval_batches = [next(val_iter) for _ in range(t.eval_batches)]
    return batches, eval_batches


# ---------------------------------------------------------------- fingerprint

_EDGE = 1 << 16  # bytes hashed at each end of a file


def _source_files(path: str | None) -> list[str]:
    if path is None:
        return [str(p) for p in default_corpus_paths()]
    if is_prepared(path):
        from jaxlm.data.shards import open_prepared

        meta = open_prepared(path).metadata
        shards = [s["file"] for split in meta["splits"].values() for s in split["shards"]]
        return [os.path.join(path, f) for f in ["metadata.json", *shards]]
    return expand_inputs([path])


def data_fingerprint(data: DataConfig) -> list[dict]:
    """Per source: a hash of each file's size and its first and last 64 KiB. Cheap at any corpus
    size; it catches a file that was replaced, grown, cut or edited near either end."""
    return [{"source": path or "the default corpus", "sha256": _files_hash(_source_files(path))}
            for path in [s.path for s in data.mixture] or [data.path]]


def _files_hash(files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        size = os.path.getsize(f)
        h.update(size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            h.update(fh.read(_EDGE))
            if size > _EDGE:
                fh.seek(max(size - _EDGE, _EDGE))
                h.update(fh.read())
    return h.hexdigest()
