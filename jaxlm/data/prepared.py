"""Reading a corpus made by `jaxlm prepare`: metadata, memory-mapped shards, consistency checks."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import numpy as np

from jaxlm.data.tokenizer import Tokenizer
from jaxlm.errors import UserError


@dataclass(frozen=True)
class PreparedSplit:
    name: str
    shards: list[np.memmap]  # token ids; the split's token stream is their concatenation
    doc_offsets: list[np.ndarray]  # per shard: int64 offsets of the documents that start in it
    starts_mid_document: list[bool]  # per shard: its first tokens continue the previous shard's document
    n_tokens: int
    n_documents: int


@dataclass(frozen=True)
class PreparedCorpus:
    path: str
    metadata: dict

    @property
    def tokenizer_hash(self) -> str:
        return self.metadata["tokenizer"]["hash"]

    @property
    def tokenizer_name(self) -> str:
        return self.metadata["tokenizer"]["name"]

    @property
    def vocab_size(self) -> int:
        return self.metadata["tokenizer"]["n_vocab"]

    @property
    def eot_id(self) -> int:
        return self.metadata["tokenizer"]["eot_id"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.metadata["dtype"])

    def split(self, name: str) -> PreparedSplit:
        name = {"validation": "val"}.get(name, name)
        if name not in self.metadata["splits"]:
            raise UserError(f"{self.path} has no split {name!r}; it has {', '.join(self.metadata['splits'])}")
        m = self.metadata["splits"][name]
        shards = [np.memmap(os.path.join(self.path, s["file"]), dtype=self.dtype, mode="r") for s in m["shards"]]
        offsets = [np.load(os.path.join(self.path, s["offsets_file"])) for s in m["shards"]]
        return PreparedSplit(name, shards, offsets, [s["starts_mid_document"] for s in m["shards"]],
                             m["n_tokens"], m["n_documents"])


COMMAND_FILE = "prepare.json"  # written first by `jaxlm prepare`: the command that makes this directory


def unfinished_prepare(path: str) -> bool:
    """True for a directory that `jaxlm prepare` started but did not finish (no metadata.json yet)."""
    return (os.path.isdir(path) and not os.path.isfile(os.path.join(path, "metadata.json"))
            and (os.path.isfile(os.path.join(path, COMMAND_FILE)) or bool(glob.glob(os.path.join(path, "*_00000.*")))))


def _finish_hint(path: str) -> str:
    try:
        with open(os.path.join(path, COMMAND_FILE)) as f:
            command = json.load(f)["command"]
    except (OSError, ValueError, KeyError, TypeError):
        command = f"jaxlm prepare INPUT... --tokenizer SPEC -o {path}"
    done = len(glob.glob(os.path.join(path, "*_[0-9][0-9][0-9][0-9][0-9].json")))
    return (f"{path} is an unfinished `jaxlm prepare` output (interrupted, or still running: no metadata.json yet, "
            f"{done} shard(s) done); run the same command again to finish it: {command}")


def open_prepared(path: str) -> PreparedCorpus:
    """Reads OUTDIR/metadata.json and checks that every shard is there with its full size."""
    meta_path = os.path.join(path, "metadata.json")
    if not os.path.isfile(meta_path):
        if unfinished_prepare(path):
            raise UserError(_finish_hint(path))
        raise UserError(f"{path} is not a prepared corpus (no metadata.json)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        itemsize = np.dtype(meta["dtype"]).itemsize
        for s, m in meta["splits"].items():
            for shard in m["shards"]:
                f = os.path.join(path, shard["file"])
                if not os.path.isfile(f) or os.path.getsize(f) != shard["n_tokens"] * itemsize:
                    raise UserError(f"{f} is missing or not {shard['n_tokens']} tokens long; prepare the corpus again")
    except UserError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path} is not valid prepared-corpus metadata ({type(e).__name__}: {e})") from None
    return PreparedCorpus(path, meta)


def check_tokenizer(prepared: PreparedCorpus, tokenizer) -> None:
    """UserError unless `tokenizer` (a tiktoken Encoding) is the one the shards were made with."""
    tok = Tokenizer.from_encoding(tokenizer)
    if tok.hash != prepared.tokenizer_hash:
        raise UserError(f"{prepared.path} was tokenized with {prepared.tokenizer_name!r} "
                        f"(hash {prepared.tokenizer_hash[:12]}) but the tokenizer given is {tok.name!r} "
                        f"(hash {tok.hash[:12]}); use the same tokenizer or prepare the data again")


def check_token_ids(prepared: PreparedCorpus, vocab_size: int | None = None) -> None:
    """UserError if any shard holds a token id >= vocab_size (default: the tokenizer's)."""
    limit = prepared.vocab_size if vocab_size is None else vocab_size
    for s in prepared.metadata["splits"]:
        for shard, meta in zip(prepared.split(s).shards, prepared.metadata["splits"][s]["shards"]):
            for start in range(0, len(shard), 1 << 24):
                block = shard[start: start + (1 << 24)]
                if len(block) and int(block.max()) >= limit:
                    pos = start + int(np.argmax(block >= limit))
                    raise UserError(f"{os.path.join(prepared.path, meta['file'])}: token id {int(shard[pos])} "
                                    f"at position {pos} is >= the vocabulary size {limit}")
