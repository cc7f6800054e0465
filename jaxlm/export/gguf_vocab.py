"""What a GGUF file says about its tokenizer, whichever kind of tokenizer it came from."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class GGUFVocab:
    """What a GGUF file says about its tokenizer (the tokenizer.ggml.* keys)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str | None  # llama.cpp's pre-tokenizer name (gpt2 model only)
    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    merges: list[str] = dataclasses.field(default_factory=list)  # "left right" (gpt2 model)
    scores: list[float] | None = None  # llama model: higher merges first
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    add_bos: bool = False
    add_space_prefix: bool | None = None  # llama model: a '▁' before the text
