"""What `jaxlm generate` continues: plain prompts (--prompt, or --prompt-file with one per line)
or, with --chat, conversations rendered by the run's chat template as SFT renders them (a
message, a file of them, or alone a conversation typed on stdin).

A Prompts holds each prompt's label (what a JSON output line echoes), its tokens, and the token
a row stops at: end-of-text, or with --chat the template's end-of-turn token.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

from jaxlm.errors import UserError


@dataclass
class Prompts:
    labels: list  # per prompt: its text, or with --chat its messages
    tokens: list[list[int]]
    stop_id: int | None
    key: str = "prompt"  # the label's key in a JSON output line


def read_lines(path: str, what: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"--prompt-file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--prompt-file {path} is not UTF-8 text (byte {e.start}); expected {what}") from None
    if not lines:
        raise UserError(f"--prompt-file {path} holds no prompt; expected {what}")
    return lines


def read_prompts(args) -> list[str]:
    """The prompt texts of --prompt or --prompt-file."""
    return [args.prompt] if args.prompt is not None else read_lines(args.prompt_file, "one prompt per line")


def plain_prompts(args, tok) -> Prompts:
    texts = read_prompts(args)
    return Prompts(texts, [tok.encode(t, allowed_special="all") or [tok.eot_id] for t in texts], tok.eot_id)


def read_conversations(args) -> list[list[dict]]:
    """--prompt as one user message, or --prompt-file's {"messages": [...]} lines. A trailing
    assistant message (an SFT record's answer) is dropped: the model writes its own."""
    if args.prompt is not None:
        return [[{"role": "user", "content": args.prompt}]]
    conversations = []
    for n, line in enumerate(read_lines(args.prompt_file, 'one {"messages": [...]} per line'), 1):
        try:
            messages = json.loads(line)["messages"]
            ok = isinstance(messages, list) and all(isinstance(m["role"], str) and isinstance(m["content"], str)
                                                    for m in messages)
        except (ValueError, TypeError, KeyError):
            ok = False
        if not ok or not messages:
            raise UserError(f'--prompt-file {args.prompt_file} line {n}: expected {{"messages": [{{"role": ..., '
                            '"content": ...}, ...]}')
        conversations.append(messages[:-1] if messages[-1]["role"] == "assistant" else messages)
    return conversations


def end_of_turn_id(fmt, tok) -> int:
    """The template's end-of-turn token: its eos_token when that is one token, else end-of-text."""
    ids = fmt.encode(fmt.eos_token) if fmt.eos_token else []
    return ids[0] if len(ids) == 1 else tok.eot_id


def run_chat_format(tok, cfg):
    """The template SFT renders with: data.chat_template, else the tokenizer's own, else the default."""
    from jaxlm.data.chat import chat_format

    return chat_format(tok, cfg.data.chat_template)


def chat_prompts(args, tok, cfg) -> Prompts:
    """Conversations rendered with the generation prompt by the template SFT uses, in the same
    pieces, so the tokens are SFT's."""
    from jaxlm.data.chat import prompt_tokens

    fmt = run_chat_format(tok, cfg)
    conversations = read_conversations(args)
    tokens = [prompt_tokens(messages, fmt).tolist() for messages in conversations]
    return Prompts(conversations, tokens, end_of_turn_id(fmt, tok), key="messages")


def converse(tok, cfg, decode: Callable[[Prompts], list[list[int]]], lines: Iterable[str] | None = None) -> None:
    """--chat alone: each line of stdin (or `lines`) is a user message; `decode` prints the reply,
    which joins the conversation the next message continues."""
    from jaxlm.data.chat import prompt_tokens

    fmt = run_chat_format(tok, cfg)
    stop, messages = end_of_turn_id(fmt, tok), []
    if lines is None and sys.stdin.isatty():
        print("jaxlm: chat: one message per line; Ctrl-D ends", file=sys.stderr, flush=True)
    for line in sys.stdin if lines is None else lines:
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        (reply,) = decode(Prompts([list(messages)], [prompt_tokens(messages, fmt).tolist()], stop, "messages"))
        messages.append({"role": "assistant", "content": tok.decode(reply)})
