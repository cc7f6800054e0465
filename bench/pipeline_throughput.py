"""Data pipeline tokens/s (windows and packed rows, one process) against what a train step eats.

Prepares TinyShakespeare (or --input) with the byte tokenizer into a temp directory, then times
BatchIterator for both row kinds at the config's batch shape, and one jaxlm train step of the
same config, in the same run. The pipeline must be far faster than the step. Usage:

    python bench/pipeline_throughput.py [--config configs/tiny.yaml] [--batches 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import time_jaxlm  # noqa: E402  (same timing as the throughput benchmark)
from data import bench_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    ap.add_argument("--input", default=bench_data("tinyshakespeare/input.txt", required=False),
                    help="a text file (default: $JAXLM_BENCH_DATA/tinyshakespeare/input.txt)")
    ap.add_argument("--batches", type=int, default=200)
    args = ap.parse_args()

    from jaxlm.config import load_config
    from jaxlm.data.pipeline import BatchIterator, row_dataset
    from jaxlm.data.prepare import prepare
    from jaxlm.data.sources import prepared_streams
    from jaxlm.tokenizer.tokenizer import load_tokenizer

    cfg = load_config(args.config, ["mesh.data=1"])
    T, B = cfg.data.seq_len, cfg.train.global_batch
    with tempfile.TemporaryDirectory() as tmp:
        prepare([args.input], "bytes", tmp, val_fraction=0.0)
        stream, _ = prepared_streams(tmp, load_tokenizer("bytes"))
        for packing in (False, True):
            it = BatchIterator(row_dataset(stream, T, packing, 0, "bench"), B, 0, 1)
            next(it)
            t = time.perf_counter()
            for _ in range(args.batches):
                next(it)
            rate = args.batches * B * T / (time.perf_counter() - t)
            print(f"pipeline ({'packed' if packing else 'windows'}): {rate:,.0f} tokens/s")

    step = time_jaxlm(cfg, steps=10, warmup=3)
    print(f"train step ({Path(args.config).name}): {step['tokens_per_s']:,.0f} tokens/s")

if __name__ == "__main__":
    main()
