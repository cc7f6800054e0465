"""Tokenizers are tiktoken Encodings: mergeable ranks + a pre-tokenizer pattern + special tokens.

`Tokenizer` subclasses `tiktoken.Encoding` (so it is one, and encodes at tiktoken speed) and adds
what the rest of jaxlm needs: a stable content hash, save/load as one directory
(`tokenizer.tiktoken` ranks + `tokenizer.json`), longest-match special tokens, and a streaming
`encode_iterable`. `load_tokenizer(spec)` is the one entry point for config and CLI specs.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import os
from collections.abc import Collection, Iterable, Iterator
from collections.abc import Set as AbstractSet
from typing import Literal

import regex
import tiktoken
from tiktoken.core import raise_disallowed_special_token

from jaxlm.errors import UserError
from jaxlm.tokenizer.byte_alphabet import gpt2_byte_decoder as _gpt2_byte_decoder

EOT = "<|endoftext|>"
# tiktoken's form of the GPT-2 pre-tokenizer (possessive quantifiers, same pre-tokens as
# bpe.GPT2_PATTERN; tests/test_tokenizer.py checks that on real text).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
NAMED = ("gpt2", "r50k_base", "p50k_base", "p50k_edit", "cl100k_base", "o200k_base", "o200k_harmony")
RANKS_FILE, CONFIG_FILE = "tokenizer.tiktoken", "tokenizer.json"

Specials = Literal["all"] | AbstractSet[str]


class Tokenizer(tiktoken.Encoding):
    """A tiktoken Encoding with a content hash, save/load and streaming encode."""

    def __init__(self, name, *, pat_str, mergeable_ranks, special_tokens, explicit_n_vocab=None):
        super().__init__(
            name,
            pat_str=pat_str,
            mergeable_ranks=mergeable_ranks,
            special_tokens=special_tokens,
            explicit_n_vocab=explicit_n_vocab,
        )
        toks = list(special_tokens)
        # tiktoken picks one of two specials that start at the same place by an internal order,
        # not by length; we then split on specials ourselves, longest first.
        self._prefix_specials = any(a != b and b.startswith(a) for a in toks for b in toks)

    @classmethod
    def from_encoding(cls, enc: tiktoken.Encoding) -> Tokenizer:
        if isinstance(enc, cls) or not isinstance(enc, tiktoken.Encoding):
            return enc  # already a jaxlm tokenizer (this class, or a Hugging Face tokenizer.json)
        return cls(enc.name, pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
                   special_tokens=enc._special_tokens)

    # ------------------------------------------------------------ identity

    @property
    def pattern(self) -> str:
        return self._pat_str

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        return self._mergeable_ranks

    @property
    def special_tokens(self) -> dict[str, int]:
        return self._special_tokens

    @property
    def eot_id(self) -> int | None:
        return self._special_tokens.get(EOT)

    def ranks_file_bytes(self) -> bytes:
        ranks = sorted(self._mergeable_ranks.items(), key=lambda kv: kv[1])
        return b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks)

    @functools.cached_property
    def hash(self) -> str:
        """sha256 over ranks, pattern and special tokens; the name does not count."""
        h = hashlib.sha256(self.ranks_file_bytes())
        h.update(b"\0" + self._pat_str.encode("utf-8") + b"\0")
        h.update(json.dumps(sorted(self._special_tokens.items(), key=lambda kv: kv[1])).encode())
        return h.hexdigest()

    def identity(self) -> dict:
        """What prepared data records about the tokenizer that made it."""
        return {"name": self.name, "hash": self.hash, "n_vocab": self.n_vocab, "eot_id": self.eot_id}

    # ------------------------------------------------------------ encode

    def encode(self, text: str, *, allowed_special: Specials = set(),  # noqa: B006
               disallowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        """tiktoken's encode; where one allowed special token is a prefix of another, the
        longest one that matches wins."""
        if not self._prefix_specials:
            return super().encode(text, allowed_special=allowed_special,
                                  disallowed_special=disallowed_special)
        allowed = self.special_tokens_set if allowed_special == "all" else set(allowed_special)
        if disallowed_special == "all":
            disallowed_special = self.special_tokens_set - allowed
        if disallowed_special:  # keep tiktoken's check and its error
            super().encode(text, allowed_special=allowed, disallowed_special=disallowed_special)
        out: list[int] = []
        for i, piece in enumerate(_split_specials(text, frozenset(allowed))):
            if i % 2:
                out.append(self._special_tokens[piece])
            elif piece:
                out += self.encode_ordinary(piece)
        return out

    def encode_iterable(self, texts: Iterable[str], *, allowed_special: Specials = set(),  # noqa: B006
                        disallowed_special: Literal["all"] | Collection[str] = "all",
                        flush_chars: int = 1 << 16) -> Iterator[int]:
        """Token ids of the concatenation of `texts`, identical to `encode("".join(texts))`,
        holding only about `flush_chars` characters (plus the longest pre-token) in memory."""
        for ids in self.encode_chunks(texts, allowed_special=allowed_special,
                                      disallowed_special=disallowed_special, flush_chars=flush_chars):
            yield from ids

    def encode_chunks(self, texts: Iterable[str], *, allowed_special: Specials = set(),  # noqa: B006
                      disallowed_special: Literal["all"] | Collection[str] = "all",
                      flush_chars: int = 1 << 16) -> Iterator[list[int]]:
        """`encode_iterable`, a list of ids at a time. Finding where the text may be cut costs a
        Python regex pass over it, so this runs at about half of `encode`'s speed."""
        allowed = frozenset(self.special_tokens_set if allowed_special == "all" else allowed_special)
        if disallowed_special == "all":
            disallowed_special = self.special_tokens_set - allowed
        check = _specials_regex(frozenset(disallowed_special))
        hold = max(map(len, disallowed_special), default=1) - 1
        tail = ""  # the end of the text already encoded, for disallowed specials across cuts

        def encode(text: str) -> list[int]:
            nonlocal tail
            if check is not None:
                if m := check.search(tail + text):
                    raise_disallowed_special_token(m.group())
                tail = (tail + text)[-hold:] if hold else ""
            return self.encode(text, allowed_special=allowed, disallowed_special=())

        buf, limit = "", flush_chars
        for text in texts:
            buf += text
            if len(buf) >= limit:
                cut = self._safe_cut(buf, allowed)
                if cut:
                    yield encode(buf[:cut])
                    buf = buf[cut:]
                limit = len(buf) + flush_chars  # a long pre-token is not rescanned per chunk
        if buf:
            yield encode(buf)

    def _safe_cut(self, buf: str, allowed: frozenset[str]) -> int:
        """An offset where the text may be cut without changing its tokens: before the last two
        pre-tokens after the last allowed special, and before any partial special at the end."""
        end = len(buf)
        for s in allowed:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    end = min(end, len(buf) - k)
                    break
        specials = _specials_regex(allowed)
        for m in specials.finditer(buf) if specials is not None and end < len(buf) else ():
            if m.start() < end < m.end():  # a longer special may be forming across the cut
                end = m.start()
                break
        last = _split_specials(buf[:end], allowed)[-1]
        start = end - len(last)
        pat = _compiled(self._pat_str)
        starts = [m.start() for m in pat.finditer(last)]
        # Keep the last two pre-tokens: their extent can depend on text after them (contractions,
        # a whitespace run's lookahead). The text before the cut is encoded on its own, so its
        # pre-tokens must come out the same where it ends at the cut: check the last eight.
        for j in range(len(starts) - 2, 0, -1):
            a = max(0, j - 8)
            if [m.start() for m in pat.finditer(last, starts[a], starts[j])] == starts[a:j]:
                return start + starts[j]
        return start


@functools.lru_cache(maxsize=16)
def _compiled(pattern: str) -> regex.Pattern:
    return regex.compile(pattern)


@functools.lru_cache(maxsize=64)
def _specials_regex(allowed: frozenset[str]) -> regex.Pattern | None:
    if not allowed:
        return None
    by_length = sorted(allowed, key=lambda s: (-len(s), s))
    return regex.compile("(" + "|".join(map(regex.escape, by_length)) + ")")


def _split_specials(text: str, allowed: frozenset[str]) -> list[str]:
    """[text, special, text, special, ..., text], longest special first."""
    pat = _specials_regex(allowed)
    return pat.split(text) if pat is not None else [text]


# ---------------------------------------------------------------- constructors


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens (id = byte value) plus <|endoftext|> = 256; no merges."""
    return Tokenizer("bytes", pat_str=r"[\s\S]",
                     mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={EOT: 256})


def from_bpe(vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]],
             special_tokens: Iterable[str] = (), *, name: str = "bpe",
             pat_str: str = GPT2_PAT_STR) -> Tokenizer:
    """A tokenizer from `train_bpe` output (or any vocab whose merged tokens have ids in merge
    order): ranks = ids, so tiktoken's lowest-rank-first merging applies the merges in order."""
    specials = {s: None for s in special_tokens}
    by_bytes: dict[bytes, int] = {}
    for i in sorted(vocab):  # where merges also made a special's bytes, the special takes the lower id
        by_bytes.setdefault(vocab[i], i)
    for s in specials:
        if s.encode("utf-8") not in by_bytes:
            raise UserError(f"special token {s!r} is not in the vocabulary")
        specials[s] = by_bytes[s.encode("utf-8")]
    special_ids = set(specials.values())
    ranks = {b: i for i, b in vocab.items() if i not in special_ids}
    if len(ranks) != len(vocab) - len(special_ids):
        raise UserError("the vocabulary has two ids for the same bytes; tiktoken needs one rank per token")
    missing = [bytes([i]) for i in range(256) if bytes([i]) not in ranks]
    if missing:
        raise UserError(f"the vocabulary lacks {len(missing)} single-byte tokens, e.g. {missing[0]!r}")
    last = -1
    for i, (a, b) in enumerate(merges):
        r = ranks.get(a + b)
        if r is None or r <= last:
            raise UserError(f"merge {i} {a!r} + {b!r}: the merged token is missing from the "
                            "vocabulary or its id is not in merge order")
        last = r
    return Tokenizer(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)


def load_gpt2_files(vocab_path: str, merges_path: str, *, name: str = "gpt2") -> Tokenizer:
    """GPT-2-style `vocab.json` (encoder.json) + `merges.txt` (vocab.bpe, with or without the
    `#version` line). Vocabulary entries that are neither bytes nor merges are special tokens."""
    dec = _gpt2_byte_decoder()

    def to_bytes(s: str, where: str) -> bytes:
        try:
            return bytes(dec[c] for c in s)
        except KeyError as e:
            raise UserError(f"{where}: {s!r} has character {e.args[0]!r} outside GPT-2's byte alphabet") from None

    try:
        with open(vocab_path, encoding="utf-8") as f:
            encoder = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read GPT-2 tokenizer files: {e}") from None
    merges = []
    for n, line in enumerate(lines, 1):
        if line.strip() and not (n == 1 and line.startswith("#version")):
            parts = line.split()
            if len(parts) != 2:
                raise UserError(f"{merges_path}:{n}: expected two tokens separated by a space, got {line!r}")
            merges.append((to_bytes(parts[0], merges_path), to_bytes(parts[1], merges_path)))
    merged = {a + b for a, b in merges}
    vocab, specials = {}, []
    for s, i in encoder.items():
        b = to_bytes(s, vocab_path) if all(c in dec for c in s) else None
        if b is not None and (len(b) == 1 or b in merged):
            vocab[i] = b
        else:
            specials.append(s)
            vocab[i] = s.encode("utf-8")
    return from_bpe(vocab, merges, specials, name=name)


# ---------------------------------------------------------------- save / load


def save_tokenizer(tok: tiktoken.Encoding, directory: str) -> None:
    """Write `tokenizer.tiktoken` and `tokenizer.json` (last, atomically) into `directory`."""
    tok = Tokenizer.from_encoding(tok)
    os.makedirs(directory, exist_ok=True)
    config = {"format": "jaxlm-tokenizer", "version": 1, "name": tok.name, "pattern": tok.pattern,
              "special_tokens": tok.special_tokens, "n_vocab": tok.n_vocab, "hash": tok.hash}
    for fname, data in ((RANKS_FILE, tok.ranks_file_bytes()),
                        (CONFIG_FILE, (json.dumps(config, indent=1, ensure_ascii=False) + "\n").encode())):
        tmp = os.path.join(directory, f".{fname}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(directory, fname))


def _read_ranks(path: str) -> dict[bytes, int]:
    """`tokenizer.tiktoken`: one `<base64 token> <rank>` per line, each token and rank once, every
    single byte present (tiktoken's Rust core panics, not raises, on a table without them)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                token, rank = binascii.a2b_base64(token, strict_mode=True), int(rank)
            except ValueError:
                raise ValueError(f"line {number} is not '<base64 token> <rank>'") from None
            if token in ranks:
                raise ValueError(f"line {number} repeats the token {token!r}")
            ranks[token] = rank
    if len(set(ranks.values())) != len(ranks):
        raise ValueError("two tokens share a rank")
    if missing := [i for i in range(256) if bytes([i]) not in ranks]:
        raise ValueError(f"{len(missing)} of the 256 single bytes have no rank (e.g. byte {missing[0]})")
    return ranks


def _load_directory(directory: str) -> Tokenizer:
    try:
        with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError(f"{CONFIG_FILE} holds a {type(config).__name__}, not a mapping")
        ranks = _read_ranks(os.path.join(directory, RANKS_FILE))
        specials = config["special_tokens"]
        if clash := set(specials.values()) & set(ranks.values()):
            raise ValueError(f"special token ids {sorted(clash)[:3]} are also ranks of {RANKS_FILE}")
        tok = Tokenizer(config["name"], pat_str=config["pattern"], mergeable_ranks=ranks, special_tokens=specials)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"tokenizer directory {directory} is not readable: {type(e).__name__}: {e}") from None
    if config.get("hash") and config["hash"] != tok.hash:
        raise UserError(f"tokenizer directory {directory}: its files do not match the hash in {CONFIG_FILE}")
    return tok


def _load_named(name: str) -> Tokenizer:
    try:
        return Tokenizer.from_encoding(tiktoken.get_encoding(name))
    except Exception as e:  # noqa: BLE001 (network, cache and plugin errors all land here)
        raise UserError(
            f"tiktoken encoding {name!r} is not in the tiktoken cache and could not be downloaded "
            f"({type(e).__name__}); offline, set TIKTOKEN_CACHE_DIR to a directory that holds its files"
        ) from None


def _is_jaxlm_directory(directory: str) -> bool:
    """jaxlm's own directories hold tokenizer.tiktoken beside a tokenizer.json of format
    jaxlm-tokenizer; a Hugging Face directory's tokenizer.json is the `tokenizers` library's."""
    if os.path.isfile(os.path.join(directory, RANKS_FILE)):
        return True
    try:
        with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as f:
            head = f.read(4096)
    except OSError:
        return False
    return '"jaxlm-tokenizer"' in head  # saved with its format key near the top


def load_tokenizer(spec: str) -> Tokenizer:
    """'bytes', a saved tokenizer directory, a Hugging Face tokenizer.json (or a directory that
    holds one), a directory with GPT-2 `vocab.json` + `merges.txt` (or `encoder.json` +
    `vocab.bpe`), or a tiktoken encoding name ('gpt2', 'cl100k_base', ...)."""
    from jaxlm.tokenizer.hf import load_hf_tokenizer

    if spec == "bytes":
        return byte_tokenizer()
    if os.path.isfile(spec) and spec.endswith(".json"):
        return load_hf_tokenizer(spec)
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, CONFIG_FILE)):
            return _load_directory(spec) if _is_jaxlm_directory(spec) else load_hf_tokenizer(spec)
        for v, m in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            if os.path.isfile(os.path.join(spec, v)) and os.path.isfile(os.path.join(spec, m)):
                return load_gpt2_files(os.path.join(spec, v), os.path.join(spec, m),
                                       name=os.path.basename(os.path.normpath(spec)))
        raise UserError(f"{spec} holds no {CONFIG_FILE} (nor vocab.json + merges.txt); "
                        "make one with `jaxlm tokenizer train` or `jaxlm tokenizer convert`")
    if spec in NAMED:
        return _load_named(spec)
    raise UserError(f"tokenizer {spec!r} is not known: expected 'bytes', a tokenizer directory, a Hugging Face "
                    f"tokenizer.json, or a tiktoken encoding ({', '.join(NAMED)})")
