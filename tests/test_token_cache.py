"""Raw text is tokenized once: a second start reads the token cache and gets the same batches; a
damaged entry is rebuilt with a warning; the key follows the files, the tokenizer and the split."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxlm.config import load_config
from jaxlm.data import sources
from jaxlm.data.token_cache import cache_dir


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokens"


@pytest.fixture
def tokenized(monkeypatch) -> list[int]:
    """Counts tokenizations (text_streams calls) by sources.build_data."""
    calls, real = [], sources.text_streams
    monkeypatch.setattr(sources, "text_streams", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def batches(path, *overrides) -> list:
    cfg = load_config("configs/tiny.yaml", [f"data.path={path}", "data.seq_len=64", "train.global_batch=8",
                                            "data.val_fraction=0.05", *overrides])
    train, evals = sources.build_data(cfg)
    return [next(train) for _ in range(3)] + evals


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("inputs", "targets", "loss_mask"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))


@pytest.fixture
def corpus(tmp_path, shakespeare_path):
    """TinyShakespeare as 40 documents (so the split is by document)."""
    paragraphs = shakespeare_path.read_text(encoding="utf-8")[:200_000].split("\n\n")
    (tmp_path / "docs").mkdir()
    for i in range(40):
        (tmp_path / "docs" / f"{i:02d}.txt").write_text("\n\n".join(paragraphs[i::40]), encoding="utf-8")
    return tmp_path / "docs"


def test_second_build_reads_the_cache_and_yields_identical_batches(cache, tokenized, corpus):
    first = batches(corpus)
    assert len(tokenized) == 1 and len(os.listdir(cache)) == 1
    second = batches(corpus)
    assert len(tokenized) == 1  # read, not tokenized again
    assert_same(first, second)
    entry = cache / os.listdir(cache)[0]
    assert sorted(os.listdir(entry)) == ["meta.json", "train.npy", "train_starts.npy", "val.npy", "val_starts.npy"]
    assert json.loads((entry / "meta.json").read_text())["source"] == str(corpus)


DAMAGE = {
    "flipped byte": lambda e: _flip(e / "train.npy"),
    "truncated": lambda e: (e / "val.npy").write_bytes((e / "val.npy").read_bytes()[:-10]),
    "missing file": lambda e: (e / "train_starts.npy").unlink(),
    "garbage meta": lambda e: (e / "meta.json").write_text("{not json"),
}


def _flip(path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_entry_is_rebuilt_with_a_warning(cache, tokenized, corpus, capfd, damage):
    first = batches(corpus)
    DAMAGE[damage](cache / os.listdir(cache)[0])
    capfd.readouterr()
    again = batches(corpus)
    err = capfd.readouterr().err
    assert len(tokenized) == 2 and "jaxlm: warning: token cache entry" in err and "is damaged" in err, err
    assert_same(first, again)
    assert_same(first, batches(corpus))
    assert len(tokenized) == 2  # the rebuilt entry is read


def test_the_key_follows_files_tokenizer_split_and_field(cache, tokenized, corpus, tmp_path):
    batches(corpus)
    batches(corpus, "data.val_fraction=0.1")
    assert len(tokenized) == 2
    from jaxlm.tokenizer.tokenizer import byte_tokenizer, save_tokenizer

    save_tokenizer(byte_tokenizer(), str(tmp_path / "tok"))
    batches(corpus, f"data.tokenizer={tmp_path / 'tok'}")
    assert len(tokenized) == 2  # the same tokenizer content under another name
    doc = corpus / "07.txt"
    doc.write_text(doc.read_text(encoding="utf-8").replace("the", "THE"), encoding="utf-8")
    batches(corpus)
    assert len(tokenized) == 3
    assert len(os.listdir(cache)) == 3


def test_only_process_0_writes_and_the_others_read(cache, tokenized, corpus, monkeypatch):
    monkeypatch.setattr(sources.jax, "process_index", lambda: 1)
    first = batches(corpus)
    assert not cache.exists() or not os.listdir(cache)
    monkeypatch.setattr(sources.jax, "process_index", lambda: 0)
    batches(corpus)
    monkeypatch.setattr(sources.jax, "process_index", lambda: 1)
    assert_same(first, batches(corpus))
    assert len(tokenized) == 2


def test_an_unwritable_cache_warns_and_training_goes_on(tmp_path, tokenized, corpus, monkeypatch, capfd):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "file"))
    batches(corpus)
    assert "jaxlm: warning: cannot write the token cache" in capfd.readouterr().err
    monkeypatch.setenv("JAXLM_CACHE", "off")
    assert cache_dir() is None
    batches(corpus)
    assert len(tokenized) == 2
