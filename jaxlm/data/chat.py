"""Chat records rendered by a chat template into tokens and an assistant-only loss mask.

Templates have Hugging Face's Jinja semantics (what `tokenizer.apply_chat_template` does): a
sandboxed environment with trim_blocks and lstrip_blocks, loop controls, `raise_exception`,
`tojson`, `strftime_now`, the variables `messages`, `add_generation_prompt`, `bos_token` and
`eos_token`, and `{% generation %}` blocks. A tokenizer without a template gets `DEFAULT_TEMPLATE`
(ChatML's role headers; each turn ends with the tokenizer's end-of-text, so generation stops there).

How the mask is found, from character spans of the render mapped to tokens:
  1. The template is rendered once with every message's content replaced by a unique placeholder
     (private-use characters no text or template contains). The placeholders' positions split the
     render into template text and message contents; the real render is rebuilt from them (a
     template that trims content is followed: the trimmed text is what it renders).
  2. An assistant turn's span is its content plus the template text after it up to and including
     the end-of-turn text (`eos_token`), so the model learns to end its turn. A template with
     `{% generation %}` blocks says its spans itself (as for HF's return_assistant_tokens_mask).
  3. The render is cut at every span and content boundary and each piece is encoded on its own:
     template text with special tokens recognised, message contents as ordinary text (a user
     cannot inject a special token). No token straddles a boundary, so the mask is exact without
     an offset mapping, and the prompt's tokens are exactly those of encoding the prompt rendered
     with add_generation_prompt, as a generator sees it.
Everything takes (messages, template string, encode functions), so any tokenizer works.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from jaxlm.errors import UserError

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GEN_OPEN, GEN_CLOSE = "\ue000", "\ue001"  # around {% generation %} output
PH_OPEN, PH_CLOSE = "\ue002", "\ue003"  # around a content placeholder's number
PRIVATE = (GEN_OPEN, GEN_CLOSE, PH_OPEN, PH_CLOSE)


@dataclass(frozen=True)
class ChatFormat:
    """What rendering needs from a tokenizer: its template and how it encodes."""

    template: str
    encode: Callable[[str], list[int]]  # template text: special tokens recognised
    encode_text: Callable[[str], list[int]]  # message content: ordinary text only
    eos_token: str = ""  # also the end-of-turn text an assistant span ends with
    bos_token: str = ""


@dataclass
class Rendered:
    tokens: np.ndarray  # int32 [N]
    mask: np.ndarray  # int32 [N]: 1 on tokens of the trained assistant turns
    text: str


def chat_format(tokenizer, template: str | None = None) -> ChatFormat:
    """The format of a jaxlm tokenizer (a tiktoken Encoding, or any object with `encode`,
    `encode_ordinary`, `decode` and `eot_id`): `template` (data.chat_template: a template file or the
    template itself), else its own `chat_template`, else the default."""
    template = read_template(template) or getattr(tokenizer, "chat_template", None) or DEFAULT_TEMPLATE
    eot = getattr(tokenizer, "eot_id", None)
    bos = getattr(tokenizer, "bos_id", None)
    text = lambda i: "" if i is None else tokenizer.decode([i])
    return ChatFormat(template, lambda s: tokenizer.encode(s, allowed_special="all"), tokenizer.encode_ordinary,
                      eos_token=text(eot), bos_token=text(bos))


def read_template(spec: str | None) -> str | None:
    """data.chat_template: a template file, or the template itself (it holds Jinja tags)."""
    if spec is None or "{%" in spec or "{{" in spec:
        return spec
    try:
        return Path(spec).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"data.chat_template={spec!r} is not a readable template file ({type(e).__name__})") from None


# ----------------------------------------------------------------------------- Jinja, as HF runs it


def _environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %}...{% endgeneration %}: marks what the assistant generates."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return GEN_OPEN + caller() + GEN_CLOSE

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


_COMPILED: dict[str, object] = {}


def render_text(messages: list[dict], fmt: ChatFormat, add_generation_prompt: bool = False) -> str:
    """The template's text for `messages` (HF's apply_chat_template(tokenize=False))."""
    if fmt.template not in _COMPILED:
        try:
            _COMPILED[fmt.template] = _environment().from_string(fmt.template)
        except Exception as e:  # noqa: BLE001 - jinja's syntax errors
            raise UserError(f"the chat template does not parse: {type(e).__name__}: {e}") from None
    try:
        return _COMPILED[fmt.template].render(messages=messages, add_generation_prompt=add_generation_prompt,
                                              bos_token=fmt.bos_token, eos_token=fmt.eos_token)
    except Exception as e:  # noqa: BLE001 - raise_exception, undefined variables, ...
        raise UserError(f"the chat template failed on a record: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- spans and tokens


def render(messages: list[dict], fmt: ChatFormat, train_on: set[int] | None = None,
           add_generation_prompt: bool = False) -> Rendered:
    """Tokens of the rendered conversation and the mask of the assistant turns in `train_on`
    (message indices; default: every assistant message)."""
    if train_on is None:
        train_on = {i for i, m in enumerate(messages) if m["role"] == "assistant"}
    for m in messages:
        if any(c in m["content"] for c in PRIVATE):
            raise UserError("a message contains a private-use character U+E000..U+E003, which chat rendering reserves")
    placeholders = [{**m, "content": f"{PH_OPEN}{i}{PH_CLOSE}"} for i, m in enumerate(messages)]
    skeleton = render_text(placeholders, fmt, add_generation_prompt)
    pieces = _pieces(skeleton, messages, render_text(messages, fmt, add_generation_prompt))
    generation = GEN_OPEN in skeleton
    spans = _generation_spans(pieces) if generation else _turn_spans(pieces, train_on, fmt.eos_token)
    tokens, mask = [], []
    for text, is_content, trained in _cut(pieces, spans):
        ids = (fmt.encode_text if is_content else fmt.encode)(text)
        tokens += ids
        mask += [int(trained)] * len(ids)
    text = "".join(t for t, _ in pieces).replace(GEN_OPEN, "").replace(GEN_CLOSE, "")
    return Rendered(np.asarray(tokens, np.int32), np.asarray(mask, np.int32), text)


def _pieces(skeleton: str, messages: list[dict], real: str) -> list[tuple[str, int | None]]:
    """The render as (text, message index or None for template text), rebuilt to equal `real`
    (with the generation markers kept, since `real` has them too)."""
    out, pos, cursor = [], 0, 0
    seen = set()
    while (start := skeleton.find(PH_OPEN, pos)) >= 0:
        end = skeleton.index(PH_CLOSE, start)
        i = int(skeleton[start + 1: end])
        if i in seen:
            raise UserError(f"the chat template renders message {i}'s content twice; the assistant mask cannot "
                            "be placed")
        seen.add(i)
        literal = skeleton[pos:start]
        out.append((literal, None))
        cursor += len(literal)
        content = messages[i]["content"]
        for variant in (content, content.strip(), content.lstrip(), content.rstrip()):
            if real.startswith(variant, cursor):
                break
        else:
            raise UserError(f"the chat template changes message {i}'s content beyond trimming it; the assistant "
                            "mask cannot be placed")
        out.append((variant, i))
        cursor += len(variant)
        pos = end + 1
    out.append((skeleton[pos:], None))
    if "".join(t for t, _ in out) != real:
        raise UserError("the chat template renders differently with other contents; the assistant mask cannot be "
                        "placed")
    return out


def _turn_spans(pieces, train_on: set[int], end_of_turn: str) -> list[tuple[int, int]]:
    """Character spans of the trained assistant turns: content + template text through end-of-turn."""
    spans, offset = [], 0
    for k, (text, i) in enumerate(pieces):
        if i is not None and i in train_on:
            stop = offset + len(text)
            after = pieces[k + 1][0] if k + 1 < len(pieces) and pieces[k + 1][1] is None else ""
            if end_of_turn and end_of_turn in after:
                stop += after.index(end_of_turn) + len(end_of_turn)
            spans.append((offset, stop))
        offset += len(text)
    return spans


def _generation_spans(pieces) -> list[tuple[int, int]]:
    """Character spans between the {% generation %} markers (the markers themselves are dropped by _cut)."""
    text = "".join(t for t, _ in pieces)
    spans, pos = [], 0
    while (start := text.find(GEN_OPEN, pos)) >= 0:
        end = text.index(GEN_CLOSE, start)
        spans.append((start + 1, end))
        pos = end + 1
    return spans


def _cut(pieces, spans) -> list[tuple[str, bool, bool]]:
    """(text, is message content, inside a span) pieces cut at every boundary; markers removed."""
    bounds = sorted({b for s in spans for b in s})
    out, offset = [], 0
    for text, i in pieces:
        cuts = [b - offset for b in bounds if offset < b < offset + len(text)]
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            part = text[a:b].replace(GEN_OPEN, "").replace(GEN_CLOSE, "")
            mid = offset + a
            if part:
                out.append((part, i is not None, any(s <= mid < e for s, e in spans)))
        offset += len(text)
    return out


def prompt_tokens(messages: list[dict], fmt: ChatFormat) -> np.ndarray:
    """The tokens a generator is given to continue `messages` with an assistant turn (encoded in
    the same pieces as training, so they equal the trained prompt's tokens)."""
    return render(messages, fmt, train_on=set(), add_generation_prompt=True).tokens
