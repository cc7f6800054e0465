"""A Hugging Face `tokenizer.json` (Llama 3 / Qwen2 byte-level BPE, Llama 2 / Mistral
SentencePiece-style BPE, ...) as a jaxlm tokenizer, encoded by the `tokenizers` library.

`HFTokenizer` has the interface the rest of jaxlm uses of a tiktoken `Tokenizer` (encode with
allowed/disallowed special tokens, batch and streaming encode, decode, token bytes, `eot_id`,
`n_vocab`, a content hash, `identity()`), plus what a Hugging Face model directory says beside
the tokenizer: its end-of-text token (`eos_token` of tokenizer_config.json), its BOS token and
whether the post-processor adds it, and its chat template. Exports write the original files back.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
from collections.abc import Collection, Iterable, Iterator
from collections.abc import Set as AbstractSet
from typing import Literal

import numpy as np

from jaxlm.errors import UserError

HF_FILE, HF_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
# files of a Hugging Face tokenizer that an export copies beside the model
SIBLING_FILES = (HF_CONFIG_FILE, "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                 "chat_template.jinja")
# the end-of-text token when no tokenizer_config.json names one, in this order
EOS_GUESSES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<|eot_id|>", "<eos>")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

Specials = Literal["all"] | AbstractSet[str]


def is_hf_tokenizer_json(config: object) -> bool:
    """A parsed tokenizer.json written by the `tokenizers` library (not jaxlm's own format)."""
    return isinstance(config, dict) and "model" in config and config.get("format") != "jaxlm-tokenizer"


def _token_text(value) -> str | None:
    """tokenizer_config.json names tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not a mapping")
    return data


def _clean(text: str) -> str:
    """Lone surrogates (from JSON escapes) as U+FFFD, as tiktoken's encode does."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer` read from a tokenizer.json, with jaxlm's tokenizer interface."""

    def __init__(self, path: str, *, name: str | None = None):
        self.path = os.path.abspath(path)
        self.directory = os.path.dirname(self.path)
        self.name = name or os.path.basename(self.directory) or "hf"
        self.json = _read_json(path)
        if not is_hf_tokenizer_json(self.json):
            raise UserError(f"{path} is not a Hugging Face tokenizer.json (it has no 'model')")
        self.text = json.dumps(self.json, ensure_ascii=False)
        try:
            self._build()
        except Exception as e:  # noqa: BLE001 (the Rust side raises plain Exceptions)
            raise UserError(f"{path}: the tokenizers library cannot read it: {e}") from None
        config_path = os.path.join(self.directory, HF_CONFIG_FILE)
        self.config = _read_json(config_path) if os.path.isfile(config_path) else {}
        self.chat_template = self._find_chat_template()  # for chat fine-tuning; not used in encoding
        added = self.json.get("added_tokens") or []
        self.special_tokens = {t["content"]: t["id"] for t in added if t.get("special")}
        self._vocab = self._tk.get_vocab(with_added_tokens=True)
        self.n_vocab = max(self._vocab.values()) + 1
        self.eot_token = self._find_eos()
        self.eot_id = self._vocab.get(self.eot_token) if self.eot_token else None
        self.bos_id, self.add_bos = self._find_bos()

    def _build(self) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self._tk = RustTokenizer.from_str(self.text)  # special-token text -> special ids
        self._plain = RustTokenizer.from_str(self.text)  # special-token text -> plain text
        self._plain.encode_special_tokens = True

    def __getstate__(self) -> dict:
        """For prepare's spawned workers: a pickled tokenizers.Tokenizer forgets
        encode_special_tokens, so the two are rebuilt from the JSON instead."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_tk", "_plain", "_token_bytes")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._build()

    # ------------------------------------------------------------ what the files say

    def _find_eos(self) -> str | None:
        named = _token_text(self.config.get("eos_token"))
        if named is None:
            map_path = os.path.join(self.directory, "special_tokens_map.json")
            if os.path.isfile(map_path):
                named = _token_text(_read_json(map_path).get("eos_token"))
        if named is not None:
            if named not in self._vocab:
                raise UserError(f"{self.directory}: eos_token {named!r} is not in {self.path}")
            return named
        return next((t for t in EOS_GUESSES if t in self._vocab), None)

    def _find_chat_template(self) -> str | dict | list | None:
        """tokenizer_config.json's chat_template, or chat_template.jinja beside it (where
        transformers >= 4.47 saves it)."""
        if self.config.get("chat_template") is not None:
            return self.config["chat_template"]
        jinja = os.path.join(self.directory, "chat_template.jinja")
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                return f.read()
        return None

    def _find_bos(self) -> tuple[int | None, bool]:
        """(BOS id, whether encoding with special tokens puts it first): the post-processor's
        leading token, seen by encoding with and without it."""
        plain = self._tk.encode("a", add_special_tokens=False).ids
        full = self._tk.encode("a", add_special_tokens=True).ids
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i: i + len(plain)] == plain), 0)
        lead = full[:at]  # what comes before the text (an EOS after it does not count)
        named = _token_text(self.config.get("bos_token"))
        if named is not None and named in self._vocab:
            return self._vocab[named], bool(lead) and lead[0] == self._vocab[named]
        return (lead[0], True) if lead else (None, False)

    @property
    def byte_level(self) -> bool:
        """Tokens spelled in GPT-2's byte alphabet (a ByteLevel pre-tokenizer or decoder)."""
        return "ByteLevel" in _types(self.json.get("pre_tokenizer")) | _types(self.json.get("decoder"))

    @property
    def pattern(self) -> str | None:
        """The regex of the pre-tokenizer's Split, where it has one (for display and GGUF)."""
        for node in _nodes(self.json.get("pre_tokenizer")):
            if node.get("type") == "Split":
                pat = node.get("pattern") or {}
                return pat.get("Regex") or pat.get("String")
        return None

    @functools.cached_property
    def hash(self) -> str:
        """sha256 of the tokenizer.json's content (key order and whitespace do not count) and of
        the end-of-text token jaxlm puts between documents; the name does not count."""
        h = hashlib.sha256(json.dumps(self.json, sort_keys=True, separators=(",", ":"),
                                      ensure_ascii=False).encode("utf-8"))
        h.update(b"\0eot\0" + (self.eot_token or "").encode("utf-8"))
        return h.hexdigest()

    def identity(self) -> dict:
        """What prepared data records about the tokenizer that made it."""
        return {"name": self.name, "hash": self.hash, "n_vocab": self.n_vocab, "eot_id": self.eot_id}

    # ------------------------------------------------------------ encode

    def _encoder(self, text_parts: Iterable[str], allowed_special: Specials,
                 disallowed_special: Literal["all"] | Collection[str]):
        """The Rust tokenizer for these rules, after tiktoken's check of disallowed specials."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        if allowed and allowed != set(self.special_tokens):
            # the tokenizers library matches every special token in text or none
            raise ValueError("a Hugging Face tokenizer encodes all special tokens or none: "
                             "pass allowed_special='all' or leave it empty")
        disallowed = set(self.special_tokens) - allowed if disallowed_special == "all" else set(disallowed_special)
        if disallowed:
            for part in text_parts:
                if found := next((s for s in disallowed if s in part), None):
                    raise ValueError(f"the text contains the special token {found!r}; pass "
                                     "allowed_special='all' to encode it as one, or disallowed_special=() as text")
        return self._tk if allowed else self._plain

    def encode(self, text: str, *, allowed_special: Specials = set(),  # noqa: B006
               disallowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        """The ids of `text` without the post-processor's BOS/EOS (as tiktoken's encode)."""
        return _batch(self._encoder([text], allowed_special, disallowed_special), [text])[0]

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encode(text, disallowed_special=())

    def encode_ordinary_batch(self, texts: list[str], *, num_threads: int = 0) -> list[list[int]]:
        """Special-token text encodes as plain text; the tokenizers library picks its threads."""
        return _batch(self._plain, texts)

    def encode_to_numpy(self, text: str, *, allowed_special: Specials = set(),  # noqa: B006
                        disallowed_special: Literal["all"] | Collection[str] = "all") -> np.ndarray:
        return np.asarray(self.encode(text, allowed_special=allowed_special,
                                      disallowed_special=disallowed_special), np.uint32)

    def encode_single_token(self, token: str | bytes) -> int:
        if isinstance(token, bytes):
            token = token.decode("utf-8")
        return self._vocab[token]  # KeyError, as tiktoken's

    def encode_iterable(self, texts: Iterable[str], **kwargs) -> Iterator[int]:
        for ids in self.encode_chunks(texts, **kwargs):
            yield from ids

    def encode_chunks(self, texts: Iterable[str], *, allowed_special: Specials = set(),  # noqa: B006
                      disallowed_special: Literal["all"] | Collection[str] = "all",
                      flush_chars: int = 1 << 16) -> Iterator[list[int]]:
        """The ids of the concatenation of `texts` in pieces, equal to `encode("".join(texts))`
        where every cut is one `_safe_cut` verified; holds about `flush_chars` characters."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        disallowed = set(self.special_tokens) - allowed if disallowed_special == "all" else set(disallowed_special)
        hold = max(map(len, disallowed), default=1) - 1
        buf, tail, limit, warned = "", "", flush_chars, False
        for text in texts:
            buf += text
            if len(buf) < limit:
                continue
            cut = self._safe_cut(buf, allowed)
            if cut:
                self._encoder([tail + buf[:cut]], allowed, disallowed)  # a disallowed special across the cut
                tail = buf[:cut][-hold:] if hold else ""
                yield self.encode(buf[:cut], allowed_special=allowed, disallowed_special=())
                buf = buf[cut:]
            elif len(buf) > 16 * flush_chars and not warned:
                print(f"jaxlm: warning: tokenizer {self.name}: no place to cut this text without changing its "
                      "tokens was found; it is encoded whole (memory grows with it)", file=sys.stderr, flush=True)
                warned = True
            limit = len(buf) + flush_chars
        if buf:
            self._encoder([tail + buf], allowed, disallowed)
            yield self.encode(buf, allowed_special=allowed, disallowed_special=())

    def _safe_cut(self, buf: str, allowed: set[str], window: int = 512, tries: int = 16) -> int:
        """An offset before a newline or space near the end of `buf` where encoding the two sides
        apart gives the tokens of encoding them together, checked on `window` characters either
        side (the tokenizer's rules are local; this finds where its start-of-text rules, such as a
        prepended '▁', do not apply). 0 when no candidate passes."""
        kw = {"allowed_special": allowed, "disallowed_special": ()}
        pos, tried = len(buf) - window, 0
        while pos > window and tried < tries:
            pos = max(buf.rfind("\n", window, pos), buf.rfind(" ", window, pos))
            if pos <= window:
                break
            for cut in (pos + 1, pos) if buf[pos] == "\n" else (pos,):
                left, right = buf[cut - window: cut], buf[cut: cut + window]
                if self.encode(left + right, **kw) == self.encode(left, **kw) + self.encode(right, **kw):
                    return cut
            tried += 1
        return 0

    # ------------------------------------------------------------ decode

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        return self._tk.decode(list(ids), skip_special_tokens=False)

    @functools.cached_property
    def _token_bytes(self) -> list[bytes]:
        """Each id's bytes: specials as their text, byte-level pieces through GPT-2's alphabet,
        SentencePiece pieces with '▁' as a space and <0xNN> as that byte."""
        from jaxlm.tokenizer.byte_alphabet import gpt2_byte_decoder as _gpt2_byte_decoder

        out = [b""] * self.n_vocab
        dec = _gpt2_byte_decoder() if self.byte_level else None
        added = {t["id"] for t in self.json.get("added_tokens") or []}
        for piece, i in self._vocab.items():
            if i in added:
                out[i] = piece.encode("utf-8")
            elif dec is not None and all(c in dec for c in piece):
                out[i] = bytes(dec[c] for c in piece)
            elif m := _BYTE_PIECE.fullmatch(piece):
                out[i] = bytes([int(m.group(1), 16)])
            else:
                out[i] = piece.replace("\u2581", " ").encode("utf-8")
        return out

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self._token_bytes[token]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self._token_bytes[i] for i in ids)

    def __repr__(self) -> str:
        return f"<HFTokenizer {self.name!r} ({self.path}), {self.n_vocab} tokens>"


def _batch(tk, texts: list[str]) -> list[list[int]]:
    """Ids without the post-processor's additions; encode_batch_fast (tokenizers >= 0.20) skips
    the offsets: about twice as fast on long texts."""
    encode = getattr(tk, "encode_batch_fast", tk.encode_batch)
    try:
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    except TypeError:  # lone surrogates are not a Rust string
        return [e.ids for e in encode([_clean(t) for t in texts], add_special_tokens=False)]


def _nodes(node) -> list[dict]:
    """A pre-tokenizer / decoder / normalizer config and the members of its Sequences."""
    if not isinstance(node, dict):
        return []
    members = node.get("pretokenizers") or node.get("decoders") or node.get("normalizers") or node.get("processors")
    return [node] + [n for m in members or [] for n in _nodes(m)]


def _types(node) -> set[str]:
    return {n.get("type") for n in _nodes(node)}


def load_hf_tokenizer(path: str) -> HFTokenizer:
    """A tokenizer.json file, or a directory that holds one (a Hugging Face model directory)."""
    file = os.path.join(path, HF_FILE) if os.path.isdir(path) else path
    name = os.path.basename(os.path.normpath(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))))
    return HFTokenizer(file, name=name)
