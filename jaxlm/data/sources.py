"""From the `data` config to train/validation token arrays."""

from __future__ import annotations

import numpy as np

from jaxlm.config import Config, DataConfig
from jaxlm.data.corpus import default_corpus, read_documents
from jaxlm.data.pipeline import BatchIterator, window_dataset
from jaxlm.data.tokenizer import EOT, load_tokenizer
from jaxlm.errors import UserError


def load_token_splits(data: DataConfig, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes the documents with <|endoftext|> between them; the last val_fraction is validation."""
    tokenizer = load_tokenizer(data.tokenizer)
    if tokenizer.n_vocab > vocab_size:
        raise UserError(f"data.tokenizer={data.tokenizer!r} has {tokenizer.n_vocab} tokens but "
                        f"model.vocab_size={vocab_size}; set model.vocab_size >= {tokenizer.n_vocab}")
    docs = default_corpus() if data.path is None else read_documents(data.path)
    eot = tokenizer.encode_single_token(EOT)
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode_ordinary(doc))
        ids.append(eot)
    tokens = np.asarray(ids, dtype=np.uint16 if tokenizer.n_vocab <= 1 << 16 else np.uint32)
    n_val = int(len(tokens) * data.val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]


def build_data(cfg: Config) -> tuple[BatchIterator, list[dict]]:
    """The training batch iterator (this process's slices) and the fixed evaluation batches."""
    t = cfg.train
    train_tokens, val_tokens = load_token_splits(cfg.data, cfg.model.vocab_size)
    batches = BatchIterator(window_dataset(train_tokens, cfg.data.seq_len, cfg.data.seed, "training"), t.global_batch)
    eval_batches = []
    if t.eval_every and cfg.data.val_fraction > 0:
        val_iter = BatchIterator(window_dataset(val_tokens, cfg.data.seq_len, None, "validation"), t.global_batch)
        eval_batches = [next(val_iter) for _ in range(t.eval_batches)]
    return batches, eval_batches
