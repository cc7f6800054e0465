"""Tokenizers: GPT-2 files reproduce tiktoken's gpt2, save/load is exact, special tokens and
streaming encode behave, and offline errors are one line."""

import hashlib
import io
import os
import re
import shutil
import tracemalloc

import pytest
import regex
import tiktoken
from conftest import SHARED_DATA, run_cli

from jaxlm.tokenizer.bpe import GPT2_PATTERN
from jaxlm.tokenizer.tokenizer import (
    EOT,
    GPT2_PAT_STR,
    Tokenizer,
    byte_tokenizer,
    load_gpt2_files,
    load_tokenizer,
    save_tokenizer,
)
from jaxlm.errors import UserError

FIX = SHARED_DATA / "cs336_fixtures"
TEXT_FILES = ["address.txt", "german.txt", "tinystories_sample.txt", "corpus.en",
              "special_token_double_newlines_non_whitespace.txt", "special_token_trailing_newlines.txt"]
UNICODE = ["", " ", "\n\n", "héllò hôw are ü? 🙃", "日本語のテキスト、句読点。", "e\u0301 \u00a0x\u2028y",
           "  leading and trailing  \n", "it's we'll they've I'M", "123 4567 3.14", "\r\n\tx\t\r\n"]
SPECIAL_TEXTS = [f"Hello{EOT}world", f"{EOT}{EOT}", f"a {EOT} b{EOT}\n\n{EOT}", f"<|endoftext{EOT}|>", "<|", EOT]
GPT2_BLOBS = {  # tiktoken_ext/openai_public.py: gpt2() reads these, cached under sha1(url)
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe": "gpt2_merges.txt",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json": "gpt2_vocab.json",
}


def read(name: str) -> str:
    return (FIX / name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def gpt2_files() -> Tokenizer:
    if not FIX.is_dir():
        pytest.skip(f"shared data not found at {FIX}")
    return load_gpt2_files(str(FIX / "gpt2_vocab.json"), str(FIX / "gpt2_merges.txt"))


@pytest.fixture(scope="module")
def gpt2_official(gpt2_files, tmp_path_factory):
    """tiktoken.get_encoding('gpt2') itself, offline: its cache seeded with the fixture files."""
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    for url, name in GPT2_BLOBS.items():
        data = (FIX / name).read_bytes()
        if name.endswith(".txt"):
            data = b"#version: 0.2\n" + data  # the official vocab.bpe has this first line
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        tiktoken.registry.ENCODINGS.pop("gpt2", None)
        yield tiktoken.get_encoding("gpt2")  # raises if the seeded files fail tiktoken's sha256 check
    finally:
        os.environ.pop("TIKTOKEN_CACHE_DIR") if old is None else os.environ.__setitem__("TIKTOKEN_CACHE_DIR", old)


def test_gpt2_files_have_official_ranks_and_specials(gpt2_files, gpt2_official):
    assert gpt2_files._mergeable_ranks == gpt2_official._mergeable_ranks
    assert gpt2_files.special_tokens == gpt2_official._special_tokens == {EOT: 50256}
    assert gpt2_files.n_vocab == gpt2_official.n_vocab == 50257


@pytest.mark.parametrize("name", TEXT_FILES)
def test_gpt2_files_encode_fixtures_like_official(gpt2_files, gpt2_official, name):
    text = read(name)
    ids = gpt2_official.encode(text, allowed_special="all")
    assert gpt2_files.encode(text, allowed_special="all") == ids
    assert gpt2_files.encode_ordinary(text) == gpt2_official.encode_ordinary(text)
    assert gpt2_files.decode(ids) == text


def test_gpt2_files_encode_unicode_and_special_texts_like_official(gpt2_files, gpt2_official):
    for text in UNICODE + SPECIAL_TEXTS:
        assert gpt2_files.encode(text, allowed_special="all") == gpt2_official.encode(text, allowed_special="all")
        assert gpt2_files.encode_ordinary(text) == gpt2_official.encode_ordinary(text), text
        assert gpt2_files.decode(gpt2_files.encode(text, allowed_special="all")) == text
    assert gpt2_files.encode("") == []
    assert gpt2_files.encode(f"{EOT}{EOT}", allowed_special="all") == [50256, 50256]


def test_named_gpt2_from_cache_has_the_same_hash_as_the_files(gpt2_files, gpt2_official):
    tok = load_tokenizer("gpt2")  # served from tiktoken's registry, filled by gpt2_official
    assert isinstance(tok, tiktoken.Encoding)
    assert tok.hash == gpt2_files.hash


def test_gpt2_merges_with_version_line_load_the_same(gpt2_files, tmp_path):
    (tmp_path / "merges.txt").write_bytes(b"#version: 0.2\n" + (FIX / "gpt2_merges.txt").read_bytes())
    (tmp_path / "vocab.json").write_bytes((FIX / "gpt2_vocab.json").read_bytes())
    tok = load_tokenizer(str(tmp_path))  # a directory with vocab.json + merges.txt
    assert tok._mergeable_ranks == gpt2_files._mergeable_ranks and tok.hash == gpt2_files.hash


def test_named_encoding_offline_is_one_line_naming_the_cache_variable(tmp_path):
    env = {"TIKTOKEN_CACHE_DIR": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "NO_PROXY": "", "no_proxy": ""}
    r = run_cli("tokenizer", "info", "cl100k_base", env_extra=env, timeout=120)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "TIKTOKEN_CACHE_DIR" in r.stderr, r.stderr


def test_tiktoken_and_cs336_gpt2_patterns_give_the_same_pretokens(shakespeare_path):
    texts = [read(n) for n in TEXT_FILES] + UNICODE + SPECIAL_TEXTS + [shakespeare_path.read_text()[:300_000]]
    texts += ["a  \n b", "x   ", "   y", "'ll 's'S  '\n\n  ", "\t \u3000z"]
    for text in texts:
        assert regex.findall(GPT2_PATTERN, text) == regex.findall(GPT2_PAT_STR, text)


def test_byte_tokenizer_is_bytes_plus_endoftext():
    tok = load_tokenizer("bytes")
    assert tok.encode("aé", allowed_special="all") == [97, 0xC3, 0xA9]
    assert tok.encode(f"a{EOT}", allowed_special="all") == [97, 256] and tok.n_vocab == 257
    # The hash is part of prepared data's metadata: it must not change between versions.
    assert tok.hash == byte_tokenizer().hash == BYTES_HASH


BYTES_HASH = "737ad17c591cb4d72e8422f4e017b4414b43880a6fd68fa5c6095c6cde48d6bb"


def test_hash_covers_ranks_pattern_and_specials_not_name():
    base = byte_tokenizer()
    ranks = dict(base.mergeable_ranks)
    variants = [
        Tokenizer("other", pat_str=base.pattern, mergeable_ranks=ranks, special_tokens={EOT: 256}),
        Tokenizer("bytes", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks, special_tokens={EOT: 256}),
        Tokenizer("bytes", pat_str=base.pattern, mergeable_ranks=ranks, special_tokens={EOT: 257}),
        Tokenizer("bytes", pat_str=base.pattern, mergeable_ranks={**ranks, b"ab": 257}, special_tokens={EOT: 256}),
    ]
    assert variants[0].hash == base.hash
    assert len({base.hash} | {v.hash for v in variants[1:]}) == 4


@pytest.mark.parametrize("which", ["gpt2_files", "bytes", "overlapping"])
def test_save_and_reload_is_exact(which, gpt2_files, tmp_path):
    tok = {"gpt2_files": gpt2_files, "bytes": byte_tokenizer(), "overlapping": overlapping()}[which]
    save_tokenizer(tok, str(tmp_path / "tok"))
    assert sorted(os.listdir(tmp_path / "tok")) == ["tokenizer.json", "tokenizer.tiktoken"]
    back = load_tokenizer(str(tmp_path / "tok"))
    assert (back.name, back.pattern, back.special_tokens, back.mergeable_ranks, back.hash) == (
        tok.name, tok.pattern, tok.special_tokens, tok.mergeable_ranks, tok.hash)
    text = read("tinystories_sample.txt") + "".join(SPECIAL_TEXTS + UNICODE)
    assert back.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")


def test_tampered_tokenizer_directory_is_refused(tmp_path):
    save_tokenizer(overlapping(), str(tmp_path))
    lines = (tmp_path / "tokenizer.tiktoken").read_text().splitlines()
    (tmp_path / "tokenizer.tiktoken").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(UserError, match="do not match the hash"):
        load_tokenizer(str(tmp_path))


def test_unknown_specs_are_user_errors(tmp_path):
    for spec in ["nope", str(tmp_path)]:
        with pytest.raises(UserError):
            load_tokenizer(spec)


def overlapping() -> Tokenizer:
    ranks = {bytes([i]): i for i in range(256)} | {b"He": 256, b"ll": 257, b"Hell": 258}
    return Tokenizer("overlap", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                     special_tokens={EOT: 300, EOT + EOT: 301, "<|end": 302})


def test_longest_overlapping_special_token_wins():
    tok = overlapping()
    ids = tok.encode(f"Hello, how {EOT}{EOT} are you?{EOT}<|end|>", allowed_special="all")
    assert ids.count(301) == 1 and ids.count(300) == 1 and ids.count(302) == 1
    assert ids[:3] == [258, ord("o"), ord(",")]
    assert tok.encode(f"{EOT}{EOT}{EOT}", allowed_special="all") == [301, 300]
    assert tok.encode(f"{EOT}{EOT}", allowed_special={EOT}, disallowed_special=()) == [300, 300]
    with pytest.raises(ValueError, match="disallowed special token"):
        tok.encode(f"x{EOT}")
    assert tok.decode(ids) == f"Hello, how {EOT}{EOT} are you?{EOT}<|end|>"


def chunked(text: str, size: int):
    return (text[i: i + size] for i in range(0, len(text), size))


@pytest.mark.parametrize("which", ["gpt2_files", "bytes", "overlapping", "cl100k_pattern"])
def test_encode_iterable_equals_encode(which, gpt2_files):
    tok = {"gpt2_files": gpt2_files, "bytes": byte_tokenizer(), "overlapping": overlapping(),
           # another pre-tokenizer: GPT-2's ranks under cl100k's pattern
           "cl100k_pattern": Tokenizer("x", pat_str=CL100K_PAT, mergeable_ranks=gpt2_files.mergeable_ranks,
                                       special_tokens=gpt2_files.special_tokens)}[which]
    texts = [read(n) for n in TEXT_FILES] + ["".join(UNICODE + SPECIAL_TEXTS) * 3]
    for text in texts:
        want = tok.encode(text, allowed_special="all")
        for size, flush in [(1, 7), (7, 16), (100, 64), (4096, 1 << 16)]:
            if flush < 64 and len(text) > 20_000:
                continue  # tiny flushes cost a regex pass each
            got = list(tok.encode_iterable(chunked(text, size), allowed_special="all", flush_chars=flush))
            assert got == want, (which, size, flush)
        assert list(tok.encode_iterable(io.StringIO(text), allowed_special="all")) == want  # lines
        assert list(tok.encode_iterable(chunked(text, 5), disallowed_special=(), flush_chars=8)) == tok.encode_ordinary(text)


CL100K_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
              r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")


def test_encode_iterable_finds_disallowed_special_split_across_chunks():
    tok = overlapping()
    with pytest.raises(ValueError, match="disallowed special token"):
        list(tok.encode_iterable(chunked("abc " * 10 + EOT + " x" * 10, 3), flush_chars=4))


def test_encode_iterable_memory_does_not_grow_with_input(gpt2_files):
    line = read("address.txt")

    def lines(n):
        for _ in range(n):
            yield line

    def peak(n):
        tracemalloc.start()
        count = sum(1 for _ in gpt2_files.encode_iterable(lines(n), flush_chars=1 << 14))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return count, top

    (small_n, small_peak), (big_n, big_peak) = peak(50), peak(1000)  # 70 KB vs 1.4 MB of text
    assert big_n == len(gpt2_files.encode_ordinary(line * 1000))
    assert big_peak < 1.5 * small_peak + 200_000, (small_peak, big_peak)


def test_encode_iterable_equals_encode_on_random_tricky_text(gpt2_files):
    import random

    toks = [gpt2_files, overlapping(), Tokenizer("cl", pat_str=CL100K_PAT, mergeable_ranks=gpt2_files.mergeable_ranks,
                                                 special_tokens=gpt2_files.special_tokens)]
    alphabet = [" ", "  ", "\n", "\n\n", "\r\n", "\t", "'", "s", "ll", "ve", "a", "Ab", "1", "234", ".", "!?", "é",
                "日", "\u00a0", "<|", "endoftext", "|>", EOT, EOT + EOT, "<|end", "/"]
    rng = random.Random(0)
    for _ in range(600):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        tok, size, flush = rng.choice(toks), rng.randint(1, 10), rng.randint(1, 20)
        got = list(tok.encode_iterable(chunked(text, size), allowed_special="all", flush_chars=flush))
        assert got == tok.encode(text, allowed_special="all"), (tok.name, text, size, flush)
        got = list(tok.encode_iterable(chunked(text, size), disallowed_special=(), flush_chars=flush))
        assert got == tok.encode_ordinary(text), (tok.name, text, size, flush)


def test_cli_convert_then_encode_and_decode_round_trip(gpt2_files, tmp_path):
    out = str(tmp_path / "g")
    r = run_cli("tokenizer", "convert", "--gpt2-vocab", str(FIX / "gpt2_vocab.json"),
                "--gpt2-merges", str(FIX / "gpt2_merges.txt"), "-o", out)
    assert r.returncode == 0, r.stderr
    assert load_tokenizer(out).hash == gpt2_files.hash
    text = f"héllo wörld{EOT}!"
    r = run_cli("tokenizer", "encode", out, text, "--allow-special")
    ids = [int(x) for x in r.stdout.split()]
    assert ids == gpt2_files.encode(text, allowed_special="all") and ids[-2] == 50256
    r = run_cli("tokenizer", "decode", out, *map(str, ids))
    assert r.returncode == 0 and r.stdout == text + "\n"
    r = run_cli("tokenizer", "decode", out, "50257")
    assert r.returncode == 2 and "outside the vocabulary" in r.stderr


def test_a_damaged_tokenizer_directory_is_one_user_error_not_a_tiktoken_panic(tmp_path):
    """tiktoken's Rust core panics (a page of pyo3 traceback) on a rank table that lacks single
    bytes or shares a rank; the loader checks the table first and names what is wrong."""
    save_tokenizer(byte_tokenizer(), str(tmp_path / "good"))
    lines = (tmp_path / "good" / "tokenizer.tiktoken").read_bytes().splitlines(keepends=True)
    damage = {
        "truncated": (b"".join(lines[:100]), "156 of the 256 single bytes have no rank (e.g. byte 100)"),
        "shared rank": (b"".join(lines[:-1]) + lines[-1].split()[0] + b" 0\n", "two tokens share a rank"),
        "garbage line": (b"".join(lines) + b"garbage line here\n", "line 257 is not '<base64 token> <rank>'"),
        "special clash": (b"".join(lines[:-1]) + b"YWI= 256\n" + lines[-1].split()[0] + b" 255\n",
                          "special token ids [256] are also ranks"),
    }
    for name, (ranks, message) in damage.items():
        directory = tmp_path / name
        shutil.copytree(tmp_path / "good", directory)
        (directory / "tokenizer.tiktoken").write_bytes(ranks)
        with pytest.raises(UserError, match=re.escape(message)):
            load_tokenizer(str(directory))
    (directory / "tokenizer.json").write_text("[]")
    with pytest.raises(UserError, match="tokenizer.json holds a list, not a mapping"):
        load_tokenizer(str(directory))
    assert load_tokenizer(str(tmp_path / "good")).encode("ok") == [111, 107]
