"""`jaxlm tokenizer train | info | encode | decode | convert`."""

from __future__ import annotations

import json
import os
import sys
import time

from jaxlm.errors import UserError


SPEC_HELP = ("the tokenizer: 'bytes' (256 bytes + <|endoftext|>), a directory written by `jaxlm tokenizer train` "
             "or `convert`, a Hugging Face tokenizer.json or a model directory holding one, or a tiktoken "
             "encoding name (gpt2, r50k_base, cl100k_base, o200k_base; tiktoken downloads it on first use)")


def add_arguments(p) -> None:
    p.epilog = f"SPEC (info, encode, decode, convert) is {SPEC_HELP}."
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE tokenizer on text files")
    t.add_argument("corpus", nargs="+", metavar="CORPUS", help="UTF-8 text files")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--special", action="append", metavar="TOKEN",
                   help="a special token (repeatable; default: <|endoftext|>)")
    t.add_argument("-o", "--output", required=True, metavar="DIR")
    t.add_argument("--name", help="the tokenizer's name (default: the output directory's name)")
    t.add_argument("--workers", type=int, default=None, help="pre-tokenization processes (default: all cores)")
    t.add_argument("--force", action="store_true", help="replace a tokenizer already in DIR")

    i = sub.add_parser("info", help="name, size, special tokens and hash of a tokenizer")
    i.add_argument("spec", metavar="SPEC", help=SPEC_HELP)

    e = sub.add_parser("encode", help="print the token ids of a text (or of --file)")
    e.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    e.add_argument("text", nargs="?", help="the text to encode")
    e.add_argument("--file", help="encode this UTF-8 file instead of TEXT")
    e.add_argument("--allow-special", action="store_true", help="encode special-token text as special tokens")

    d = sub.add_parser("decode", help="print the text of token ids")
    d.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    d.add_argument("ids", nargs="+", type=int, help="token ids")

    c = sub.add_parser("convert", help="save any tokenizer (or GPT-2 vocab.json + merges.txt) as a jaxlm directory")
    c.add_argument("spec", nargs="?", metavar="SPEC", help=SPEC_HELP + "; or give --gpt2-vocab and --gpt2-merges")
    c.add_argument("--gpt2-vocab", metavar="VOCAB_JSON", help="GPT-2 encoder.json / vocab.json")
    c.add_argument("--gpt2-merges", metavar="MERGES_TXT", help="GPT-2 merges.txt")
    c.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to write the tokenizer to")
    c.add_argument("--name", help="the tokenizer's name (default: the output directory's name)")
    c.add_argument("--force", action="store_true", help="replace a tokenizer already in DIR")


def refuse_to_replace(output: str, force: bool) -> None:
    """Runs and prepared corpora name a tokenizer by its directory: replacing one is asked for."""
    from jaxlm.tokenizer.tokenizer import CONFIG_FILE, RANKS_FILE

    if not force and any(os.path.exists(os.path.join(output, f)) for f in (CONFIG_FILE, RANKS_FILE)):
        raise UserError(f"{output} already holds a tokenizer; pass --force to replace it")


def main(args) -> int:
    from jaxlm.tokenizer import tokenizer as T

    if args.command == "train":
        from jaxlm.tokenizer.bpe import train_bpe

        specials = args.special if args.special is not None else [T.EOT]
        if "" in specials:
            raise UserError("--special '' is empty; a special token is a non-empty string such as <|endoftext|>")
        refuse_to_replace(args.output, args.force)
        t0 = time.perf_counter()
        vocab, merges = train_bpe(args.corpus, args.vocab_size, specials, workers=args.workers)
        name = args.name or os.path.basename(os.path.normpath(args.output))
        tok = T.from_bpe(vocab, merges, specials, name=name)
        T.save_tokenizer(tok, args.output)
        short = (f"; fewer than --vocab-size {args.vocab_size}: after {len(merges)} merges every pre-token "
                 "of the corpus is one token, so no pair is left to merge") if len(vocab) < args.vocab_size else ""
        print(f"{args.output}: {len(vocab)} tokens ({len(merges)} merges, {len(specials)} special) "
              f"in {time.perf_counter() - t0:.2f} s; hash {tok.hash[:16]}{short}")
    elif args.command == "info":
        tok = T.load_tokenizer(args.spec)
        info = {**tok.identity(), "special_tokens": tok.special_tokens, "pattern": tok.pattern}
        if not isinstance(tok, T.Tokenizer):  # a Hugging Face tokenizer.json
            info.update(file=tok.path, eot_token=tok.eot_token, bos_id=tok.bos_id, add_bos=tok.add_bos,
                        chat_template=tok.chat_template is not None)
        print(json.dumps(info, indent=1, ensure_ascii=False))
    elif args.command == "encode":
        if (args.text is None) == (args.file is None):
            raise UserError("give either TEXT or --file")
        tok = T.load_tokenizer(args.spec)
        if args.file is not None:
            try:
                with open(args.file, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read {args.file}: {e}") from None
        else:
            text = args.text
        kw = {"allowed_special": "all"} if args.allow_special else {"disallowed_special": ()}
        print(" ".join(map(str, tok.encode(text, **kw))))
    elif args.command == "decode":
        tok = T.load_tokenizer(args.spec)
        bad = [i for i in args.ids if not 0 <= i < tok.n_vocab]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary [0, {tok.n_vocab})")
        try:
            sys.stdout.write(tok.decode(args.ids) + "\n")
        except KeyError as e:
            raise UserError(f"token id {e.args[0]} is not in the vocabulary") from None
    elif args.command == "convert":
        if args.gpt2_vocab or args.gpt2_merges:
            if not (args.gpt2_vocab and args.gpt2_merges) or args.spec:
                raise UserError("give --gpt2-vocab and --gpt2-merges together, without SPEC")
            tok = T.load_gpt2_files(args.gpt2_vocab, args.gpt2_merges,
                                    name=args.name or os.path.basename(os.path.normpath(args.output)))
        elif args.spec:
            tok = T.load_tokenizer(args.spec)
            if not isinstance(tok, T.Tokenizer):
                raise UserError(f"{args.spec} is a Hugging Face tokenizer.json: use it as it is (data.tokenizer="
                                f"{args.spec}); convert writes tiktoken tokenizers only")
            if args.name:
                tok = T.Tokenizer(args.name, pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks,
                                  special_tokens=tok.special_tokens)
        else:
            raise UserError("give SPEC or --gpt2-vocab/--gpt2-merges")
        refuse_to_replace(args.output, args.force)
        T.save_tokenizer(tok, args.output)
        print(f"{args.output}: {tok.name}, {tok.n_vocab} tokens; hash {tok.hash[:16]}")
    return 0
