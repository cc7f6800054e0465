"""A Hugging Face tokenizer.json (jaxlm's HFTokenizer) in exports.

HF export: the original tokenizer.json and the files beside it (tokenizer_config.json with its
chat template and special tokens, ...) are copied, so `AutoTokenizer` loads the tokenizer the model
trained with. GGUF: byte-level BPE becomes llama.cpp's "gpt2" model (tokens, merges, the
pre-tokenizer named by its regex); SentencePiece-style BPE (byte fallback, '▁') its "llama" model,
with scores from the merge order. llama.cpp's SentencePiece tokenizer merges every adjacent pair
whose concatenation is a token, best score first; that is the BPE of the tokenizer.json only where
every such pair is a merge and the merges come in the order of what they make (as in the Llama 2 and
Mistral conversions). Other tokenizers are refused in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from jaxlm.errors import UserError
from jaxlm.export.gguf_vocab import GGUFVocab
from jaxlm.tokenizer.hf import HF_CONFIG_FILE, HF_FILE, SIBLING_FILES, HFTokenizer, _types

# llama.cpp's names for the byte-level pre-tokenizer regexes it implements
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_BY_REGEX = {LLAMA3_PAT: "llama-bpe", QWEN2_PAT: "qwen2"}


def _check_size(tok: HFTokenizer, n_vocab: int) -> None:
    if tok.n_vocab > n_vocab:
        raise UserError(f"tokenizer {tok.name} has {tok.n_vocab} tokens but the model only {n_vocab}")


def copy_hf_tokenizer(tok: HFTokenizer, out: Path, n_vocab: int, max_len: int) -> None:
    """tokenizer.json and the files beside it as they are; a tokenizer_config.json naming the
    eos/bos tokens and the chat template where there was none."""
    _check_size(tok, n_vocab)
    shutil.copyfile(tok.path, out / HF_FILE)
    source = Path(tok.directory)
    for name in SIBLING_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    if (source / HF_CONFIG_FILE).is_file():
        return
    named = {"eos_token": tok.eot_token} if tok.eot_token else {}
    if tok.bos_id is not None:
        named["bos_token"] = tok._tk.id_to_token(tok.bos_id)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
              "clean_up_tokenization_spaces": False, **named}
    if isinstance(tok.chat_template, str):
        config["chat_template"] = tok.chat_template
    (out / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(named, indent=2, ensure_ascii=False))


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    """tokenizer.json writes merges as "a b" (older) or ["a", "b"] (tokenizers >= 0.20)."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def hf_gguf_vocab(tok: HFTokenizer, n_vocab: int) -> GGUFVocab:
    import gguf

    _check_size(tok, n_vocab)
    model = tok.json["model"]
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export of tokenizer {tok.name}: its model is {model.get('type')}; only BPE "
                        "(byte-level, or SentencePiece-style with byte fallback) is written for llama.cpp")
    T = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [T.UNUSED] * n_vocab
    added = {t["id"]: t for t in tok.json.get("added_tokens") or []}
    for piece, i in tok._vocab.items():
        tokens[i] = piece
        types[i] = (T.CONTROL if added[i].get("special") else T.USER_DEFINED) if i in added else T.NORMAL
    pairs = _merge_pairs(model)
    common = dict(bos_id=tok.bos_id, eos_id=tok.eot_id, add_bos=tok.add_bos)
    if tok.byte_level:
        pre = GGUF_PRE_BY_REGEX.get(tok.pattern) if tok.pattern else "gpt-2"
        return GGUFVocab("gpt2", pre, tokens, types, [f"{a} {b}" for a, b in pairs], **common)
    if not model.get("byte_fallback") or not ({"Metaspace", "Prepend"} & (_types(tok.json.get("pre_tokenizer"))
                                                                          | _types(tok.json.get("normalizer")))):
        raise UserError(f"GGUF export of tokenizer {tok.name}: a BPE that is neither byte-level nor SentencePiece-"
                        "style (byte_fallback with '▁' for spaces) has no llama.cpp tokenizer")
    scores = _spm_scores(tok, pairs, n_vocab)
    for i, piece in enumerate(tokens[: tok.n_vocab]):
        if types[i] == T.NORMAL and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types[i] = T.BYTE
    unk = model.get("unk_token")
    unk_id = tok._vocab.get(unk) if unk else None
    if unk_id is not None:
        types[unk_id] = T.UNKNOWN
    return GGUFVocab("llama", None, tokens, types, scores=scores, unk_id=unk_id,
                     add_space_prefix=_adds_space_prefix(tok.json), **common)


def _adds_space_prefix(config: dict) -> bool:
    """A '▁' before the text: a Metaspace that prepends, or a Prepend normalizer (Llama 2's legacy form)."""
    from jaxlm.tokenizer.hf import _nodes

    for node in _nodes(config.get("pre_tokenizer")) + _nodes(config.get("normalizer")):
        if node.get("type") == "Metaspace":
            return node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never") != "never"
        if node.get("type") == "Prepend":
            return True
    return False


def _spm_scores(tok: HFTokenizer, pairs: list[tuple[str, str]], n_vocab: int) -> list[float]:
    """Scores for llama.cpp's SentencePiece merging (the first merge that makes a token ranks it);
    refused where that merging is not this BPE."""
    vocab = tok.json["model"]["vocab"]
    first: dict[str, int] = {}
    for rank, (a, b) in enumerate(pairs):
        first.setdefault(a + b, rank)
    where = f"GGUF export of tokenizer {tok.name}"
    order = [first[a + b] for a, b in pairs]
    if any(x > y for x, y in zip(order, order[1:])):
        raise UserError(f"{where}: its merges do not come in the order of the tokens they make, so llama.cpp's "
                        "SentencePiece tokenizer would encode differently; export --format hf instead")
    known, added = set(pairs), {t["content"] for t in tok.json.get("added_tokens") or []}
    for piece in vocab.keys() - added:
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab and (a, b) not in known:
                raise UserError(f"{where}: {a!r} + {b!r} makes the token {piece!r} but is not one of its merges, so "
                                "llama.cpp's SentencePiece tokenizer would encode differently; export --format hf "
                                "instead")
    return [-float(first[t]) - 1.0 if t in first else 0.0 for t in (tok._tk.id_to_token(i) or "" for i in range(n_vocab))]
