"""Byte-level BPE training, with the semantics of Stanford CS336 assignment 1.

Vocabulary ids: the 256 byte tokens first (id = byte value), then the special tokens, then one
id per merge in merge order. Text is split on the special tokens (which never take part in
merges), each piece is pre-tokenized with the GPT-2 regex, and no merge crosses a pre-token.
Ties in pair count go to the lexicographically greater pair of byte strings.

How it is fast:
- pre-tokenization runs in a process pool over byte ranges of the corpus whose boundaries are
  pre-token boundaries (the start of a special token, or a newline between two printable ASCII
  characters; see `_find_boundary`), and only the counts of unique pre-tokens come back, so
  memory is bounded by the number of unique pre-tokens, not by the corpus size;
- the merge loop keeps pair counts and an index pair -> pre-tokens that contain it, updates
  both incrementally for the pre-tokens a merge touches, and takes the best pair from a heap
  (stale heap entries are skipped when popped).
"""

from __future__ import annotations

import heapq
import multiprocessing
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import regex

from jaxlm.errors import UserError

# The GPT-2 pre-tokenizer as written in CS336 (and in the original GPT-2 release).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_CHUNK_BYTES = 16 << 20  # target bytes per pre-tokenization task
_SCAN_BYTES = 4 << 20  # how far past a target offset to look for a safe boundary
_SERIAL_BELOW = 4 << 20  # smaller corpora are pre-tokenized in this process
# A newline with a printable, non-space ASCII character on each side: no GPT-2 pre-token
# spans it, and the pre-tokens on either side do not depend on the text across it.
_SAFE_NEWLINE = regex.compile(rb"[\x21-\x7e]\n[\x21-\x7e]")


def train_bpe(
    input_path: str | os.PathLike | Sequence[str | os.PathLike],
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    *,
    workers: int | None = None,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train byte-level BPE on one or more UTF-8 text files.

    Returns `vocab` (id -> token bytes) and `merges` (in the order they were learned). Fewer
    than `vocab_size` tokens come back only when no pair is left to merge.
    """
    specials = list(dict.fromkeys(special_tokens))
    n_merges = vocab_size - 256 - len(specials)
    if n_merges < 0:
        raise UserError(
            f"--vocab-size {vocab_size} is too small: it must be at least 256 bytes + "
            f"{len(specials)} special tokens = {256 + len(specials)}"
        )
    counts = count_pretokens(input_path, specials, workers=workers)
    vocab = [bytes([i]) for i in range(256)] + [s.encode("utf-8") for s in specials]
    words = [list(t.encode("utf-8")) for t in counts]
    pairs = merge_pretokens(words, list(counts.values()), vocab, n_merges)
    return dict(enumerate(vocab)), [(vocab[a], vocab[b]) for a, b in pairs]


# ---------------------------------------------------------------- pre-tokenization


def count_pretokens(
    input_path: str | os.PathLike | Sequence[str | os.PathLike],
    special_tokens: Sequence[str] = (),
    *,
    workers: int | None = None,
    chunk_bytes: int = _CHUNK_BYTES,
) -> Counter[str]:
    """Counts of the unique pre-tokens of the corpus (special tokens removed)."""
    paths = [input_path] if isinstance(input_path, (str, os.PathLike)) else list(input_path)
    if not paths:
        raise UserError("no corpus files given")
    specials = [s.encode("utf-8") for s in special_tokens]
    tasks = []
    for p in map(os.fspath, paths):
        if not os.path.isfile(p):
            raise UserError(f"corpus file {p} does not exist")
        size = os.path.getsize(p)
        if size == 0:
            raise UserError(f"corpus file {p} is empty")
        bounds = chunk_boundaries(p, max(1, -(-size // chunk_bytes)), specials)
        tasks += [(p, a, b, tuple(special_tokens)) for a, b in zip(bounds, bounds[1:])]
    total_bytes = sum(b - a for _, a, b, _ in tasks)
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(tasks) == 1 or total_bytes < _SERIAL_BELOW:
        results: Iterable[Counter[str]] = map(_count_chunk, tasks)
        return _sum_counters(results)
    with _pool_context().Pool(min(workers, len(tasks))) as pool:
        return _sum_counters(pool.imap_unordered(_count_chunk, tasks))


def _sum_counters(counters: Iterable[Counter[str]]) -> Counter[str]:
    total: Counter[str] = Counter()
    for c in counters:
        if not total:
            total = c
        else:
            total.update(c)
    return total


def _pool_context():
    # fork is cheap, but unsafe once JAX (threads) is loaded in this process.
    if "jax" in sys.modules or "fork" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    return multiprocessing.get_context("fork")


def chunk_boundaries(path: str, n_chunks: int, specials: Sequence[bytes]) -> list[int]:
    """Byte offsets [0, ..., size] cutting the file into about `n_chunks` ranges at safe places."""
    size = os.path.getsize(path)
    bounds = [0]
    with open(path, "rb") as f:
        for k in range(1, n_chunks):
            target = k * size // n_chunks
            if target <= bounds[-1]:
                continue
            b = _find_boundary(f, target, size, specials)
            if b is not None and bounds[-1] < b < size:
                bounds.append(b)
    return bounds + [size] if size > 0 else [0, 0]


def _find_boundary(f, target: int, size: int, specials: Sequence[bytes]) -> int | None:
    """First safe cut at or after `target` within _SCAN_BYTES: a special token's start, or else
    the position just after a newline that has printable non-space ASCII on both sides."""
    longest = max((len(s) for s in specials), default=1)
    f.seek(max(0, target - longest))
    base = f.tell()
    data = f.read(min(_SCAN_BYTES, size - base) + longest)
    lo = target - base
    best = None
    for s in specials:
        i = data.find(s, lo)
        while i >= 0 and any(_spans(data, t, i) for t in specials):  # inside a longer special
            i = data.find(s, i + 1)
        if i >= 0 and (best is None or i < best):
            best = i
    if best is not None:
        return base + best  # prefer special tokens: documents stay whole
    m = _SAFE_NEWLINE.search(data, max(0, lo - 2))
    while m is not None:
        cut = m.start() + 2
        if not any(_spans(data, s, cut) for s in specials):  # not inside a special token
            best = cut
            break
        m = _SAFE_NEWLINE.search(data, m.start() + 1)
    return None if best is None else base + best


def _spans(data: bytes, s: bytes, cut: int) -> bool:
    i = data.find(s, max(0, cut - len(s) + 1))
    while 0 <= i < cut:
        if i + len(s) > cut:
            return True
        i = data.find(s, i + 1)
    return False


_compiled: dict[tuple[str, ...], tuple[regex.Pattern, regex.Pattern | None]] = {}


def _patterns(special_tokens: tuple[str, ...]):
    if special_tokens not in _compiled:
        by_length = sorted(special_tokens, key=len, reverse=True)  # longest special wins
        split = regex.compile("|".join(map(regex.escape, by_length))) if by_length else None
        _compiled[special_tokens] = (regex.compile(GPT2_PATTERN), split)
    return _compiled[special_tokens]


def _count_chunk(task: tuple[str, int, int, tuple[str, ...]]) -> Counter[str]:
    path, start, end, special_tokens = task
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
    except OSError as e:
        raise UserError(f"{path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: invalid UTF-8 at byte offset {start + e.start}") from None
    return pretokenize_counts(text, special_tokens)


def pretokenize_counts(text: str, special_tokens: Sequence[str] = ()) -> Counter[str]:
    pat, split = _patterns(tuple(special_tokens))
    pieces = split.split(text) if split is not None else [text]
    counts: Counter[str] = Counter()
    for piece in pieces:
        counts.update(pat.findall(piece))
    return counts


# ---------------------------------------------------------------- merges


def _desc_key(token: bytes) -> str:
    """A string that sorts in the opposite order of `token` (a prefix sorts after its
    extensions), so a min-heap over keys pops the lexicographically greatest pair first."""
    return "".join(chr(256 - c) for c in token) + "\u0101"  # U+0101 > any chr(256 - c)


def merge_pretokens(
    words: list[list[int]], freqs: list[int], vocab: list[bytes], n_merges: int
) -> list[tuple[int, int]]:
    """Run `n_merges` BPE merges over pre-tokens (lists of token ids) with counts `freqs`.

    Appends the new tokens to `vocab` and returns the merged id pairs in order. `words` is
    updated in place.
    """
    counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for p in zip(w, w[1:]):
            counts[p] += f
            where[p].add(wi)
    keys = [_desc_key(t) for t in vocab]
    heap = [(-c, keys[a], keys[b], a, b) for (a, b), c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    while len(merges) < n_merges and heap:
        neg, _, _, a, b = heapq.heappop(heap)
        if counts.get((a, b), 0) != -neg or neg == 0:
            continue  # stale entry: the count changed after it was pushed
        new = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        keys.append(_desc_key(vocab[new]))
        merges.append((a, b))
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for wi in where.pop((a, b)):
            w = words[wi]
            merged, i, n = [], 0, len(w)
            while i < n:
                if w[i] == a and i + 1 < n and w[i + 1] == b:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(w[i])
                    i += 1
            if len(merged) == n:
                continue  # the index was stale for this pre-token
            f = freqs[wi]
            for p in zip(w, w[1:]):
                delta[p] -= f
            for p in zip(merged, merged[1:]):
                delta[p] += f
                if new in p:
                    where[p].add(wi)
            words[wi] = merged
        for p, d in delta.items():
            if d:
                c = counts[p] + d
                if c > 0:
                    counts[p] = c
                    heapq.heappush(heap, (-c, keys[p[0]], keys[p[1]], p[0], p[1]))
                else:
                    del counts[p]
        counts.pop((a, b), None)
    return merges
