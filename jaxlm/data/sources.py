"""From the `data` config to token streams and batch iterators.

A source is raw text (a file, directory or glob, tokenized here with `data.tokenizer`), a
corpus prepared by `jaxlm prepare` (a directory with metadata.json, memory-mapped), or, with
neither, the embedded default corpus. `data.mixture` lists several sources with weights.
"""

from __future__ import annotations

import os

import numpy as np

from jaxlm.config import Config, DataConfig
from jaxlm.data.corpus import default_corpus, read_documents
from jaxlm.data.pipeline import BatchIterator, TokenStream, mixture, row_dataset
from jaxlm.data.tokenizer import EOT, load_tokenizer
from jaxlm.errors import UserError


def is_prepared(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "metadata.json"))


def text_streams(docs: list[str], tokenizer, val_fraction: float) -> tuple[TokenStream, TokenStream]:
    """Tokenizes documents with <|endoftext|> after each; the last val_fraction of tokens is validation."""
    eot = tokenizer.encode_single_token(EOT)
    encoded = [np.asarray(ids + [eot]) for ids in tokenizer.encode_ordinary_batch(docs, num_threads=2)]
    tokens = np.concatenate(encoded).astype(np.uint16 if tokenizer.n_vocab <= 1 << 16 else np.uint32)
    starts = np.cumsum([0] + [len(e) for e in encoded[:-1]]).astype(np.int64)
    cut = len(tokens) - int(len(tokens) * val_fraction)
    train = TokenStream([tokens[:cut]], starts[starts < cut])
    val_starts = starts[starts >= cut] - cut
    val = TokenStream([tokens[cut:]], np.unique(np.concatenate([[0], val_starts])).astype(np.int64))
    return train, val


def prepared_streams(path: str, tokenizer) -> tuple[TokenStream, TokenStream]:
    from jaxlm.data.prepared import check_tokenizer, open_prepared

    corpus = open_prepared(path)
    check_tokenizer(corpus, tokenizer)

    def stream(name: str) -> TokenStream:
        split = corpus.split(name)
        bases = np.cumsum([0] + [len(s) for s in split.shards[:-1]])
        starts = np.concatenate([np.zeros(1, np.int64)] + [o.astype(np.int64) + b
                                                           for o, b in zip(split.doc_offsets, bases)])
        return TokenStream(list(split.shards), np.unique(starts))

    return stream("train"), stream("val")


def load_streams(path: str | None, data: DataConfig, tokenizer) -> tuple[TokenStream, TokenStream]:
    if path is not None and is_prepared(path):
        return prepared_streams(path, tokenizer)
    docs = default_corpus() if path is None else read_documents(path)
    return text_streams(docs, tokenizer, data.val_fraction)


def build_data(cfg: Config) -> tuple[BatchIterator, list[dict]]:
    """The training batch iterator (this process's slices) and the fixed evaluation batches."""
    data, t = cfg.data, cfg.train
    tokenizer = load_tokenizer(data.tokenizer)
    if tokenizer.n_vocab > cfg.model.vocab_size:
        raise UserError(f"data.tokenizer={data.tokenizer!r} has {tokenizer.n_vocab} tokens but "
                        f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size >= {tokenizer.n_vocab}")
    sources = [(s.path, s.weight) for s in data.mixture] or [(data.path, 1.0)]
    train_sets, val_sets = [], []
    for i, (path, weight) in enumerate(sources):
        train, val = load_streams(path, data, tokenizer)
        name = path or "the default corpus"
        train_sets.append(row_dataset(train, data.seq_len, data.packing, data.seed + i, f"{name} (train)"))
        if len(val) > data.seq_len:  # a source too small for a validation row is left out of evaluation
            val_sets.append((row_dataset(val, data.seq_len, data.packing, None, f"{name} (validation)"), weight))
    batches = BatchIterator(mixture(train_sets, [w for _, w in sources]), t.global_batch)
    eval_batches = []
    if t.eval_every and val_sets:
        val_iter = BatchIterator(mixture(*map(list, zip(*val_sets))), t.global_batch)
        eval_batches = [next(val_iter) for _ in range(t.eval_batches)]
    return batches, eval_batches
