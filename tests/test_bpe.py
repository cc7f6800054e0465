"""BPE training: equal to a naive full-recount reference, the CS336 tie rule, special tokens kept
out of merges, parallel pre-tokenization equal to serial, and tiktoken encoding equal to
applying the merges in order."""

from collections import Counter

import pytest
import regex
from conftest import SHARED_DATA, run_cli

from jaxlm.tokenizer.bpe import GPT2_PATTERN, chunk_boundaries, count_pretokens, pretokenize_counts, train_bpe
from jaxlm.tokenizer.tokenizer import EOT, from_bpe, load_tokenizer
from jaxlm.errors import UserError

FIX = SHARED_DATA / "cs336_fixtures"


def pretokens(text: str, specials: list[str]) -> list[str]:
    pieces = regex.split("|".join(map(regex.escape, sorted(specials, key=len, reverse=True))), text) if specials else [text]
    return [m.group() for piece in pieces for m in regex.finditer(GPT2_PATTERN, piece)]


def naive_train(text: str, vocab_size: int, specials: list[str]) -> list[tuple[bytes, bytes]]:
    """The textbook algorithm: recount every pair, merge the (count, pair)-greatest, repeat."""
    words = Counter(tuple(bytes([b]) for b in p.encode()) for p in pretokens(text, specials))
    merges = []
    while len(merges) < vocab_size - 256 - len(specials):
        pairs = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = Counter()
        for w, c in words.items():
            if best[0] not in w:
                merged[w] += c
                continue
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    return merges


def naive_encode(text: str, vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]]) -> list[int]:
    """Apply the merges in order to each pre-token."""
    ids = {b: i for i, b in vocab.items()}
    out, cache = [], {}
    for p in pretokens(text, []):
        if p not in cache:
            w = [bytes([b]) for b in p.encode()]
            for a, b in merges:
                if a in w:
                    i, nw = 0, []
                    while i < len(w):
                        if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                            nw.append(a + b)
                            i += 2
                        else:
                            nw.append(w[i])
                            i += 1
                    w = nw
            cache[p] = [ids[t] for t in w]
        out += cache[p]
    return out


@pytest.fixture(scope="module")
def corpus_en():
    path = FIX / "corpus.en"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    return path


def test_train_bpe_on_corpus_en_equals_naive_reference_and_is_deterministic(corpus_en):
    vocab, merges = train_bpe(corpus_en, 500, [EOT])
    assert train_bpe(str(corpus_en), 500, [EOT]) == (vocab, merges)
    assert merges == naive_train(corpus_en.read_text(), 500, [EOT])
    assert len(vocab) == 500 and len(merges) == 500 - 257


def test_vocab_ids_are_bytes_then_specials_then_merges(corpus_en):
    vocab, merges = train_bpe(corpus_en, 300, [EOT, "<|pad|>"])
    assert [vocab[i] for i in range(256)] == [bytes([i]) for i in range(256)]
    assert vocab[256] == EOT.encode() and vocab[257] == b"<|pad|>"
    assert [vocab[258 + i] for i in range(len(merges))] == [a + b for a, b in merges]


def test_count_ties_go_to_the_lexicographically_greater_pair(tmp_path):
    path = tmp_path / "tiny.txt"
    # Pre-tokens: "ab" x3, "abc" x2, "az" x2 (newlines are their own pre-tokens). (a, b) is
    # merged first (5); then (ab, c) and (a, z) tie at 2, and as (bytes, bytes) tuples
    # (b"ab", b"c") > (b"a", b"z") because b"a" < b"ab" -- comparing the joined bytes
    # ("abc" < "az") would pick the other one.
    path.write_text("abc\nabc\naz\naz\nab\nab\nab")
    _, merges = train_bpe(path, 258, [])
    assert merges == [(b"a", b"b"), (b"ab", b"c")]
    path.write_text("cd\nab\ncd\nab")  # (a, b) and (c, d) tie at 2: (c, d) is greater
    assert train_bpe(path, 257, [])[1] == [(b"c", b"d")]


def test_special_tokens_split_text_and_never_merge():
    path = FIX / "tinystories_sample.txt"
    vocab, merges = train_bpe(path, 500, [EOT])
    assert vocab[256] == EOT.encode()
    assert not [t for i, t in vocab.items() if i != 256 and b"<|" in t]
    assert merges == naive_train(path.read_text(), 500, [EOT])


def test_parallel_chunked_pretokenization_equals_one_pass(shakespeare_path, tmp_path):
    text = shakespeare_path.read_text()
    bounds = chunk_boundaries(str(shakespeare_path), 40, [])
    assert len(bounds) > 30 and bounds[0] == 0 and bounds[-1] == shakespeare_path.stat().st_size
    assert count_pretokens(shakespeare_path, workers=2, chunk_bytes=30_000) == pretokenize_counts(text)
    # with special tokens, chunks start at them
    stories = (FIX / "tinystories_sample.txt").read_text() * 40
    (tmp_path / "s.txt").write_text(stories)
    raw = (tmp_path / "s.txt").read_bytes()
    bounds = chunk_boundaries(str(tmp_path / "s.txt"), 30, [EOT.encode()])
    assert len(bounds) > 20 and all(raw.startswith(EOT.encode(), b) for b in bounds[1:-1])
    assert count_pretokens(tmp_path / "s.txt", [EOT], workers=2, chunk_bytes=5000) == pretokenize_counts(stories, [EOT])


def test_tiktoken_encoding_equals_applying_merges_in_order(shakespeare_path):
    vocab, merges = train_bpe(shakespeare_path, 600, [EOT])
    tok = from_bpe(vocab, merges, [EOT])
    text = shakespeare_path.read_text()[:100_000] + (FIX / "german.txt").read_text() + (FIX / "address.txt").read_text()
    ids = tok.encode_ordinary(text)
    assert ids == naive_encode(text, vocab, merges)
    assert tok.decode(ids) == text
    assert tok.encode(f"a{EOT}b", allowed_special="all") == [ord("a"), 256, ord("b")]


def test_bad_training_input_is_a_user_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.txt").write_bytes(b"fine text\n\xff\xfe")
    with pytest.raises(UserError, match="empty"):
        train_bpe(tmp_path / "empty.txt", 300, [])
    with pytest.raises(UserError, match=r"bad.txt: invalid UTF-8 at byte offset 10"):
        train_bpe(tmp_path / "bad.txt", 300, [])
    with pytest.raises(UserError, match="too small"):
        train_bpe(FIX / "address.txt", 256, [EOT])


def test_cli_train_writes_a_tokenizer_that_reloads_to_the_trained_one(corpus_en, tmp_path):
    r = run_cli("tokenizer", "train", str(corpus_en), "--vocab-size", "400", "--special", EOT, "-o", str(tmp_path / "tok"))
    assert r.returncode == 0, r.stderr
    vocab, merges = train_bpe(corpus_en, 400, [EOT])
    want = from_bpe(vocab, merges, [EOT], name="tok")
    got = load_tokenizer(str(tmp_path / "tok"))
    assert (got.mergeable_ranks, got.special_tokens, got.hash) == (want.mergeable_ranks, want.special_tokens, want.hash)
    r = run_cli("tokenizer", "train", str(tmp_path / "missing.txt"), "--vocab-size", "400", "-o", str(tmp_path / "t2"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "missing.txt" in r.stderr
    assert not (tmp_path / "t2").exists()
