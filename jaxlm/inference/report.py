"""How every generator prints, alike: stdout holds only what was generated (the prompt is not
echoed; with --chat, only the assistant's reply) and ends with a newline; everything else (speed,
a stop at end-of-text, warnings) goes to stderr on lines of its own, prefixed "jaxlm:".

One prompt: its text (streamed where the generator can), then a newline. Several (--prompt-file):
one JSON line each, {"prompt" (or "messages" with --chat), "completion", "stop"}, where "stop" is
the stop token's text when the row ended there, else "length".
"""

from __future__ import annotations

import codecs
import json
import sys


def say(msg: str) -> None:
    print(f"jaxlm: {msg}", file=sys.stderr, flush=True)


class Stream:
    """Writes one row's tokens to stdout as they come (UTF-8 split across tokens held back)."""

    def __init__(self, tok):
        self.tok = tok
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, new: list[int]) -> None:
        sys.stdout.write(self.utf8.decode(b"".join(self.tok.decode_single_token_bytes(t) for t in new)))
        sys.stdout.flush()

    def close(self) -> None:
        sys.stdout.write(self.utf8.decode(b"", final=True) + "\n")
        sys.stdout.flush()


def print_completions(labels: list, completions: list[list[int]], stopped, tok, stop_id: int | None,
                      key: str = "prompt", streamed: Stream | None = None) -> None:
    """The rows' completions as the module docstring says (`streamed`: one row already written)."""
    stop_name = tok.decode([stop_id]) if stop_id is not None else ""
    if len(labels) == 1:
        if streamed is not None:
            streamed.close()
        else:
            print(tok.decode(completions[0]), flush=True)
        if stopped[0]:
            say(f"stopped at {stop_name} after {len(completions[0])} new tokens")
        return
    for label, ids, stop in zip(labels, completions, stopped):
        line = {key: label, "completion": tok.decode(ids), "stop": stop_name if stop else "length"}
        print(json.dumps(line, ensure_ascii=False), flush=True)
