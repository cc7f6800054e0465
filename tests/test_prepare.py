"""`jaxlm prepare`: shards hold exactly each document's encoding + EOT, the split follows the rule,
writes are atomic and resumable, and every kind of bad input is a one-line error, exit 2, with
nothing left behind."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import SHARED_DATA, run_cli

from jaxlm.data import prepare as P
from jaxlm.data import shards as R
from jaxlm.tokenizer.tokenizer import EOT, Tokenizer, byte_tokenizer, load_gpt2_files, load_tokenizer, save_tokenizer
from jaxlm.errors import UserError

FIX = SHARED_DATA / "cs336_fixtures"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    if not FIX.is_dir():
        pytest.skip(f"shared data not found at {FIX}")
    d = tmp_path_factory.mktemp("gpt2")
    save_tokenizer(load_gpt2_files(str(FIX / "gpt2_vocab.json"), str(FIX / "gpt2_merges.txt")), str(d))
    return str(d)


@pytest.fixture
def corpus(tmp_path):
    """Text files in nested directories plus a JSONL file; returns (root, documents in order)."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    docs = []
    for name in ["address.txt", "corpus.en", "german.txt"]:
        shutil.copy(FIX / name, root / name)
    shutil.copy(FIX / "tinystories_sample.txt", root / "sub" / "stories.txt")
    records = [{"text": f"Record {i}: " + "héllo wörld " * (i % 7), "id": i} for i in range(30)]
    records[5]["text"] = ""  # an empty record is skipped
    (root / "sub" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    for path in sorted([root / "address.txt", root / "corpus.en", root / "german.txt"]) + [root / "sub" / "records.jsonl", root / "sub" / "stories.txt"]:
        if path.suffix == ".jsonl":
            docs += [r["text"] for r in records]
        else:
            docs.append(path.read_text(encoding="utf-8"))
    return root, docs


def documents(split: R.PreparedSplit) -> list[np.ndarray]:
    """Cut the split's token stream into documents by the per-shard offsets."""
    starts, base = [], 0
    for shard, offsets in zip(split.shards, split.doc_offsets):
        starts += (base + offsets).tolist()
        base += len(shard)
    stream = np.concatenate(split.shards) if split.shards else np.zeros(0)
    return [stream[a:b] for a, b in zip(starts, starts[1:] + [len(stream)])]


def expected(tok, docs, split, f):
    return [tok.encode_ordinary(d) + [tok.eot_id] for i, d in enumerate(docs)
            if d and (split == "val") == P.in_val(i, f)]


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_hold_each_documents_encoding_followed_by_eot(corpus, gpt2_dir, tmp_path, workers, monkeypatch):
    monkeypatch.setattr(P, "_TASK_BYTES", 1500)  # many tasks: JSONL cut in ranges, both workers busy
    root, docs = corpus
    out = tmp_path / "out"
    meta = P.prepare([str(root)], gpt2_dir, str(out), val_fraction=0.2, shard_tokens=7000, workers=workers)
    tok = load_tokenizer(gpt2_dir)
    prepared = R.open_prepared(str(out))
    assert prepared.tokenizer_hash == tok.hash and prepared.vocab_size == 50257 and prepared.dtype == np.uint16
    for split in ["train", "val"]:
        s = prepared.split(split)
        got = [d.tolist() for d in documents(s)]
        assert got == expected(tok, docs, split, 0.2)
        assert s.n_documents == len(got) == meta["splits"][split]["n_documents"]
        assert s.n_tokens == sum(map(len, got)) and all(len(x) <= 7000 for x in s.shards)
    splits = [prepared.split("train"), prepared.split("val")]
    assert sum(len(s.shards) for s in splits) > 3 and any(any(s.starts_mid_document) for s in splits)
    R.check_tokenizer(prepared, tok)
    R.check_token_ids(prepared)


def test_two_workers_write_the_same_bytes_as_one(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "_TASK_BYTES", 1000)
    root, _ = corpus
    for w in (1, 2):
        P.prepare([str(root / "*.txt"), str(root / "sub")], "bytes", str(tmp_path / f"w{w}"), shard_tokens=2000, workers=w)
    files = sorted(os.listdir(tmp_path / "w1"))
    assert files == sorted(os.listdir(tmp_path / "w2")) and "train_00001.bin" in files
    for f in files:
        if f.endswith(".bin"):
            assert (tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes()


def test_val_split_takes_about_the_fraction_spread_evenly():
    picks = [i for i in range(1000) if P.in_val(i, 0.05)]
    assert len(picks) == 50 and picks[0] == 1 and all(b - a == 20 for a, b in zip(picks, picks[1:]))
    assert not P.in_val(0, 0.5) and P.in_val(1, 0.01) and not any(P.in_val(i, 0.0) for i in range(100))


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    big = Tokenizer("big", pat_str=byte_tokenizer().pattern, mergeable_ranks=byte_tokenizer().mergeable_ranks,
                    special_tokens={EOT: 70_000})
    save_tokenizer(big, str(tmp_path / "tok"))
    (tmp_path / "a.txt").write_text("hello")
    P.prepare([str(tmp_path / "a.txt")], str(tmp_path / "tok"), str(tmp_path / "out"), val_fraction=0)
    prepared = R.open_prepared(str(tmp_path / "out"))
    assert prepared.dtype == np.uint32
    assert prepared.split("train").shards[0].tolist() == [104, 101, 108, 108, 111, 70_000]


def test_rerun_skips_finished_work_and_resumes_an_interrupted_run(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    args = ([str(root)], "bytes")
    kw = dict(shard_tokens=20_000, workers=1)
    P.prepare(*args, str(tmp_path / "fresh"), **kw)
    same = lambda f: f not in ("metadata.json", "prepare.json")  # noqa: E731 - these name the output directory
    fresh = {f: (tmp_path / "fresh" / f).read_bytes() for f in os.listdir(tmp_path / "fresh") if same(f)}

    # A finished corpus is not touched again.
    before = {f: os.stat(tmp_path / "fresh" / f).st_mtime_ns for f in fresh}
    P.prepare(*args, str(tmp_path / "fresh"), **kw)
    assert before == {f: os.stat(tmp_path / "fresh" / f).st_mtime_ns for f in fresh}

    # Interrupt a run after its third shard: finished shards stay, nothing half-written looks complete.
    out = tmp_path / "out"
    finalize, calls = R.ShardWriter._finalize, []

    def interrupted(self):
        calls.append(self.split)
        if len(calls) == 3:
            raise KeyboardInterrupt
        finalize(self)

    monkeypatch.setattr(R.ShardWriter, "_finalize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        P.prepare(*args, str(out), **kw)
    monkeypatch.setattr(R.ShardWriter, "_finalize", finalize)
    names = os.listdir(out)
    assert "metadata.json" not in names and not [n for n in names if n.endswith(".tmp")]
    bins = [n for n in names if n.endswith(".bin")]
    assert len(bins) == 2 and all(n[:-4] + ".json" in names for n in bins)
    with pytest.raises(UserError, match="interrupted"):
        R.open_prepared(str(out))
    kept = {n: os.stat(out / n).st_mtime_ns for n in bins}
    (out / "train_00002.bin.999.tmp").write_bytes(b"junk from a killed run")

    P.prepare(*args, str(out), **kw)
    assert {n: os.stat(out / n).st_mtime_ns for n in bins} == kept  # resumed, not redone
    assert {f: (out / f).read_bytes() for f in os.listdir(out) if same(f)} == fresh


def cli_error(*args) -> str:
    r = run_cli(*args, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_bad_inputs_are_one_line_errors_that_leave_nothing_behind(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("some text " * 2000)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.txt").write_bytes(b"caf\xc3\xa9 ok\n" + b"x\xff\xfey")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "field.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    out = tmp_path / "out"
    cases = {
        str(tmp_path / "missing.txt"): "missing.txt does not exist",
        str(tmp_path / "nothing*.txt"): "matches no files",
        str(tmp_path / "empty.txt"): "empty.txt is empty",
        str(tmp_path / "bad.txt"): "bad.txt: invalid UTF-8 at byte offset 10",
        str(tmp_path / "bad.jsonl"): "bad.jsonl:2: invalid JSON",
        str(tmp_path / "field.jsonl"): "field.jsonl:2: the record has no string field 'text'",
    }
    for bad, message in cases.items():
        # the good file comes first and fills shards before the bad one is read
        line = cli_error("prepare", str(good), bad, "--tokenizer", "bytes", "-o", str(out), "--shard-tokens", "1000")
        assert message in line, line
        assert not out.exists(), (bad, os.listdir(out))
    assert "not known" in cli_error("prepare", str(good), "--tokenizer", "nope", "-o", str(out))


def test_tokenizer_mismatch_and_out_of_vocabulary_ids_are_refused(tmp_path, gpt2_dir):
    (tmp_path / "a.txt").write_text("hello world " * 100)
    out = str(tmp_path / "out")
    assert run_cli("prepare", str(tmp_path / "a.txt"), "--tokenizer", "bytes", "-o", out).returncode == 0
    assert "prepared with tokenizer 'bytes'" in cli_error("prepare", str(tmp_path / "a.txt"), "--tokenizer", gpt2_dir, "-o", out)
    assert "tokenized with 'bytes'" in cli_error("prepare", "--check", "-o", out, "--tokenizer", gpt2_dir)
    with pytest.raises(UserError, match="tokenized with 'bytes'"):
        R.check_tokenizer(R.open_prepared(out), load_tokenizer(gpt2_dir))
    assert run_cli("prepare", "--check", "-o", out, "--tokenizer", "bytes").returncode == 0
    shard = R.open_prepared(out).split("train").shards[0]
    data = np.array(shard)
    data[7] = 300  # >= 257, the byte tokenizer's vocabulary
    data.tofile(os.path.join(out, "train_00000.bin"))
    assert "token id 300 at position 7 is >= the vocabulary size 257" in cli_error("prepare", "--check", "-o", out)
    os.truncate(os.path.join(out, "train_00000.bin"), 10)
    assert f"not {len(data)} tokens long" in cli_error("prepare", "--check", "-o", out)


def test_an_error_after_shards_were_written_removes_this_runs_output(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "_TASK_BYTES", 1000)  # one task per file, so good shards land first
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text(f"document {i} " * 300)
    (tmp_path / "9.txt").write_bytes(b"\xff")
    written = []
    replace = R._replace
    monkeypatch.setattr(R, "_replace", lambda tmp, final, created: (written.append(final), replace(tmp, final, created)))
    with pytest.raises(UserError, match="9.txt: invalid UTF-8 at byte offset 0"):
        P.prepare([str(tmp_path / "*.txt")], "bytes", str(tmp_path / "out"), shard_tokens=1000, workers=2)
    assert any(w.endswith(".bin") for w in written) and not (tmp_path / "out").exists()


def test_streamed_large_files_give_the_same_shards(corpus, gpt2_dir, tmp_path, monkeypatch):
    root, _ = corpus
    P.prepare([str(root)], gpt2_dir, str(tmp_path / "whole"), workers=1)
    monkeypatch.setattr(P, "_STREAM_ABOVE", 100)  # every text file goes through encode_chunks
    monkeypatch.setattr(P, "_STREAM_BLOCK", 63)  # and is read 63 bytes at a time, cutting characters
    P.prepare([str(root)], gpt2_dir, str(tmp_path / "streamed"), workers=1)
    for f in os.listdir(tmp_path / "whole"):
        if f.endswith(".bin"):
            assert (tmp_path / "whole" / f).read_bytes() == (tmp_path / "streamed" / f).read_bytes()
    (tmp_path / "bad.txt").write_bytes("é".encode() * 300 + b"\xe9t\xc3")
    with pytest.raises(UserError, match="bad.txt: invalid UTF-8 at byte offset 600"):
        P.prepare([str(tmp_path / "bad.txt")], "bytes", str(tmp_path / "out"), workers=1)
    (tmp_path / "bad.txt").write_bytes("é".encode() * 300 + b"\xc3")
    with pytest.raises(UserError, match="bad.txt: invalid UTF-8 at byte offset 600"):
        P.prepare([str(tmp_path / "bad.txt")], "bytes", str(tmp_path / "out"), workers=1)
