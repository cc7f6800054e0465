"""BPE training speed: `python bench/bpe_train.py [--big] [--workers N]`.

Prints wall time (and the pre-tokenization / merge split) for
  corpus.en -> vocab 500            (target <= 0.2 s; the CS336 reference takes 0.38 s)
  TinyShakespeare -> vocab 10,000
  --big: a >= 100 MB synthetic corpus -> vocab 32,000, with peak RSS (target < 5 min, < 4 GB):
         shuffled copies of TinyShakespeare's lines plus the Python standard library's .py files,
         documents separated by <|endoftext|>.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sysconfig
import tempfile
import time
from pathlib import Path

from jaxlm.tokenizer.bpe import count_pretokens, merge_pretokens, train_bpe

import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import bench_data  # noqa: E402
EOT = "<|endoftext|>"


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024  # ru_maxrss is in KiB on Linux


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pre-tokenization workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(path: Path, vocab_size: int, workers: int | None, repeats: int) -> None:
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), cpu_seconds()
        vocab, merges = train_bpe(path, vocab_size, [EOT], workers=workers)
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, cpu_seconds() - c0)
    t0 = time.perf_counter()
    counts = count_pretokens(path, [EOT], workers=workers)
    t1 = time.perf_counter()
    vocab_list = [bytes([i]) for i in range(256)] + [EOT.encode()]
    merge_pretokens([list(t.encode()) for t in counts], list(counts.values()), vocab_list, vocab_size - 257)
    t2 = time.perf_counter()
    size = path.stat().st_size / 1e6
    print(f"{path.name:>24} {size:8.1f} MB -> vocab {vocab_size:>6}: {best:8.3f} s wall, {best_cpu:.3f} s CPU "
          f"(best of {repeats}); "
          f"pre-tokenize {t1 - t0:.3f} s ({len(counts):,} unique pre-tokens), merges {t2 - t1:.3f} s; "
          f"{len(merges)} merges; peak RSS {peak_rss_mb():,.0f} MB", flush=True)


def synthetic_corpus(path: Path, min_bytes: int = 100_000_000, seed: int = 0) -> None:
    rng = random.Random(seed)
    lines = bench_data("tinyshakespeare/input.txt").read_text().splitlines()
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    py = [p.read_bytes().decode("utf-8", errors="replace") for p in stdlib if "site-packages" not in p.parts]
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in py:
            written += f.write(doc + EOT)
        while written < min_bytes:
            rng.shuffle(lines)
            written += f.write("\n".join(lines) + "\n" + EOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big", action="store_true", help="also the >= 100 MB corpus to vocab 32,000")
    ap.add_argument("--workers", type=int, default=None, help="pre-tokenization processes (default: all cores)")
    args = ap.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    timed(bench_data("cs336_fixtures/corpus.en"), 500, args.workers, repeats=5)
    timed(bench_data("tinyshakespeare/input.txt"), 10_000, args.workers, repeats=1)
    if args.big:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "synthetic.txt"
            synthetic_corpus(path)
            t0, c0 = time.perf_counter(), cpu_seconds()
            vocab, merges = train_bpe(path, 32_000, [EOT], workers=args.workers)
            dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            print(f"{'synthetic':>24} {path.stat().st_size / 1e6:8.1f} MB -> vocab 32,000: {dt:8.1f} s wall, "
                  f"{cpu:.1f} s CPU; "
                  f"{len(merges)} merges; peak RSS {peak_rss_mb():,.0f} MB (this process or one worker)", flush=True)


if __name__ == "__main__":
    main()
