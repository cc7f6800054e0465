"""Tokenizers are tiktoken Encodings. (Minimal for now: the byte-level tokenizer.)"""

from __future__ import annotations

import tiktoken

from jaxlm.errors import UserError

EOT = "<|endoftext|>"


def byte_tokenizer() -> tiktoken.Encoding:
    """256 byte tokens (id = byte value) plus <|endoftext|> = 256; no merges."""
    return tiktoken.Encoding(
        name="bytes",
        pat_str=r"[\s\S]",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={EOT: 256},
    )


def load_tokenizer(spec: str) -> tiktoken.Encoding:
    if spec == "bytes":
        return byte_tokenizer()
    raise UserError(f"data.tokenizer={spec!r} is not known; expected 'bytes'")
