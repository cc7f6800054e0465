"""Data formats: one corpus written as text files, JSONL, parquet, gzip/zstd-compressed files and a
saved Hugging Face dataset gives the same documents, the same training batches and the same
prepared shards; bad records are one-line errors naming file and line."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from conftest import SHARED_DATA, run_cli

from jaxlm.config import load_config
from jaxlm.data import prepare as P
from jaxlm.data import shards as R
from jaxlm.data.corpus import expand_inputs, read_documents
from jaxlm.data.sources import build_data, data_fingerprint
from jaxlm.errors import UserError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")
FORMATS = ["txt_dir", "txt_gz_dir", "jsonl", "parquet", "jsonl_gz", "jsonl_zst", "hf_dataset"]


@pytest.fixture(scope="module")
def docs(shakespeare_path) -> list[str]:
    """Documents with newlines, quotes, backslashes, German and emoji: what JSON must escape."""
    paragraphs = [p for p in shakespeare_path.read_text(encoding="utf-8")[:40_000].split("\n\n") if p.strip()]
    german = (SHARED_DATA / "cs336_fixtures" / "german.txt").read_text(encoding="utf-8")
    return paragraphs + [german, 'He said "to be\\not" 👋🏽 世界\n\n', "last\tone\r\n"]


def jsonl_bytes(docs: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({"id": i, field: d}, ensure_ascii=i % 2 == 0) + "\n" for i, d in enumerate(docs)).encode()


def write(fmt: str, docs: list[str], root) -> str:
    """The corpus in format `fmt` under `root`; returns what data.path names."""
    if fmt in ("txt_dir", "txt_gz_dir"):
        (root / "docs").mkdir()
        for i, d in enumerate(docs):
            if fmt == "txt_dir":
                (root / "docs" / f"{i:04d}.txt").write_bytes(d.encode())
            else:
                (root / "docs" / f"{i:04d}.txt.gz").write_bytes(gzip.compress(d.encode()))
        return str(root / "docs")
    if fmt == "jsonl":
        (root / "c.jsonl").write_bytes(jsonl_bytes(docs))
        return str(root / "c.jsonl")
    if fmt == "jsonl_gz":
        (root / "c.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(docs)))
        return str(root / "c.jsonl.gz")
    if fmt == "jsonl_zst":
        (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(docs)))
        return str(root / "c.jsonl.zst")
    if fmt == "parquet":  # several row groups, another column first
        table = pa.table({"id": list(range(len(docs))), "text": docs})
        pq.write_table(table, root / "c.parquet", row_group_size=7)
        return str(root / "c.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"id": list(range(len(docs))), "text": docs}).save_to_disk(
        str(root / "ds"), num_shards=3)  # three Arrow files, read in the dataset's order
    return str(root / "ds")


@pytest.fixture(scope="module")
def written(docs, tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for fmt in FORMATS:
        (root / fmt).mkdir()
        out[fmt] = write(fmt, docs, root / fmt)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_same_documents(written, docs, fmt, monkeypatch):
    from jaxlm.data import formats

    monkeypatch.setattr(formats, "RECORD_BATCH", 5)  # parquet and Arrow rows: several batches
    assert read_documents(written[fmt]) == docs


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "txt_dir"])
def test_every_format_gives_the_same_training_batches(written, fmt):
    def batches(path: str):
        cfg = load_config("configs/tiny.yaml", [f"data.path={path}", "data.seq_len=64", "train.global_batch=8",
                                                "data.packing=true", "data.val_fraction=0.1"])
        train, evals = build_data(cfg)
        return [next(train) for _ in range(3)] + evals

    for a, b in zip(batches(written["txt_dir"]), batches(written[fmt]), strict=True):
        for name in ("inputs", "targets", "loss_mask", "segment_ids", "positions"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.mark.parametrize("fmt", ["jsonl_zst", "parquet", "hf_dataset", "txt_gz_dir"])
def test_prepare_of_every_format_writes_the_same_shards(written, tmp_path, fmt, monkeypatch):
    """Small tasks (so several are read here and handed on) give the shards of the text files."""
    monkeypatch.setattr(P, "_TASK_BYTES", 4096)

    def tokens(path: str, out: str) -> tuple[list, dict]:
        meta = P.prepare([path], "bytes", str(tmp_path / out), val_fraction=0.1)
        corpus = R.open_prepared(str(tmp_path / out))
        return [np.concatenate(corpus.split(s).shards).tolist() for s in R.SPLITS], meta["splits"]

    want, want_meta = tokens(written["txt_dir"], "want")
    got, got_meta = tokens(written[fmt], "got")
    assert got == want
    assert [m["n_documents"] for m in got_meta.values()] == [m["n_documents"] for m in want_meta.values()]


def test_jsonl_text_field_names_the_field(tmp_path, docs):
    (tmp_path / "body.jsonl").write_bytes(jsonl_bytes(docs[:5], field="body"))
    assert read_documents(str(tmp_path / "body.jsonl"), text_field="body") == docs[:5]
    cfg = load_config("configs/tiny.yaml", [f"data.path={tmp_path / 'body.jsonl'}", "data.text_field=body",
                                            "data.seq_len=16", "train.global_batch=8"])
    next(build_data(cfg)[0])  # trains from the field
    with pytest.raises(UserError, match="body.jsonl:1: the record has no string field 'text'"):
        read_documents(str(tmp_path / "body.jsonl"))


def test_blank_lines_and_empty_texts_are_skipped(tmp_path):
    (tmp_path / "e.jsonl").write_text('{"text": "a"}\n\n{"text": ""}\n   \n{"text": "b"}', encoding="utf-8")
    assert read_documents(str(tmp_path / "e.jsonl")) == ["a", "b"]


BAD_LINES = {
    "not JSON": ('{"text": oops}', "invalid JSON (Expecting value); expected one JSON object per line"),
    "no field": ('{"body": "x"}', "the record has no string field 'text'"),
    "not an object": ('["text", "x"]', "the record has no string field 'text'"),
    "not a string": ('{"text": 3}', "the record has no string field 'text'"),
}


@pytest.mark.parametrize("bad", sorted(BAD_LINES))
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_a_bad_jsonl_line_is_one_line_naming_file_and_line(tmp_path, bad, suffix):
    line, message = BAD_LINES[bad]
    data = b'{"text": "fine"}\n\n' + line.encode() + b'\n{"text": "after"}\n'
    compress = {".jsonl": bytes, ".jsonl.gz": gzip.compress, ".jsonl.zst": zstandard.ZstdCompressor().compress}
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(compress[suffix](data))
    with pytest.raises(UserError) as e:
        read_documents(str(path))
    assert str(e.value).startswith(f"{path}:3: {message}") and "\n" not in str(e.value)
    r = run_cli("prepare", str(path), "--tokenizer", "bytes", "-o", str(tmp_path / "out"), "--workers", "1")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"jaxlm prepare: error: {e.value}"], r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_line_numbers_count_across_the_blocks_read_at_a_time(tmp_path, monkeypatch, suffix):
    from jaxlm.data import formats

    monkeypatch.setattr(formats, "LINE_BLOCK", 1000)
    monkeypatch.setattr(P, "_TASK_BYTES", 1000)
    data = jsonl_bytes([f"document {i}" + "\n" * (i % 3) for i in range(2000)]) + b"{broken\n"
    path = tmp_path / f"long{suffix}"
    path.write_bytes(data if suffix == ".jsonl" else zstandard.ZstdCompressor().compress(data))
    for read in (lambda: read_documents(str(path)), lambda: P.prepare([str(path)], "bytes", str(tmp_path / "out"))):
        with pytest.raises(UserError, match=f"long{suffix}:2001: invalid JSON"):
            read()


def test_parquet_and_dataset_errors_name_the_column_and_row(tmp_path, monkeypatch):
    from jaxlm.data import formats

    monkeypatch.setattr(formats, "RECORD_BATCH", 2)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(UserError, match=r"a.parquet: no column 'text' \(it has body\); set data.text_field"):
        read_documents(str(tmp_path / "a.parquet"))
    pq.write_table(pa.table({"text": ["x"] * 5 + [None]}), tmp_path / "b.parquet")
    with pytest.raises(UserError, match=r"b.parquet: row 5 has no text \(null\) in column 'text'"):
        read_documents(str(tmp_path / "b.parquet"))  # rows count from 0, as datasets indexes them
    (tmp_path / "c.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="c.parquet: not a readable parquet file"):
        read_documents(str(tmp_path / "c.parquet"))
    (tmp_path / "d.txt.gz").write_bytes(gzip.compress(b"cut short")[:-6])
    with pytest.raises(UserError, match="d.txt.gz: cannot read it"):
        read_documents(str(tmp_path / "d.txt.gz"))


def test_a_saved_dataset_dict_asks_for_one_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a", "b"]})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match=f"is a saved DatasetDict with splits train, test; give one split's "
                                        f"directory, e.g. {tmp_path / 'dd' / 'train'}"):
        read_documents(str(tmp_path / "dd"))
    assert read_documents(str(tmp_path / "dd" / "train")) == ["a", "b"]


@pytest.mark.parametrize("fmt", ["parquet", "hf_dataset", "jsonl_zst"])
def test_data_fingerprint_of_each_format_follows_its_content(docs, tmp_path, fmt):
    from jaxlm.config import DataConfig

    path = write(fmt, docs, tmp_path)
    before = data_fingerprint(DataConfig(path=path))
    assert before == data_fingerprint(DataConfig(path=path))
    assert all(f.endswith((".parquet", ".arrow", ".zst")) for f in expand_inputs([path]))  # no state.json
    write_again = tmp_path / "again"
    write_again.mkdir()
    path2 = write(fmt, docs[:-1] + ["changed"], write_again)
    assert data_fingerprint(DataConfig(path=path2))[0]["sha256"] != before[0]["sha256"]
