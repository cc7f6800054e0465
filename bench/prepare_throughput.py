"""`jaxlm prepare` throughput: `python bench/prepare_throughput.py [--mb 50] [--tokenizer SPEC]`.

Builds two corpora in a temporary directory -- JSONL records of TinyShakespeare passages
(shuffled, about --mb MB) and the Python standard library's .py files as a directory of text
documents -- prepares each with 1 and 2 workers, and prints input MB/s (target >= 10 MB/s on 2
cores). The default tokenizer is GPT-2 built from $JAXLM_BENCH_DATA/cs336_fixtures (bench/data.py) (the same ranks
as tiktoken's gpt2), so tiktoken does the encoding. For reference it also prints tiktoken's
single-thread encode_ordinary speed on the same text.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sysconfig
import tempfile
import time
from pathlib import Path

from jaxlm.data.prepare import prepare
from jaxlm.tokenizer.tokenizer import load_gpt2_files, load_tokenizer, save_tokenizer

import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import bench_data  # noqa: E402


def jsonl_corpus(path: Path, mb: float, seed: int = 0) -> None:
    rng = random.Random(seed)
    text = bench_data("tinyshakespeare/input.txt").read_text()
    passages = [p for p in text.split("\n\n") if p.strip()]
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < mb * 1e6:
            rng.shuffle(passages)
            for i in range(0, len(passages), 8):  # records of about 8 passages (~1.5 KB)
                written += f.write(json.dumps({"text": "\n\n".join(passages[i: i + 8]), "n": i}) + "\n")


def stdlib_corpus(root: Path) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(stdlib.rglob("*.py")):
        if "site-packages" in p.parts:
            continue
        data = p.read_bytes().decode("utf-8", errors="replace")
        if data:
            dst = root / p.relative_to(stdlib)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(data, encoding="utf-8")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50, help="size of the JSONL corpus")
    ap.add_argument("--tokenizer", help="tokenizer spec (default: GPT-2 from $JAXLM_BENCH_DATA/cs336_fixtures)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = args.tokenizer
        if spec is None:
            spec = str(tmp / "gpt2")
            fix = bench_data("cs336_fixtures/gpt2_vocab.json").parent
            save_tokenizer(load_gpt2_files(str(fix / "gpt2_vocab.json"), str(fix / "gpt2_merges.txt")), spec)
        tok = load_tokenizer(spec)
        jsonl_corpus(tmp / "records.jsonl", args.mb)
        stdlib_corpus(tmp / "stdlib")
        sample = bench_data("tinyshakespeare/input.txt").read_text() * 4
        t0, c0 = time.perf_counter(), time.process_time()
        tok.encode_ordinary(sample)
        mb = len(sample.encode()) / 1e6
        print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; tokenizer {tok.name} ({tok.n_vocab} "
              f"tokens); tiktoken encode_ordinary, 1 thread: {mb / (time.perf_counter() - t0):.1f} MB/s, "
              f"{mb / (time.process_time() - c0):.1f} MB per CPU-s", flush=True)
        for name, inp in [("jsonl", tmp / "records.jsonl"), ("stdlib .py files", tmp / "stdlib")]:
            mb = size_mb(inp)
            for w in args.workers:
                out = tmp / f"out-{inp.name}-{w}"
                t0, c0 = time.perf_counter(), cpu_seconds()
                meta = prepare([str(inp)], spec, str(out), workers=w)
                dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
                n = sum(s["n_tokens"] for s in meta["splits"].values())
                docs = sum(s["n_documents"] for s in meta["splits"].values())
                print(f"{name:>17}: {mb:6.1f} MB, {docs:>7,} documents -> {n / 1e6:6.1f} M tokens, {w} worker(s): "
                      f"{dt:6.2f} s = {mb / dt:5.1f} MB/s; {cpu:6.2f} CPU s = {mb / cpu:5.1f} MB per CPU-s", flush=True)


if __name__ == "__main__":
    main()
