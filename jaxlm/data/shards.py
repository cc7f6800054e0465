"""The on-disk format of a prepared corpus, in one place: the shard writer `jaxlm prepare` uses and
the reader training uses (memory-mapped shards, metadata, consistency checks).

Layout of OUTDIR (one split = the train or val documents, each followed by <|endoftext|>):
  prepare.json          written first: the command that makes OUTDIR (to finish an interrupted run)
  train_00000.bin       raw uint16 (or uint32) token ids, a slice of the split's token stream
  train_00000.idx.npy   int64 offsets, in the shard, of the documents that start in it
  train_00000.json      sidecar written last: the shard is complete, where to resume, its largest id
  metadata.json         written when every split is finished; readers need it
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import numpy as np

from jaxlm.tokenizer.tokenizer import Tokenizer
from jaxlm.errors import UserError

SPLITS = ("train", "val")


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


def check_max_ids(prepared: PreparedCorpus, vocab_size: int) -> None:
    """From the metadata alone (no shard is read, nothing is checked per step): UserError if a
    shard's largest token id is >= vocab_size. An out-of-range id would train silently as another
    token (XLA's gather clamps). Corpora prepared before max ids were recorded have none to check;
    `prepare` checked their ids when it wrote them."""
    for s, m in prepared.metadata["splits"].items():
        for shard in m["shards"]:
            if shard.get("max_id", -1) >= vocab_size:
                raise UserError(f"{os.path.join(prepared.path, shard['file'])} holds token ids up to {shard['max_id']} "
                                f"(its metadata), but the vocabulary has {vocab_size}; prepare the data again with "
                                f"the tokenizer the run uses (`jaxlm prepare --check` verifies a corpus)")


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


# ----------------------------------------------------------------------------- writing


class ShardWriter:
    """Appends documents (+ EOT) to one split's shards; resumes after the finished ones."""

    def __init__(self, out: str, split: str, dtype, shard_tokens: int, eot: int, settings_hash: str, created: list):
        self.out, self.split, self.dtype, self.cap = out, split, np.dtype(dtype), shard_tokens
        self.eot = np.array([eot], self.dtype)
        self.settings_hash, self.created = settings_hash, created
        self.k, self.next_doc, self.next_offset = 0, 0, 0
        while os.path.exists(side := self._path(self.k, ".json")):
            with open(side) as f:
                info = json.load(f)
            if info.get("settings_hash") != settings_hash:
                raise UserError(f"{out} holds shards from a run with other inputs, settings or tokenizer "
                                f"({os.path.basename(side)}); remove it or choose another -o")
            self.k, self.next_doc, self.next_offset = self.k + 1, info["next_doc"], info["next_offset"]
        self.file = None

    def _path(self, k: int, ext: str) -> str:
        return os.path.join(self.out, f"{self.split}_{k:05d}{ext}")

    def _open(self) -> None:
        self.tmp = self._path(self.k, f".bin.{os.getpid()}.tmp")
        self.file, self.n, self.offsets, self.buf, self.buffered = open(self.tmp, "wb"), 0, [], [], 0
        self.max_id = -1
        self.mid_doc = self.next_offset > 0
        self.created.append(self.tmp)

    def add(self, doc: int, ids: np.ndarray) -> None:
        """Document `doc` (in input order) + EOT; documents before the resume point are done."""
        if doc < self.next_doc:
            return
        pos, total = (self.next_offset if doc == self.next_doc else 0), len(ids) + 1
        while pos < total:
            if self.file is None:
                self._open()
            if pos == 0:
                self.offsets.append(self.n)
            end = pos + min(self.cap - self.n, total - pos)
            if pos < len(ids):
                self.buf.append(ids[pos: min(end, len(ids))])
                self.max_id = max(self.max_id, int(self.buf[-1].max()))
            if end == total:
                self.buf.append(self.eot)
                self.max_id = max(self.max_id, int(self.eot[0]))
            self.n, self.buffered, pos = self.n + end - pos, self.buffered + end - pos, end
            self.next_doc, self.next_offset = (doc + 1, 0) if pos == total else (doc, pos)
            if self.n == self.cap:
                self._finalize()
            elif self.buffered >= 1 << 20:
                self._flush()

    def finish(self) -> None:
        if self.file is not None and self.n:
            self._finalize()

    def _flush(self) -> None:
        if self.buf:
            np.concatenate(self.buf).tofile(self.file)
        self.buf, self.buffered = [], 0

    def _finalize(self) -> None:
        self._flush()
        self.file.close()
        self.file = None
        _replace(self.tmp, self._path(self.k, ".bin"), self.created)
        idx = self._path(self.k, ".idx.npy")
        with open(idx + ".tmp", "wb") as f:
            np.save(f, np.asarray(self.offsets, np.int64))
        _replace(idx + ".tmp", idx, self.created)
        write_json(self._path(self.k, ".json"), {
            "settings_hash": self.settings_hash, "n_tokens": self.n, "n_documents": len(self.offsets),
            "starts_mid_document": self.mid_doc, "next_doc": self.next_doc, "next_offset": self.next_offset,
            "max_id": self.max_id,
        }, self.created)
        self.k += 1


def _replace(tmp: str, final: str, created: list) -> None:
    os.replace(tmp, final)
    created.append(final)


def write_json(path: str, obj: dict, created: list) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    created.append(tmp)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    _replace(tmp, path, created)


def corpus_metadata(out, tok, spec, dtype, settings, settings_hash) -> dict:
    splits = {}
    for s in SPLITS:
        shards, k = [], 0
        while os.path.exists(side := os.path.join(out, f"{s}_{k:05d}.json")):
            with open(side) as f:
                info = json.load(f)
            shards.append({"file": f"{s}_{k:05d}.bin", "offsets_file": f"{s}_{k:05d}.idx.npy",
                           "n_tokens": info["n_tokens"], "n_documents": info["n_documents"],
                           "starts_mid_document": info["starts_mid_document"],
                           **({"max_id": info["max_id"]} if "max_id" in info else {})})
            k += 1
        splits[s] = {"n_tokens": sum(x["n_tokens"] for x in shards),
                     "n_documents": sum(x["n_documents"] for x in shards), "shards": shards}
    return {"format": "jaxlm-prepared", "version": 1, "tokenizer": {**tok.identity(), "spec": spec},
            "dtype": dtype, "settings_hash": settings_hash, "settings": settings, "splits": splits}
