"""A jaxlm (tiktoken) tokenizer as Hugging Face tokenizer files and as a GGUF vocabulary.

Both targets want byte-level BPE as GPT-2 writes it: tokens spelled in GPT-2's byte-to-unicode
alphabet, plus an ordered merge list. tiktoken keeps only ranks; the merges are recovered by
running BPE on each token with the ranks below its own until two parts remain (the method of
transformers' TikTokenConverter). Ids the model has beyond the tokenizer's are "[PAD<id>]".
A Hugging Face tokenizer.json is written back as it came (hf_tokenizer_files.py).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from jaxlm.tokenizer.hf import HFTokenizer
from jaxlm.tokenizer.tokenizer import EOT, GPT2_PAT_STR, Tokenizer, _gpt2_byte_decoder
from jaxlm.errors import UserError
from jaxlm.export.gguf_vocab import GGUFVocab


@functools.lru_cache(maxsize=1)
def _byte_encoder() -> dict[int, str]:
    return {b: c for c, b in _gpt2_byte_decoder().items()}


def spell(token: bytes) -> str:
    enc = _byte_encoder()
    return "".join(enc[b] for b in token)


def _split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best is None:
            break
        parts[best: best + 2] = [parts[best] + parts[best + 1]]
    return parts


def merges(tok: Tokenizer) -> list[tuple[str, str]]:
    """The merge list, in rank order, spelled in GPT-2's alphabet."""
    ranks = tok.mergeable_ranks
    out = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = _split(ranks, token, rank)
            if len(parts) != 2:
                raise UserError(f"tokenizer {tok.name}: token {token!r} is not a merge of two lower-ranked tokens; "
                                "it cannot be written as byte-level BPE")
            out.append((spell(parts[0]), spell(parts[1])))
    return out


def vocabulary(tok: Tokenizer, n_vocab: int) -> tuple[list[str], set[int]]:
    """(token strings by id for ids 0..n_vocab-1, ids of special tokens)."""
    if tok.n_vocab > n_vocab:
        raise UserError(f"tokenizer {tok.name} has {tok.n_vocab} tokens but the model only {n_vocab}")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    for token, rank in tok.mergeable_ranks.items():
        tokens[rank] = spell(token)
    for text, i in tok.special_tokens.items():
        tokens[i] = text
    return tokens, set(tok.special_tokens.values())


def write_hf_tokenizer(tok: Tokenizer | HFTokenizer, out: Path, n_vocab: int, max_len: int) -> None:
    """tokenizer.json (made with the `tokenizers` library), tokenizer_config.json and
    special_tokens_map.json, with <|endoftext|> as bos and eos where the tokenizer has it; a
    Hugging Face tokenizer's own files, as they are."""
    if isinstance(tok, HFTokenizer):
        from jaxlm.export.hf_tokenizer_files import copy_hf_tokenizer

        return copy_hf_tokenizer(tok, out, n_vocab, max_len)
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    tokens, specials = vocabulary(tok, n_vocab)
    vocab = {s: i for i, s in enumerate(tokens) if i not in specials}
    # ignore_merges: a pre-token that is itself a token is taken whole, as tiktoken does
    hf = RustTokenizer(models.BPE(vocab, merges(tok), ignore_merges=True, fuse_unk=False))
    if tok.pattern == GPT2_PAT_STR:
        split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        split = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(tok.pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.pre_tokenizer = split
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False)
                           for s, _ in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])])
    hf.save(str(out / "tokenizer.json"))
    named = {"bos_token": EOT, "eos_token": EOT} if tok.eot_id is not None else {}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False, **named}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(named, indent=2, ensure_ascii=False))


# llama.cpp's pre-tokenizer names for the patterns it implements
GGUF_PRE = {
    GPT2_PAT_STR: "gpt-2",
    r"[\s\S]": "gpt-2",  # the byte tokenizer: no merges, so any split gives the same ids
}


def gguf_pre(tok: Tokenizer) -> str | None:
    return GGUF_PRE.get(tok.pattern)


def gguf_vocab(tok: Tokenizer | HFTokenizer, n_vocab: int) -> GGUFVocab:
    """The tokenizer as GGUF keys: tiktoken ranks as byte-level BPE; a Hugging Face tokenizer as
    it is (hf_tokenizer_files.py)."""
    import gguf

    if isinstance(tok, HFTokenizer):
        from jaxlm.export.hf_tokenizer_files import hf_gguf_vocab

        return hf_gguf_vocab(tok, n_vocab)
    tokens, specials = vocabulary(tok, n_vocab)
    real = set(tok.mergeable_ranks.values())
    T = gguf.TokenType
    types = [T.CONTROL if i in specials else T.NORMAL if i in real else T.UNUSED for i in range(n_vocab)]
    # llama.cpp requires the merges key and the gguf package cannot write an empty array: a
    # tokenizer without merges (bytes) gets one whose left side no merge can ever produce
    pairs = [f"{a} {b}" for a, b in merges(tok)] or ["\u0120\u0120 \u0120\u0120"]
    return GGUFVocab("gpt2", gguf_pre(tok), tokens, types, pairs, bos_id=tok.eot_id, eos_id=tok.eot_id)
